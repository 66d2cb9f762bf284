"""A drop-in for vLLM-Omni's diffusion ``Attention`` layer, running on attnlib.

Model files written against vLLM-Omni's interface::

    from vllm_omni.diffusion.attention.layer import Attention
    from vllm_omni.diffusion.attention.backends.abstract import AttentionMetadata

switch to::

    from attnlib.integrations.vllm_omni import Attention, AttentionMetadata

and keep their calls: ``Attention(num_heads, head_size, causal, softmax_scale, num_kv_heads=None)`` and
``forward(query, key, value, attn_metadata=None)`` on BSHD tensors. Needs no vLLM / vLLM-Omni install.
Metadata is read by attribute (or dict key), so vLLM-Omni's own ``AttentionMetadata`` objects work too:

==============================================  ==================================================
metadata                                        attnlib mask
==============================================  ==================================================
none, ``causal=False`` / ``causal=True``        ``None`` / ``Causal()`` (**bottom-right**: with
                                                ``Sq != Sk`` this differs from vLLM-Omni's SDPA
                                                backend, which passes torch's top-left ``is_causal``)
``attn_mask`` 2-D ``[B, Sk]``, True/1 = keep    ``KeyPadding`` (any pattern); with ``causal=True``
                                                the rows are packed into causal ``BlockDiagonal``
                                                blocks (see ``last_plan``)
``attn_mask`` 4-D (bool or additive)            recovered structure, else ``DenseMask``
``joint_query/key/value`` + ``joint_strategy``  concatenated in front of (``"front"``) or behind
                                                (``"rear"``) q/k/v; ``joint_attn_mask`` joins
                                                ``attn_mask`` in the same order (missing = all keep);
                                                the output covers the joint sequence in that order
``cu_seqlens_q/k`` (+ ``max_seqlen_q/k``)       ``BlockDiagonal`` on the packed tokens (``[T, H, D]``
                                                or ``[1, T, H, D]``), causal per block if ``causal``
==============================================  ==================================================

Sequence parallelism (Ulysses / ring) is out of scope: the layer is single-device; its parallelism
keyword arguments are accepted and must leave parallelism off.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..api import attention
from ..masks import BlockDiagonal, Causal, KeyPadding
from ..registry import canonical_name
from ._structure import MaskPlan, PackedPart, plan_from_dense

__all__ = ["Attention", "AttentionMetadata", "plan_for"]

_JOINT_STRATEGIES = ("front", "rear")
#: vLLM-Omni layer arguments about sequence parallelism / bookkeeping, harmless on one device
_IGNORED_KWARGS = frozenset({"prefix", "role", "role_category", "qkv_layout", "scatter_idx", "gather_idx",
                             "use_sync", "skip_sequence_parallel", "disable_kv_quant", "allow_fp32_fallback"})


@dataclass
class AttentionMetadata:
    """The per-forward metadata vLLM-Omni model code passes (the fields this layer reads)."""

    attn_mask: torch.Tensor | None = None
    joint_attn_mask: torch.Tensor | None = None
    joint_query: torch.Tensor | None = None
    joint_key: torch.Tensor | None = None
    joint_value: torch.Tensor | None = None
    joint_strategy: str = "front"
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _get(meta, name: str):
    """Field ``name`` from a metadata object, a dict, or its ``extra`` dict (vLLM-Omni keeps cu_seqlens there)."""
    if meta is None:
        return None
    if isinstance(meta, dict):
        value = meta.get(name)
        extra = meta.get("extra") or {}
    else:
        value = getattr(meta, name, None)
        extra = getattr(meta, "extra", None) or {}
    if value is None and isinstance(extra, dict):
        value = extra.get(name)
    return value


def _as_valid(mask: torch.Tensor, name: str) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or 0/1 numbers (True/1 = keep), got {mask.dtype}")
    return mask != 0


def plan_for(q: torch.Tensor, k: torch.Tensor, meta, causal: bool) -> MaskPlan:
    """The attnlib plan for already-joined BSHD (or packed) ``q``/``k`` and the layer's metadata."""
    cu_q, cu_k = _get(meta, "cu_seqlens_q"), _get(meta, "cu_seqlens_k")
    attn_mask = _get(meta, "attn_mask")
    if cu_q is not None or cu_k is not None:
        if attn_mask is not None:
            raise NotImplementedError("attn_mask together with cu_seqlens_q/k is not supported: packed sequences "
                                      "carry their boundaries in cu_seqlens; drop the padding tokens instead")
        bd = BlockDiagonal.from_cu_seqlens(cu_q if cu_q is not None else cu_k, cu_k, causal=causal)
        return MaskPlan.packed([PackedPart(bd)])
    if q.dim() != 4:
        raise ValueError(f"query must be BSHD [B, S, H, D] (or packed [T, H, D] with cu_seqlens_q/k in the metadata), "
                         f"got shape {tuple(q.shape)}")
    B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    if attn_mask is None:
        return MaskPlan("causal", Causal()) if causal else MaskPlan("none")
    if attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (B, Sk):
            raise ValueError(f"attn_mask must be [B={B}, Sk={Sk}] (True/1 = keep, over the joint keys), got "
                             f"{tuple(attn_mask.shape)}")
        valid = _as_valid(attn_mask, "attn_mask")
        if not causal:
            return MaskPlan("none") if bool(valid.all()) else MaskPlan("key_padding", KeyPadding(valid))
        full = Causal().materialize(Sq, Sk, valid.device)[None] & valid[:, None, :]
        return plan_from_dense(full[:, None], B, Sq, Sk)
    if attn_mask.dim() == 4:
        mask = attn_mask
        if causal:
            if mask.dtype.is_floating_point:
                keep = mask > torch.finfo(mask.dtype).min / 2
            else:
                keep = _as_valid(mask, "attn_mask")
            if mask.dtype.is_floating_point and not bool(((mask == 0) | ~keep).all()):
                raise NotImplementedError("an additive-bias attn_mask together with causal=True is not supported; "
                                          "fold the causal mask into the bias")
            mask = keep & Causal().materialize(Sq, Sk, mask.device)
        return plan_from_dense(mask, B, Sq, Sk)
    raise ValueError(f"attn_mask must be 2-D [B, Sk] (True/1 = keep) or 4-D [B, H, Sq, Sk], got shape "
                     f"{tuple(attn_mask.shape)}")


