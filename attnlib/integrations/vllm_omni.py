"""A drop-in for vLLM-Omni's diffusion ``Attention`` layer, running on attnlib.

Model files written against vLLM-Omni's interface::

    from vllm_omni.diffusion.attention.layer import Attention
    from vllm_omni.diffusion.attention.backends.abstract import AttentionMetadata

switch to::

    from attnlib.integrations.vllm_omni import Attention, AttentionMetadata

and keep their calls: ``Attention(num_heads, head_size, causal, softmax_scale, num_kv_heads=None)`` and
``forward(query, key, value, attn_metadata=None)`` on BSHD tensors. Needs no vLLM / vLLM-Omni install.
attnlib's score modifiers are layer options passed to every call: ``softcap=``, ``alibi_slopes=``
(float32 ``[num_heads]``) and ``sinks=`` (``[num_heads]``; an ``nn.Parameter`` is learnable), as in
:func:`attnlib.attention`. Metadata is read by attribute (or dict key), so vLLM-Omni's own
``AttentionMetadata`` objects work too:

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
``block_table`` + ``seq_lens`` (+                paged KV: ``key``/``value`` are page pools
``cu_seqlens_q``, ``max_seqlen_k``)              ``[num_pages, page_size, Hkv, D]``, ``seq_lens`` each
                                                request's keys (new tokens included), ``cu_seqlens_q``
                                                the packed new tokens (default: one per request);
                                                ``seq_lens`` a tensor with ``max_seqlen_k`` given:
                                                ``BlockDiagonal.from_device_lengths`` (never read on
                                                the host: CUDA-graph decode)
==============================================  ==================================================

The translated mask (``last_translation``) is built once per metadata, not once per layer: every layer
of a model gets the same metadata object, and the translation is cached on the identity of its mask and
``cu_seqlens`` tensors (held weakly) and their version counters, with the causal flag, the joint
strategy and the q/k shapes (a small bounded cache shared by all layers). An in-place edit of a mask
tensor translates it again. Inference-mode tensors carry no version counter: their translations are cached per metadata
object (when it accepts weak references, as ``AttentionMetadata`` does), so refill such a tensor in
place only together with a new metadata object.

Sequence parallelism: ``Attention(..., ulysses_degree=u, ring_degree=r)`` (or
``sequence_parallel=SequenceParallel(...)``) runs the layer over an ``attnlib.parallel.SequenceParallel``
of the default process group (``u * r`` ranks; created on the first forward). Then, as in vLLM-Omni,
``query/key/value`` are this rank's shards of the sequence (``sp.shard``), ``joint_query/key/value``
are whole and the same on every rank, and the output is this rank's shard (with joint tensors: the
joint part whole, in the joint order). Masks describe the whole sequence: ``attn_mask`` 2-D over all
keys (``[B, S_k]``) or 4-D ``[B, H, S_q, S_k]``, ``joint_attn_mask`` over the joint keys, ``cu_seqlens``
of the whole packed sequence. ``skip_sequence_parallel=True`` keeps a layer local.
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
from ._structure import MaskTranslation, PackedCall, translate_dense

__all__ = ["Attention", "AttentionMetadata", "translate_metadata"]

_JOINT_STRATEGIES = ("front", "rear")
#: vLLM-Omni layer arguments about sequence parallelism / bookkeeping, harmless on one device
_IGNORED_KWARGS = frozenset({"prefix", "role", "role_category", "qkv_layout", "scatter_idx", "gather_idx",
                             "use_sync", "disable_kv_quant", "allow_fp32_fallback"})


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
    block_table: torch.Tensor | None = None
    seq_lens: torch.Tensor | list | None = None
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


def translate_metadata(q: torch.Tensor, k: torch.Tensor, meta, causal: bool) -> MaskTranslation:
    """The attnlib calls for already-joined BSHD (or packed) ``q``/``k`` and the layer's metadata."""
    cu_q, cu_k = _get(meta, "cu_seqlens_q"), _get(meta, "cu_seqlens_k")
    attn_mask = _get(meta, "attn_mask")
    if cu_q is not None or cu_k is not None:
        if attn_mask is not None:
            raise NotImplementedError("attn_mask together with cu_seqlens_q/k is not supported: packed sequences "
                                      "carry their boundaries in cu_seqlens; drop the padding tokens instead")
        bd = BlockDiagonal.from_cu_seqlens(cu_q if cu_q is not None else cu_k, cu_k, causal=causal)
        return MaskTranslation.packed([PackedCall(bd)])
    if q.dim() != 4:
        raise ValueError(f"query must be BSHD [B, S, H, D] (or packed [T, H, D] with cu_seqlens_q/k in the metadata), "
                         f"got shape {tuple(q.shape)}")
    B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    if attn_mask is None:
        return MaskTranslation("causal", Causal()) if causal else MaskTranslation("none")
    if attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (B, Sk):
            raise ValueError(f"attn_mask must be [B={B}, Sk={Sk}] (True/1 = keep, over the joint keys), got "
                             f"{tuple(attn_mask.shape)}")
        valid = _as_valid(attn_mask, "attn_mask")
        if not causal:
            return MaskTranslation("none") if bool(valid.all()) else MaskTranslation("key_padding", KeyPadding(valid))
        return MaskTranslation("key_padding", KeyPadding(valid, causal=True))     # no host read, no dense mask
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
        return translate_dense(mask, B, Sq, Sk)
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
    return _cat_key_masks(attn_mask, joint_mask, B, key_len, joint_len, strategy, k.device)


