"""Validation of one attention call, before any backend or kernel sees it.

``validate_call`` turns user arguments into an :class:`AttentionCall` (shapes named, mask, score
modifiers and KV layout checked against them, the plan built) or raises ``ValueError``/``TypeError``
naming the argument and the fix.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from .caching import host_lru
from .masks import as_plan, mask_features
from . import settings
from .plan import NO_MODIFIERS, Modifiers, PagedKv, Plan

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def default_scale(head_dim: int) -> float:
    """The softmax scale used when none is given: ``head_dim ** -0.5`` (the one definition)."""
    return head_dim ** -0.5


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """A validated call, as every backend sees it: ``q [B, Sq, Hq, D]``, ``k [B, Sk, Hkv, D]``,
    ``v [B, Sk, Hkv, Dv]`` (BSHD always: packed THD inputs arrive with ``B = 1`` and ``plan.packed``), or
    with a paged plan (``plan.kv``) ``k``/``v`` the page pools ``[num_pages, page_size, Hkv, D]``.
    ``forward`` returns ``out [B, Sq, Hq, Dv]`` and ``lse`` float32 ``[B, Hq, Sq]`` (or None).

    ``plan`` is the one description of what to compute (visibility, score modifiers, KV layout);
    ``mask`` is the user's mask object, kept for messages only. ``thd``: the caller passed THD tensors
    (the front door restores that layout).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: object
    scale: float
    return_lse: bool
    plan: Plan
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    head_dim_v: int
    thd: bool = False
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def packed(self) -> bool:
        return self.plan.packed

    @property
    def features(self) -> frozenset:
        return self.plan.features

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def gqa_ratio(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def requires_grad(self) -> bool:
        sinks = self.plan.mods.sinks
        return torch.is_grad_enabled() and (self.q.requires_grad or self.k.requires_grad or self.v.requires_grad
                                            or (sinks is not None and sinks.requires_grad))

    def empty_rows(self) -> torch.Tensor | None:
        """``plan.empty_rows_on(q.device)``, computed once per call (lowering and normalization share it)."""
        if "empty" not in self._memo:
            self._memo["empty"] = self.plan.empty_rows_on(self.q.device)
        return self._memo["empty"]

    def replace(self, **changes) -> "AttentionCall":
        """A copy with fields changed (``plan`` rebuilt when ``mask`` or the lengths change without one)."""
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "_memo"}
        fields.update(changes)
        if "plan" not in changes and {"mask", "seqlen_q", "seqlen_k"} & set(changes):
            fields["plan"] = as_plan(fields["mask"], fields["seqlen_q"], fields["seqlen_k"]).with_call(
                self.plan.mods, self.plan.kv)
        new = AttentionCall(**fields)
        if changes.keys() <= {"k", "v", "return_lse"} and "empty" in self._memo:     # same plan, same q
            new._memo["empty"] = self._memo["empty"]
        return new

    def with_tensors(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> "AttentionCall":
        """This call (validated, planned) on other tensors of the same shapes, dtypes and devices, given in
        the caller's layout."""
        if self.thd:
            q = q.unsqueeze(0)
            if self.plan.kv is None:
                k, v = k.unsqueeze(0), v.unsqueeze(0)
        return AttentionCall(q, k, v, self.mask, self.scale, self.return_lse, self.plan, self.batch, self.seqlen_q,
                             self.seqlen_k, self.heads_q, self.heads_kv, self.head_dim, self.head_dim_v, self.thd)

    def restore(self, out: torch.Tensor, lse: torch.Tensor | None):
        """``(out, lse)`` in the caller's layout (THD: ``[Tq, Hq, Dv]`` and ``[Hq, Tq]``)."""
        if self.thd:
            return out[0], (lse[0] if lse is not None else None)
        return out, lse


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def validate_call(q, k, v, mask=None, scale=None, return_lse: bool = False, *, softcap=None, alibi_slopes=None,
                  sinks=None, block_table=None) -> AttentionCall:
    """Check shapes, dtypes, devices, the mask, the score modifiers and the KV layout; return the call."""
    _check_tensor(q, "q")
    _check_tensor(k, "k")
    _check_tensor(v, "v")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them with .to(dtype)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if block_table is not None:
        return _validate_paged(q, k, v, mask, scale, return_lse, softcap, alibi_slopes, sinks, block_table)
    if not (q.dim() == k.dim() == v.dim()) or q.dim() not in (3, 4):
        raise ValueError(
            f"q, k, v must all be BSHD [B, S, H, D] (4-D) or packed THD [T, H, D] (3-D); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    packed_mask = getattr(mask, "packed", False)
    thd = q.dim() == 3
    if packed_mask and not thd and (q.shape[0] != 1 or k.shape[0] != 1 or v.shape[0] != 1):
        raise ValueError(
            f"a {type(mask).__name__} mask needs packed THD inputs [T, H, D] (or batch 1), got q {tuple(q.shape)}; "
            "pack the sequences along the token axis (mask.merge / torch.cat) instead of batching them")
    qq, kk, vv = (q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)) if thd else (q, k, v)
    batch, sq, hq, d = qq.shape
    bk, sk, hkv, dk = kk.shape
    bv, skv, hv, dv = vv.shape
    if not (bk == bv == batch):
        raise ValueError(f"batch sizes differ: q {batch}, k {bk}, v {bv}")
    if skv != sk:
        raise ValueError(f"k and v must have the same sequence length, got {sk} and {skv}")
    _check_heads(d, dk, dv, hq, hkv, hv)
    scale = _check_scale(scale, d)
    plan = _plan_of(mask, thd=thd, batch=batch, sq=sq, sk=sk, hq=hq, q=q)
    mods = check_modifiers(softcap, alibi_slopes, sinks, batch, hq, q)
    if mods is not NO_MODIFIERS:
        plan = plan.with_call(mods)
    return AttentionCall(qq, kk, vv, mask, scale, bool(return_lse), plan, batch, sq, sk, hq, hkv, d, dv, thd)


def _check_heads(d, dk, dv, hq, hkv, hv) -> None:
    if dk != d:
        raise ValueError(f"head dim of k ({dk}) must equal that of q ({d})")
    if hv != hkv:
        raise ValueError(f"k and v must have the same number of heads, got {hkv} and {hv}")
    if hq < 1 or hkv < 1 or hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA/MQA (query head h reads kv "
            f"head h // (Hq // Hkv)); check num_heads / num_kv_heads")
    if d < 1 or dv < 1:
        raise ValueError(f"head dims must be >= 1, got D={d}, Dv={dv}")


def _check_scale(scale, d: int) -> float:
    if scale is None:
        return default_scale(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None (default D ** -0.5), got {type(scale).__name__}")
    return float(scale)


def _plan_of(mask, *, thd, batch, sq, sk, hq, q) -> Plan:
    if mask is not None:
        mask_features(mask)            # the type, first
        mask.check_call(packed=thd, batch=batch, seqlen_q=sq, seqlen_k=sk, heads_q=hq, device=q.device,
                        dtype=q.dtype)
    return as_plan(mask, sq, sk)


def check_modifiers(softcap, alibi_slopes, sinks, batch: int, hq: int, q: torch.Tensor) -> Modifiers:
    """The score modifiers of a call, validated (``ValueError``/``TypeError`` naming the argument)."""
    if softcap is None and alibi_slopes is None and sinks is None:
        return NO_MODIFIERS
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a positive float (scores become c * tanh(s / c)) or None, got "
                            f"{type(softcap).__name__}")
        softcap = float(softcap)
        if not (softcap > 0 and math.isfinite(softcap)):
            raise ValueError(f"softcap must be a positive finite float (Gemma 2 uses 50.0), got {softcap}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"alibi_slopes must be a float32 tensor [Hq] or [B, Hq], got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32 (flash-attn's convention), got {alibi_slopes.dtype}; use "
                            ".float()")
        if tuple(alibi_slopes.shape) not in ((hq,), (batch, hq)):
            raise ValueError(f"alibi_slopes must be [Hq] = [{hq}] or [B, Hq] = [{batch}, {hq}], got "
                             f"{tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {q.device}; move it with "
                             ".to(q.device)")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor):
            raise TypeError(f"sinks must be a float tensor [Hq] (one learnable logit per query head), got "
                            f"{type(sinks).__name__}")
        if not sinks.dtype.is_floating_point:
            raise TypeError(f"sinks must be a floating tensor [Hq], got {sinks.dtype}")
        if tuple(sinks.shape) != (hq,):
            raise ValueError(f"sinks must be [Hq] = [{hq}] (one logit per query head), got {tuple(sinks.shape)}")
        if sinks.device != q.device:
            raise ValueError(f"sinks is on {sinks.device} but q is on {q.device}; move it with .to(q.device)")
    return Modifiers(softcap, alibi_slopes, sinks)


def _validate_paged(q, k, v, mask, scale, return_lse, softcap, alibi_slopes, sinks, block_table) -> AttentionCall:
    from .masks import BlockDiagonal

    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be an int32 tensor [R, max_pages], got {type(block_table).__name__}")
    if block_table.dtype not in (torch.int32, torch.int64) or block_table.dim() != 2:
        raise TypeError(f"block_table must be an int32 tensor [R, max_pages] (page ids per request), got "
                        f"{block_table.dtype} {tuple(block_table.shape)}")
    if block_table.device != q.device:
        raise ValueError(f"block_table is on {block_table.device} but q is on {q.device}; move it with .to(q.device)")
    if not isinstance(mask, BlockDiagonal):
        raise ValueError("block_table needs a BlockDiagonal mask over the requests (q_seqlens: new tokens, "
                         "kv_seqlens: each request's keys, new tokens included), got "
                         f"{type(mask).__name__ if mask is not None else 'None'}")
    if q.dim() != 3:
        raise ValueError(f"with block_table, q must be packed THD [Tq, Hq, D], got {tuple(q.shape)}")
    if k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"with block_table, k and v must be page pools [num_pages, page_size, Hkv, D], got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v page pools must share [num_pages, page_size, Hkv], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    tq, hq, d = q.shape
    num_pages, page_size, hkv, dk = k.shape
    dv = v.shape[-1]
    _check_heads(d, dk, dv, hq, hkv, v.shape[2])
    requests = mask.num_blocks
    if block_table.shape[0] != requests:
        raise ValueError(f"block_table has {block_table.shape[0]} rows but the BlockDiagonal mask has {requests} "
                         "requests: one row of page ids per request")
    if page_size < 1:
        raise ValueError(f"block_table needs page pools with page_size >= 1, got k {tuple(k.shape)}")
    used = mask.kv_seqused
    kv = PagedKv(block_table, page_size, mask.kv_seqlens, used)
    need = max(kv.pages_needed()) if kv.pages_needed() else 0
    if need > block_table.shape[1]:
        r = kv.pages_needed().index(need)
        what = f"{mask.kv_seqlens[r]} keys" if used is None else f"up to max_seqlen_k={mask.kv_seqlens[r]} keys"
        raise ValueError(f"block_table has {block_table.shape[1]} page columns but request {r} has {what}, which "
                         f"need {need} pages of {page_size}: widen block_table")
    scale = _check_scale(scale, d)
    mask.check_call(packed=True, batch=1, seqlen_q=tq, seqlen_k=mask.total_k, heads_q=hq, device=q.device,
                    dtype=q.dtype)
    if os.environ.get(settings.DEBUG_CHECKS, "0") == "1":     # page ids in range, on the device: a debugging aid
        if used is None:
            flat = block_table.reshape(-1).index_select(0, _used_entries(kv.pages_needed(), block_table.shape[1],
                                                                          str(block_table.device)))
            torch._assert_async(((flat >= 0) & (flat < num_pages)).all(),
                                f"block_table holds a page id outside the pool's {num_pages} pages")
        else:
            _check_device_lengths(block_table, num_pages, page_size, mask)
    plan = as_plan(mask, tq, mask.total_k)
    mods = check_modifiers(softcap, alibi_slopes, sinks, 1, hq, q)
    plan = plan.with_call(mods, kv)
    return AttentionCall(q.unsqueeze(0), k, v, mask, scale, bool(return_lse), plan, 1, tq, mask.total_k, hq, hkv, d,
                         dv, True)


def _check_device_lengths(block_table, num_pages: int, page_size: int, mask) -> None:
    """``ATTNLIB_DEBUG_CHECKS``: device lengths within their bounds and the page ids they use in range
    (asserted on the device: no host read)."""
    used = mask.kv_seqused.to(torch.int64)
    q_lens = torch.tensor(mask.q_seqlens, dtype=torch.int64).to(used.device)
    torch._assert_async(((used >= q_lens) & (used <= mask.max_seqlen_k)).all(),
                        f"BlockDiagonal kv_seqused outside [q_seqlens, max_seqlen_k={mask.max_seqlen_k}]")
    cols = torch.arange(block_table.shape[1], device=used.device)
    read = cols[None, :] < ((used + page_size - 1) // page_size)[:, None]
    ok = (block_table >= 0) & (block_table < num_pages)
    torch._assert_async((ok | ~read).all(), f"block_table holds a page id outside the pool's {num_pages} pages")


@host_lru(64)
def _used_entries(pages: tuple, max_pages: int, device: str) -> torch.Tensor:
    """Flat indices of the block_table entries a call reads (each request's first ``pages[r]`` columns)."""
    idx = [torch.arange(n) + r * max_pages for r, n in enumerate(pages)]
    return (torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)).to(device)


def call_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float | None,
             return_lse: bool = False) -> AttentionCall:
    """The call of BSHD ``q``/``k``/``v`` (contiguous keys) under a plan of their own (ring steps, Ulysses'
    local heads, adapters that plan themselves): shapes checked against the plan, no mask."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must be BSHD [B, S, H, D] here, got {tuple(t.shape)}")
    b, sq, hq, d = q.shape
    _, sk, hkv, dk = k.shape
    dv = v.shape[-1]
    _check_heads(d, dk, dv, hq, hkv, v.shape[2])
    if (plan.seqlen_q, plan.seqlen_k) != (sq, sk):
        raise ValueError(f"the plan covers {plan.seqlen_q} queries x {plan.seqlen_k} keys, the tensors hold "
                         f"{sq} x {sk}")
    return AttentionCall(q, k, v, None, _check_scale(scale, d), bool(return_lse), plan, b, sq, sk, hq, hkv, d, dv)
