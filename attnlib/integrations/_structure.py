"""Recover an attnlib mask from a dense mask a host library hands us.

Host libraries (transformers' 4-D masks, 2-D padding masks in DiT code) describe attention with dense
tensors. Running those through ``DenseMask`` is exact but throws away everything a fast kernel needs,
so :func:`plan_from_dense` looks for the structure behind the tensor, in this order, and verifies it
exactly (nothing here is a heuristic that could change a result):

1. every key visible                           -> ``None``
2. the same causal diagonal in every batch row -> ``Causal()`` / ``Causal(window=W)`` /
                                                  ``Causal(align="top_left")``
3. every query of a batch row sees the same keys -> ``KeyPadding(valid)`` (left/right padding, holes)
4. each query sees one contiguous run of keys, and consecutive queries chain into causal (or full)
   blocks -> the rows are gathered into the packed layout and run with one ``BlockDiagonal``:
   left-padded prompts (padded queries see nothing and are dropped), sequences packed into one row,
   chunked prefill against a padded cache. Query rows that see no key return 0 (attnlib's rule).
5. nothing structured fits (holes inside a causal row, per-head masks, additive biases, or a gather
   that would copy the keys more than ``max_kv_copies`` times) -> ``DenseMask``, with the reason.

The analysis reads three ``[B, Sq]`` integer summaries back to the host once per mask; hosts pass one
mask object to every layer, so callers cache the :class:`MaskPlan` per mask tensor
(:class:`PlanCache`).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..api import attention
from ..masks import BlockDiagonal, Causal, DenseMask, KeyPadding

__all__ = ["MaskPlan", "plan_from_dense", "PlanCache", "bool_from_additive"]

#: a packed plan may gather at most this many key tokens per original key token before the dense
#: mask is cheaper (right padding makes each padded query its own block over the valid keys)
MAX_KV_COPIES = 2.0


@dataclass(frozen=True, eq=False)
class MaskPlan:
    """How to run one host mask on attnlib.

    ``kind``: ``"none"``, ``"causal"``, ``"key_padding"``, ``"packed"`` or ``"dense"``. For every kind
    but ``"packed"`` the attnlib ``mask`` is used on the dense BSHD tensors as they are; ``"packed"``
    gathers the visible query rows and key runs into THD tensors and scatters the output back.
    ``reason`` says why a ``"dense"`` plan was needed.
    """

    kind: str
    mask: object = None
    reason: str = ""
    # packed plans only
    q_index: torch.Tensor | None = None
    kv_index: torch.Tensor | None = None
    identity_q: bool = False
    identity_kv: bool = False
    _by_device: dict = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        if self.kind == "dense":
            return f"DenseMask ({self.reason})"
        if self.kind == "none":
            return "None (full attention)"
        return repr(self.mask)

    def _indices_on(self, device):
        key = str(device)
        got = self._by_device.get(key)
        if got is None:
            got = (self.q_index.to(device), self.kv_index.to(device))
            self._by_device[key] = got
        return got

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale=None, backend=None) -> torch.Tensor:
        """Attention of BSHD ``q [B, Sq, Hq, D]``, ``k/v [B, Sk, Hkv, *]`` under this plan (BSHD out)."""
        if self.kind != "packed":
            return attention(q, k, v, self.mask, scale=scale, backend=backend)
        B, Sq, Hq, _ = q.shape
        Sk = k.shape[1]
        qf = q.reshape(B * Sq, Hq, q.shape[-1])
        kf = k.reshape(B * Sk, k.shape[2], k.shape[-1])
        vf = v.reshape(B * Sk, v.shape[2], v.shape[-1])
        if not (self.identity_q and self.identity_kv):
            q_idx, kv_idx = self._indices_on(q.device)
        if not self.identity_q:
            qf = qf.index_select(0, q_idx)
        if not self.identity_kv:
            kf = kf.index_select(0, kv_idx)
            vf = vf.index_select(0, kv_idx)
        out = attention(qf, kf, vf, self.mask, scale=scale, backend=backend)
        if not self.identity_q:
            full = out.new_zeros(B * Sq, Hq, out.shape[-1])
            out = full.index_copy(0, q_idx, out)
        return out.reshape(B, Sq, Hq, out.shape[-1])


def bool_from_additive(mask: torch.Tensor) -> torch.Tensor | None:
    """An additive float mask made only of ``0`` and "masked" values (``-inf`` or below half the dtype's
    lowest value, as transformers' eager masks use) as bool (True = attend); ``None`` if it carries any
    other value (a real bias, which only ``DenseMask`` can express)."""
    low = torch.finfo(mask.dtype).min / 2
    keep = mask == 0
    hidden = mask <= low  # -inf included
    if bool((keep | hidden).all()):
        return keep
    return None


def plan_from_dense(mask: torch.Tensor, batch: int, seqlen_q: int, seqlen_k: int, *,
                    max_kv_copies: float = MAX_KV_COPIES) -> MaskPlan:
    """Plan for a bool (True = attend) or additive float mask broadcastable to ``[B, H, Sq, Sk]``.

    Leading dims may be missing (``[Sq, Sk]``, ``[B, Sq, Sk]`` is *not* accepted: give 2-D or 4-D).
    """
    if mask.dim() == 2:
        mask = mask[None, None]
    if mask.dim() != 4:
        raise ValueError(f"expected a 2-D [Sq, Sk] or 4-D [B, H, Sq, Sk] mask, got shape {tuple(mask.shape)}")
    if mask.shape[-2:] != (seqlen_q, seqlen_k) or mask.shape[0] not in (1, batch):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to [B={batch}, H, Sq={seqlen_q}, "
                         f"Sk={seqlen_k}]")
    original = mask
    if mask.dtype != torch.bool:
        if not mask.dtype.is_floating_point:
            mask = mask != 0  # 0/1 integer masks: 1 = attend
        else:
            as_bool = bool_from_additive(mask)
            if as_bool is None:
                return MaskPlan("dense", DenseMask(original), reason="additive float mask with bias values "
                                "other than 0 / -inf (a score bias has no structured form)")
            mask = as_bool
    if mask.shape[1] > 1:
        if not bool((mask == mask[:, :1]).all()):
            return MaskPlan("dense", DenseMask(mask), reason="the mask differs between heads")
        mask = mask[:, :1]
    m = mask[:, 0].expand(batch, seqlen_q, seqlen_k)
    return _plan_bool(m, max_kv_copies)


def _plan_bool(m: torch.Tensor, max_kv_copies: float) -> MaskPlan:
    B, Sq, Sk = m.shape
    dev = m.device
    cnt = m.sum(-1)
    if bool((cnt == Sk).all()):
        return MaskPlan("none")
    ar = torch.arange(Sk, device=dev)
    lo = torch.where(m, ar, Sk).amin(-1)
    hi = torch.where(m, ar, -1).amax(-1)
    empty = cnt == 0
    contiguous = empty | (hi - lo + 1 == cnt)
    i = torch.arange(Sq, device=dev)

    # 2. one causal diagonal for the whole batch
    max_cnt = int(cnt.max())
    windows = (None,) if max_cnt >= Sk else (None, max_cnt)
    for align, diag in (("bottom_right", i + (Sk - Sq)), ("top_left", i)):
        if align == "top_left" and (Sq == Sk or Sq > Sk):
            continue  # same as bottom-right / rows past the last key: not a top-left shape we emit
        diag = diag.expand(B, Sq)
        for window in windows:
            lo_e = torch.zeros_like(diag) if window is None else (diag - window + 1).clamp(min=0)
            ok = torch.where(diag < 0, empty, contiguous & ~empty & (lo == lo_e) & (hi == diag))
            if bool(ok.all()):
                return MaskPlan("causal", Causal(align=align, window=window))

    # 3. every query row of a batch row sees the same keys: key padding (any pattern)
    if bool((m == m[:, :1]).all()):
        return MaskPlan("key_padding", KeyPadding(m[:, 0].contiguous()))

    # 4. per-row contiguous runs chained into blocks
    if not bool(contiguous.all()):
        return MaskPlan("dense", DenseMask(m[:, None]), reason="some query sees keys that are not one "
                        "contiguous run (holes inside a row), which no block structure expresses")
    best = None
    for causal, window in ((True, None), (True, max_cnt), (False, None)):
        if causal and window is not None and window >= Sk:
            continue
        cand = _chain_blocks(lo, hi, empty, Sk, causal, window)
        if best is None or cand[0] < best[0]:
            best = cand + (causal, window)
    n_blocks, starts, q_rows, k_lo, k_hi, causal, window = best
    q_lens = torch.diff(torch.cat([starts, starts.new_tensor([q_rows.numel()])])).tolist()
    k_lens = (k_hi - k_lo + 1).tolist()
    total_k = sum(k_lens)
    if total_k > max_kv_copies * B * Sk:
        return MaskPlan("dense", DenseMask(m[:, None]), reason=f"the block structure would gather {total_k} key "
                        f"tokens for {B * Sk} keys (more than {max_kv_copies}x): e.g. right padding, where every "
                        "padded query sees all valid keys")
    if window is not None and not causal:
        window = None
    # key gather: block j reads flat keys [k_lo_j, k_hi_j] (already offset by batch row)
    lens_t = torch.tensor(k_lens, dtype=torch.long)
    starts_k = k_lo.cpu().long()
    offsets = torch.repeat_interleave(starts_k - (torch.cumsum(lens_t, 0) - lens_t), lens_t)
    kv_index = offsets + torch.arange(total_k)
    q_index = q_rows.cpu().long()
    bd = BlockDiagonal(q_lens, k_lens, causal=causal, window=window if causal else None)
    return MaskPlan("packed", bd, q_index=q_index, kv_index=kv_index,
                    identity_q=q_index.numel() == B * Sq and bool((q_index == torch.arange(B * Sq)).all()),
                    identity_kv=total_k == B * Sk and bool((kv_index == torch.arange(B * Sk)).all()))


def _chain_blocks(lo, hi, empty, Sk: int, causal: bool, window):
    """Split the non-empty query rows into blocks.

    Causal: a row continues the block of the row just above it (same batch row) when it sees exactly
    one more key at the end and the same first key (with a window: the first key moves so that at most
    ``window`` keys are seen). Full: a row continues the block when it sees exactly the same keys.
    Returns ``(n_blocks, block_starts (index into the kept rows), kept_rows (flat b*Sq+i),
    key_lo_flat, key_hi_flat)`` with key bounds offset by ``b * Sk``.
    """
    B, Sq = lo.shape
    dev = lo.device
    flat_lo, flat_hi, flat_empty = lo.reshape(-1), hi.reshape(-1), empty.reshape(-1)
    rows = torch.arange(B * Sq, device=dev)
    prev_ok = torch.zeros(B * Sq, dtype=torch.bool, device=dev)
    prev_ok[1:] = ~flat_empty[:-1] & ((rows[1:] % Sq) != 0)  # row above exists in the same batch row
    p_lo = torch.roll(flat_lo, 1)
    p_hi = torch.roll(flat_hi, 1)
    if causal:
        expect_lo = p_lo if window is None else torch.maximum(p_lo, flat_hi - window + 1)
        cont = prev_ok & (flat_hi == p_hi + 1) & (flat_lo == expect_lo)
    else:
        cont = prev_ok & (flat_hi == p_hi) & (flat_lo == p_lo)
    kept = ~flat_empty
    kept_rows = rows[kept]
    is_start = ~cont[kept]
    starts = torch.nonzero(is_start).flatten()
    n_blocks = int(starts.numel())
    ends = torch.cat([starts[1:], starts.new_tensor([kept_rows.numel()])]) - 1
    first_rows, last_rows = kept_rows[starts], kept_rows[ends]
    base = (kept_rows[starts] // Sq) * Sk  # the block's batch row, as a flat key offset
    # the key run of a block: first key of its first row .. last key of its last row
    return n_blocks, starts, kept_rows, base + flat_lo[first_rows], base + flat_hi[last_rows]


class PlanCache:
    """Tiny identity cache: one plan per mask tensor (hosts reuse one mask object for every layer).

    Entries hold weak references, so the cache never keeps a host's mask alive; an in-place edit of the
    mask (new ``_version``) re-plans.
    """

    def __init__(self, size: int = 4):
        self._size = size
        self._entries: OrderedDict = OrderedDict()

    def get(self, mask: torch.Tensor, build):
        key = (id(mask), mask._version, mask.data_ptr(), tuple(mask.shape), tuple(mask.stride()), mask.dtype,
               str(mask.device))
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is mask:
            self._entries.move_to_end(key)
            return entry[1]
        plan = build()
        self._entries[key] = (weakref.ref(mask), plan)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return plan