def _cat_key_masks(attn_mask, joint_mask, batch: int, key_len: int, joint_len: int, strategy: str, device):
    """``[B, key_len]`` and ``[B, joint_len]`` key masks (None = keep all) as one bool mask in joint order."""
    if attn_mask is None:
        attn_mask = torch.ones(batch, key_len, dtype=torch.bool, device=device)
    if joint_mask is None:
        joint_mask = torch.ones(batch, joint_len, dtype=torch.bool, device=device)
    if tuple(attn_mask.shape) != (batch, key_len) or tuple(joint_mask.shape) != (batch, joint_len):
        raise ValueError(f"attn_mask is {tuple(attn_mask.shape)} and joint_attn_mask {tuple(joint_mask.shape)}, but "
                         f"key has [B={batch}, {key_len}] keys and joint_key [B={batch}, {joint_len}]")
    attn_mask, joint_mask = _as_valid(attn_mask, "attn_mask"), _as_valid(joint_mask, "joint_attn_mask")
    return torch.cat([joint_mask, attn_mask] if strategy == "front" else [attn_mask, joint_mask], dim=1)


#: the metadata fields a translation is built from
_MASK_FIELDS = ("attn_mask", "joint_attn_mask", "cu_seqlens_q", "cu_seqlens_k", "seq_lens")


class _MetadataTranslations:
    """The :class:`MaskTranslation` per metadata, shared by every layer (bounded, least recently used
    first out, thread-safe).

    Keyed on what the translation is built from: the fields in ``_MASK_FIELDS`` (tensors by identity, held
    weakly and checked on a hit, with their version counter, storage, shape, strides, dtype and device;
    lists by value) and the caller's static key (causal flag, joint strategy, q/k shapes). Inference
    tensors have no version counter: their translations are also keyed on the metadata object, held weakly,
    and not cached when it takes no weak reference.
    """

    def __init__(self, size: int = 8):
        self._size = size
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, meta, static_key: tuple, build):
        fingerprint, refs, versioned = [], [], True
        for name in _MASK_FIELDS:
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
        got = build()
        with self._lock:
            self._entries[key] = (tuple(weakref.ref(t) for t in refs), got)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return got


_TRANSLATIONS = _MetadataTranslations()


