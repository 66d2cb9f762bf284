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
``attn_mask`` 2-D ``[B, Sk]``, True/1 = keep    ``KeyPadding`` (any pattern; none when nothing is
                                                padded); with ``causal=True``
                                                ``KeyPadding(valid, causal=True)``: the valid keys
                                                and bottom-right causal over the key axis (no
                                                device sync, no dense mask)
``attn_mask`` 4-D (bool or additive)            recovered structure, else ``DenseMask``
``joint_query/key/value`` + ``joint_strategy``  concatenated in front of (``"front"``) or behind
                                                (``"rear"``) q/k/v; ``joint_attn_mask`` joins
                                                ``attn_mask`` in the same order (missing = all keep);
                                                the output covers the joint sequence in that order;
                                                ``causal=True`` runs over the joined sequence
``cu_seqlens_q/k`` (+ ``max_seqlen_q/k``)       ``BlockDiagonal`` on the packed tokens (``[T, H, D]``
                                                or ``[1, T, H, D]``), causal per block if ``causal``
==============================================  ==================================================

The translated mask (``last_plan``) is built once per metadata, not once per layer: every layer of a
model gets the same metadata object, and the plan is cached on the identity of its mask and
``cu_seqlens`` tensors (held weakly) and their version counters, with the causal flag, the joint
strategy and the q/k shapes (a small bounded cache shared by all layers). An in-place edit of a mask
tensor re-plans. Inference-mode tensors carry no version counter: their plans are cached per metadata
object (when it accepts weak references, as ``AttentionMetadata`` does), so refill such a tensor in
place only together with a new metadata object.

Sequence parallelism (Ulysses / ring) is out of scope: the layer is single-device; its parallelism
keyword arguments are accepted and must leave parallelism off.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..api import attention
from ..inputs import default_scale
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
        return MaskPlan("key_padding", KeyPadding(valid, causal=True))     # no host read, no dense mask
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
    """Concatenate the joint tensors (every call: they differ per layer); return ``(q, k, v, strategy)``,
    ``strategy`` None without joint tensors."""
    jq, jk, jv = _get(meta, "joint_query"), _get(meta, "joint_key"), _get(meta, "joint_value")
    if jq is None and jk is None and jv is None:
        return query, key, value, None
    if jq is None or jk is None or jv is None:
        raise ValueError("joint_query, joint_key and joint_value must be given together (or none of them)")
    strategy = _get(meta, "joint_strategy") or "front"
    if strategy not in _JOINT_STRATEGIES:
        raise ValueError(f"joint_strategy must be one of {_JOINT_STRATEGIES}, got {strategy!r}")
    if _get(meta, "cu_seqlens_q") is not None or _get(meta, "cu_seqlens_k") is not None:
        raise NotImplementedError("joint_query/key/value together with cu_seqlens_q/k is not supported")

    def cat(a, b):
        return torch.cat([b, a] if strategy == "front" else [a, b], dim=1)

    return cat(query, jq), cat(key, jk), cat(value, jv), strategy


def _joined_mask(meta, strategy: str | None, key_len: int, k: torch.Tensor):
    """The metadata's key mask over the joined keys ``k`` (``key_len`` of them are the layer's own)."""
    attn_mask = _get(meta, "attn_mask")
    if strategy is None:
        return attn_mask
    joint_mask = _get(meta, "joint_attn_mask")
    if attn_mask is None and joint_mask is None:
        return None
    B, joint_len = k.shape[0], k.shape[1] - key_len
    if attn_mask is not None and attn_mask.dim() == 2 and attn_mask.shape[1] == k.shape[1] and joint_mask is None:
        return attn_mask  # already over the joint keys
    if (attn_mask is not None and attn_mask.dim() != 2) or (joint_mask is not None and joint_mask.dim() != 2):
        raise ValueError("with joint tensors, attn_mask and joint_attn_mask must be 2-D [B, S] key masks")
    if attn_mask is None:
        attn_mask = torch.ones(B, key_len, dtype=torch.bool, device=k.device)
    if joint_mask is None:
        joint_mask = torch.ones(B, joint_len, dtype=torch.bool, device=k.device)
    if attn_mask.shape[1] != key_len or joint_mask.shape[1] != joint_len:
        raise ValueError(f"attn_mask covers {attn_mask.shape[1]} keys and joint_attn_mask {joint_mask.shape[1]}, but "
                         f"key has {key_len} and joint_key {joint_len}")
    attn_mask, joint_mask = _as_valid(attn_mask, "attn_mask"), _as_valid(joint_mask, "joint_attn_mask")
    return torch.cat([joint_mask, attn_mask] if strategy == "front" else [attn_mask, joint_mask], dim=1)


