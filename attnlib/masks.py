"""The attention mask vocabulary: immutable descriptions at the public edge.

Each mask turns itself into the call's :class:`attnlib.plan.Plan` (``mask.plan(Sq, Sk)``); backends,
sequence parallelism and the adapters read only the plan, so a new mask kind is one class here.
``materialize`` gives the boolean truth (True = query may see key) that the tests use.

Visibility (``i`` = query index, ``j`` = key index inside one sequence or block, ``Sq``/``Sk`` its
query/key lengths, ``off = Sk - Sq`` for bottom-right alignment and ``0`` for top-left; query ``i`` sits at
position ``p = i + off`` on the key timeline):

=========================================  =====================================================
``None``                                   every key
``Causal()``                               ``j <= p``  (bottom-right: the KV-cache offset)
``Causal(align="top_left")``               ``j <= i``  (torch ``is_causal``)
``Causal(window=W)``                       ``p - W < j <= p``  (the W newest keys)
``Causal(chunk=C)``                        ``chunk(j) <= chunk(p)``: chunks of ``C`` keys from key 0
                                           (or a tuple of chunk lengths), bidirectional inside a
                                           chunk; ``window=W`` then keeps the W newest chunks
``Causal(window=W, sink=n)``               as above, and keys ``j < n`` whenever ``j <= p``
``BlockDiagonal(...)``                     only keys of the query's own block; ``causal``, ``window``,
                                           ``chunk``, ``sink`` apply per block, bottom-right
``KeyPadding(valid)``                      ``valid[b, j]`` (``causal=True``: and bottom-right causal)
``DenseMask(m)``                           ``m`` (bool: True = attend; float: added to the scores)
``BlockSparse(layout, block_size)``        ``layout[..., i // bq, j // bk]`` (``causal=True``: and
                                           bottom-right causal)
=========================================  =====================================================

Bottom-right causal for ``Sq=2, Sk=5`` (rows = queries, columns = keys)::

    1 1 1 1 0
    1 1 1 1 1
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence, Union

import torch

from .caching import host_lru
from .plan import BlockLayout, Plan, Tile, causal_tiles, full_plan, host_blocks, window_key_valid

__all__ = ["Mask", "Causal", "BlockDiagonal", "KeyPadding", "DenseMask", "BlockSparse"]

_ALIGNMENTS = ("bottom_right", "top_left")


def _check_positive(value, name: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int ({what}) or None, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 ({what}), got {value}")


def _check_window(window, name: str = "window") -> None:
    if window is not None:
        _check_positive(window, name, "number of newest keys, or chunks, a query sees; the diagonal counts")


def _check_chunk(chunk, owner: str, allow_tuple: bool = True):
    """``chunk`` normalized: None, an int >= 1 (1 is ordinary causal: None), or a tuple of ints >= 1."""
    if chunk is None:
        return None
    if isinstance(chunk, (list, tuple)) and allow_tuple:
        out = tuple(chunk)
        for c in out:
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ValueError(f"{owner}(chunk=...) lengths must be ints >= 1, got {list(chunk)}")
        if not out:
            raise ValueError(f"{owner}(chunk=...) needs at least one chunk length")
        return out
    what = "keys per chunk" + (", or a tuple of chunk lengths summing to Sk" if allow_tuple else "")
    _check_positive(chunk, f"{owner}(chunk=...)", what)
    return None if chunk == 1 else chunk


def _check_sink(sink, owner: str) -> int:
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ValueError(f"{owner}(sink=...) must be an int >= 0 (the number of sink keys), got {sink!r}")
    return sink


class Mask:
    """Base class of attnlib masks. Subclasses are immutable and hashable.

    The interface every mask implements (the rest of attnlib reads only these and the plan):
    ``plan(Sq, Sk)``, ``check_call(...)`` (the mask against the call's shapes), ``lengths()`` (the whole
    lengths it names, for sequence parallelism), ``causal_version()`` (``Attention(causal=True)``),
    ``features()`` (the capability names it needs by its fields) and ``packed`` (needs THD inputs).
    """

    _kind: str = ""
    #: the mask describes sequences packed along the token axis (THD inputs)
    packed: bool = False
    #: its plan depends on tensor values that change between calls (it is rebuilt at every call)
    replans: bool = False

    def features(self) -> frozenset[str]:
        f = {self._kind} if self._kind else set()
        if getattr(self, "causal", False):
            f.add("causal")
        if getattr(self, "window", None) is not None:
            f.add("window")
        return frozenset(f)

    def plan(self, seqlen_q: int, seqlen_k: int) -> Plan:
        raise NotImplementedError

    def materialize(self, seqlen_q: int, seqlen_k: int, device=None) -> torch.Tensor:
        """bool, True = may attend (a fresh tensor; see each mask for the shape), from the mask's plan."""
        return self.plan(seqlen_q, seqlen_k).materialize(device).clone()

    def check_call(self, *, packed: bool, batch: int, seqlen_q: int, seqlen_k: int, heads_q: int,
                   device: torch.device, dtype: torch.dtype) -> None:
        """Raise ``ValueError``/``TypeError`` naming the fix when the mask does not fit the call."""

    def lengths(self) -> tuple[int | None, int | None]:
        """The whole ``(Sq, Sk)`` this mask names (None where it does not)."""
        return (None, None)

    def to(self, device) -> "Mask":
        """This mask with its tensors on ``device`` (structured masks: itself)."""
        return self

    def causal_version(self) -> "Mask":
        """This mask with causal attention added (``Attention(causal=True)``)."""
        raise ValueError(f"Attention(causal=True) cannot add causal attention to a {type(self).__name__}; build "
                         "the causal mask yourself")


