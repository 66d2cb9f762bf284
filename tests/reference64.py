"""An independent float64 attention reference for the tests: it shares no code with attnlib's backends.

Visibility is re-derived here from the masks' public fields (lengths, alignment, window, chunks, sinks,
block layouts, tensors) with explicit index arithmetic, not through ``materialize()``, the plan or any
backend's lowering; scores, the score modifiers (softcap, ALiBi, sinks), softmax and the LSE are
computed with ``einsum``, GQA by an explicit head map, paged keys by reading ``block_table`` entry by
entry. So a bug in the mask vocabulary, the plan or the ``math`` backend cannot hide in both the backend
under test and its oracle.
"""
from __future__ import annotations

import torch

from attnlib.masks import BlockDiagonal, BlockSparse, Causal, DenseMask, KeyPadding

NEG_INF = float("-inf")


def _chunk_of(positions: torch.Tensor, chunk, sk: int) -> torch.Tensor:
    """Chunk index of each key position (chunks from key 0: an int length or a tuple of lengths)."""
    if chunk is None:
        return positions
    if isinstance(chunk, int):
        return torch.div(positions, chunk, rounding_mode="floor")
    bounds = torch.tensor([0] + [sum(chunk[:i + 1]) for i in range(len(chunk))])
    return torch.bucketize(positions, bounds[1:], right=True)


def _causal_keep(nq: int, nk: int, offset: int, window, chunk=None, sink: int = 0) -> torch.Tensor:
    """bool [nq, nk]: query ``i`` at position ``p = i + offset`` keeps key ``j`` iff ``chunk(j) <= chunk(p)``
    and (``chunk(j) > chunk(p) - window`` or ``j < sink``); no chunk: every position its own chunk."""
    p = torch.arange(nq).view(nq, 1) + offset
    j = torch.arange(nk).view(1, nk)
    if chunk is None:
        cp, cj = p, j
    else:
        cp = torch.where(p >= 0, _chunk_of(p.clamp(min=0), chunk, nk), torch.full_like(p, -1))
        cj = _chunk_of(j, chunk, nk)
    keep = (cj <= cp) & (p >= 0 if chunk is not None else torch.ones_like(cj <= cp))
    if window is not None:
        keep = keep & ((cj > cp - window) | (j < sink))
    return keep


