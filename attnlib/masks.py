"""The attention mask vocabulary: four immutable, hashable descriptions.

Backends lower these to their native form (``is_causal`` / cu_seqlens / attn_bias / BlockMask / kernel
arguments); users never build cu_seqlens or dense masks by hand. ``materialize`` gives the boolean
truth (True = query may see key) that the ``math`` backend and the tests use.

The rules below are implemented once, in :mod:`attnlib.plan`. Visibility (``i`` = query index, ``j`` = key index inside one sequence or block, ``Sq``/``Sk`` its
query/key lengths, ``off = Sk - Sq`` for bottom-right alignment and ``0`` for top-left):

=====================================  =====================================================
``None``                               every key
``Causal()``                           ``j <= i + off``  (bottom-right: the KV-cache offset)
``Causal(align="top_left")``           ``j <= i``        (torch ``is_causal``)
``Causal(window=W)``                   ``i + off - W < j <= i + off``  (the W newest keys)
``BlockDiagonal(...)``                 only keys of the query's own block; ``causal``/``window``
                                       apply per block, bottom-right
``KeyPadding(valid)``                  ``valid[b, j]``
``KeyPadding(valid, causal=True)``     ``valid[b, j]`` and bottom-right causal (``window`` as above)
``DenseMask(m)``                       ``m`` (bool: True = attend; float: added to the scores)
=====================================  =====================================================

Bottom-right causal for ``Sq=2, Sk=5`` (rows = queries, columns = keys)::

    1 1 1 1 0
    1 1 1 1 1
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import torch

__all__ = ["Mask", "Causal", "BlockDiagonal", "KeyPadding", "DenseMask", "mask_features"]

_ALIGNMENTS = ("bottom_right", "top_left")


def _check_window(window, name: str = "window") -> None:
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"{name} must be a positive int (number of newest keys a query sees) or None, got {window!r}")
    if window < 1:
        raise ValueError(f"{name} must be >= 1 (it counts the diagonal key), got {window}")


class Mask:
    """Base class of attnlib masks. Subclasses are immutable and hashable.

    ``features()`` names the capabilities a backend must list to serve the mask: the mask's own kind
    plus ``causal`` / ``top_left`` / ``window`` from its fields.
    """

    _kind: str = ""

    def features(self) -> frozenset[str]:
        f = {self._kind} if self._kind else set()
        if getattr(self, "causal", False):
            f.add("causal")
        if getattr(self, "align", None) == "top_left":
            f.add("top_left")
        if getattr(self, "window", None) is not None:
            f.add("window")
        return frozenset(f)

    def materialize(self, seqlen_q: int, seqlen_k: int, device=None) -> torch.Tensor:
        """bool, True = may attend (see each mask for the shape); built from the mask's plan."""
        return _materialize(self, seqlen_q, seqlen_k, device)


def _check_causal_window(causal, window, owner: str) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"{owner}(causal=...) must be a bool, got {causal!r}")
    _check_window(window)
    if window is not None and not causal:
        raise ValueError(f"{owner}(window=...) needs causal=True (a window is counted back from the causal diagonal)")


@dataclass(frozen=True)
class Causal(Mask):
    """Causal attention with explicit alignment and an optional sliding window.

    ``align="bottom_right"`` (default): query ``i`` sees key ``j`` iff ``j <= i + (Sk - Sq)``: the last
    query sees every key, as in decoding against a KV cache (flash-attn >= 2.1, xformers
    ``LowerTriangularFromBottomRightMask``, torch ``causal_lower_right``). ``align="top_left"``:
    ``j <= i`` (torch ``is_causal=True``). ``window=W`` additionally hides keys older than the W newest
    ones a query may see (the diagonal counts): flash-attn ``window_size=(W-1, 0)``.
    When ``Sq > Sk`` bottom-right leaves the first ``Sq - Sk`` query rows with no key: they return 0.
    """

    align: str = "bottom_right"
    window: int | None = None
    causal = True           # a class attribute, not a field

    def __post_init__(self):
        if self.align not in _ALIGNMENTS:
            raise ValueError(f"Causal(align=...) must be one of {_ALIGNMENTS}, got {self.align!r}")
        _check_window(self.window)

    @property
    def top_left(self) -> bool:
        return self.align == "top_left"

    def offset(self, seqlen_q: int, seqlen_k: int) -> int:
        """Diagonal offset: query i's newest visible key is ``i + offset``."""
        return 0 if self.top_left else seqlen_k - seqlen_q