class _TensorPlans:
    """Plans of a tensor-holding mask, cached on the mask object per (Sq, Sk): reusing one mask object
    across layers plans once."""

    def _cached_plan(self, sq: int, sk: int, build) -> Plan:
        if torch.compiler.is_compiling():   # the compiled graph is the cache; writing onto a mask built outside
            return build()                  # the compiled region would be a side effect dynamo cannot replay
        plans = self.__dict__.get("_plans")
        if plans is None:
            plans = {}
            object.__setattr__(self, "_plans", plans)
        got = plans.get((sq, sk))
        if got is None:
            got = plans[(sq, sk)] = build()
        return got


@dataclass(frozen=True)
class Causal(Mask):
    """Causal attention with explicit alignment, windows, chunks and sinks.

    ``align="bottom_right"`` (default): query ``i`` sees key ``j`` iff ``j <= i + (Sk - Sq)``: the last
    query sees every key, as in decoding against a KV cache (flash-attn >= 2.1, xformers
    ``LowerTriangularFromBottomRightMask``, torch ``causal_lower_right``). ``align="top_left"``:
    ``j <= i`` (torch ``is_causal=True``). ``window=W`` additionally hides keys older than the W newest
    ones a query may see (the diagonal counts): flash-attn ``window_size=(W-1, 0)``.

    ``chunk=C`` groups key positions into chunks of ``C`` from key 0 (or ``chunk=(c0, c1, ...)``, lengths
    summing to ``Sk``): a query sees every key of its own chunk and of earlier chunks (frame-causal video,
    block-causal streaming); ``window=W`` then counts chunks. ``sink=n``: keys ``j < n`` stay visible to
    every query that may see them causally, whatever the window (attention sinks, a sink frame).
    When ``Sq > Sk`` bottom-right leaves the first ``Sq - Sk`` query rows with no key: they return 0.
    """

    align: str = "bottom_right"
    window: int | None = None
    chunk: int | tuple | None = None
    sink: int = 0
    causal = True           # a class attribute, not a field

    def __post_init__(self):
        if self.align not in _ALIGNMENTS:
            raise ValueError(f"Causal(align=...) must be one of {_ALIGNMENTS}, got {self.align!r}")
        _check_window(self.window)
        object.__setattr__(self, "chunk", _check_chunk(self.chunk, "Causal"))
        _check_sink(self.sink, "Causal")

    @property
    def top_left(self) -> bool:
        return self.align == "top_left"

    def features(self) -> frozenset[str]:
        f = set(super().features())
        if self.sink and self.window is not None:       # a row sees its sink keys and its window: two runs
            f.add("multi_tile")
        return frozenset(f)

    def offset(self, seqlen_q: int, seqlen_k: int) -> int:
        """Diagonal offset: query i's newest visible key is ``i + offset``."""
        return 0 if self.top_left else seqlen_k - seqlen_q

    def plan(self, seqlen_q: int, seqlen_k: int) -> Plan:
        return _causal_plan(self, int(seqlen_q), int(seqlen_k))

    def check_call(self, *, packed, batch, seqlen_q, seqlen_k, heads_q, device, dtype) -> None:
        if isinstance(self.chunk, tuple) and sum(self.chunk) != seqlen_k:
            raise ValueError(f"Causal(chunk=...) lengths sum to {sum(self.chunk)} but k/v have {seqlen_k} keys: "
                             "the chunk lengths must cover every key")

    def causal_version(self) -> "Causal":
        return self


