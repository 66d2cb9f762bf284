"""attnlib as a transformers attention implementation.

    import attnlib.integrations.transformers as attnlib_hf
    attnlib_hf.register()                                   # once, before loading/using models
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attnlib")
    model.set_attn_implementation("attnlib")                # or switch an existing model

Every attention call of the model then runs ``attnlib.attention``, honouring ``backend=`` given to
:func:`register`, ``attnlib.use_backend(...)`` and ``$DIFFUSION_ATTENTION_BACKEND``.

Only public extension points are used: ``AttentionInterface.register`` for the attention function and
``AttentionMaskInterface.register`` for the mask builder, :func:`build_mask`. transformers calls the
builder once per mask and forward with the arguments it gives its own ``sdpa_mask`` (sizes, offsets,
the 2-D padding mask, the ``mask_function``), and hands what it returns, a :class:`TransformersMask`,
unchanged to every layer's attention function. The builder translates those arguments straight into an
attnlib mask, with device ops only (no dense mask, no read of a tensor on the host):

=============================================================  ==========================================
transformers asks for                                           attnlib runs
=============================================================  ==========================================
causal, no padding, queries are the newest keys (dynamic        ``Causal()`` / ``Causal(window=W)``
cache, no cache, fresh static cache: keys past the queries      (``None`` for one query without a window)
are dropped)
causal with a 2-D padding mask (left/right padding, holes)      ``KeyPadding(valid, causal=True[, window])``
                                                                (``KeyPadding(valid)`` for one query)
one query against a filled static cache (offset on the device)  ``KeyPadding(valid)``, the written slots
several queries against a filled static cache                   ``DenseMask`` built on the device
bidirectional (encoders), with / without padding                ``KeyPadding(valid)`` / ``None``
position ids restarting at 0 (sequences packed in a row)        ``BlockDiagonal(causal=True[, window])``
=============================================================  ==========================================

Packed sequences need their lengths on the host: they are read once per mask object (that is, once
per forward; all layers reuse the ``BlockDiagonal``), and ``cu_seq_lens_q/k`` keyword arguments
(flash-style packing) once per tensor. Anything else -- custom ``mask_function``s (image-token or
bidirectional overlays, ``block_sequence_ids``), chunked attention, a model that asks for a
materialized mask (``allow_is_causal_skip=False``, e.g. to add ALiBi), unknown combinations -- runs
transformers' own ``sdpa_mask`` and recovers the structure from the dense mask
(:func:`attnlib.integrations._structure.translate_dense`): exact, but it reads the mask on the host
once per mask. So does a static cache's decode step in sliding-window layers (transformers clears
``allow_is_causal_skip`` there itself, which the builder cannot tell from a model's request). While
``torch.compile`` traces, where neither the analysis nor reading the mask functions' closures is
possible, those cases and the sliding-window and packed masks use transformers' dense mask as a
``DenseMask`` (exact, built on the device). :func:`last_translation` says which path ran (``.path``:
``"direct"``, ``"lengths"``, ``"dense"`` or ``"device_dense"``; ``.why`` for the dense paths).

The builder recognises transformers' mask functions by the code objects of its public factories
(``causal_mask_function``, ``bidirectional_mask_function``, ``and_masks``,
``sliding_window_overlay``, ``remap_positions_for_packed_sequence``,
``packed_sequence_mask_function``) and reads their closure variables by name; a function it does not
recognise takes the dense path, never a guess.

Score modifiers: ``softcap`` (Gemma 2) and per-head attention sinks (``s_aux``, gpt-oss) go to
``attnlib.attention(softcap=, sinks=)``. No transformers model passes ALiBi slopes to its attention
function (Falcon adds ALiBi to a materialized float mask, which runs as a ``DenseMask``).

A :class:`TransformersMask` survives transformers' exporters: it is a ``torch.utils._pytree`` node
whose one leaf is the dense mask it stands for (an exported graph takes that tensor as input and runs
it as a ``DenseMask``: one graph for every mask of its shape, as with transformers' ``sdpa`` masks), it
has no ``__dict__`` for generic object walkers to rewrite, and ``torch.cat`` of step masks along the
query axis (how the exporter merges decode steps) gives the mask of the merged steps.

Raises ``NotImplementedError`` naming the feature for: attention dropout in training, per-token
sinks (``sinks`` that are not one logit per head), ``position_bias`` (T5-style) and transformers'
paged cache (continuous batching).
"""
from __future__ import annotations

try:
    import transformers  # noqa: F401
    from transformers import AttentionInterface
    from transformers import masking_utils as _mu
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover - exercised only without transformers
    from ..versions import get, requirement

    raise ImportError(f"attnlib.integrations.transformers needs the `transformers` package (pip install "
                      f"'{requirement(get('transformers'))}'); attnlib itself works without it") from e

