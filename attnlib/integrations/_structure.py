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
   When it gathers fewer keys, two calls instead: rows that repeat the row above in full blocks, the
   rest in causal blocks (right padding: the padded queries all see their prompt).
5. nothing structured fits (holes inside a causal row, per-head masks, additive biases, or a gather
   that would copy the keys more than ``max_kv_copies`` times) -> ``DenseMask``, with the reason.

The analysis reads three ``[B, Sq]`` integer summaries back to the host once per mask; hosts pass one
mask object to every layer, so callers cache the :class:`MaskPlan` per mask tensor
(:class:`PlanCache`).
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..api import attention
from ..masks import BlockDiagonal, Causal, DenseMask, KeyPadding

__all__ = ["MaskPlan", "plan_from_dense", "PlanCache", "bool_from_additive"]

#: a packed plan may gather at most this many key tokens per original key token before the dense
#: mask is cheaper
MAX_KV_COPIES = 2.0


@dataclass(frozen=True, eq=False)
class PackedPart:
    """One packed attention call: gather query rows ``q_index`` (flat ``b * Sq + i``) and key rows
    ``kv_index`` (flat ``b * Sk + j``, repeats allowed) and run them under ``mask``."""

    mask: BlockDiagonal
    q_index: torch.Tensor | None = None  # CPU int64; None = every row in order
    kv_index: torch.Tensor | None = None
    _by_device: dict = field(default_factory=dict, repr=False)

    def indices_on(self, device):
        key = str(device)
        got = self._by_device.get(key)
        if got is None:
            got = tuple(None if t is None else t.to(device) for t in (self.q_index, self.kv_index))
            self._by_device[key] = got
        return got