def _join(meta, query, key, value):
    """Concatenate the joint tensors; return ``(q, k, v, meta_mask_or_None)``."""
    jq, jk, jv = _get(meta, "joint_query"), _get(meta, "joint_key"), _get(meta, "joint_value")
    attn_mask = _get(meta, "attn_mask")
    if jq is None and jk is None and jv is None:
        return query, key, value, attn_mask
    if jq is None or jk is None or jv is None:
        raise ValueError("joint_query, joint_key and joint_value must be given together (or none of them)")
    strategy = _get(meta, "joint_strategy") or "front"
    if strategy not in _JOINT_STRATEGIES:
        raise ValueError(f"joint_strategy must be one of {_JOINT_STRATEGIES}, got {strategy!r}")
    if _get(meta, "cu_seqlens_q") is not None or _get(meta, "cu_seqlens_k") is not None:
        raise NotImplementedError("joint_query/key/value together with cu_seqlens_q/k is not supported")

    def cat(a, b):
        return torch.cat([b, a] if strategy == "front" else [a, b], dim=1)

    q, k, v = cat(query, jq), cat(key, jk), cat(value, jv)
    joint_mask = _get(meta, "joint_attn_mask")
    if attn_mask is None and joint_mask is None:
        return q, k, v, None
    B = k.shape[0]
    if attn_mask is not None and attn_mask.dim() == 2 and attn_mask.shape[1] == k.shape[1] and joint_mask is None:
        return q, k, v, attn_mask  # already over the joint keys
    if (attn_mask is not None and attn_mask.dim() != 2) or (joint_mask is not None and joint_mask.dim() != 2):
        raise ValueError("with joint tensors, attn_mask and joint_attn_mask must be 2-D [B, S] key masks")
    if attn_mask is None:
        attn_mask = torch.ones(B, key.shape[1], dtype=torch.bool, device=k.device)
    if joint_mask is None:
        joint_mask = torch.ones(B, jk.shape[1], dtype=torch.bool, device=k.device)
    if attn_mask.shape[1] != key.shape[1] or joint_mask.shape[1] != jk.shape[1]:
        raise ValueError(f"attn_mask covers {attn_mask.shape[1]} keys and joint_attn_mask {joint_mask.shape[1]}, but "
                         f"key has {key.shape[1]} and joint_key {jk.shape[1]}")
    return q, k, v, cat(_as_valid(attn_mask, "attn_mask"), _as_valid(joint_mask, "joint_attn_mask"))


class Attention(nn.Module):
    """vLLM-Omni-compatible attention layer: ``forward(query, key, value, attn_metadata=None)``, BSHD."""

    def __init__(self, num_heads: int, head_size: int, causal: bool, softmax_scale: float | None,
                 num_kv_heads: int | None = None, *, backend: str | None = None, **kwargs):
        super().__init__()
        unknown = set(kwargs) - _IGNORED_KWARGS
        if "custom_attention" in kwargs and kwargs["custom_attention"] is not None:
            raise NotImplementedError("custom_attention (a model-owned kernel) is not supported by the attnlib layer")
        unknown.discard("custom_attention")
        if unknown:
            raise TypeError(f"unexpected Attention arguments: {sorted(unknown)}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.causal = bool(causal)
        self.softmax_scale = head_size ** -0.5 if softmax_scale is None else float(softmax_scale)
        self.backend = None if backend is None else canonical_name(backend)
        self.last_plan: MaskPlan | None = None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_metadata=None) -> torch.Tensor:
        q, k, v, mask = _join(attn_metadata, query, key, value)
        if q.shape[-2] != self.num_heads or k.shape[-2] != self.num_kv_heads:
            raise ValueError(f"expected {self.num_heads} query heads and {self.num_kv_heads} kv heads (layer config), "
                             f"got query {tuple(q.shape)} and key {tuple(k.shape)}")
        meta = {"attn_mask": mask, "cu_seqlens_q": _get(attn_metadata, "cu_seqlens_q"),
                "cu_seqlens_k": _get(attn_metadata, "cu_seqlens_k")}
        plan = plan_for(q, k, meta, self.causal)
        self.last_plan = plan
        if q.dim() == 3:  # packed THD with cu_seqlens
            return attention(q, k, v, plan.mask, scale=self.softmax_scale, backend=self.backend)
        if plan.kind == "packed" and plan.parts[0].q_index is None and q.shape[0] != 1:
            raise ValueError(f"cu_seqlens_q/k need packed tokens [T, H, D] or [1, T, H, D], got {tuple(q.shape)}")
        return plan.run(q, k, v, scale=self.softmax_scale, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_size={self.head_size}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, softmax_scale={self.softmax_scale:.4g}, backend={self.backend or 'auto'}")