import threading
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..masks import BlockDiagonal, Causal, DenseMask, KeyPadding
from ..registry import canonical_name
from ..userframe import user_stacklevel
from ._structure import MaskTranslation, PackedCall, TensorKeyedCache, translate_dense

__all__ = ["register", "attnlib_attention_forward", "make_attention_function", "translate", "last_translation",
           "build_mask", "TransformersMask", "MaskTranslation", "NAME"]

NAME = "attnlib"

#: transformers' dense 4-D masks analysed on the host, one translation per mask tensor
_dense_translations = TensorKeyedCache()
_last_translation: list = [None]
#: the dense tensors build_mask handed to models that asked for a materialized mask (by id)
_materialized: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def _from_args(kind: str, mask=None, **fields) -> MaskTranslation:
    """A translation built from transformers' mask arguments (``path="direct"``).

    The ``path`` of a translation here says how it was obtained: ``"direct"`` (from the mask
    arguments, nothing read on the host), ``"lengths"`` (packed sequences: their lengths read on the
    host once per mask object or ``cu_seq_lens`` tensor), ``"dense"`` (transformers' dense mask
    analysed on the host; ``why`` says why) or ``"device_dense"`` (transformers' dense mask used as
    it is, e.g. under ``torch.compile`` where the analysis cannot run: exact but without structure).
    """
    return MaskTranslation(kind, mask, path="direct", **fields)


def last_translation() -> MaskTranslation | None:
    """What the most recent attention call ran (the attnlib mask and how it was obtained): for tests
    and debugging. Calls inside a ``torch.compile``d region do not update it."""
    return _last_translation[0]


# ---------------------------------------------------------------------------------------------
# recognising transformers' mask functions
# ---------------------------------------------------------------------------------------------
def _code_of(factory, *args):
    try:
        return factory(*args).__code__
    except Exception:  # pragma: no cover - a transformers version without this factory
        return None


_CAUSAL_FN = getattr(_mu, "causal_mask_function", None)
_BIDIRECTIONAL_FN = getattr(_mu, "bidirectional_mask_function", None)
_AND_CODE = _code_of(getattr(_mu, "and_masks", None), _CAUSAL_FN) if _CAUSAL_FN is not None else None
_SLIDING_CODE = _code_of(getattr(_mu, "sliding_window_overlay", None), 1)
_REMAP_CODE = (_code_of(getattr(_mu, "remap_positions_for_packed_sequence", None), _CAUSAL_FN, torch.zeros(1, 1))
               if _CAUSAL_FN is not None else None)
_PACKED_CODE = _code_of(getattr(_mu, "packed_sequence_mask_function", None), torch.zeros(1, 1))


def _closure(fn) -> dict:
    code = fn.__code__
    return dict(zip(code.co_freevars, (c.cell_contents for c in (fn.__closure__ or ()))))


def _is(fn, code) -> bool:
    return code is not None and getattr(fn, "__code__", None) is code


@dataclass(frozen=True)
class _Pattern:
    """What a recognised mask function computes: ``causal`` (kv <= q), ``window`` (kv > q - W),
    and for packed sequences the ``segments`` tensor ([B, S], equal ids = one sequence)."""

    causal: bool
    window: int | None = None
    segments: torch.Tensor | None = None


def _pattern(fn) -> _Pattern | None:
    """The pattern of ``fn``, or None when it is not (exactly) one attnlib expresses."""
    try:
        if _is(fn, _AND_CODE):
            parts = list(_closure(fn)["mask_functions"])
            if len(parts) == 2 and _is(parts[0], _REMAP_CODE) and _is(parts[1], _PACKED_CODE):
                return _packed_pattern(parts[0], parts[1])
            return _and_pattern(parts)
        return _and_pattern([fn])
    except (KeyError, AttributeError, TypeError, ValueError):
        return None


def _and_pattern(parts) -> _Pattern | None:
    causal = full = False
    windows = []
    for f in parts:
        if _CAUSAL_FN is not None and f is _CAUSAL_FN:
            causal = True
        elif _BIDIRECTIONAL_FN is not None and f is _BIDIRECTIONAL_FN:
            full = True  # q_idx >= 0: true for every query
        elif _is(f, _SLIDING_CODE):
            w = _closure(f)["sliding_window"]
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                return None
            windows.append(w)
        elif _is(f, _AND_CODE):
            inner = _and_pattern(list(_closure(f)["mask_functions"]))
            if inner is None or inner.segments is not None:
                return None
            causal |= inner.causal
            full |= not inner.causal
            if inner.window is not None:
                windows.append(inner.window)
        else:
            return None
    if windows and not causal:
        return None  # a window that is not counted back from the causal diagonal
    if not (causal or full):
        return None
    return _Pattern(causal, min(windows) if windows else None)