@dataclass(frozen=True, eq=False)
class MaskPlan:
    """How to run one host mask on attnlib.

    ``kind``: ``"none"``, ``"causal"``, ``"key_padding"``, ``"packed"`` or ``"dense"``. For every kind
    but ``"packed"`` the attnlib ``mask`` is used on the dense BSHD tensors as they are; ``"packed"``
    gathers the visible query rows and key runs into THD tensors (one call per :class:`PackedPart`: a
    causal part and a full part when rows of both shapes occur, as with right padding) and scatters
    the outputs back; rows in no part see no key and get 0. ``mask`` is then the ``BlockDiagonal`` of
    a single part, or the tuple of them. ``reason`` says why a ``"dense"`` plan was needed.
    """

    kind: str
    mask: object = None
    reason: str = ""
    parts: tuple = ()

    @classmethod
    def packed(cls, parts) -> "MaskPlan":
        parts = tuple(parts)
        return cls("packed", parts[0].mask if len(parts) == 1 else tuple(p.mask for p in parts), parts=parts)

    def describe(self) -> str:
        if self.kind == "dense":
            return f"DenseMask ({self.reason})"
        if self.kind == "none":
            return "None (full attention)"
        return repr(self.mask)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale=None, backend=None) -> torch.Tensor:
        """Attention of BSHD ``q [B, Sq, Hq, D]``, ``k/v [B, Sk, Hkv, *]`` under this plan (BSHD out)."""
        if self.kind != "packed":
            return attention(q, k, v, self.mask, scale=scale, backend=backend)
        B, Sq, Hq, _ = q.shape
        Sk = k.shape[1]
        qf = q.reshape(B * Sq, Hq, q.shape[-1])
        kf = k.reshape(B * Sk, k.shape[2], k.shape[-1])
        vf = v.reshape(B * Sk, v.shape[2], v.shape[-1])
        out = None
        for part in self.parts:
            q_idx, kv_idx = part.indices_on(q.device)
            qp = qf if q_idx is None else qf.index_select(0, q_idx)
            kp, vp = (kf, vf) if kv_idx is None else (kf.index_select(0, kv_idx), vf.index_select(0, kv_idx))
            o = attention(qp, kp, vp, part.mask, scale=scale, backend=backend)
            if q_idx is None:
                out = o
            else:
                out = (o.new_zeros(B * Sq, Hq, o.shape[-1]) if out is None else out).index_copy(0, q_idx, o)
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
    windows = (None,) if max_cnt >= Sk or max_cnt < 1 else (None, max_cnt)
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
    B_Sk = B * Sk
    rows = torch.arange(B * Sq, device=dev)
    base = (rows // Sq) * Sk  # flat key offset of each row's batch row
    flat_lo, flat_hi = lo.reshape(-1) + base, hi.reshape(-1) + base
    kept = rows[~empty.reshape(-1)]
    budget = max_kv_copies * B_Sk

    # one call: every visible row in causal blocks (optionally windowed), or in full blocks
    best = None
    for causal, window in ((True, None), (True, max_cnt), (False, None)):
        if window is not None and (window >= Sk or window < 1):
            continue
        part = _part(flat_lo, flat_hi, kept, Sq, causal, window)
        if best is None or part.mask.num_blocks < best.mask.num_blocks:
            best = part
    # or two calls: rows that repeat the row above (padded queries after a prompt) in full blocks, the
    # rest in causal blocks -- right padding: every padded query sees the prompt's keys
    prev_same = torch.zeros_like(rows, dtype=torch.bool)
    prev_same[1:] = ((rows[1:] % Sq) != 0) & (flat_lo[1:] == flat_lo[:-1]) & (flat_hi[1:] == flat_hi[:-1])
    prev_same &= ~empty.reshape(-1)
    plan_parts, total_k = [_identity(best, B * Sq, B_Sk)], best.mask.total_k
    if bool(prev_same.any()):
        split = [_part(flat_lo, flat_hi, rows[~prev_same & ~empty.reshape(-1)], Sq, True, None),
                 _part(flat_lo, flat_hi, rows[prev_same], Sq, False, None)]
        split_k = sum(p.mask.total_k for p in split)
        if split_k < total_k:
            plan_parts, total_k = split, split_k
    if total_k <= budget:
        return MaskPlan.packed(plan_parts)
    return MaskPlan("dense", DenseMask(m[:, None]), reason=f"the block structure would gather {total_k} key "
                    f"tokens for {B_Sk} keys (more than {max_kv_copies}x): queries see long, overlapping runs "
                    "of keys that are neither causal nor shared")


def _part(flat_lo, flat_hi, sel, Sq: int, causal: bool, window) -> PackedPart:
    """Blocks over the query rows ``sel`` (flat ``b * Sq + i``, increasing), each seeing one key run.

    Causal: a row continues the block of the previous selected row (same batch row) when it sees
    exactly one more key at the end and the same first key (with a window: the first key moves so
    that at most ``window`` keys are seen) -- a bottom-right causal block. Full: a row continues the
    block when it sees exactly the same keys.
    """
    lo, hi = flat_lo[sel], flat_hi[sel]
    batch = sel // Sq
    cont = torch.zeros_like(sel, dtype=torch.bool)
    if sel.numel() > 1:
        same = batch[1:] == batch[:-1]
        if causal:
            expect_lo = lo[:-1] if window is None else torch.maximum(lo[:-1], hi[1:] - window + 1)
            cont[1:] = same & (hi[1:] == hi[:-1] + 1) & (lo[1:] == expect_lo)
        else:
            cont[1:] = same & (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
    starts = torch.nonzero(~cont).flatten()
    ends = torch.cat([starts[1:], starts.new_tensor([sel.numel()])]) - 1
    k_lo, k_hi = lo[starts].cpu(), hi[ends].cpu()
    q_lens = (ends - starts + 1).tolist()
    k_lens_t = k_hi - k_lo + 1
    k_lens = k_lens_t.tolist()
    offsets = torch.repeat_interleave(k_lo - (torch.cumsum(k_lens_t, 0) - k_lens_t), k_lens_t)
    kv_index = offsets + torch.arange(int(k_lens_t.sum()))
    bd = BlockDiagonal(q_lens, k_lens, causal=causal, window=window if causal else None)
    return PackedPart(bd, sel.cpu(), kv_index)


def _identity(part: PackedPart, n_q: int, n_k: int) -> PackedPart:
    """Drop gathers that would copy every row in order (sequences already packed in one batch row)."""
    q_idx, kv_idx = part.q_index, part.kv_index
    if q_idx.numel() == n_q and bool((q_idx == torch.arange(n_q)).all()):
        q_idx = None
    if kv_idx.numel() == n_k and bool((kv_idx == torch.arange(n_k)).all()):
        kv_idx = None
    return PackedPart(part.mask, q_idx, kv_idx)


class PlanCache:
    """Tiny identity cache: one plan per mask tensor (hosts reuse one mask object for every layer).

    Entries hold weak references, so the cache never keeps a host's mask alive; an in-place edit of the
    mask (new ``_version``) re-plans.
    """

    def __init__(self, size: int = 4):
        self._size = size
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, mask: torch.Tensor, build):
        if torch.compiler.is_compiling():    # the compiled graph is the cache (and a lock cannot be traced)
            return build()
        try:
            version = mask._version
        except RuntimeError:   # inference-mode tensors have no version counter: identity and storage only
            version = None
        key = (id(mask), version, mask.data_ptr(), tuple(mask.shape), tuple(mask.stride()), mask.dtype,
               str(mask.device))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is mask:
                self._entries.move_to_end(key)
                return entry[1]
        plan = build()
        with self._lock:
            self._entries[key] = (weakref.ref(mask), plan)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return plan