class Attention(nn.Module):
    """vLLM-Omni-compatible attention layer: ``forward(query, key, value, attn_metadata=None)``, BSHD."""

    def __init__(self, num_heads: int, head_size: int, causal: bool, softmax_scale: float | None,
                 num_kv_heads: int | None = None, *, backend: str | None = None, ulysses_degree: int = 1,
                 ring_degree: int = 1, sequence_parallel=None, skip_sequence_parallel: bool = False,
                 softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
                 sinks: torch.Tensor | None = None, **kwargs):
        super().__init__()
        for name, val in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if sequence_parallel is not None and (ulysses_degree, ring_degree) != (1, 1):
            raise ValueError("give sequence_parallel= or ulysses_degree/ring_degree, not both")
        self.ulysses_degree, self.ring_degree = ulysses_degree, ring_degree
        self._sp = None if skip_sequence_parallel else sequence_parallel
        self._sp_wanted = not skip_sequence_parallel and (sequence_parallel is not None
                                                          or ulysses_degree * ring_degree > 1)
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
        # score modifiers, passed to attnlib.attention as they are (it validates them)
        self.softcap = softcap
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        if isinstance(sinks, nn.Parameter):
            self.sinks = sinks                      # learnable: a parameter of this layer
        else:
            self.register_buffer("sinks", sinks, persistent=False)
        self.last_translation: MaskTranslation | None = None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_metadata=None) -> torch.Tensor:
        block_table = _get(attn_metadata, "block_table")
        if block_table is not None:
            return self._paged_forward(query, key, value, attn_metadata, block_table)
        if self._sp_wanted:
            return self._parallel_forward(query, key, value, attn_metadata)
        q, k, v, strategy = _join(attn_metadata, query, key, value)
        if q.shape[-2] != self.num_heads or k.shape[-2] != self.num_kv_heads:
            raise ValueError(f"expected {self.num_heads} query heads and {self.num_kv_heads} kv heads (layer config), "
                             f"got query {tuple(q.shape)} and key {tuple(k.shape)}")

        def build():
            meta = {"attn_mask": _joined_mask(attn_metadata, strategy, key.shape[1], k),
                    "cu_seqlens_q": _get(attn_metadata, "cu_seqlens_q"),
                    "cu_seqlens_k": _get(attn_metadata, "cu_seqlens_k")}
            return translate_metadata(q, k, meta, self.causal)

        static = (self.causal, strategy, tuple(q.shape[:-1]), tuple(k.shape[:-1]), key.shape[1], str(q.device))
        got = _TRANSLATIONS.get(attn_metadata, static, build)
        self.last_translation = got
        if q.dim() == 3:  # packed THD with cu_seqlens
            return attention(q, k, v, got.mask, **self._call_options())
        if got.kind == "packed" and got.parts[0].q_index is None and q.shape[0] != 1:
            raise ValueError(f"cu_seqlens_q/k need packed tokens [T, H, D] or [1, T, H, D], got {tuple(q.shape)}")
        return got.run(q, k, v, **self._call_options())

    def _call_options(self) -> dict:
        return dict(scale=self.softmax_scale, backend=self.backend, softcap=self.softcap,
                    alibi_slopes=self.alibi_slopes, sinks=self.sinks)

    def _paged_forward(self, query, key, value, meta, block_table):
        """Packed new tokens ``[T, H, D]`` (or ``[1, T, H, D]``) against page pools through ``block_table``."""
        q = query[0] if query.dim() == 4 and query.shape[0] == 1 else query
        static = ("paged", self.causal, tuple(q.shape[:-1]), str(q.device), _get(meta, "max_seqlen_k"))
        mask = _TRANSLATIONS.get(meta, static, lambda: _paged_mask(meta, q.shape[0], self.causal))
        self.last_translation = MaskTranslation("paged", mask)
        out = attention(q, key, value, mask, block_table=block_table, **self._call_options())
        return out if q is query else out[None]

    @property
    def sequence_parallel(self):
        """The layer's ``SequenceParallel`` (created on first use from the degrees), or None."""
        if self._sp is None and self._sp_wanted:
            from ..parallel import SequenceParallel

            self._sp = SequenceParallel(ulysses=self.ulysses_degree, ring=self.ring_degree)
        return self._sp

    def _parallel_forward(self, query, key, value, meta):
        sp = self.sequence_parallel
        jq, jk, jv = _get(meta, "joint_query"), _get(meta, "joint_key"), _get(meta, "joint_value")
        joint = jq is not None or jk is not None or jv is not None
        if joint and (jq is None or jk is None or jv is None):
            raise ValueError("joint_query, joint_key and joint_value must be given together (or none of them)")
        heads = (jq if joint else query).shape[-2], (jk if joint else key).shape[-2]
        if heads != (self.num_heads, self.num_kv_heads) or query.shape[-2] != self.num_heads \
                or key.shape[-2] != self.num_kv_heads:
            raise ValueError(f"expected {self.num_heads} query heads and {self.num_kv_heads} kv heads (layer config), "
                             f"got query {tuple(query.shape)} and key {tuple(key.shape)}")
        kw = self._call_options()
        if not joint:
            mask = _whole_mask(meta, self.causal, query, key)
            self.last_translation = _translation_of(mask)
            return sp.attention(query, key, value, mask, **kw)
        strategy = _get(meta, "joint_strategy") or "front"
        if strategy not in _JOINT_STRATEGIES:
            raise ValueError(f"joint_strategy must be one of {_JOINT_STRATEGIES}, got {strategy!r}")
        mask = _whole_joint_mask(meta, self.causal, strategy, sp, query, jk)
        self.last_translation = _translation_of(mask)
        return sp.joint_attention(query, key, value, jq, jk, jv, mask, joint_strategy=strategy, **kw)

    def extra_repr(self) -> str:
        sp = "" if not self._sp_wanted else f", ulysses_degree={self.ulysses_degree}, ring_degree={self.ring_degree}"
        return (f"num_heads={self.num_heads}, head_size={self.head_size}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, softmax_scale={self.softmax_scale:.4g}, backend={self.backend or 'auto'}{sp}"
                + (f", softcap={self.softcap:g}" if self.softcap is not None else "")
                + (", alibi" if self.alibi_slopes is not None else "") + (", sinks" if self.sinks is not None else ""))