def _packed_pattern(remap, packed) -> _Pattern | None:
    """``and_masks(remap_positions_for_packed_sequence(base, position_ids), packed_sequence_mask_function(ids))``:
    within one sequence the position ids step by 1 (that is how transformers finds the sequences), so
    ``base`` on position ids is ``base`` on token indices inside each sequence."""
    inner = _pattern(_closure(remap)["mask_function"])
    segments = _closure(packed)["packed_sequence_mask"]
    if inner is None or inner.segments is not None or not inner.causal or not isinstance(segments, torch.Tensor):
        return None
    if segments.dim() != 2:
        return None
    return _Pattern(True, inner.window, segments)


# ---------------------------------------------------------------------------------------------
# the mask object transformers hands to the attention function
# ---------------------------------------------------------------------------------------------
class TransformersMask:
    """What :func:`build_mask` returns and the attention function receives (one per mask and forward).

    It carries the attnlib mask for ``[batch_size, q_length]`` queries against ``kv_length`` keys
    (``crop_k``: only the first ``crop_k`` keys can be visible, the rest are empty static-cache slots),
    or what is needed to build it once, on first use: the packed sequence ids (lengths read on the host
    once), or transformers' dense mask (analysed once). Every layer reuses the result.
    ``ndim``/``shape``/``dim()`` describe the ``[B, 1, Sq, Sk]`` mask it stands for, so transformers can
    pass it back into its mask functions (``generate`` prepares masks ahead of the forward with a static
    cache) and its exporters can merge decode steps (``torch.cat`` along the query axis).

    For ``torch.export`` it is a pytree node with one leaf, the dense ``[B, 1, Sq, Sk]`` mask it stands
    for: an exported graph takes that tensor as its input (as with transformers' ``sdpa`` masks) and
    runs it as a ``DenseMask``. Rebuilt from its leaf inside the trace it knows no sizes of its own, so
    they stay symbolic under dynamic shapes. ``__slots__`` (no ``__dict__``) keeps generic object
    walkers (transformers' ``cast_leaf_tensors``) from rewriting its fields.
    """

    ndim = 4
    __slots__ = ("batch_size", "q_length", "kv_length", "crop_k", "plain", "_kwargs", "_translation", "_segments",
                 "_window", "_why", "_cropped")

    def __init__(self, kwargs: dict, *, translation: MaskTranslation | None = None, crop_k: int | None = None,
                 plain: bool = False, segments: torch.Tensor | None = None, window: int | None = None, why: str = ""):
        self.batch_size = int(kwargs["batch_size"])
        self.q_length = int(kwargs["q_length"])
        self.kv_length = int(kwargs["kv_length"])
        self.crop_k = crop_k
        #: no padding and no packing: the keyword ``cu_seq_lens_q/k`` (flash-style packing) may refine it
        self.plain = plain
        self._kwargs = kwargs
        self._translation = translation
        self._segments = segments
        self._window = window
        self._why = why
        self._cropped: dict = {}

    @property
    def shape(self) -> tuple:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    def dim(self) -> int:
        return self.ndim

    @property
    def mask(self):
        """The attnlib mask (builds it on first use for the packed and dense paths)."""
        return self.translation().mask

    @property
    def path(self) -> str:
        if self._translation is not None:
            return self._translation.path
        return "lengths" if self._segments is not None else "dense"

    def fits(self, batch_size: int, q_length: int, kv_length: int) -> bool:
        """Whether this mask was built for these sizes (a mask rebuilt from its leaves knows none: it fits)."""
        if self.batch_size is None:
            return True
        return (self.batch_size, self.q_length, self.kv_length) == (batch_size, q_length, kv_length)

    def translation(self) -> MaskTranslation:
        """The attnlib calls this mask runs as (built on first use)."""
        # no lock (torch.compile cannot trace one): two threads racing here build the same translation
        if self._translation is None:
            self._translation = self._packed() if self._segments is not None else self._dense()
        return self._translation

    def _packed(self) -> MaskTranslation:
        seg = self._segments
        B, S = seg.shape
        # one read of the sequence ids on the host (all layers share this object)
        ids = (seg.to(torch.int64) + torch.arange(B, device=seg.device)[:, None] * (S + 1)).reshape(-1).cpu()
        lengths = torch.unique_consecutive(ids, return_counts=True)[1].tolist()
        window = self._window if self._window is not None and self._window < max(lengths) else None
        bd = BlockDiagonal(lengths, causal=True, window=window)
        return MaskTranslation("packed", bd, parts=(PackedCall(bd),), path="lengths")

    def dense_tensor(self) -> torch.Tensor:
        """transformers' own boolean ``[B, 1, Sq, Sk]`` mask for these arguments (``sdpa_mask``)."""
        if "mask_function" not in self._kwargs:
            raise ValueError("this TransformersMask was rebuilt from its tensors (torch.export) and no longer has "
                             "transformers' mask arguments; build the mask again with build_mask(...)")
        kw = dict(self._kwargs, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        return sdpa_mask(**kw)

    def _dense(self, seqlen_k: int | None = None) -> MaskTranslation:
        m = self.dense_tensor()
        if seqlen_k is not None and m.shape[-1] > seqlen_k:
            m = m[..., :seqlen_k]  # as transformers' sdpa path slices its mask to the keys
        sk = m.shape[-1]
        return translate_dense(m, self.batch_size, self.q_length, sk).with_path("dense", self._why)

    def resolve(self, batch: int, seqlen_q: int, seqlen_k: int) -> tuple[MaskTranslation, int | None]:
        """The translation for a call with these sizes, and the number of keys to keep (None: all)."""
        if self.batch_size is None:  # rebuilt from its leaf by torch.export: made for this call
            return self.translation(), None
        if batch != self.batch_size or seqlen_q != self.q_length:
            raise ValueError(f"the attention mask was built for batch {self.batch_size} and {self.q_length} "
                             f"queries, the call has batch {batch} and {seqlen_q}")
        if seqlen_k != self.kv_length:
            if seqlen_k > self.kv_length:
                raise ValueError(f"the attention mask covers {self.kv_length} keys, the call has {seqlen_k}")
            # fewer keys than transformers sized the mask for: its sdpa path keeps the first columns
            if seqlen_k not in self._cropped:
                self._cropped[seqlen_k] = self._dense(seqlen_k)
            return self._cropped[seqlen_k], None
        t = self.translation()
        return t, (self.crop_k if t.path == "direct" else None)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """``torch.cat(step_masks, dim=2)``: transformers' exporters merge the masks of consecutive decode
        steps along the query axis. The result is the concatenation of transformers' dense masks of the
        steps (exact whatever the steps were), run as a ``DenseMask`` built on the device."""
        kwargs = kwargs or {}
        if func is torch.cat:
            masks = args[0] if args else kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if dim in (2, -2) and masks and all(isinstance(m, TransformersMask) for m in masks):
                return cls._cat_queries(list(masks))
        return NotImplemented

    @classmethod
    def _cat_queries(cls, masks: list) -> "TransformersMask":
        first, last = masks[0], masks[-1]
        if any((m.batch_size, m.kv_length) != (last.batch_size, last.kv_length) for m in masks):
            raise ValueError("torch.cat of TransformersMasks along the query axis needs the same batch and key sizes, "
                             f"got shapes {[m.shape for m in masks]}")
        dense = torch.cat([m.dense_tensor().expand(m.batch_size, 1, m.q_length, m.kv_length) for m in masks], dim=2)
        # the merged steps' arguments: the first step's query offset, the last step's padding (it spans the most)
        kw = dict(last._kwargs, q_length=dense.shape[2], q_offset=first._kwargs["q_offset"])
        return cls(kw, translation=MaskTranslation(
            "dense", DenseMask(dense), reason="the dense masks of several steps, concatenated along the query axis",
            path="device_dense"))

    def __repr__(self):
        if self._translation is not None:
            what = self._translation.describe()
        else:
            what = f"<{self.path}, built on first use>"
        crop = f", keys cropped to {self.crop_k}" if self.crop_k is not None else ""
        return f"TransformersMask({what}, shape={list(self.shape)}{crop})"


# -- torch.export: a pytree node whose one leaf is the dense mask ----------------------------------------------
def _flatten(tm: TransformersMask):
    """One leaf, the ``[B, 1, Sq, Sk]`` mask it stands for (transformers' own dense mask, or the dense mask
    it already runs): what transformers' ``sdpa`` path hands an exporter. The exported graph then runs
    a ``DenseMask`` (exact), and one graph serves every mask of its shape -- padded or not, one query or
    several -- where a structured attnlib mask would tie it to the structure it was traced with."""
    t = tm._translation
    if t is not None and t.kind == "dense" and (t.path == "device_dense" or "mask_function" not in tm._kwargs):
        dense = t.mask.mask
    else:
        dense = tm.dense_tensor()
    return [dense], None


def _unflatten(leaves, context) -> TransformersMask:
    (dense,) = leaves
    tm = TransformersMask.__new__(TransformersMask)
    tm.batch_size = tm.q_length = tm.kv_length = tm.crop_k = None
    tm.plain, tm._segments, tm._window, tm._why, tm._cropped, tm._kwargs = False, None, None, "", {}, {}
    tm._translation = MaskTranslation("dense", DenseMask(dense), reason="transformers' dense mask (torch.export)",
                                      path="device_dense")
    return tm


def _flatten_with_keys(tm: TransformersMask):
    leaves, context = _flatten(tm)
    return [(torch.utils._pytree.SequenceKey(0), leaves[0])], context


torch.utils._pytree.register_pytree_node(
    TransformersMask, _flatten, _unflatten, serialized_type_name=f"{__name__}.TransformersMask",
    flatten_with_keys_fn=_flatten_with_keys)


# ---------------------------------------------------------------------------------------------
# the mask builder registered with AttentionMaskInterface
# ---------------------------------------------------------------------------------------------
def _key_valid(pad: torch.Tensor, kv_offset: int, kv_length: int) -> torch.Tensor:
    """``pad[:, kv_offset : kv_offset + kv_length]`` as bool, missing columns False (transformers'
    ``prepare_padding_mask``). Device ops only."""
    if pad.dtype != torch.bool:
        pad = pad != 0
    need = kv_offset + kv_length
    if pad.shape[-1] < need:
        pad = F.pad(pad, (0, need - pad.shape[-1]), value=False)
    return pad[:, kv_offset:need]


def _direct(kwargs: dict, pattern: _Pattern, why_not: list) -> TransformersMask | None:
    B, Sq, Sk = kwargs["batch_size"], kwargs["q_length"], kwargs["kv_length"]
    q_offset, kv_offset = kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0)
    pad = kwargs.get("attention_mask")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (B, Sq, Sk, kv_offset)):
        why_not.append("sizes or key offset that are not Python ints")
        return None
    if pad is not None and (not isinstance(pad, torch.Tensor) or pad.dim() != 2 or pad.shape[0] != B):
        why_not.append("a padding mask that is not [batch, keys]")
        return None
    window = pattern.window

    if pattern.segments is not None:  # sequences packed in a row (no cache, no padding)
        if pad is not None or q_offset != 0 or kv_offset != 0 or Sq != Sk or tuple(pattern.segments.shape) != (B, Sq):
            why_not.append("packed sequences together with a cache or a padding mask")
            return None
        return TransformersMask(kwargs, segments=pattern.segments, window=window)

    if not pattern.causal:  # bidirectional: only the padding
        if pad is None:
            return TransformersMask(kwargs, translation=_from_args("none"), plain=True)
        padding = KeyPadding(_key_valid(pad, kv_offset, Sk))
        return TransformersMask(kwargs, translation=_from_args("key_padding", padding))

    valid = None if pad is None else _key_valid(pad, kv_offset, Sk)
    if isinstance(q_offset, torch.Tensor):
        # a filled static cache: the queries' position lives on the device; the keys past it are empty
        # slots, which only the mask can hide
        if q_offset.numel() != 1:
            why_not.append("a query offset tensor with more than one element")
            return None
        dev = q_offset.device
        kpos = torch.arange(Sk, device=dev) + kv_offset
        if Sq == 1:
            keep = kpos <= q_offset
            if window is not None:
                keep &= kpos > q_offset - window
            keep = keep[None, :].expand(B, Sk)
            keep = keep & valid if valid is not None else keep.contiguous()
            return TransformersMask(kwargs, translation=_from_args("key_padding", KeyPadding(keep)))
        qpos = torch.arange(Sq, device=dev) + q_offset
        keep = kpos[None, :] <= qpos[:, None]
        if window is not None:
            keep &= kpos[None, :] > qpos[:, None] - window
        keep = keep[None, None].expand(B, 1, Sq, Sk)
        keep = keep & valid[:, None, None, :] if valid is not None else keep.contiguous()
        return TransformersMask(kwargs, translation=_from_args("dense", DenseMask(keep), reason=(
            "several queries against a filled static cache: their position is only known on the device")))

    if not isinstance(q_offset, int) or isinstance(q_offset, bool):
        why_not.append(f"a query offset of type {type(q_offset).__name__}")
        return None
    n = q_offset + Sq - kv_offset  # keys up to the newest query
    if n < Sq or n > Sk:
        why_not.append(f"queries at positions {q_offset}..{q_offset + Sq - 1} that are not the newest of keys "
                       f"{kv_offset}..{kv_offset + Sk - 1}")
        return None
    crop = n if n < Sk else None
    if window is not None and window >= n:
        window = None  # no query sees more than n keys: the window never binds
    if valid is None:
        if Sq == 1 and window is None:
            return TransformersMask(kwargs, translation=_from_args("none"), crop_k=crop, plain=True)
        return TransformersMask(kwargs, translation=_from_args("causal", Causal(window=window)), crop_k=crop,
                                plain=True)
    valid = valid[:, :n] if crop is not None else valid
    if Sq == 1:  # one query: causal is every key; a window is the newest W keys
        if window is not None:
            valid = valid & (torch.arange(n, device=valid.device) >= n - window)
        return TransformersMask(kwargs, translation=_from_args("key_padding", KeyPadding(valid)), crop_k=crop)
    return TransformersMask(kwargs, translation=_from_args("key_padding", KeyPadding(valid, causal=True, window=window)),
                            crop_k=crop)


