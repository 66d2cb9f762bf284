"""Validation of one attention call, before any backend or kernel sees it.

``validate_call`` turns user arguments into an :class:`AttentionCall` (shapes named, mask checked
against them) or raises ``ValueError``/``TypeError`` naming the argument and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import BlockDiagonal, Causal, DenseMask, KeyPadding, mask_features
from .plan import plan_for

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def default_scale(head_dim: int) -> float:
    """The softmax scale used when none is given: ``head_dim ** -0.5`` (the one definition)."""
    return head_dim ** -0.5


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """A validated call. Dense: ``q [B,Sq,Hq,D]``; packed: ``q [Tq,Hq,D]`` (then ``batch == 1``).

    ``squeezed_batch``: the caller passed ``[1, T, H, D]`` with a ``BlockDiagonal`` mask; backends see
    the packed ``[T, H, D]`` tensors and the front door re-adds the batch dim.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: object
    scale: float
    return_lse: bool
    packed: bool
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    head_dim_v: int
    features: frozenset
    squeezed_batch: bool = False
    #: the mask's :class:`attnlib.plan.Plan` for this call's shape (the one visibility rule)
    plan: object = None

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
        return torch.is_grad_enabled() and (self.q.requires_grad or self.k.requires_grad or self.v.requires_grad)

    def replace(self, **changes) -> "AttentionCall":
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__}
        fields.update(changes)
        if "plan" not in changes and {"mask", "seqlen_q", "seqlen_k"} & set(changes):
            fields["plan"] = plan_for(fields["mask"], fields["seqlen_q"], fields["seqlen_k"])
        return AttentionCall(**fields)


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def validate_call(q, k, v, mask=None, scale=None, return_lse: bool = False) -> AttentionCall:
    """Check shapes, dtypes, devices and the mask; return the normalized call."""
    _check_tensor(q, "q")
    _check_tensor(k, "k")
    _check_tensor(v, "v")
    if not (q.dim() == k.dim() == v.dim()) or q.dim() not in (3, 4):
        raise ValueError(
            f"q, k, v must all be BSHD [B, S, H, D] (4-D) or packed THD [T, H, D] (3-D); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them with .to(dtype)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")

    squeezed = False
    if isinstance(mask, BlockDiagonal) and q.dim() == 4:
        if q.shape[0] != 1 or k.shape[0] != 1 or v.shape[0] != 1:
            raise ValueError(
                f"a BlockDiagonal mask needs packed THD inputs [T, H, D] (or batch 1), got q {tuple(q.shape)}; "
                "pack the sequences along the token axis (mask.merge / torch.cat) instead of batching them")
        q, k, v, squeezed = q[0], k[0], v[0], True

    packed = q.dim() == 3
    if packed:
        batch = 1
        sq, hq, d = q.shape
        sk, hkv, dk = k.shape
        skv, hv, dv = v.shape
    else:
        batch, sq, hq, d = q.shape
        bk, sk, hkv, dk = k.shape
        bv, skv, hv, dv = v.shape
        if not (bk == bv == batch):
            raise ValueError(f"batch sizes differ: q {batch}, k {bk}, v {bv}")
    if dk != d:
        raise ValueError(f"head dim of k ({dk}) must equal that of q ({d})")
    if skv != sk:
        raise ValueError(f"k and v must have the same sequence length, got {sk} and {skv}")
    if hv != hkv:
        raise ValueError(f"k and v must have the same number of heads, got {hkv} and {hv}")
    if hq < 1 or hkv < 1 or hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA/MQA (query head h reads kv "
            f"head h // (Hq // Hkv)); check num_heads / num_kv_heads")
    if d < 1 or dv < 1:
        raise ValueError(f"head dims must be >= 1, got D={d}, Dv={dv}")

    if scale is None:
        scale = default_scale(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None (default D ** -0.5), got {type(scale).__name__}")
    else:
        scale = float(scale)

    features = mask_features(mask)
    _check_mask(mask, packed, batch, sq, sk, hq, q)
    return AttentionCall(q, k, v, mask, scale, bool(return_lse), packed, batch, sq, sk, hq, hkv, d, dv,
                         features, squeezed, plan_for(mask, sq, sk))


def _check_mask(mask, packed: bool, batch: int, sq: int, sk: int, hq: int, q: torch.Tensor) -> None:
    if mask is None or isinstance(mask, Causal):
        return
    if isinstance(mask, BlockDiagonal):
        if mask.total_q != sq:
            raise ValueError(f"BlockDiagonal q_seqlens sum to {mask.total_q} but q has {sq} tokens; "
                             "the seqlens must cover every packed query token")
        if mask.total_k != sk:
            raise ValueError(f"BlockDiagonal kv_seqlens sum to {mask.total_k} but k/v have {sk} tokens; "
                             "pass kv_seqlens when keys are packed differently from queries")
        return
    if isinstance(mask, KeyPadding):
        if packed:
            raise ValueError("KeyPadding needs dense BSHD inputs; for packed THD inputs describe the sequences "
                             "with BlockDiagonal instead")
        if tuple(mask.valid.shape) != (batch, sk):
            raise ValueError(f"KeyPadding valid must be [B, Sk] = [{batch}, {sk}], got {tuple(mask.valid.shape)}")
        if mask.valid.device != q.device:
            raise ValueError(f"KeyPadding valid is on {mask.valid.device} but q is on {q.device}; move it with .to(q.device)")
        return
    if isinstance(mask, DenseMask):
        m = mask.mask
        if m.device != q.device:
            raise ValueError(f"DenseMask is on {m.device} but q is on {q.device}; move it with .to(q.device)")
        if not m.dtype == torch.bool and m.dtype != q.dtype and m.dtype != torch.float32:
            raise TypeError(f"a float DenseMask must be {q.dtype} (q's dtype) or float32, got {m.dtype}")
        target = (batch, hq, sq, sk)
        shape = (1,) * (4 - m.dim()) + tuple(m.shape)
        for have, want, axis in zip(shape, target, ("B", "Hq", "Sq", "Sk")):
            if have not in (1, want):
                raise ValueError(f"DenseMask of shape {tuple(m.shape)} does not broadcast to [B, Hq, Sq, Sk] = "
                                 f"{list(target)} (axis {axis}: {have} vs {want})")
        return
    raise TypeError(f"unknown mask type {type(mask).__name__}")
