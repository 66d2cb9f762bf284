"""``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``.

Lowering reads the call's plan (:mod:`attnlib.plan`):

- one tile over the call: ``is_causal=True`` only when the tile's diagonal offset is 0 (``Sq == Sk``, or
  top-left); a tile every query sees whole needs no mask at all; anything else gets the plan's bool grid
  (cached per plan and device). ``is_causal`` is never passed when it would mean top-left for a
  bottom-right mask.
- several tiles (packed sequences, chunked causal): the plan's runs of equal tiles become one batched call
  on views (CFG branches, equal-length packing, sliding frame windows through strided views); the other
  tiles are called one by one on views. No ``[T, T]`` mask. (Rows that see several key runs arrive as
  one call per layer from the dispatch.)
- ``KeyPadding``: a ``[B, 1, 1, Sk]`` bool mask (``[B, 1, Sq, Sk]`` with ``causal=True``). ``DenseMask``:
  passed through.
- ``BlockSparse`` with a host layout: query blocks (per head, for per-head layouts) are grouped by how many
  key blocks they see; each group gathers its visible key blocks and runs as batched calls of bounded
  memory (work in proportion to the visible blocks, no padding to the longest row, a mask only where partial
  blocks or causal attention cut the gathered keys); a device layout, a restricted plan, or a call inside
  ``torch.compile``, runs on its materialized bool mask (up to :data:`DENSE_CAP_BYTES`).
- ALiBi: an additive float bias from the plan (up to :data:`DENSE_CAP_BYTES`); softcap: not served (no score
  hook in SDPA): ``why_not`` says so and auto picks a backend that has one.
- GQA: query heads folded into the query axis when the mask allows it (no K/V copies), else
  ``enable_gqa=True`` (K/V expanded only on the LSE path, whose kernels lack it).
- Rows with no visible key: unmasked before the call (SDPA would give NaN), then zeroed by the dispatch.
- LSE: from the fused CPU flash kernel on CPU and the memory-efficient kernel on CUDA (one pass);
  a second pass over the scores only where neither applies.
- Fused backward (the ring, merged multi-tile results, LSE gradients): PyTorch's CPU flash-attention
  backward kernel from the saved output and LSE, for one-tile plans without softcap.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..caching import host_lru
from ..inputs import AttentionCall
from ..plan import Plan
from .base import Backend, Capabilities
from .common import NEG_INF, repeat_kv, run_tiles, tile_plan

#: the largest dense mask or bias (bytes) this backend materializes (ALiBi, device block layouts)
DENSE_CAP_BYTES = 1 << 30
#: many small tiles (packed short sequences) run padded in a few batched calls instead of one call per run:
#: from this many runs of tiles, each at most BUCKET_MAX_LEN queries and keys
BUCKET_MIN_RUNS = 16
BUCKET_MAX_LEN = 256
#: the dtypes PyTorch's CPU flash kernels take
_CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class SdpaBackend(Backend):
    name = "sdpa"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda", "mps", "xpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        features=frozenset({"causal", "window", "block_diagonal", "key_padding", "dense", "block_sparse", "alibi"}),
        isolates_sequences=True,      # packed sequences run on views of their own keys
    )
    implementation = f"torch {torch.__version__} scaled_dot_product_attention"

    def extra_reasons(self, call: AttentionCall) -> list[str]:
        need = _dense_bytes(call)
        if need > DENSE_CAP_BYTES:
            return [f"this call would materialize a {need / 2**30:.1f} GiB mask or ALiBi bias (cap: "
                    f"{DENSE_CAP_BYTES / 2**30:.0f} GiB, attnlib.backends.sdpa.DENSE_CAP_BYTES); use flex or triton"]
        return []

    def forward(self, call: AttentionCall):
        plan = call.plan
        if _host_blocks_apply(plan):
            return _block_sparse(call)
        if plan.single is not None or not plan.structured or not plan.tiles:
            return _dense(call.q, call.k, call.v, plan, call.scale, call.return_lse, call.empty_rows())
        if len(plan.runs()) >= BUCKET_MIN_RUNS and not plan.mods.any and _small_tiles(plan):
            return _bucketed(call)
        return run_tiles(call, lambda c: _dense(c.q, c.k, c.v, c.plan, c.scale, c.return_lse, c.empty_rows()))

    def backward(self, call: AttentionCall, out, lse, dout, dlse):
        plan = call.plan
        if (call.device.type != "cpu" or call.dtype not in _CPU_FLASH_DTYPES or plan.mods.softcap is not None
                or plan.single is None or plan.sparse is not None):
            return NotImplemented
        return _cpu_flash_backward(call, out, lse, dout, dlse)


def _dense_bytes(call: AttentionCall) -> int:
    """Bytes of the mask/bias this call would materialize beyond the structured ones (0 if none)."""
    plan = call.plan
    sq, sk = call.seqlen_q, call.seqlen_k
    need = 0
    if plan.mods.alibi is not None:
        b = call.batch if plan.mods.alibi.dim() == 2 else 1
        need += b * call.heads_q * sq * sk * call.q.element_size()
    if plan.sparse is not None and not _host_blocks_apply(plan):
        lay = plan.sparse.as4d()
        need += lay.shape[0] * lay.shape[1] * sq * sk
    return need


# ---------------------------------------------------------------------------------------------
# mask lowering, from the plan: (attn_mask, is_causal) for BHSD tensors
# ---------------------------------------------------------------------------------------------
@host_lru(256)
def _structured_lowering(plan: Plan, device: torch.device):
    """One tile, no tensors. Returns ``(attn_mask | None, is_causal)``."""
    tile = plan.single
    if plan.structure_full:
        return None, False        # e.g. one-token decode against a cache
    if tile.causal and tile.offset == 0 and tile.window is None:
        return None, True         # torch's is_causal is the top-left diagonal
    keep = plan.structure_grid(device)
    empty = plan.empty_rows_on(device)  # [Sq] from the plan's Python ints (no device read)
    if empty is not None:               # SDPA gives NaN for rows with no key: unmask them (zeroed after)
        keep = keep | empty.unsqueeze(-1)
    return keep, False


def _lower(plan: Plan, dtype: torch.dtype, device: torch.device, hq: int, empty):
    """Returns ``(attn_mask, is_causal)``; a float mask when the plan has an additive bias (ALiBi, a
    float DenseMask)."""
    bias = plan.bias(hq, device, dtype)
    if plan.structured and bias is None:
        return _structured_lowering(plan, device)
    if bias is None:      # a boolean mask: lowered once while the mask's tensors are unchanged
        if plan.key_valid is not None and not plan.full:    # [B, 1, 1, Sk]: additive, as SDPA would convert it
            return plan.tensor_derived(("sdpa", str(device), dtype, empty is None), lambda p: _float_mask(
                _keep(p, device, empty), dtype, device)), False
        return plan.tensor_derived(("sdpa", str(device), empty is None), lambda p: _keep(p, device, empty)), False
    keep = _keep(plan, device, empty)
    if keep is None:
        return bias, False
    return bias.masked_fill(~keep, NEG_INF), False


def _keep(plan: Plan, device: torch.device, empty):
    """bool mask broadcastable to ``[B, Hq, Sq, Sk]`` (None: every key visible), with the rows that see no
    key (``empty``: the plan's own) unmasked: SDPA would give NaN there; they are zeroed after."""
    keep = None if plan.full else plan.materialize(device)
    if keep is not None:
        keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
        if empty is not None:
            e = empty.reshape((1,) * (3 - empty.dim()) + tuple(empty.shape))
            keep = keep | e.unsqueeze(-1)
    return keep


# ---------------------------------------------------------------------------------------------
# calls
# ---------------------------------------------------------------------------------------------
def _dense(q, k, v, plan: Plan, scale: float, return_lse: bool, empty):
    """BSHD in, ``(out BSHD, lse [B,H,Sq] | None)`` out, for a plan with one tile over the call."""
    b, sq, hq, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if sk == 0 or sq == 0 or not plan.tiles:
        out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
        lse = torch.full((b, hq, sq), NEG_INF, device=q.device) if return_lse else None
        return out, lse
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    attn_mask, is_causal = _lower(plan, q.dtype, q.device, hq, empty)
    # GQA: when the mask does not depend on the query position or head, fold each kv group's query heads
    # into the query axis ([B, Hkv, ratio*Sq, D]); no K/V copies, and decode becomes one longer query block.
    fold = hq != hkv and not is_causal and (attn_mask is None or (
        attn_mask.shape[-2] == 1 and (attn_mask.dim() < 3 or attn_mask.shape[-3] == 1)))
    if fold:
        qh = qh.reshape(b, hkv, (hq // hkv) * sq, qh.shape[-1])
    if return_lse:
        out, lse = _sdpa_with_lse(qh, kh, vh, attn_mask, is_causal, scale)
    else:
        gqa = {"enable_gqa": True} if qh.shape[1] != hkv else {}
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, is_causal=is_causal, scale=scale, **gqa)
        lse = None
    if fold:
        out = out.reshape(b, hq, sq, out.shape[-1])
        lse = lse.reshape(b, hq, sq) if lse is not None else None
    return out.transpose(1, 2), lse


def _float_mask(attn_mask, dtype, device):
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype, device=device).masked_fill(~attn_mask, NEG_INF)


def _sdpa_with_lse(qh, kh, vh, attn_mask, is_causal: bool, scale: float):
    """One fused pass returning (out, lse) where torch offers a kernel for it; else a second pass."""
    ratio = qh.shape[1] // kh.shape[1]
    kx, vx = repeat_kv(kh, ratio, head_dim=1), repeat_kv(vh, ratio, head_dim=1)
    float_mask = _float_mask(attn_mask, qh.dtype, qh.device)
    if qh.device.type == "cpu":
        d, dv = qh.shape[-1], vh.shape[-1]
        qp, kp, vp = qh, kx, vx
        if dv < d:    # the fused kernel wants one head size: zero columns change no score and no output
            vp = F.pad(vx, (0, d - dv))
        elif d < dv:
            qp, kp = F.pad(qh, (0, dv - d)), F.pad(kx, (0, dv - d))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qp, kp, vp, 0.0, is_causal, attn_mask=float_mask, scale=scale)
        return out[..., :dv], lse.to(_lse_dtype(qh))
    if qh.device.type == "cuda" and qh.dtype != torch.float64:
        try:
            bias = None if float_mask is None else float_mask.expand(qh.shape[0], qh.shape[1], qh.shape[2], kx.shape[2])
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                qh, kx, vx, bias, True, 0.0, is_causal, scale=scale)[:2]
            return out, lse[..., : qh.shape[2]].float()
        except RuntimeError:
            pass  # kernel constraints not met: exact second pass below
    out = F.scaled_dot_product_attention(qh, kx, vx, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    with torch.no_grad():
        cd = _lse_dtype(qh)
        scores = torch.matmul(qh.to(cd), kx.to(cd).transpose(-1, -2)) * scale
        if is_causal:
            sq, sk = scores.shape[-2:]
            scores = scores.masked_fill(~torch.ones(sq, sk, dtype=torch.bool, device=qh.device).tril(), NEG_INF)
        if float_mask is not None:
            scores = scores + float_mask.to(cd)
        lse = torch.logsumexp(scores, dim=-1)
    return out, lse


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (their LSE merges and rescales at full precision)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _host_blocks_apply(plan: Plan) -> bool:
    """A block layout whose host index (read when the mask was built) lists this call's own blocks, and no
    ALiBi bias (the gathered blocks lose the key positions it needs); eager only: grouping query blocks by
    count reads that index on the host, which a compiled graph cannot."""
    sp = plan.sparse
    return (sp is not None and sp.host is not None and sp.covers(plan.seqlen_q, plan.seqlen_k)
            and plan.mods.alibi is None and not torch.compiler.is_compiling())


def _block_sparse(call: AttentionCall):
    """A host block layout: each query block attends to its gathered visible key blocks. Query blocks (per
    head, for per-head layouts) are grouped by how many key blocks they see, and each group runs as batched
    calls of bounded size: work and memory follow the visible blocks, with no padding to the longest row
    and no mask where every gathered key is visible."""
    q, k, v, plan = call.q, call.k, call.v, call.plan
    lay = plan.sparse
    idx, _, _, counts = lay.host
    b, sq, hq, d = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    bq, bk = lay.bq, lay.bk
    nq, nk = -(-sq // bq), -(-sk // bk)
    dev = q.device
    lead = tuple(lay.as4d().shape[:2])                                     # (1 or B, 1 or Hq)
    shared = lead == (1, 1)
    qp = _pad_blocks(q, nq * bq)
    kp, vp = _pad_blocks(k, nk * bk), _pad_blocks(v, nk * bk)
    if shared:   # a unit is one query block with all its heads; the batch rides along
        qs = qp.reshape(b, nq, bq, hq, d)
        ks, vs = kp.reshape(b, nk, bk, hkv, d), vp.reshape(b, nk, bk, hkv, dv)
        heads = (hq, hkv)
    else:        # a unit is one (batch, head, query block); keys of its kv head
        qs = qp.permute(0, 2, 1, 3).reshape(1, b * hq * nq, bq, 1, d)
        ks = kp.permute(0, 2, 1, 3).reshape(1, b * hkv * nk, bk, 1, d)
        vs = vp.permute(0, 2, 1, 3).reshape(1, b * hkv * nk, bk, 1, dv)
        heads = (1, 1)
    bb = qs.shape[0]
    out = q.new_zeros(bb, qs.shape[1], bq, heads[0], dv)                  # units that see nothing stay 0
    lse = torch.full((bb, qs.shape[1], heads[0], bq), NEG_INF, dtype=_lse_dtype(q), device=dev) \
        if call.return_lse else None
    lo, hi = plan.runs_table_on(dev)
    lo = F.pad(lo[0], (0, nq * bq - sq), value=0).view(nq, bq)
    hi = F.pad(hi[0], (0, nq * bq - sq), value=-1).view(nq, bq)
    structure_full = plan.structure_full and sk == nk * bk
    per_key = bb * bk * heads[1] * (d + dv) * k.element_size()
    for c, units, rows, blocks, first in _units(idx, counts, lead, b, hq, hkv, nq, nk, str(dev)):
        step = max(1, _GATHER_BYTES // (c * per_key))
        for s0 in range(0, units.shape[0], step):
            u, r = units[s0:s0 + step], rows[s0:s0 + step].reshape(-1)   # [U] units, [U * c] key block rows
            n = u.shape[0]
            # consecutive units (e.g. every query block sees as many key blocks): views, not copies
            where = u if first is None else slice(first + s0, first + s0 + n)
            qg = (qs.index_select(1, u) if first is None else qs[:, where]).reshape(bb * n, bq, heads[0], d)
            qg = qg.transpose(1, 2)
            kg = ks.index_select(1, r).reshape(bb * n, c * bk, heads[1], d).transpose(1, 2)
            vg = vs.index_select(1, r).reshape(bb * n, c * bk, heads[1], dv).transpose(1, 2)
            mask = None
            if not structure_full:
                qblock = u % nq
                key = (blocks[s0:s0 + step, :, None] * bk + torch.arange(bk, device=dev)).reshape(n, 1, c * bk)
                keep = (key < sk) & (key >= lo[qblock][..., None]) & (key <= hi[qblock][..., None])  # [U, bq, c*bk]
                keep = keep | ~keep.any(-1, keepdim=True)      # rows with no key: unmasked (no NaN), zeroed after
                mask = keep[None].expand(bb, n, bq, c * bk).reshape(bb * n, 1, bq, c * bk)
            o, l = _sdpa_maybe_lse(qg, kg, vg, mask, call.scale, call.return_lse)
            out[:, where] = o.transpose(1, 2).reshape(bb, n, bq, heads[0], dv)      # SDPA's output is BSHD in memory
            if l is not None:
                lse[:, where] = l.reshape(bb, n, heads[0], bq)
    if shared:
        out = out.reshape(b, nq * bq, hq, dv)[:, :sq]
        lse = None if lse is None else lse.permute(0, 2, 1, 3).reshape(b, hq, nq * bq)[..., :sq]
    else:
        out = out.reshape(b, hq, nq * bq, dv)[:, :, :sq].transpose(1, 2)
        lse = None if lse is None else lse.reshape(b, hq, nq * bq)[..., :sq]
    return out, lse


#: the most bytes of gathered keys and values one batched call of the block-sparse path holds: below glibc's
#: largest mmap threshold (32 MiB), so the buffers are reused, not page-faulted in per call (measured on CPU:
#: 64 MiB cost 1.3-1.4x the time of 16-24 MiB at 4k tokens and 10-25 % density)
_GATHER_BYTES = 24 << 20


def _pad_blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    """BSHD ``x`` with its sequence zero-padded to ``n`` (itself when it has ``n`` already)."""
    return x if x.shape[1] == n else F.pad(x, (0, 0, 0, 0, 0, n - x.shape[1]))


def _small_tiles(plan: Plan) -> bool:
    return all(t.q_len <= BUCKET_MAX_LEN and t.k_len <= BUCKET_MAX_LEN for t in plan.tiles)


def _bucket_len(n: int) -> int:
    """Tiles padded to a multiple of 8 (16 past 64, 32 past 128): little padding, few buckets."""
    step = 8 if n <= 64 else (16 if n <= 128 else 32)
    return max(step, -(-n // step) * step)


def _buckets(plan: Plan, device: torch.device):
    """Per length bucket ``(Lq, Lk)``: the tiles padded to it -- query and key token indices (padding points at
    token 0), the bool mask ``[n, 1, Lq, Lk]`` of what each padded query row sees (each tile's own rule;
    padded keys hidden; padded rows, and rows that see nothing, unmasked to one key so SDPA gives no NaN),
    and which padded rows carry a result to which token. Host ints only; cached on the plan per device."""
    key = ("buckets", str(device))
    got = plan._cache.get(key)
    if got is not None:
        return got
    groups: dict = {}
    for t in plan.tiles:
        groups.setdefault((_bucket_len(t.q_len), _bucket_len(t.k_len)), []).append(t)
    out = []
    for (lq, lk), tiles in groups.items():
        n = len(tiles)
        qi = torch.zeros(n, lq, dtype=torch.int64)
        ki = torch.zeros(n, lk, dtype=torch.int64)
        keep = torch.zeros(n, lq, lk, dtype=torch.bool)
        rows = torch.zeros(n, lq, dtype=torch.bool)
        for m, t in enumerate(tiles):
            qi[m, :t.q_len] = torch.arange(t.q_start, t.q_start + t.q_len)
            ki[m, :t.k_len] = torch.arange(t.k_start, t.k_start + t.k_len)
            local = tile_plan(t).structure_grid()                             # [q_len, k_len]
            keep[m, :t.q_len, :t.k_len] = local
            rows[m, :t.q_len] = local.any(-1)
        keep[..., 0] |= ~rows                              # rows that see nothing: one key, result dropped
        sel = rows.reshape(-1).nonzero().squeeze(1)        # host tensors: no device sync
        out.append((qi.reshape(-1).to(device), ki.reshape(-1).to(device), keep[:, None].to(device),
                    sel.to(device), qi.reshape(-1).index_select(0, sel).to(device), n, lq, lk))
    got = plan._cache[key] = tuple(out)
    return got


def _bucketed(call: AttentionCall):
    """Many small tiles: gathered into a few padded batches (one per length bucket), one SDPA call each,
    scattered back. Rows in no tile stay 0 / -inf."""
    q, k, v = call.q[0], call.k[0], call.v[0]
    hq, dv = call.heads_q, call.head_dim_v
    out = q.new_zeros(call.seqlen_q, hq, dv)
    lse = torch.full((hq, call.seqlen_q), NEG_INF, device=q.device) if call.return_lse else None
    for qi, ki, keep, sel, dest, n, lq, lk in _buckets(call.plan, q.device):
        qb = q.index_select(0, qi).view(n, lq, hq, -1).transpose(1, 2)
        kb = k.index_select(0, ki).view(n, lk, k.shape[1], -1).transpose(1, 2)
        vb = v.index_select(0, ki).view(n, lk, v.shape[1], -1).transpose(1, 2)
        o, l = _sdpa_maybe_lse(qb, kb, vb, keep, call.scale, call.return_lse)
        o = o.transpose(1, 2).reshape(n * lq, hq, dv)
        out = out.index_copy(0, dest, o.index_select(0, sel))
        if lse is not None:
            lse = lse.index_copy(1, dest, l.transpose(0, 1).reshape(hq, n * lq).index_select(1, sel))
    return out.unsqueeze(0), (lse.unsqueeze(0) if lse is not None else None)


@host_lru(64)
def _units(idx: torch.Tensor, counts: tuple, lead: tuple, b: int, hq: int, hkv: int, nq: int, nk: int,
           device: str):
    """A host layout's units grouped by how many key blocks they see: ``[(c, units [U], rows [U, c],
    blocks [U, c], first), ...]`` for each count ``c > 0``, on ``device``. A unit is a query block (a layout
    shared by batch and heads) or a flat ``(batch, head, query block)``; ``rows`` index the gathered key tensor
    (the block, or the block of the unit's kv head), ``blocks`` are the key block numbers; ``first``: the
    first unit when the group's units are consecutive, else None. ``lead``: the layout's ``(batch, heads)``
    dims (each 1 or full); ``counts``: the layout's flat per-query-block counts (Python ints: no tensor is
    read here)."""
    if lead != (1, 1) and lead != (b, hq):               # broadcast over the batch or the heads: one row per (b, h)
        idx = idx.view(*lead, nq, -1).expand(b, hq, nq, idx.shape[-1]).reshape(b * hq, nq, -1)
        rows_of = [(i if lead[0] > 1 else 0) * lead[1] + (h if lead[1] > 1 else 0) for i in range(b) for h in range(hq)]
        counts = tuple(counts[r * nq + j] for r in rows_of for j in range(nq))
    flat_idx = idx.reshape(len(counts), -1)
    by_count: dict = {}
    for unit, c in enumerate(counts):
        if c:
            by_count.setdefault(c, []).append(unit)
    out = []
    for c in sorted(by_count):
        listed = by_count[c]
        units = torch.tensor(listed, dtype=torch.int64)
        blocks = flat_idx[units, :c]
        rows = blocks
        if lead != (1, 1):                               # (b, h, i) -> rows of (b, h // group): (b*hkv + h//g)*nk + j
            bh = units // nq
            rows = ((bh // hq) * hkv + (bh % hq) // (hq // hkv))[:, None] * nk + blocks
        first = listed[0] if listed[-1] - listed[0] == len(listed) - 1 else None
        out.append((c, units.to(device), rows.contiguous().to(device), blocks.contiguous().to(device), first))
    return out


def _sdpa_maybe_lse(qh, kh, vh, mask, scale, return_lse):
    if return_lse:
        return _sdpa_with_lse(qh, kh, vh, mask, False, scale)
    gqa = {"enable_gqa": True} if qh.shape[1] != kh.shape[1] else {}
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, **gqa), None


def _cpu_flash_backward(call: AttentionCall, out, lse, dout, dlse):
    """PyTorch's CPU flash-attention backward from the saved (final) output and LSE. A gradient through
    the LSE joins in exactly by one extra value column: with ``V' = [V, 1]``, ``O' = [O, 0]`` and
    ``dO' = [dO, dlse]`` the kernel's ``dS = P (dO' V'^T - rowsum(dO' O'))`` is ``P (dP + dlse - rowsum(dO O))``."""
    q, k, v, plan = call.q, call.k, call.v, call.plan
    b, sq, hq, d = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is not None:
        ones = torch.ones(b, sk, hkv, 1, dtype=v.dtype, device=v.device)
        v = torch.cat([v, ones], -1)
        out = torch.cat([out, torch.zeros_like(out[..., :1])], -1)
        dout = torch.cat([dout, torch.nan_to_num(dlse.float(), nan=0.0, posinf=0.0, neginf=0.0)
                          .transpose(1, 2).unsqueeze(-1).to(dout.dtype)], -1)
    w = v.shape[-1]
    qp, kp = (F.pad(q, (0, w - d)), F.pad(k, (0, w - d))) if w > d else (q, k)
    vp, outp, doutp = (F.pad(v, (0, d - w)), F.pad(out, (0, d - w)), F.pad(dout, (0, d - w))) if d > w else (v, out, dout)
    kx = kp.repeat_interleave(g, dim=2) if g > 1 else kp
    vx = vp.repeat_interleave(g, dim=2) if g > 1 else vp
    attn_mask, _ = _lower(plan, q.dtype, q.device, hq, None)
    attn_mask = _float_mask(attn_mask, q.dtype, q.device)
    if attn_mask is None and not plan.structure_full:
        attn_mask = _float_mask(plan.structure_grid(q.device), q.dtype, q.device)
    if attn_mask is not None:
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)).expand(b, hq, sq, sk)
    safe = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf"))).float()   # unseen rows: P = 0
    gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        doutp.transpose(1, 2), qp.transpose(1, 2), kx.transpose(1, 2), vx.transpose(1, 2), outp.transpose(1, 2),
        safe.contiguous(), 0.0, False, attn_mask=attn_mask, scale=call.scale)
    gq, gk, gv = gq.transpose(1, 2)[..., :d], gk.transpose(1, 2)[..., :d], gv.transpose(1, 2)[..., :dv]
    if g > 1:
        gk = gk.reshape(b, sk, hkv, g, d).sum(3)
        gv = gv.reshape(b, sk, hkv, g, dv).sum(3)
    return gq, gk, gv