def build_mask(batch_size: int, q_length: int | None = None, kv_length: int | None = None, q_offset=0,
               kv_offset: int = 0, mask_function=None, attention_mask=None, local_size=None,
               allow_is_causal_skip: bool = True, allow_is_bidirectional_skip: bool = False, **kwargs):
    """The mask builder registered with ``AttentionMaskInterface``: the keyword arguments of
    transformers' ``sdpa_mask``, and a :class:`TransformersMask` back (a model that asks for a
    materialized mask gets transformers' dense tensor instead; see the module docstring)."""
    if q_length is None or kv_length is None:
        # an older transformers (``cache_position`` instead of ``q_length``/``q_offset``): its own masks
        return sdpa_mask(batch_size, kv_length=kv_length, kv_offset=kv_offset, mask_function=mask_function or _CAUSAL_FN,
                         attention_mask=attention_mask, local_size=local_size, allow_is_causal_skip=allow_is_causal_skip,
                         allow_is_bidirectional_skip=allow_is_bidirectional_skip, **kwargs)
    if mask_function is None:
        mask_function = _CAUSAL_FN
    if isinstance(attention_mask, TransformersMask):
        # a mask prepared ahead of the forward (generate with a static cache) comes back in
        if attention_mask.fits(batch_size, q_length, kv_length):
            return attention_mask
        attention_mask = attention_mask._kwargs.get("attention_mask")
    kw = dict(kwargs, batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
              kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
              allow_is_causal_skip=allow_is_causal_skip, allow_is_bidirectional_skip=allow_is_bidirectional_skip)
    pattern = _pattern(mask_function)
    compiling = torch.compiler.is_compiling()
    why_not: list = []
    if pattern is None:
        name = "" if compiling else f" {getattr(mask_function, '__qualname__', type(mask_function).__name__)!r}"
        why_not.append(f"mask_function{name} is not one of transformers' causal / sliding-window / bidirectional / "
                       "packed-sequence masks" + (" (or its closure cannot be read while compiling)" if compiling else ""))
    elif pattern.window is not None and pattern.segments is None and local_size is not None and local_size != pattern.window:
        why_not.append(f"local_size={local_size} differs from the mask function's sliding window {pattern.window}")
    elif pattern.segments is None and _materialize_requested(pattern, kw):
        # the model adds to the mask or concatenates it (ALiBi, indexers, ...): it needs the tensor
        dense = sdpa_mask(**kw)
        if isinstance(dense, torch.Tensor) and not compiling:
            _materialized[id(dense)] = dense
        return dense
    else:
        got = _direct(kw, pattern, why_not)
        if got is not None:
            return got
    why = "; ".join(why_not)
    if compiling:
        # no host read inside a compiled graph: transformers' mask, built on the device, used as it is
        dense = sdpa_mask(**dict(kw, allow_is_causal_skip=False, allow_is_bidirectional_skip=False))
        return TransformersMask(kw, translation=MaskTranslation(
            "dense", DenseMask(dense), reason="transformers' dense mask, used as it is while compiling",
            path="device_dense", why=why))
    return TransformersMask(kw, why=why)


