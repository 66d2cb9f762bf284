"""An independent float64 attention reference for the tests: it shares no code with attnlib's backends.

Visibility is re-derived here from the masks' public fields (lengths, alignment, window, tensors) with
explicit index arithmetic, not through ``materialize()`` or any backend's lowering; scores, softmax and
the LSE are computed with ``einsum`` per query row group, GQA by an explicit head map. So a bug in the
mask vocabulary or in the ``math`` backend cannot hide in both the backend under test and its oracle.
"""
from __future__ import annotations

import torch

from attnlib.masks import BlockDiagonal, Causal, DenseMask, KeyPadding

NEG_INF = float("-inf")


def _causal_keep(nq: int, nk: int, offset: int, window) -> torch.Tensor:
    """bool [nq, nk]: query ``i`` keeps key ``j`` iff ``i + offset - window < j <= i + offset``."""
    diag = torch.arange(nq).view(nq, 1) + offset
    j = torch.arange(nk).view(1, nk)
    keep = j <= diag
    if window is not None:
        keep = keep & (j > diag - window)
    return keep


def visibility(mask, batch: int, sq: int, sk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(keep, bias)``: keep bool broadcastable to ``[B, H, Sq, Sk]``; bias float64 or None."""
    if mask is None:
        return torch.ones(1, 1, sq, sk, dtype=torch.bool), None
    if isinstance(mask, Causal):
        offset = 0 if mask.align == "top_left" else sk - sq
        return _causal_keep(sq, sk, offset, mask.window)[None, None], None
    if isinstance(mask, BlockDiagonal):
        keep = torch.zeros(sq, sk, dtype=torch.bool)
        q0 = k0 = 0
        for nq, nk in zip(mask.q_seqlens, mask.kv_seqlens):
            if mask.causal:
                block = _causal_keep(nq, nk, nk - nq, mask.window)
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
    raise TypeError(f"reference64 does not know {type(mask).__name__}")


def attention64(q, k, v, mask=None, scale: float | None = None, *, packed: bool | None = None,
                dtype: torch.dtype = torch.float64):
    """``(out, lse)`` like ``attnlib.attention(..., return_lse=True)``, computed in ``dtype`` on the CPU.

    ``dtype=float64`` is the oracle; the inputs' own dtype gives the naive same-dtype implementation
    that the tolerance policy measures against. Rows with no visible key: output 0, LSE -inf.
    """
    packed = q.dim() == 3 if packed is None else packed
    q, k, v = (t.cpu().to(dtype) for t in (q, k, v))      # differentiable: pass fresh leaves for grads
    if packed:
        q, k, v = q[None], k[None], v[None]
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    head_map = torch.arange(hq) // (hq // hkv)              # query head h reads kv head h // ratio
    kh, vh = k[:, :, head_map], v[:, :, head_map]           # [B, Sk, Hq, D]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kh) * scale
    keep, bias = visibility(mask, b, sq, sk)
    if bias is not None:
        scores = scores + bias.to(dtype)
    keep = keep.expand(b, hq, sq, sk)
    scores = scores.masked_fill(~keep, NEG_INF)
    any_key = keep.any(dim=-1, keepdim=True)
    safe = torch.where(any_key, scores, torch.zeros_like(scores))
    top = safe.amax(dim=-1, keepdim=True)
    weights = torch.exp(safe - top) * keep
    total = weights.sum(dim=-1, keepdim=True)
    probs = torch.where(any_key, weights / torch.where(any_key, total, torch.ones_like(total)), 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vh)
    lse = torch.where(any_key, torch.log(total) + top, torch.full_like(total, NEG_INF))[..., 0]
    if packed:
        out, lse = out[0], lse[0]
    return out, lse