def _as_int_tuple(values, name: str) -> tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.dtype.is_floating_point or values.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints, got {values.dtype} {tuple(values.shape)}")
        values = values.tolist()
    try:
        out = tuple(int(x) for x in values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}") from None
    for x, raw in zip(out, values):
        if isinstance(raw, float) and raw != int(raw):
            raise TypeError(f"{name} must hold ints, got {raw!r}")
    return out


class BlockDiagonal(Mask):
    """Sequences packed along the token axis; query block ``b`` sees only key block ``b``.

    Used with the packed THD layout (``q [Tq, Hq, D]``, ``k/v [Tk, Hkv, D]``): varlen packing, CFG
    branches batched into one call without attending to each other, per-request KV caches of different
    lengths. ``kv_seqlens=None`` means the same lengths as ``q_seqlens``. ``causal=True`` is bottom-right
    per block (a block with more keys than queries is a KV cache); ``window`` as in :class:`Causal`.

    Metadata is computed once here: ``cu_seqlens_q/k`` (int32, ``cu_seqlens_q_on(device)`` caches a
    copy per device) and ``max_seqlen_q/k`` as Python ints, so no backend syncs the device per layer.
    """

    _kind = "block_diagonal"
    __slots__ = ("q_seqlens", "kv_seqlens", "causal", "window", "max_seqlen_q", "max_seqlen_k",
                 "total_q", "total_k", "_cu_q", "_cu_k", "_device_cache", "_hash")

    def __init__(self, q_seqlens: Sequence[int], kv_seqlens: Sequence[int] | None = None, causal: bool = False,
                 window: int | None = None):
        q = _as_int_tuple(q_seqlens, "q_seqlens")
        kv = q if kv_seqlens is None else _as_int_tuple(kv_seqlens, "kv_seqlens")
        if len(q) == 0:
            raise ValueError("q_seqlens must name at least one block")
        if len(kv) != len(q):
            raise ValueError(f"kv_seqlens has {len(kv)} blocks but q_seqlens has {len(q)}: give one key length per query block")
        if any(x < 0 for x in q) or any(x < 0 for x in kv):
            raise ValueError(f"sequence lengths must be >= 0, got q_seqlens={q}, kv_seqlens={kv}")
        _check_causal_window(causal, window, "BlockDiagonal")
        set_ = object.__setattr__
        set_(self, "q_seqlens", q)
        set_(self, "kv_seqlens", kv)
        set_(self, "causal", causal)
        set_(self, "window", window)
        set_(self, "max_seqlen_q", max(q))
        set_(self, "max_seqlen_k", max(kv))
        set_(self, "total_q", sum(q))
        set_(self, "total_k", sum(kv))
        set_(self, "_cu_q", torch.tensor((0,) + tuple(_cumsum(q)), dtype=torch.int32))
        set_(self, "_cu_k", self._cu_q if kv == q else torch.tensor((0,) + tuple(_cumsum(kv)), dtype=torch.int32))
        set_(self, "_device_cache", {})
        set_(self, "_hash", hash((q, kv, causal, window)))

    def __setattr__(self, name, value):
        raise AttributeError("BlockDiagonal is immutable")

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_seqlens(cls, q_seqlens: Sequence[int], kv_seqlens: Sequence[int] | None = None, *,
                     causal: bool = False, window: int | None = None) -> "BlockDiagonal":
        return cls(q_seqlens, kv_seqlens, causal=causal, window=window)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens_q, cu_seqlens_k=None, *, causal: bool = False,
                        window: int | None = None) -> "BlockDiagonal":
        """From cumulative offsets ``[0, l0, l0+l1, ...]`` (list or integer tensor; read once, here)."""
        return cls(_lengths_from_cu(cu_seqlens_q, "cu_seqlens_q"),
                   None if cu_seqlens_k is None else _lengths_from_cu(cu_seqlens_k, "cu_seqlens_k"),
                   causal=causal, window=window)

    @classmethod
    def from_segment_ids(cls, segment_ids, kv_segment_ids=None, *, causal: bool = False,
                         window: int | None = None) -> "BlockDiagonal":
        """From per-token segment ids (``[0,0,0,1,1,2,...]``): each run of equal ids is one block.

        With ``kv_segment_ids`` the key runs are paired with the query runs in order and must carry the
        same ids in the same order.
        """
        q_ids, q_lens = _runs(segment_ids, "segment_ids")
        if kv_segment_ids is None:
            return cls(q_lens, None, causal=causal, window=window)
        k_ids, k_lens = _runs(kv_segment_ids, "kv_segment_ids")
        if q_ids != k_ids:
            raise ValueError(f"segment ids differ between queries {q_ids} and keys {k_ids}: every query "
                             "segment needs its key segment, in the same order")
        return cls(q_lens, k_lens, causal=causal, window=window)

    # -- metadata -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.q_seqlens)

    @property
    def cu_seqlens_q(self) -> torch.Tensor:
        """int32 ``[N+1]`` on the CPU."""
        return self._cu_q

    @property
    def cu_seqlens_k(self) -> torch.Tensor:
        return self._cu_k

    def cu_seqlens_q_on(self, device) -> torch.Tensor:
        return self._on(device, "q")

    def cu_seqlens_k_on(self, device) -> torch.Tensor:
        return self._on(device, "k")

    def _on(self, device, which: str) -> torch.Tensor:
        device = torch.device(device)
        src = self._cu_q if which == "q" else self._cu_k
        if device.type == "cpu":
            return src
        if torch.compiler.is_compiling():      # part of the compiled graph: no cache entry holding a traced value
            return src.to(device, non_blocking=True)
        key = (str(device), which)
        t = self._device_cache.get(key)
        if t is None:
            t = self._device_cache[key] = src.to(device, non_blocking=True)
        return t

    @property
    def self_attention(self) -> bool:
        return self.kv_seqlens == self.q_seqlens

    def as_causal(self) -> "BlockDiagonal":
        return self if self.causal else BlockDiagonal(self.q_seqlens, self.kv_seqlens, causal=True)

    def block_offset(self, b: int) -> int:
        """Bottom-right diagonal offset of block b (``Sk_b - Sq_b``)."""
        return self.kv_seqlens[b] - self.q_seqlens[b]

    # -- tensors --------------------------------------------------------------------------------
    def split(self, x: torch.Tensor, *, kv: bool = False) -> list[torch.Tensor]:
        """Split a packed tensor along dim 0 into one view per block (query lengths, or key lengths)."""
        lens = self.kv_seqlens if kv else self.q_seqlens
        total = sum(lens)
        if x.shape[0] != total:
            which = "kv_seqlens" if kv else "q_seqlens"
            raise ValueError(f"x has {x.shape[0]} tokens along dim 0 but {which} sum to {total}")
        return list(torch.split(x, list(lens), dim=0))

    def merge(self, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        """Inverse of ``split``: concatenate per-block tensors along dim 0."""
        tensors = list(tensors)
        if len(tensors) != self.num_blocks:
            raise ValueError(f"merge got {len(tensors)} tensors for {self.num_blocks} blocks")
        return torch.cat(tensors, dim=0)

    def materialize(self, seqlen_q: int | None = None, seqlen_k: int | None = None, device=None) -> torch.Tensor:
        """bool ``[Tq, Tk]``: block structure, with per-block bottom-right causal/window."""
        tq, tk = self.total_q, self.total_k
        if seqlen_q is not None and seqlen_q != tq or seqlen_k is not None and seqlen_k != tk:
            raise ValueError(f"BlockDiagonal covers {tq} query and {tk} key tokens, asked for {seqlen_q}x{seqlen_k}")
        return _materialize(self, tq, tk, device)

    # -- identity -------------------------------------------------------------------------------
    def __eq__(self, other):
        if not isinstance(other, BlockDiagonal):
            return NotImplemented
        return (self.q_seqlens, self.kv_seqlens, self.causal, self.window) == (
            other.q_seqlens, other.kv_seqlens, other.causal, other.window)

    def __hash__(self):
        return self._hash

    def __repr__(self):
        kv = "" if self.self_attention else f", kv_seqlens={list(self.kv_seqlens)}"
        extra = (", causal=True" if self.causal else "") + (f", window={self.window}" if self.window else "")
        return f"BlockDiagonal(q_seqlens={list(self.q_seqlens)}{kv}{extra})"

    def __reduce__(self):
        return (_rebuild_block_diagonal, (self.q_seqlens, self.kv_seqlens, self.causal, self.window))


def _rebuild_block_diagonal(q, kv, causal, window):
    return BlockDiagonal(q, kv, causal=causal, window=window)


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total


def _lengths_from_cu(cu, name: str) -> tuple[int, ...]:
    cu = _as_int_tuple(cu, name)
    if len(cu) < 2:
        raise ValueError(f"{name} needs at least 2 entries ([0, total]), got {list(cu)}")
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {cu[0]}")
    lens = tuple(b - a for a, b in zip(cu[:-1], cu[1:]))
    if any(x < 0 for x in lens):
        raise ValueError(f"{name} must be non-decreasing (cumulative sequence offsets), got {list(cu)}")
    return lens


def _runs(ids, name: str) -> tuple[list[int], list[int]]:
    ids = _as_int_tuple(ids, name)
    if not ids:
        raise ValueError(f"{name} is empty")
    run_ids, lens = [ids[0]], [1]
    for x in ids[1:]:
        if x == run_ids[-1]:
            lens[-1] += 1
        else:
            if x in run_ids:
                raise ValueError(f"{name}: segment {x} appears in two separate runs; a block must be contiguous")
            run_ids.append(x)
            lens.append(1)
    return run_ids, lens


@dataclass(frozen=True, eq=False)
class KeyPadding(Mask):
    """Per-batch key validity: ``valid`` is bool ``[B, Sk]``, True = the key may be seen.

    Any pattern works (left padding, right padding, holes). Queries are never dropped: a query row
    that sees no valid key returns 0 (LSE -inf). ``causal=True`` also applies bottom-right causal
    attention over the key axis (query ``i`` sees key ``j`` iff ``j <= i + (Sk - Sq)`` and ``valid[b, j]``:
    padded prompts in a decoder, prefill and decode alike); ``window`` as in :class:`Causal`.
    Identity-hashed (it holds a tensor).
    """

    valid: torch.Tensor
    causal: bool = False
    window: int | None = None
    _kind = "key_padding"

    def __post_init__(self):
        if not isinstance(self.valid, torch.Tensor):
            raise TypeError(f"KeyPadding(valid) needs a bool tensor [B, Sk], got {type(self.valid).__name__}")
        if self.valid.dtype != torch.bool:
            raise TypeError(f"KeyPadding(valid) must be a bool tensor (True = key visible), got {self.valid.dtype}; "
                            "use valid.bool() or attention_mask == 1")
        if self.valid.dim() != 2:
            raise ValueError(f"KeyPadding(valid) must be [B, Sk], got shape {tuple(self.valid.shape)}")
        _check_causal_window(self.causal, self.window, "KeyPadding")

    @property
    def seqlens(self) -> torch.Tensor:
        """Valid keys per batch row, int32 ``[B]`` (a tensor: reading it syncs the device)."""
        return self.valid.sum(-1, dtype=torch.int32)

    def __repr__(self):
        extra = (", causal=True" if self.causal else "") + (f", window={self.window}" if self.window else "")
        return f"KeyPadding(valid=<bool {list(self.valid.shape)}>{extra})"


@dataclass(frozen=True, eq=False)
class DenseMask(Mask):
    """Escape hatch: an explicit mask broadcastable to ``[B, Hq, Sq, Sk]``.

    bool: True = attend. Floating: added to the scaled scores (``-inf`` hides a key). Identity-hashed.
    """

    mask: torch.Tensor
    _kind = "dense"

    def __post_init__(self):
        if not isinstance(self.mask, torch.Tensor):
            raise TypeError(f"DenseMask(mask) needs a tensor, got {type(self.mask).__name__}")
        if not (self.mask.dtype == torch.bool or self.mask.dtype.is_floating_point):
            raise TypeError(f"DenseMask(mask) must be bool (True = attend) or floating (additive), got {self.mask.dtype}")
        if not 2 <= self.mask.dim() <= 4:
            raise ValueError(f"DenseMask(mask) must have 2 to 4 dims broadcastable to [B, Hq, Sq, Sk], got {tuple(self.mask.shape)}")

    @property
    def is_bool(self) -> bool:
        return self.mask.dtype == torch.bool


    def __repr__(self):
        return f"DenseMask(mask=<{self.mask.dtype} {list(self.mask.shape)}>)"


def _materialize(mask, seqlen_q: int, seqlen_k: int, device) -> torch.Tensor:
    """The mask's plan, materialized (a fresh tensor: callers may edit it)."""
    from .plan import plan_for

    m = plan_for(mask, seqlen_q, seqlen_k).materialize(device)
    return m.clone() if isinstance(mask, (Causal, BlockDiagonal)) else m


AnyMask = Union[Causal, BlockDiagonal, KeyPadding, DenseMask, None]


def mask_features(mask) -> frozenset[str]:
    """The capability names a backend needs for ``mask`` (empty for ``None``)."""
    if mask is None:
        return frozenset()
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be None or one of attnlib.masks (Causal, BlockDiagonal, KeyPadding, DenseMask), "
                        f"got {type(mask).__name__}; wrap a raw tensor as DenseMask(tensor)")
    return mask.features()