def _materialize_requested(pattern: _Pattern, kw: dict) -> bool:
    """transformers' mask functions set the skip flags to False themselves only for custom overlays,
    packing and a compileable cache's decode step (one query, offset a tensor for full-attention static
    layers); otherwise False came from the model, which then works on the tensor."""
    if pattern.causal:
        if kw["allow_is_causal_skip"]:
            return False
        return not (kw["q_length"] == 1 and isinstance(kw["q_offset"], torch.Tensor))
    return not kw["allow_is_bidirectional_skip"]


# ---------------------------------------------------------------------------------------------
# the attention function
# ---------------------------------------------------------------------------------------------
class _CuCache:
    """One translation per ``cu_seq_lens_q/k`` tensor pair and layer kind (every layer gets the same
    tensors; ``extra`` tells causal and windowed layers apart)."""

    def __init__(self, size: int = 4):
        self._size = size
        self._entries: dict = {}
        self._lock = threading.Lock()

    def get(self, cu_q, cu_k, extra: tuple, build):
        tensors = tuple(t for t in (cu_q, cu_k) if isinstance(t, torch.Tensor))
        if len(tensors) != 2:
            return build()
        key = tuple((id(t), t._version, t.data_ptr()) for t in tensors) + extra
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is cu_q and entry[1]() is cu_k:
                return entry[2]
        got = build()
        with self._lock:
            self._entries[key] = (weakref.ref(cu_q), weakref.ref(cu_k), got)
            while len(self._entries) > self._size:
                self._entries.pop(next(iter(self._entries)))
        return got