def _paged_mask(meta, tokens: int, causal: bool) -> BlockDiagonal:
    """The ``BlockDiagonal`` of paged metadata: ``seq_lens`` (keys per request) and ``cu_seqlens_q``."""
    seq_lens, cu_q = _get(meta, "seq_lens"), _get(meta, "cu_seqlens_q")
    if seq_lens is None:
        raise ValueError("paged metadata (block_table) needs seq_lens: each request's key count, new tokens included")
    n = seq_lens.shape[0] if isinstance(seq_lens, torch.Tensor) else len(seq_lens)
    if cu_q is None:
        q_lens = (1,) * n
    else:
        q_lens = BlockDiagonal.from_cu_seqlens(cu_q).q_seqlens
    if sum(q_lens) != tokens:
        raise ValueError(f"cu_seqlens_q covers {sum(q_lens)} new tokens but query has {tokens} (without cu_seqlens_q: "
                         f"one new token per request of block_table)")
    bound = _get(meta, "max_seqlen_k")
    if isinstance(seq_lens, torch.Tensor) and bound is not None:
        return BlockDiagonal.from_device_lengths(q_lens, seq_lens, int(bound), causal=causal)
    return BlockDiagonal(q_lens, seq_lens, causal=causal)


# -- sequence parallel: masks over the whole sequence ---------------------------------------------------------
def _translation_of(mask) -> MaskTranslation:
    from ..masks import DenseMask

    if mask is None:
        return MaskTranslation("none")
    kind = {Causal: "causal", KeyPadding: "key_padding", DenseMask: "dense"}.get(type(mask), "packed")
    return MaskTranslation(kind, mask, reason="the whole sequence's 4-D attn_mask" if kind == "dense" else "")


def _whole_mask(meta, causal: bool, query, key):
    """The attnlib mask of the whole (sharded) sequence from the metadata: no dense analysis, no host read."""
    from ..masks import DenseMask

    cu_q, cu_k = _get(meta, "cu_seqlens_q"), _get(meta, "cu_seqlens_k")
    attn_mask = _get(meta, "attn_mask")
    if cu_q is not None or cu_k is not None:
        if attn_mask is not None:
            raise NotImplementedError("attn_mask together with cu_seqlens_q/k is not supported")
        return BlockDiagonal.from_cu_seqlens(cu_q if cu_q is not None else cu_k, cu_k, causal=causal)
    if attn_mask is None:
        return Causal() if causal else None
    if attn_mask.dim() == 2:
        if attn_mask.shape[0] != query.shape[0]:
            raise ValueError(f"attn_mask must be [B={query.shape[0]}, S_k] over all keys of the whole sequence, got "
                             f"{tuple(attn_mask.shape)}")
        return KeyPadding(_as_valid(attn_mask, "attn_mask"), causal=causal)
    if attn_mask.dim() == 4:
        keep = attn_mask > torch.finfo(attn_mask.dtype).min / 2 if attn_mask.dtype.is_floating_point else \
            _as_valid(attn_mask, "attn_mask")
        if attn_mask.dtype.is_floating_point and not causal:
            return DenseMask(attn_mask)
        sq, sk = keep.shape[-2:]
        return DenseMask(keep & Causal().materialize(sq, sk, keep.device) if causal else keep)
    raise ValueError(f"attn_mask must be 2-D [B, S_k] or 4-D [B, H, S_q, S_k] over the whole sequence, got "
                     f"{tuple(attn_mask.shape)}")


def _whole_joint_mask(meta, causal: bool, strategy: str, sp, query, joint_key):
    """The joint sequence's mask: ``joint_attn_mask [B, T]`` and ``attn_mask [B, S]`` (whole) joined in
    ``strategy`` order as a KeyPadding; missing ones keep every key (the whole image length then comes
    from one exchange of the local lengths unless ``attn_mask`` gives it)."""
    attn_mask, joint_mask = _get(meta, "attn_mask"), _get(meta, "joint_attn_mask")
    if _get(meta, "cu_seqlens_q") is not None or _get(meta, "cu_seqlens_k") is not None:
        raise NotImplementedError("joint_query/key/value together with cu_seqlens_q/k is not supported")
    if attn_mask is None and joint_mask is None:
        return Causal() if causal else None
    if (attn_mask is not None and attn_mask.dim() != 2) or (joint_mask is not None and joint_mask.dim() != 2):
        raise ValueError("with joint tensors, attn_mask and joint_attn_mask must be 2-D [B, S] key masks")
    dev = query.device
    s_img = attn_mask.shape[-1] if attn_mask is not None else sp.whole_length(query.shape[1], dev)
    valid = _cat_key_masks(attn_mask, joint_mask, query.shape[0], s_img, joint_key.shape[1], strategy, dev)
    return KeyPadding(valid, causal=causal)