#: the metadata fields a plan is built from
_PLAN_FIELDS = ("attn_mask", "joint_attn_mask", "cu_seqlens_q", "cu_seqlens_k")


class _MetadataPlans:
    """The translated :class:`MaskPlan` per metadata, shared by every layer (bounded, least recently used
    first out, thread-safe).

    Keyed on what the plan is built from: the fields in ``_PLAN_FIELDS`` (tensors by identity, held
    weakly and checked on a hit, with their version counter, storage, shape, strides, dtype and device;
    lists by value) and the caller's static key (causal flag, joint strategy, q/k shapes). Inference
    tensors have no version counter: their plans are also keyed on the metadata object, held weakly,
    and not cached when it takes no weak reference.
    """

    def __init__(self, size: int = 8):
        self._size = size
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, meta, static_key: tuple, build):
        fingerprint, refs, versioned = [], [], True
        for name in _PLAN_FIELDS:
            value = _get(meta, name)
            if value is None:
                fingerprint.append(None)
            elif isinstance(value, torch.Tensor):
                inference = value.is_inference()
                versioned &= not inference
                fingerprint.append((id(value), -1 if inference else value._version, value.data_ptr(),
                                    tuple(value.shape), tuple(value.stride()), value.dtype, str(value.device)))
                refs.append(value)
            elif isinstance(value, (list, tuple)) and all(isinstance(x, int) for x in value):
                fingerprint.append(tuple(value))
            else:
                return build()
        if not versioned:
            try:
                weakref.ref(meta)                       # the metadata object itself must be the same one
            except TypeError:
                return build()
            refs.append(meta)
            fingerprint.append(id(meta))
        key = (static_key, tuple(fingerprint))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and all(r() is t for r, t in zip(entry[0], refs)):
                self._entries.move_to_end(key)
                return entry[1]
        plan = build()
        with self._lock:
            self._entries[key] = (tuple(weakref.ref(t) for t in refs), plan)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return plan


_PLANS = _MetadataPlans()


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
        self.softmax_scale = default_scale(head_size) if softmax_scale is None else float(softmax_scale)
        self.backend = None if backend is None else canonical_name(backend)
        self.last_plan: MaskPlan | None = None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_metadata=None) -> torch.Tensor:
        q, k, v, strategy = _join(attn_metadata, query, key, value)
        if q.shape[-2] != self.num_heads or k.shape[-2] != self.num_kv_heads:
            raise ValueError(f"expected {self.num_heads} query heads and {self.num_kv_heads} kv heads (layer config), "
                             f"got query {tuple(q.shape)} and key {tuple(k.shape)}")

        def build():
            meta = {"attn_mask": _joined_mask(attn_metadata, strategy, key.shape[1], k),
                    "cu_seqlens_q": _get(attn_metadata, "cu_seqlens_q"),
                    "cu_seqlens_k": _get(attn_metadata, "cu_seqlens_k")}
            return plan_for(q, k, meta, self.causal)

        static = (self.causal, strategy, tuple(q.shape[:-1]), tuple(k.shape[:-1]), key.shape[1], str(q.device))
        plan = _PLANS.get(attn_metadata, static, build)
        self.last_plan = plan
        if q.dim() == 3:  # packed THD with cu_seqlens
            return attention(q, k, v, plan.mask, scale=self.softmax_scale, backend=self.backend)
        if plan.kind == "packed" and plan.parts[0].q_index is None and q.shape[0] != 1:
            raise ValueError(f"cu_seqlens_q/k need packed tokens [T, H, D] or [1, T, H, D], got {tuple(q.shape)}")
        return plan.run(q, k, v, scale=self.softmax_scale, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_size={self.head_size}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, softmax_scale={self.softmax_scale:.4g}, backend={self.backend or 'auto'}")