_cu_cache = _CuCache()


def translate(query_bhsd: torch.Tensor, key_bhsd: torch.Tensor, attention_mask, *, causal: bool,
              sliding_window: int | None = None, cu_seqlens=None) -> tuple[MaskTranslation, int | None]:
    """Turn what transformers passes into a :class:`MaskTranslation`.

    Returns ``(translation, crop_k)``: ``crop_k`` (or None) is the number of keys to keep (the empty
    tail of a static cache).
    """
    B, _, Sq, _ = query_bhsd.shape
    Sk = key_bhsd.shape[2]
    if cu_seqlens is not None and (attention_mask is None or
                                   (isinstance(attention_mask, TransformersMask) and attention_mask.plain)):
        cu_q, cu_k = cu_seqlens
        if B != 1:
            raise ValueError(f"cu_seq_lens_q/k describe sequences packed into batch 1, got batch {B}")
        window = sliding_window if causal else None

        def build():
            bd = BlockDiagonal.from_cu_seqlens(cu_q, cu_k, causal=causal, window=window)
            return MaskTranslation("packed", bd, parts=(PackedCall(bd),), path="lengths")

        got = _cu_cache.get(cu_q, cu_k, (causal, window), build)
        if got.mask.total_q != Sq or got.mask.total_k != Sk:
            raise ValueError(f"cu_seq_lens_q/k cover {got.mask.total_q}/{got.mask.total_k} tokens but the call "
                             f"has {Sq} queries and {Sk} keys")
        return got, None
    if isinstance(attention_mask, TransformersMask):
        return attention_mask.resolve(B, Sq, Sk)
    if attention_mask is None:
        if not causal or Sq == 1:
            return _from_args("none"), None
        if Sq > Sk:
            raise ValueError(f"causal attention with more queries ({Sq}) than keys ({Sk}) and no mask")
        # a caller relying on the kwarg alone (flash-style, no mask) gets the window here: the W newest
        # keys, diagonal included; extra keys are unwritten cache slots (sdpa's top-left is_causal)
        window = sliding_window if sliding_window is not None and sliding_window < Sq else None
        return _from_args("causal", Causal(window=window)), (Sq if Sk > Sq else None)
    if not isinstance(attention_mask, torch.Tensor):
        raise NotImplementedError(f"attention_mask of type {type(attention_mask).__name__} (e.g. flex BlockMask) is "
                                  "not supported by the attnlib implementation; call register() so transformers "
                                  "builds attnlib masks")
    if attention_mask.dim() != 4:
        raise ValueError(f"expected transformers' 4-D attention mask [B, 1, Sq, Sk], got shape "
                         f"{tuple(attention_mask.shape)}; call register() so transformers builds masks for "
                         f"attn_implementation='{NAME}'")
    mask = attention_mask[..., :Sk] if attention_mask.shape[-1] > Sk else attention_mask
    if _materialized.get(id(attention_mask)) is attention_mask:
        why = ("the mask was built as a tensor: the call asked for a materialized mask (allow_is_causal_skip="
               "False or allow_is_bidirectional_skip=False)")
    else:
        why = "the model passed a dense 4-D mask tensor"
    return _dense_translations.get(mask, lambda: translate_dense(mask, B, Sq, Sk).with_path("dense", why)), None


