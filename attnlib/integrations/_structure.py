"""Recover an attnlib mask from a dense mask a host library hands us.

Host libraries (transformers' 4-D masks, 2-D padding masks in DiT code) describe attention with dense
tensors. Running those through ``DenseMask`` is exact but throws away everything a fast kernel needs,
so :func:`translate_dense` looks for the structure behind the tensor, in this order, and verifies it
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
5. nothing structured fits (holes inside a row, per-head masks, additive biases, or a gather
   that would copy the keys more than ``max_kv_copies`` times) -> ``DenseMask``, with the reason.

The result, a :class:`MaskTranslation`, says which attnlib calls run the host mask. The analysis
reads three ``[B, Sq]`` integer summaries back to the host once per mask; hosts pass one mask object
to every layer, so callers keep the translation per mask tensor (:class:`TensorKeyedCache`).
"""
from __future__ import annotations

import dataclasses
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..api import attention
from ..masks import BlockDiagonal, Causal, DenseMask, KeyPadding

__all__ = ["MaskTranslation", "PackedCall", "translate_dense", "TensorKeyedCache", "bool_from_additive"]

#: a packed translation may gather at most this many key tokens per original key token before the
#: dense mask is cheaper
MAX_KV_COPIES = 2.0


@dataclass(frozen=True, eq=False)
class PackedCall:
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
class MaskTranslation:
    """A host mask translated into attnlib calls.

    ``kind``: ``"none"``, ``"causal"``, ``"key_padding"``, ``"packed"``, ``"dense"`` or ``"paged"`` (a
    vLLM-Omni layer's paged metadata: the ``BlockDiagonal`` of its requests). For every kind
    but ``"packed"`` the attnlib ``mask`` is used on the dense BSHD tensors as they are; ``"packed"``
    gathers the visible query rows and key runs into THD tensors (one call per :class:`PackedCall`: a
    causal call and a full one when rows of both shapes occur, as with right padding) and scatters
    the outputs back; rows in no call see no key and get 0. ``mask`` is then the ``BlockDiagonal`` of
    a single call, or the tuple of them. ``reason`` says why a ``"dense"`` translation was needed.
    ``source`` is the bool ``[B, Sq, Sk]`` host mask a ``"packed"`` translation was recovered from:
    ALiBi counts distances in the host's positions, which packing into blocks moves, so with
    ``alibi_slopes`` such a translation runs ``DenseMask(source)`` (packing from sequence lengths has no
    source: ALiBi counts inside each sequence). ``path`` and ``why`` are for the adapter to say how
    the translation was obtained (transformers: ``"direct"``, ``"lengths"``, ``"dense"``,
    ``"device_dense"``) and why a slower path ran.
    """

    kind: str
    mask: object = None
    reason: str = ""
    parts: tuple = ()
    source: torch.Tensor | None = field(default=None, repr=False)
    path: str = ""
    why: str = ""

    @classmethod
    def packed(cls, parts, source: torch.Tensor | None = None) -> "MaskTranslation":
        parts = tuple(parts)
        return cls("packed", parts[0].mask if len(parts) == 1 else tuple(p.mask for p in parts), parts=parts,
                   source=source)

    def with_path(self, path: str, why: str = "") -> "MaskTranslation":
        return dataclasses.replace(self, path=path, why=why)

    def describe(self) -> str:
        if self.kind == "dense":
            return f"DenseMask ({self.reason})"
        if self.kind == "none":
            return "None (full attention)"
        return repr(self.mask)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale=None, backend=None, softcap=None,
            alibi_slopes=None, sinks=None) -> torch.Tensor:
        """Attention of BSHD ``q [B, Sq, Hq, D]``, ``k/v [B, Sk, Hkv, *]`` under this translation (BSHD
        out), with attnlib's score modifiers (see :func:`attnlib.attention`)."""
        mods = dict(scale=scale, backend=backend, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
        if self.kind != "packed":
            return attention(q, k, v, self.mask, **mods)
        if alibi_slopes is not None and self.source is not None:
            return attention(q, k, v, DenseMask(self.source[:, None]), **mods)
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
            o = attention(qp, kp, vp, part.mask, **mods)
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


def translate_dense(mask: torch.Tensor, batch: int, seqlen_q: int, seqlen_k: int, *,
                    max_kv_copies: float = MAX_KV_COPIES) -> MaskTranslation:
    """The translation of a bool (True = attend) or additive float mask broadcastable to ``[B, H, Sq, Sk]``.

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
                return MaskTranslation("dense", DenseMask(original), reason="additive float mask with bias values "
                                "other than 0 / -inf (a score bias has no structured form)")
            mask = as_bool
    if mask.shape[1] > 1:
        if not bool((mask == mask[:, :1]).all()):
            return MaskTranslation("dense", DenseMask(mask), reason="the mask differs between heads")
        mask = mask[:, :1]
    m = mask[:, 0].expand(batch, seqlen_q, seqlen_k)
    return _translate_bool(m, max_kv_copies)


def _translate_bool(m: torch.Tensor, max_kv_copies: float) -> MaskTranslation:
    B, Sq, Sk = m.shape
    dev = m.device
    cnt = m.sum(-1)
    if bool((cnt == Sk).all()):
        return MaskTranslation("none")
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
                return MaskTranslation("causal", Causal(align=align, window=window))

    # 3. every query row of a batch row sees the same keys: key padding (any pattern)
    if bool((m == m[:, :1]).all()):
        return MaskTranslation("key_padding", KeyPadding(m[:, 0].contiguous()))

    # 4. per-row contiguous runs chained into blocks
    if not bool(contiguous.all()):
        return MaskTranslation("dense", DenseMask(m[:, None]), reason="some query sees keys that are not one "
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
    calls, total_k = [_identity(best, B * Sq, B_Sk)], best.mask.total_k
    if bool(prev_same.any()):
        split = [_part(flat_lo, flat_hi, rows[~prev_same & ~empty.reshape(-1)], Sq, True, None),
                 _part(flat_lo, flat_hi, rows[prev_same], Sq, False, None)]
        split_k = sum(p.mask.total_k for p in split)
        if split_k < total_k:
            calls, total_k = split, split_k
    if total_k <= budget:
        return MaskTranslation.packed(calls, source=m)
    return MaskTranslation("dense", DenseMask(m[:, None]), reason=f"the block structure would gather {total_k} key "
                    f"tokens for {B_Sk} keys (more than {max_kv_copies}x): queries see long, overlapping runs "
                    "of keys that are neither causal nor shared")


def _part(flat_lo, flat_hi, sel, Sq: int, causal: bool, window) -> PackedCall:
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
    return PackedCall(bd, sel.cpu(), kv_index)


def _identity(part: PackedCall, n_q: int, n_k: int) -> PackedCall:
    """Drop gathers that would copy every row in order (sequences already packed in one batch row)."""
    q_idx, kv_idx = part.q_index, part.kv_index
    if q_idx.numel() == n_q and bool((q_idx == torch.arange(n_q)).all()):
        q_idx = None
    if kv_idx.numel() == n_k and bool((kv_idx == torch.arange(n_k)).all()):
        kv_idx = None
    return PackedCall(part.mask, q_idx, kv_idx)


class TensorKeyedCache:
    """Tiny identity cache: one value per tensor (hosts reuse one mask or RoPE table object for every layer).

    Keys are held by weak reference (a value may hold a view of its key: at most ``size`` entries live);
    an in-place edit of the tensor (new ``_version``) builds again.
    """

    def __init__(self, size: int = 4):
        self._size = size
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tensor: torch.Tensor, build):
        if torch.compiler.is_compiling():    # the compiled graph is the cache (and a lock cannot be traced)
            return build()
        try:
            version = tensor._version
        except RuntimeError:   # inference-mode tensors have no version counter: identity and storage only
            version = None
        key = (id(tensor), version, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype,
               str(tensor.device))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is tensor:
                self._entries.move_to_end(key)
                return entry[1]
        value = build()
        with self._lock:
            self._entries[key] = (weakref.ref(tensor), value)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return value