@host_lru(1024)
def _causal_plan(mask: Causal, sq: int, sk: int) -> Plan:
    tiles = causal_tiles(0, sq, 0, sk, mask.offset(sq, sk), mask.window, mask.chunk, mask.sink)
    return Plan(sq, sk, tuple(tiles))


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
    per block (a block with more keys than queries is a KV cache); ``window``, ``chunk`` (an int) and
    ``sink`` as in :class:`Causal`, per block with block-local positions.

    Metadata is computed once here: ``cu_seqlens_q/k`` (int32, ``cu_seqlens_q_on(device)`` caches a
    copy per device) and ``max_seqlen_q/k`` as Python ints, so no backend syncs the device per layer.

    Key lengths known only on the device (a captured CUDA-graph decode step): see :meth:`from_device_lengths`;
    then ``kv_seqused`` holds them and ``kv_seqlens`` are the host bounds (``kv_seqused`` is None otherwise).
    """

    _kind = "block_diagonal"
    packed = True
    __slots__ = ("q_seqlens", "kv_seqlens", "causal", "window", "chunk", "sink", "max_seqlen_q", "max_seqlen_k",
                 "total_q", "total_k", "_cu_q", "_cu_k", "_device_cache", "_hash", "kv_seqused", "_bounds")

    def __init__(self, q_seqlens: Sequence[int], kv_seqlens: Sequence[int] | None = None, causal: bool = False,
                 window: int | None = None, chunk: int | None = None, sink: int = 0):
        q = _as_int_tuple(q_seqlens, "q_seqlens")
        kv = q if kv_seqlens is None else _as_int_tuple(kv_seqlens, "kv_seqlens")
        if len(q) == 0:
            raise ValueError("q_seqlens must name at least one block")
        if len(kv) != len(q):
            raise ValueError(f"kv_seqlens has {len(kv)} blocks but q_seqlens has {len(q)}: give one key length per query block")
        if any(x < 0 for x in q) or any(x < 0 for x in kv):
            raise ValueError(f"sequence lengths must be >= 0, got q_seqlens={q}, kv_seqlens={kv}")
        if not isinstance(causal, bool):
            raise TypeError(f"BlockDiagonal(causal=...) must be a bool, got {causal!r}")
        _check_window(window)
        chunk = _check_chunk(chunk, "BlockDiagonal", allow_tuple=False)
        sink = _check_sink(sink, "BlockDiagonal")
        if not causal and (window is not None or chunk is not None or sink):
            raise ValueError("BlockDiagonal(window=/chunk=/sink=...) needs causal=True (they shape causal attention)")
        set_ = object.__setattr__
        set_(self, "q_seqlens", q)
        set_(self, "kv_seqlens", kv)
        set_(self, "causal", causal)
        set_(self, "window", window)
        set_(self, "chunk", chunk)
        set_(self, "sink", sink)
        set_(self, "max_seqlen_q", max(q))
        set_(self, "max_seqlen_k", max(kv))
        set_(self, "total_q", sum(q))
        set_(self, "total_k", sum(kv))
        set_(self, "_cu_q", torch.tensor((0,) + tuple(_cumsum(q)), dtype=torch.int32))
        set_(self, "_cu_k", self._cu_q if kv == q else torch.tensor((0,) + tuple(_cumsum(kv)), dtype=torch.int32))
        set_(self, "_device_cache", {})
        set_(self, "_hash", hash((q, kv, causal, window, chunk, sink)))
        set_(self, "kv_seqused", None)
        set_(self, "_bounds", None)

    def __setattr__(self, name, value):
        raise AttributeError("BlockDiagonal is immutable")

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_seqlens(cls, q_seqlens: Sequence[int], kv_seqlens: Sequence[int] | None = None, *,
                     causal: bool = False, window: int | None = None, chunk: int | None = None,
                     sink: int = 0) -> "BlockDiagonal":
        return cls(q_seqlens, kv_seqlens, causal=causal, window=window, chunk=chunk, sink=sink)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens_q, cu_seqlens_k=None, *, causal: bool = False,
                        window: int | None = None, chunk: int | None = None, sink: int = 0) -> "BlockDiagonal":
        """From cumulative offsets ``[0, l0, l0+l1, ...]`` (list or integer tensor; read once, here)."""
        return cls(_lengths_from_cu(cu_seqlens_q, "cu_seqlens_q"),
                   None if cu_seqlens_k is None else _lengths_from_cu(cu_seqlens_k, "cu_seqlens_k"),
                   causal=causal, window=window, chunk=chunk, sink=sink)

    @classmethod
    def from_segment_ids(cls, segment_ids, kv_segment_ids=None, *, causal: bool = False,
                         window: int | None = None, chunk: int | None = None, sink: int = 0) -> "BlockDiagonal":
        """From per-token segment ids (``[0,0,0,1,1,2,...]``): each run of equal ids is one block.

        With ``kv_segment_ids`` the key runs are paired with the query runs in order and must carry the
        same ids in the same order.
        """
        q_ids, q_lens = _runs(segment_ids, "segment_ids")
        opts = dict(causal=causal, window=window, chunk=chunk, sink=sink)
        if kv_segment_ids is None:
            return cls(q_lens, None, **opts)
        k_ids, k_lens = _runs(kv_segment_ids, "kv_segment_ids")
        if q_ids != k_ids:
            raise ValueError(f"segment ids differ between queries {q_ids} and keys {k_ids}: every query "
                             "segment needs its key segment, in the same order")
        return cls(q_lens, k_lens, **opts)

    @classmethod
    def from_device_lengths(cls, q_seqlens: Sequence[int], kv_seqused: torch.Tensor, max_seqlen_k: int, *,
                            causal: bool = False, window: int | None = None) -> "BlockDiagonal":
        """Key lengths that live on the device, bounded on the host: one mask (and one captured CUDA graph)
        serves every decode step while the lengths grow, and nothing is read on the host.

        ``q_seqlens``: new tokens per request (host ints, fixed); ``kv_seqused``: int32/int64 ``[R]`` on the
        call's device, each request's keys (new tokens included), ``q_seqlens[r] <= kv_seqused[r] <=
        max_seqlen_k``; ``max_seqlen_k``: the host bound. Request ``r``'s key axis is a window of
        ``max_seqlen_k`` slots with its keys right-aligned (the newest at the end) and the slots before
        them empty (hidden): with ``block_table`` the windows are filled from the pages (key ``j`` in page
        ``block_table[r, j // page_size]``, as usual; the table needs ``ceil(max_seqlen_k / page_size)``
        columns); with contiguous keys ``k`` holds the ``R`` windows packed (``R * max_seqlen_k`` rows,
        left-padded). ``causal`` (bottom-right) and ``window`` are exact; ``chunk``/``sink`` are not
        available (they depend on absolute key positions). Values outside the bounds are not checked
        unless ``ATTNLIB_DEBUG_CHECKS=1`` (then on the device, with a paged call)."""
        if not isinstance(kv_seqused, torch.Tensor) or kv_seqused.dim() != 1 or kv_seqused.dtype not in (
                torch.int32, torch.int64):
            got = f"{kv_seqused.dtype} {tuple(kv_seqused.shape)}" if isinstance(kv_seqused, torch.Tensor) else \
                type(kv_seqused).__name__
            raise TypeError(f"kv_seqused must be an int32 tensor [R] of key lengths on the device, got {got}")
        q = _as_int_tuple(q_seqlens, "q_seqlens")
        _check_positive(max_seqlen_k, "max_seqlen_k", "the host bound on every request's key count")
        if kv_seqused.shape[0] != len(q):
            raise ValueError(f"kv_seqused has {kv_seqused.shape[0]} entries but q_seqlens has {len(q)}: one key "
                             "length per request")
        if q and max(q) > max_seqlen_k:
            raise ValueError(f"max_seqlen_k={max_seqlen_k} is smaller than a request's {max(q)} new tokens; the bound "
                             "must hold every request's keys, new tokens included")
        bounds = cls(q, (max_seqlen_k,) * len(q), causal=causal, window=window)
        mask = cls(q, bounds.kv_seqlens, causal=causal, window=window)
        object.__setattr__(mask, "kv_seqused", kv_seqused)
        object.__setattr__(mask, "_bounds", bounds)
        object.__setattr__(mask, "_hash", hash((mask._hash, id(kv_seqused))))
        return mask

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

    def features(self) -> frozenset[str]:
        f = set(super().features())
        if self.sink and self.window is not None:       # a row sees its sink keys and its window: two runs
            f.add("multi_tile")
        if self.kv_seqused is not None:                 # the empty window slots: a key mask
            f.add("key_padding")
        return frozenset(f)

    def as_causal(self) -> "BlockDiagonal":
        if self.causal:
            return self
        if self.kv_seqused is not None:
            return BlockDiagonal.from_device_lengths(self.q_seqlens, self.kv_seqused, self.max_seqlen_k, causal=True)
        return BlockDiagonal(self.q_seqlens, self.kv_seqlens, causal=True)

    def causal_version(self) -> "BlockDiagonal":
        return self.as_causal()

    def block_offset(self, b: int) -> int:
        """Bottom-right diagonal offset of block b (``Sk_b - Sq_b``)."""
        return self.kv_seqlens[b] - self.q_seqlens[b]

    def lengths(self) -> tuple[int, int]:
        return (self.total_q, self.total_k)

    @property
    def replans(self) -> bool:
        """Its plan is rebuilt at every call (device lengths change in place between steps)."""
        return self.kv_seqused is not None

    def plan(self, seqlen_q: int, seqlen_k: int) -> Plan:
        if self.kv_seqused is None:
            return _block_diagonal_plan(self, int(seqlen_q), int(seqlen_k))
        # device lengths: the bounds' structure (cached), the empty window slots hidden by a key mask
        # computed on the device at every call (never cached: the lengths change in place between steps)
        plan = _block_diagonal_plan(self._bounds, int(seqlen_q), int(seqlen_k))
        valid = window_key_valid(self.kv_seqlens, self.kv_seqused)
        return replace(plan, key_valid=valid[None])

    def check_call(self, *, packed, batch, seqlen_q, seqlen_k, heads_q, device, dtype) -> None:
        if self.kv_seqused is not None and self.kv_seqused.device != torch.device(device):
            raise ValueError(f"BlockDiagonal kv_seqused is on {self.kv_seqused.device} but q is on {device}; build "
                             "it on the call's device")
        if self.total_q != seqlen_q:
            raise ValueError(f"BlockDiagonal q_seqlens sum to {self.total_q} but q has {seqlen_q} tokens; "
                             "the seqlens must cover every packed query token")
        if self.total_k != seqlen_k:
            raise ValueError(f"BlockDiagonal kv_seqlens sum to {self.total_k} but k/v have {seqlen_k} tokens; "
                             "pass kv_seqlens when keys are packed differently from queries")

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
        """bool ``[Tq, Tk]``: block structure, with the per-block causal options (and, with device lengths,
        the empty window slots hidden)."""
        tq, tk = self.total_q, self.total_k
        if seqlen_q is not None and seqlen_q != tq or seqlen_k is not None and seqlen_k != tk:
            raise ValueError(f"BlockDiagonal covers {tq} query and {tk} key tokens, asked for {seqlen_q}x{seqlen_k}")
        return super().materialize(tq, tk, device).reshape(tq, tk)

    # -- identity -------------------------------------------------------------------------------
    def _key(self):
        return (self.q_seqlens, self.kv_seqlens, self.causal, self.window, self.chunk, self.sink)

    def __eq__(self, other):
        if not isinstance(other, BlockDiagonal):
            return NotImplemented
        return self._key() == other._key() and self.kv_seqused is other.kv_seqused

    def __hash__(self):
        return self._hash

    def __repr__(self):
        kv = "" if self.self_attention else f", kv_seqlens={list(self.kv_seqlens)}"
        extra = ((", causal=True" if self.causal else "") + (f", window={self.window}" if self.window else "")
                 + (f", chunk={self.chunk}" if self.chunk else "") + (f", sink={self.sink}" if self.sink else ""))
        if self.kv_seqused is not None:
            used = self.kv_seqused
            return (f"BlockDiagonal.from_device_lengths(q_seqlens={list(self.q_seqlens)}, kv_seqused=<{used.dtype} "
                    f"{list(used.shape)} on {used.device}>, max_seqlen_k={self.max_seqlen_k}{extra})")
        return f"BlockDiagonal(q_seqlens={list(self.q_seqlens)}{kv}{extra})"

    def __reduce__(self):
        if self.kv_seqused is not None:
            return (_rebuild_device_lengths, (self.q_seqlens, self.kv_seqused, self.max_seqlen_k, self.causal,
                                              self.window))
        return (_rebuild_block_diagonal, self._key())


def _rebuild_block_diagonal(q, kv, causal, window, chunk=None, sink=0):
    return BlockDiagonal(q, kv, causal=causal, window=window, chunk=chunk, sink=sink)


def _rebuild_device_lengths(q, used, bound, causal, window):
    return BlockDiagonal.from_device_lengths(q, used, bound, causal=causal, window=window)


@host_lru(1024)
def _block_diagonal_plan(mask: BlockDiagonal, sq: int, sk: int) -> Plan:
    if (sq, sk) != (mask.total_q, mask.total_k):
        raise ValueError(f"BlockDiagonal covers {mask.total_q} query and {mask.total_k} key tokens, "
                         f"asked for {sq}x{sk}")
    tiles, q0, k0 = [], 0, 0
    for lq, lk in zip(mask.q_seqlens, mask.kv_seqlens):
        if mask.causal:
            tiles += causal_tiles(q0, lq, k0, lk, lk - lq, mask.window, mask.chunk, mask.sink)
        elif lq:
            tiles.append(Tile(q0, lq, k0, lk, False, lk - lq))
        q0 += lq
        k0 += lk
    return Plan(sq, sk, tuple(t for t in tiles if t.q_len and t.k_len), packed=True)


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


def _check_device(t: torch.Tensor, what: str, device) -> None:
    if t.device != device:
        raise ValueError(f"{what} is on {t.device} but q is on {device}; move it with .to(q.device)")


@dataclass(frozen=True, eq=False)
class KeyPadding(_TensorPlans, Mask):
    """Per-batch key validity: ``valid`` is bool ``[B, Sk]``, True = the key may be seen.

    Any pattern works (left padding, right padding, holes). Queries are never dropped: a query row
    that sees no valid key returns 0 (LSE -inf). ``causal=True`` also applies bottom-right causal
    attention over the key axis (query ``i`` sees key ``j`` iff ``j <= i + (Sk - Sq)`` and ``valid[b, j]``:
    padded prompts in a decoder, prefill and decode alike); ``window`` as in :class:`Causal`.
    Padded keys may hold anything (``torch.empty`` cache slots included): they never reach an output.
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
        if not isinstance(self.causal, bool):
            raise TypeError(f"KeyPadding(causal=...) must be a bool, got {self.causal!r}")
        _check_window(self.window)
        if self.window is not None and not self.causal:
            raise ValueError("KeyPadding(window=...) needs causal=True (a window is counted back from the causal diagonal)")

    @property
    def seqlens(self) -> torch.Tensor:
        """Valid keys per batch row, int32 ``[B]`` (a tensor: reading it syncs the device)."""
        return self.valid.sum(-1, dtype=torch.int32)

    def plan(self, seqlen_q: int, seqlen_k: int) -> Plan:
        def build():
            if self.valid.shape[1] != seqlen_k:
                raise ValueError(f"KeyPadding covers {self.valid.shape[1]} keys, asked for {seqlen_k}")
            off = seqlen_k - seqlen_q
            tile = Tile(0, seqlen_q, 0, seqlen_k, self.causal, off, self.window)
            return Plan(seqlen_q, seqlen_k, (tile,) if seqlen_q else (), key_valid=self.valid)
        return self._cached_plan(seqlen_q, seqlen_k, build)

    def check_call(self, *, packed, batch, seqlen_q, seqlen_k, heads_q, device, dtype) -> None:
        if packed:
            raise ValueError("KeyPadding needs dense BSHD inputs; for packed THD inputs describe the sequences "
                             "with BlockDiagonal instead")
        if tuple(self.valid.shape) != (batch, seqlen_k):
            raise ValueError(f"KeyPadding valid must be [B, Sk] = [{batch}, {seqlen_k}], got {tuple(self.valid.shape)}")
        _check_device(self.valid, "KeyPadding valid", device)

    def lengths(self) -> tuple[int | None, int]:
        return (None, int(self.valid.shape[-1]))

    def causal_version(self) -> "KeyPadding":
        return self if self.causal else KeyPadding(self.valid, causal=True)

    def to(self, device) -> "KeyPadding":
        valid = self.valid.to(device)
        return self if valid is self.valid else KeyPadding(valid, causal=self.causal, window=self.window)

    def __repr__(self):
        extra = (", causal=True" if self.causal else "") + (f", window={self.window}" if self.window else "")
        return f"KeyPadding(valid=<bool {list(self.valid.shape)}>{extra})"


@dataclass(frozen=True, eq=False)
class DenseMask(_TensorPlans, Mask):
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

    def plan(self, seqlen_q: int, seqlen_k: int) -> Plan:
        def build():
            tile = Tile(0, seqlen_q, 0, seqlen_k, False, seqlen_k - seqlen_q)
            return Plan(seqlen_q, seqlen_k, (tile,) if seqlen_q else (), dense=self.mask)
        return self._cached_plan(seqlen_q, seqlen_k, build)

    def check_call(self, *, packed, batch, seqlen_q, seqlen_k, heads_q, device, dtype) -> None:
        m = self.mask
        _check_device(m, "DenseMask", device)
        if m.dtype != torch.bool and m.dtype not in (dtype, torch.float32):
            raise TypeError(f"a float DenseMask must be {dtype} (q's dtype) or float32, got {m.dtype}")
        target = (batch, heads_q, seqlen_q, seqlen_k)
        shape = (1,) * (4 - m.dim()) + tuple(m.shape)
        for have, want, axis in zip(shape, target, ("B", "Hq", "Sq", "Sk")):
            if have not in (1, want):
                raise ValueError(f"DenseMask of shape {tuple(m.shape)} does not broadcast to [B, Hq, Sq, Sk] = "
                                 f"{list(target)} (axis {axis}: {have} vs {want})")

    def to(self, device) -> "DenseMask":
        m = self.mask.to(device)
        return self if m is self.mask else DenseMask(m)

    def lengths(self) -> tuple[int | None, int | None]:
        sq, sk = self.mask.shape[-2], self.mask.shape[-1]
        return (int(sq) if sq != 1 else None, int(sk) if sk != 1 else None)

    def __repr__(self):
        return f"DenseMask(mask=<{self.mask.dtype} {list(self.mask.shape)}>)"


@dataclass(frozen=True, eq=False)
class BlockSparse(_TensorPlans, Mask):
    """Block-sparse attention: query ``i`` sees key ``j`` iff ``layout[..., i // bq, j // bk]``.

    ``layout``: bool ``[nQ, nK]``, ``[Hq, nQ, nK]`` or ``[B, Hq, nQ, nK]`` with ``nQ = ceil(Sq / bq)`` and
    ``nK = ceil(Sk / bk)`` (the last blocks may be partial), on the host or on q's device: a device layout
    (e.g. a top-k block selection) runs without a host read. ``block_size``: ``b`` or ``(bq, bk)``.
    ``causal=True`` intersects it with bottom-right causal attention (``j <= i + Sk - Sq``).
    Identity-hashed (it holds a tensor).
    """

    layout: torch.Tensor
    block_size: int | tuple = 64
    causal: bool = False
    _kind = "block_sparse"

    def __post_init__(self):
        lay = self.layout
        if not isinstance(lay, torch.Tensor):
            raise TypeError(f"BlockSparse(layout) needs a bool tensor [nQ, nK] (or [Hq, nQ, nK], [B, Hq, nQ, nK]), "
                            f"got {type(lay).__name__}")
        if lay.dtype != torch.bool:
            raise TypeError(f"BlockSparse(layout) must be a bool tensor (True = the block pair is visible), got "
                            f"{lay.dtype}; use layout.bool() or layout > 0")
        if not 2 <= lay.dim() <= 4:
            raise ValueError(f"BlockSparse(layout) must be [nQ, nK], [Hq, nQ, nK] or [B, Hq, nQ, nK], got "
                             f"{tuple(lay.shape)}")
        bs = self.block_size
        pair = tuple(bs) if isinstance(bs, (tuple, list)) else (bs, bs)
        if len(pair) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in pair):
            raise ValueError(f"BlockSparse(block_size=...) must be an int >= 1 or a (bq, bk) pair of them, got {bs!r}")
        object.__setattr__(self, "block_size", pair)
        if not isinstance(self.causal, bool):
            raise TypeError(f"BlockSparse(causal=...) must be a bool, got {self.causal!r}")
        # a host layout is read here, once: which key blocks each query block sees (no read per call)
        host = host_blocks(lay) if lay.device.type == "cpu" and not torch.compiler.is_compiling() else None
        object.__setattr__(self, "_host", host)

    def blocks(self, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
        """``(nQ, nK)`` for a call of ``Sq`` x ``Sk``."""
        bq, bk = self.block_size
        return -(-seqlen_q // bq), -(-seqlen_k // bk)

    def plan(self, seqlen_q: int, seqlen_k: int) -> Plan:
        def build():
            want = self.blocks(seqlen_q, seqlen_k)
            have = tuple(self.layout.shape[-2:])
            if have != want:
                raise ValueError(f"BlockSparse layout has {have[0]}x{have[1]} blocks but a call of {seqlen_q} queries "
                                 f"x {seqlen_k} keys in blocks of {self.block_size[0]}x{self.block_size[1]} needs "
                                 f"{want[0]}x{want[1]} (ceil(Sq / bq) x ceil(Sk / bk))")
            tile = Tile(0, seqlen_q, 0, seqlen_k, self.causal, seqlen_k - seqlen_q)
            return Plan(seqlen_q, seqlen_k, (tile,) if seqlen_q else (),
                        sparse=BlockLayout(self.layout, *self.block_size, host=self._host))
        return self._cached_plan(seqlen_q, seqlen_k, build)

    def check_call(self, *, packed, batch, seqlen_q, seqlen_k, heads_q, device, dtype) -> None:
        lay = self.layout
        if lay.device != device and lay.device.type != "cpu":
            raise ValueError(f"BlockSparse layout is on {lay.device} but q is on {device}; move it with .to(q.device)")
        self.plan(seqlen_q, seqlen_k)
        if lay.dim() >= 3 and lay.shape[-3] not in (1, heads_q):
            raise ValueError(f"BlockSparse layout has {lay.shape[-3]} heads but q has {heads_q}: give one layout per "
                             "query head, or a [nQ, nK] layout shared by all heads")
        if lay.dim() == 4 and lay.shape[0] not in (1, batch):
            raise ValueError(f"BlockSparse layout has batch {lay.shape[0]} but q has {batch}")

    def to(self, device) -> "BlockSparse":
        lay = self.layout.to(device)
        return self if lay is self.layout else BlockSparse(lay, self.block_size, causal=self.causal)

    def causal_version(self) -> "BlockSparse":
        return self if self.causal else BlockSparse(self.layout, self.block_size, causal=True)

    def __repr__(self):
        c = ", causal=True" if self.causal else ""
        return f"BlockSparse(layout=<bool {list(self.layout.shape)}>, block_size={self.block_size}{c})"


AnyMask = Union[Causal, BlockDiagonal, KeyPadding, DenseMask, BlockSparse, None]


def mask_features(mask) -> frozenset[str]:
    """The capability names ``mask`` needs by its fields (empty for ``None``)."""
    if mask is None:
        return frozenset()
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be None or one of attnlib.masks (Causal, BlockDiagonal, KeyPadding, DenseMask, "
                        f"BlockSparse), got {type(mask).__name__}; wrap a raw tensor as DenseMask(tensor)")
    return mask.features()


def as_plan(mask, seqlen_q: int, seqlen_k: int) -> Plan:
    """``mask.plan(Sq, Sk)`` (``None``: full attention), with the type checked."""
    if mask is None:
        return full_plan(seqlen_q, seqlen_k)
    mask_features(mask)
    return mask.plan(seqlen_q, seqlen_k)