def make_attention_function(backend: str | None = None):
    """An attention function for ``AttentionInterface`` that pins ``backend`` (None: selection rules)."""
    backend = None if backend is None else canonical_name(backend)

    def attnlib_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                  scaling: float | None = None, is_causal: bool | None = None,
                                  sliding_window: int | None = None, softcap: float | None = None,
                                  s_aux: torch.Tensor | None = None, **kwargs):
        """transformers attention function: BHSD in, ``(BSHD out, None)`` back (or the weights with
        ``output_attentions=True``). ``softcap`` and the per-head sinks ``s_aux`` (or ``sinks``) go to
        attnlib's score modifiers."""
        sinks = _per_head_sinks(s_aux if s_aux is not None else kwargs.get("sinks"), query.shape[1])
        _reject_unsupported(dropout, kwargs)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        cu = None
        if kwargs.get("cu_seq_lens_q") is not None:
            cu = (kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k", kwargs["cu_seq_lens_q"]))
        got, crop_k = translate(query, key, attention_mask, causal=bool(causal), sliding_window=sliding_window,
                                cu_seqlens=cu)
        if not torch.compiler.is_compiling():  # a compiled graph cannot hand objects it built to Python state
            _last_translation[0] = got
        full_k = key.shape[2]
        if crop_k is not None:
            key, value = key[:, :, :crop_k], value[:, :, :crop_k]
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        mods = dict(scale=scaling, softcap=softcap, sinks=sinks)
        if kwargs.get("output_attentions"):
            return _with_weights(got, q, k, v, full_k, **mods)
        return got.run(q, k, v, backend=backend, **mods), None

    return attnlib_attention_forward


attnlib_attention_forward = make_attention_function()


_weights_warned: list = [False]


def _with_weights(got: MaskTranslation, q, k, v, full_k: int, **mods):
    """``output_attentions=True``: output and weights ``[B, Hq, Sq, Sk]`` on the ``math`` reference path.

    The weights are the attention of the same translation over one-hot values (value ``j`` = the unit
    vector of key ``j``), so they follow exactly the mask the fast path runs -- packed rows, dropped
    padding, softcap and sinks (the sink's share is in no key's weight, as in eager) and all; rows
    that see no key have weight 0. Warns once: weights cost ``Sq x Sk`` memory per head and the
    reference path is slow.
    """
    if not _weights_warned[0]:
        _weights_warned[0] = True
        warnings.warn(f"attn_implementation='{NAME}': output_attentions=True computes the attention weights on "
                      "attnlib's reference (math) path, which is slow; leave it off for speed", RuntimeWarning,
                      stacklevel=user_stacklevel())
    B, Sk, Hkv = k.shape[0], k.shape[1], k.shape[2]
    one_hot = torch.eye(Sk, dtype=q.dtype, device=q.device)[None, :, None, :].expand(B, Sk, Hkv, Sk)
    weights = got.run(q, k, one_hot, backend="math", **mods)                    # [B, Sq, Hq, Sk]
    out = got.run(q, k, v, backend="math", **mods)
    weights = weights.transpose(1, 2)
    if Sk < full_k:                                                             # keys cropped from a static cache
        weights = torch.nn.functional.pad(weights, (0, full_k - Sk))
    return out, weights


def _per_head_sinks(sinks, heads: int):
    """The model's attention sinks as attnlib's ``sinks`` (one logit per query head), or None."""
    if sinks is None or (isinstance(sinks, torch.Tensor) and tuple(sinks.shape) == (heads,)):
        return sinks
    shape = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
    raise NotImplementedError(f"attention sinks of shape {shape}: attn_implementation='{NAME}' takes one sink "
                              f"logit per query head ([{heads}], gpt-oss' s_aux); per-token sinks are not "
                              "supported; use 'eager' for this model")


def _reject_unsupported(dropout, kwargs) -> None:
    if dropout and dropout > 0.0:
        raise NotImplementedError(f"attention dropout (p={dropout}) is not supported by attn_implementation="
                                  f"'{NAME}'; use model.eval() or set the config's attention_dropout to 0")
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError(f"position_bias (T5-style relative bias) is not supported by attn_implementation="
                                  f"'{NAME}'; use 'eager' for this model")
    cache = kwargs.get("cache")
    if cache is not None and type(cache).__name__ == "PagedAttentionCache":
        raise NotImplementedError(f"transformers' paged cache (continuous batching) is not supported by "
                                  f"attn_implementation='{NAME}'")


def register(name: str = NAME, backend: str | None = None) -> str:
    """Register attnlib with transformers under ``name`` (default ``"attnlib"``); returns the name.

    ``backend`` pins an attnlib backend for this name (e.g. ``register("attnlib_flex", backend="flex")``);
    by default each call follows ``use_backend`` / ``$DIFFUSION_ATTENTION_BACKEND`` / auto.
    Idempotent.
    """
    fn = attnlib_attention_forward if backend is None else make_attention_function(backend)
    AttentionInterface.register(name, fn)
    # transformers builds no mask at all for implementations missing from the mask interface; ours
    # builds attnlib masks from the same arguments sdpa_mask gets
    AttentionMaskInterface.register(name, build_mask)
    return name