def visibility(mask, batch: int, sq: int, sk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(keep, bias)``: keep bool broadcastable to ``[B, H, Sq, Sk]``; bias float64 or None."""
    if mask is None:
        return torch.ones(1, 1, sq, sk, dtype=torch.bool), None
    if isinstance(mask, Causal):
        offset = 0 if mask.align == "top_left" else sk - sq
        return _causal_keep(sq, sk, offset, mask.window, mask.chunk, mask.sink)[None, None], None
    if isinstance(mask, BlockDiagonal):
        keep = torch.zeros(sq, sk, dtype=torch.bool)
        q0 = k0 = 0
        for nq, nk in zip(mask.q_seqlens, mask.kv_seqlens):
            if mask.causal:
                block = _causal_keep(nq, nk, nk - nq, mask.window, mask.chunk, mask.sink)
            else:
                block = torch.ones(nq, nk, dtype=torch.bool)
            keep[q0:q0 + nq, k0:k0 + nk] = block
            q0, k0 = q0 + nq, k0 + nk
        assert (q0, k0) == (sq, sk), "BlockDiagonal lengths must cover the call"
        return keep[None, None], None
    if isinstance(mask, KeyPadding):
        keep = mask.valid.detach().cpu()[:, None, None, :]
        if mask.causal:
            keep = keep & _causal_keep(sq, sk, sk - sq, mask.window)[None, None]
        return keep, None
    if isinstance(mask, DenseMask):
        m = mask.mask.detach().cpu()
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
        if m.dtype == torch.bool:
            return m, None
        bias = m.to(torch.float64)
        return bias > NEG_INF, bias
    if isinstance(mask, BlockSparse):
        lay = mask.layout.detach().cpu()
        lay = lay.reshape((1,) * (4 - lay.dim()) + tuple(lay.shape))
        bq, bk = mask.block_size
        keep = torch.zeros(lay.shape[0], lay.shape[1], sq, sk, dtype=torch.bool)
        for i in range(sq):
            for j in range(sk):
                keep[:, :, i, j] = lay[:, :, i // bq, j // bk]
        if mask.causal:
            keep = keep & _causal_keep(sq, sk, sk - sq, None)[None, None]
        return keep, None
    raise TypeError(f"reference64 does not know {type(mask).__name__}")


def _aligned(mask, sq: int, sk: int) -> torch.Tensor:
    """int64 [Sq]: the key index each query is aligned with (ALiBi's ``i + off``): per block for
    ``BlockDiagonal`` (block-local ``i + Sk_b - Sq_b``, shifted to global keys), ``i`` top-left, else
    ``i + Sk - Sq``."""
    if isinstance(mask, BlockDiagonal):
        out, q0, k0 = [], 0, 0
        for nq, nk in zip(mask.q_seqlens, mask.kv_seqlens):
            out.append(torch.arange(nq) + (nk - nq) + k0)
            q0, k0 = q0 + nq, k0 + nk
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)
    if isinstance(mask, Causal) and mask.align == "top_left":
        return torch.arange(sq)
    return torch.arange(sq) + (sk - sq)


def paged_keys(pool: torch.Tensor, block_table: torch.Tensor, kv_seqlens) -> torch.Tensor:
    """The logical keys ``[Tk, H, D]`` of a page pool ``[P, page, H, D]``, read entry by entry."""
    page = pool.shape[1]
    rows = []
    for r, n in enumerate(kv_seqlens):
        for j in range(n):
            rows.append(pool[int(block_table[r, j // page]), j % page])
    return torch.stack(rows) if rows else pool.new_zeros(0, *pool.shape[2:])


def attention64(q, k, v, mask=None, scale: float | None = None, *, packed: bool | None = None,
                dtype: torch.dtype = torch.float64, softcap=None, alibi_slopes=None, sinks=None, block_table=None):
    """``(out, lse)`` like ``attnlib.attention(..., return_lse=True)``, computed in ``dtype`` on the CPU.

    ``dtype=float64`` is the oracle; the inputs' own dtype gives the naive same-dtype implementation
    that the tolerance policy measures against. Rows with no visible key: output 0, LSE -inf (with
    sinks: LSE = the sink). Keys a row cannot see never reach it (they are dropped, not weighted 0).
    """
    if block_table is not None:
        k = paged_keys(k, block_table.cpu(), mask.kv_seqlens)
        v = paged_keys(v, block_table.cpu(), mask.kv_seqlens)
    packed = q.dim() == 3 if packed is None else packed
    q, k, v = (t.cpu().to(dtype) for t in (q, k, v))      # differentiable: pass fresh leaves for grads
    if packed:
        q, k, v = q[None], k[None], v[None]
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    head_map = torch.arange(hq) // (hq // hkv)              # query head h reads kv head h // ratio
    kh, vh = k[:, :, head_map], v[:, :, head_map]           # [B, Sk, Hq, D]
    keep, bias = visibility(mask, b, sq, sk)
    keep = keep.expand(b, hq, sq, sk)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kh) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.detach().cpu().to(dtype)
        slopes = slopes.view(1, hq) if slopes.dim() == 1 else slopes
        dist = (_aligned(mask, sq, sk)[:, None] - torch.arange(sk)[None, :]).abs().to(dtype)
        scores = scores - slopes[:, :, None, None] * dist
    if bias is not None:
        scores = scores + torch.where(keep, bias.to(dtype).expand(b, hq, sq, sk), torch.zeros((), dtype=dtype))
    scores = torch.where(keep, scores, torch.full((), NEG_INF, dtype=dtype))
    sink = None
    if sinks is not None:
        sink = sinks.cpu().to(dtype).view(1, hq, 1, 1).expand(b, hq, sq, 1)
    any_key = keep.any(dim=-1, keepdim=True)
    safe = torch.where(keep, scores, torch.zeros((), dtype=dtype))
    top = torch.where(any_key, safe.masked_fill(~keep, float("-inf")).amax(dim=-1, keepdim=True),
                      torch.zeros((), dtype=dtype))
    if sink is not None:
        top = torch.maximum(top, sink).detach()
    weights = torch.where(keep, torch.exp(safe - top), torch.zeros((), dtype=dtype))
    total = weights.sum(dim=-1, keepdim=True)
    if sink is not None:
        total = total + torch.exp(sink - top)
    probs = torch.where(total > 0, weights / torch.where(total > 0, total, torch.ones_like(total)), 0.0)
    # a hidden value never reaches a row: non-finite values are zeroed, then the rows that see one marked
    v_ok = torch.isfinite(vh).all(-1).permute(0, 2, 1)                      # [B, Hq, Sk]
    out = torch.einsum("bhqk,bkhd->bqhd", probs, torch.where(torch.isfinite(vh), vh, torch.zeros((), dtype=dtype)))
    sees_bad = (keep & ~v_ok[:, :, None, :]).any(-1).permute(0, 2, 1)       # [B, Sq, Hq]
    out = out.masked_fill(sees_bad[..., None], float("nan"))
    lse = torch.where(total > 0, torch.log(total) + top, torch.full_like(total, NEG_INF))[..., 0]
    if packed:
        out, lse = out[0], lse[0]
    return out, lse
