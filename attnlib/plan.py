"""The plan: one description of an attention call, the only place that says whether query ``i`` sees
key ``j`` and what score it gets.

Every mask, for a call with ``Sq`` queries and ``Sk`` keys, turns itself into one :class:`Plan`
(``mask.plan(Sq, Sk)``; :func:`plan_for` also takes ``None``), built on the host from Python ints and
cached for structured masks; the call then attaches its score modifiers and KV layout
(:meth:`Plan.with_call`). Backends, the ring, the fused backward and the adapters read only plans.

**Tiles.** A plan's :class:`Tile`\\ s are rectangles of the ``[Sq, Sk]`` grid: tile ``t`` covers query
rows ``[q_start, q_start + q_len)`` and key rows ``[k_start, k_start + k_len)``. With tile-local indices
``i`` (query) and ``j`` (key), ``i + offset`` is the key index aligned with query ``i`` (its position on
the key timeline), and key ``j`` is visible iff

* the tile is not causal, or ``j <= i + offset`` (and with a window ``W``: ``j > i + offset - W``), and
* the plan's tensor restriction allows it: ``key_valid[b, j]`` (``KeyPadding``), the dense mask
  (``DenseMask``), or the block layout (``BlockSparse``) — at most one of the three.

Tiles never overlap. Tiles with the same query range form a *group* (a row may see several key runs:
chunked causal, sink + window); groups are disjoint along the query axis and sorted. A row in no tile
sees no key: output 0, LSE ``-inf`` (with sinks: LSE = the sink) on every backend.

**Score modifiers** (:class:`Modifiers`), in this order, with ``s = scale * q . k``: ``softcap``
(``s <- c tanh(s / c)``), ALiBi (``s <- s - slope_h |i + offset - j|``, the distance to the aligned key),
then the mask, then the softmax over the visible keys plus one sink logit per head (``sinks``, no value):
the returned LSE includes the sink. **KV layout**: contiguous, or paged (:class:`PagedKv`: logical key
``j`` of request ``r`` lives in page ``block_table[r, j // page_size]``).

The Triton kernels carry the same rule in device code; tests compare every backend with an independent
float64 oracle that re-derives visibility from the masks' public fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .caching import host_lru

__all__ = ["Tile", "Plan", "Modifiers", "BlockLayout", "PagedKv", "NO_MODIFIERS", "plan_for", "full_plan",
           "FEATURES"]

#: every plan feature name a backend's capabilities can list (``Plan.features`` returns subsets)
FEATURES = frozenset({
    "causal", "window",            # causal tiles, windows (structure)
    "multi_tile",                  # some row sees several key runs, or tiles are not one run per sequence
    "block_diagonal",              # packed THD: several sequences along the token axis
    "key_padding", "dense", "block_sparse",   # the tensor restriction
    "softcap", "alibi", "sinks",   # score modifiers
    "paged",                       # paged KV layout
})


# ---------------------------------------------------------------------------------------------------
# tiles
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """One rectangle of the plan (see the module docstring for the visibility rule)."""

    q_start: int
    q_len: int
    k_start: int
    k_len: int
    causal: bool = False
    offset: int = 0
    window: int | None = None

    def key_span(self, i: int) -> tuple[int, int]:
        """Tile-local ``(first, last)`` keys query ``i`` sees (inclusive); ``first > last``: none."""
        if not self.causal:
            return (0, self.k_len - 1)
        last = min(i + self.offset, self.k_len - 1)
        first = 0 if self.window is None else max(i + self.offset - self.window + 1, 0)
        return (first, last)

    def visible_rows(self) -> tuple[int, int]:
        """Tile-local ``[start, stop)`` of the query rows that see at least one key of the tile (one run)."""
        if self.k_len == 0 or self.q_len == 0:
            return (0, 0)
        if not self.causal:
            return (0, self.q_len)
        start = max(0, -self.offset)                      # the diagonal reaches key 0
        stop = self.q_len
        if self.window is not None:                       # the window must still reach key k_len - 1
            stop = min(stop, self.k_len - 1 - self.offset + self.window)
        start, stop = min(start, self.q_len), max(min(stop, self.q_len), 0)
        return (start, max(start, stop))

    @property
    def full(self) -> bool:
        """Every query row of the tile sees every key of the tile."""
        if self.q_len == 0 or self.k_len == 0:
            return self.q_len == 0
        if not self.causal:
            return True
        first, _ = self.key_span(self.q_len - 1)
        return self.offset >= self.k_len - 1 and first <= 0

    @property
    def bottom_right(self) -> bool:
        """The causal diagonal (if any) sits at ``k_len - q_len``: the last row's aligned key is the last key."""
        return self.offset == self.k_len - self.q_len

    def visible_pairs(self) -> int:
        """How many (query, key) pairs of the tile are visible by structure."""
        if not self.causal:
            return self.q_len * self.k_len
        total = 0
        for i in range(*self.visible_rows()):
            first, last = self.key_span(i)
            total += max(0, last - first + 1)
        return total

    def shape_key(self) -> tuple:
        """What two tiles must share to run as one batched call: sizes, rule and aligned offset."""
        return (self.q_len, self.k_len, self.causal, self.offset, self.window)

    def clip(self, q0: int, q1: int, k0: int, k1: int) -> "Tile | None":
        """This tile cut to global rows ``[q0, q1)`` and keys ``[k0, k1)``, re-based to ``(q0, k0)``; None if empty."""
        a, b = max(self.q_start, q0), min(self.q_start + self.q_len, q1)
        c, d = max(self.k_start, k0), min(self.k_start + self.k_len, k1)
        if b <= a or d <= c:
            return None
        offset = self.offset + (a - self.q_start) - (c - self.k_start)
        return Tile(a - q0, b - a, c - k0, d - c, self.causal, offset, self.window)


def causal_tiles(q0: int, sq: int, k0: int, sk: int, offset: int, window: int | None = None,
                 chunk=None, sink: int = 0) -> list[Tile]:
    """The tiles of a causal rectangle: rows ``[q0, q0 + sq)``, keys ``[k0, k0 + sk)``, query ``i``
    aligned with key ``i + offset`` (local), ``window`` (tokens, or chunks with ``chunk``), ``chunk`` (an
    int, or a tuple of chunk lengths summing to ``sk``) and ``sink`` (keys ``j < sink`` stay visible to
    every query that may see them causally). The masks' one implementation of these options."""
    if sq == 0:
        return []
    if chunk is None:
        if not sink or window is None:
            return [Tile(q0, sq, k0, sk, True, offset, window)]
        if sink >= sk:                    # every key is a sink: causal, no window
            return [Tile(q0, sq, k0, sk, True, offset, None)]
        n = sink                          # sink keys: causal, no window; the rest: causal with the window
        return [Tile(q0, sq, k0, n, True, offset, None), Tile(q0, sq, k0 + n, sk - n, True, offset - n, window)]
    bounds = _chunk_bounds(chunk, sk, offset + sq - 1)
    tiles = []
    for c in range(len(bounds) - 1):
        # rows whose aligned position p = i + offset lies in chunk c
        r0, r1 = max(0, bounds[c] - offset), min(sq, bounds[c + 1] - offset)
        if r1 <= r0:
            continue
        end = min(bounds[c + 1], sk)                                  # causal across chunks
        start = 0 if window is None else bounds[max(0, c - window + 1)]
        if sink and start > 0:
            n = min(sink, start)
            tiles.append(Tile(q0 + r0, r1 - r0, k0, n, False, r0 + offset, None))
        if end > start:
            tiles.append(Tile(q0 + r0, r1 - r0, k0 + start, end - start, False, r0 + offset - start, None))
    return tiles


def _chunk_bounds(chunk, sk: int, last_position: int) -> tuple[int, ...]:
    """Chunk boundaries from key 0 covering every aligned query position up to ``last_position``."""
    if isinstance(chunk, int):
        top = max(sk, last_position + 1)
        return tuple(range(0, top, chunk)) + (-(-top // chunk) * chunk,)
    bounds = [0]
    for c in chunk:
        bounds.append(bounds[-1] + c)
    if last_position >= bounds[-1]:
        raise ValueError(f"chunk lengths {tuple(chunk)} cover key positions 0..{bounds[-1] - 1}, but a query sits at "
                         f"position {last_position}: give chunks for every query position (or an int chunk length)")
    return tuple(bounds)


# ---------------------------------------------------------------------------------------------------
# tensor restrictions, modifiers, KV layout
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class BlockLayout:
    """A block-sparse restriction: query ``i`` may see key ``j`` iff
    ``layout[..., (i + q_origin) // bq, (j + k_origin) // bk]`` (bool ``[nQ, nK]``, ``[Hq, nQ, nK]`` or
    ``[B, Hq, nQ, nK]``; host or device). The origins are non-zero only in restricted plans."""

    layout: torch.Tensor
    bq: int
    bk: int
    q_origin: int = 0
    k_origin: int = 0
    #: for a host (CPU) layout, read once when the mask was built: ``(idx, count, most, counts)`` with ``idx``
    #: int64 ``[L, nQ, most]`` the visible key blocks of each query block (ascending, padded), ``count``
    #: ``[L, nQ]``, ``most`` the largest count, ``counts`` the same counts as a flat tuple of ints (calls read
    #: them without touching a tensor; ``L``: the layout's flattened leading dims)
    host: tuple | None = None

    @property
    def aligned(self) -> bool:
        """Block coordinates start at the call's origin (not a restricted plan's slice)."""
        return self.q_origin == 0 and self.k_origin == 0

    def covers(self, sq: int, sk: int) -> bool:
        """The layout is exactly the block grid of a ``Sq x Sk`` call at its origin, so :attr:`host` indexes
        the call's own blocks (a restricted plan's slice, even one starting at 0, is not)."""
        return self.aligned and tuple(self.layout.shape[-2:]) == (-(-sq // self.bq), -(-sk // self.bk))

    def as4d(self) -> torch.Tensor:
        t = self.layout
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))

    def grid(self, sq: int, sk: int, device=None) -> torch.Tensor:
        """bool ``[B?, H?, Sq, Sk]``: the layout expanded to tokens (the call's coordinates)."""
        lay = self.as4d() if device is None else self.as4d().to(device)
        qi = (torch.arange(sq, device=lay.device) + self.q_origin) // self.bq
        kj = (torch.arange(sk, device=lay.device) + self.k_origin) // self.bk
        return lay[:, :, qi][:, :, :, kj]

    def empty_rows(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """bool ``[B?, H?, Sq]``: the rows that see no key, from the rows' key runs ``lo..hi`` ``[R, Sq]``
        (:meth:`Plan.runs_table`) and prefix counts of the listed blocks: ``O(Sq)`` on the layout's
        device, no token grid, no host read."""
        lay = self.as4d().to(lo.device)
        csum = torch.nn.functional.pad(lay.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
        qi = (torch.arange(lo.shape[1], device=lo.device) + self.q_origin) // self.bq
        seen = torch.zeros(lay.shape[:2] + (lo.shape[1],), dtype=torch.bool, device=lo.device)
        for r in range(lo.shape[0]):
            first = (lo[r] + self.k_origin) // self.bk
            last = (hi[r].clamp(min=0) + self.k_origin) // self.bk
            listed = csum[:, :, qi, last + 1] - csum[:, :, qi, first]
            seen = seen | ((listed > 0) & (hi[r] >= lo[r]))
        return ~seen


def host_blocks(layout: torch.Tensor) -> tuple:
    """``(idx, count, most, counts)`` of a CPU layout (see :attr:`BlockLayout.host`); reads it on the host."""
    lay = layout.reshape(-1, layout.shape[-2], layout.shape[-1])
    count = lay.sum(-1, dtype=torch.int64)
    counts = tuple(count.reshape(-1).tolist())
    most = max(counts, default=0)
    order = torch.sort((~lay).to(torch.int8), dim=-1, stable=True).indices
    return order[..., :most].contiguous(), count, most, counts


@dataclass(frozen=True, eq=False)
class Modifiers:
    """Score modifiers of a call: ``softcap`` (float > 0), ``alibi`` (float32 ``[Hq]`` or ``[B, Hq]``),
    ``sinks`` (float ``[Hq]``, one extra logit per head that carries no value)."""

    softcap: float | None = None
    alibi: torch.Tensor | None = None
    sinks: torch.Tensor | None = None

    @property
    def any(self) -> bool:
        return self.softcap is not None or self.alibi is not None or self.sinks is not None

    def names(self) -> frozenset:
        return frozenset(n for n, v in (("softcap", self.softcap), ("alibi", self.alibi), ("sinks", self.sinks))
                         if v is not None)

    def without_sinks(self) -> "Modifiers":
        return self if self.sinks is None else (Modifiers(self.softcap, self.alibi) if
                                                self.softcap is not None or self.alibi is not None else NO_MODIFIERS)

    def heads(self, h0: int, h1: int) -> "Modifiers":
        """The modifiers of query heads ``[h0, h1)`` (Ulysses)."""
        alibi = None if self.alibi is None else self.alibi[..., h0:h1]
        sinks = None if self.sinks is None else self.sinks[h0:h1]
        return Modifiers(self.softcap, alibi, sinks)


NO_MODIFIERS = Modifiers()


@dataclass(frozen=True, eq=False)
class PagedKv:
    """A paged KV layout: ``k``/``v`` are page pools ``[num_pages, page_size, Hkv, D]``; logical key ``j`` of
    request ``r`` (packed order: request 0's keys first) is slot ``j % page_size`` of page
    ``block_table[r, j // page_size]``. ``kv_seqlens`` are the requests' key counts (host ints).

    With ``kv_seqused`` (int ``[R]`` on the device: lengths the host does not know), ``kv_seqlens`` are
    host upper bounds and request ``r``'s keys sit right-aligned in a window of ``kv_seqlens[r]`` logical
    slots: window slot ``s`` holds key ``j = s - (kv_seqlens[r] - kv_seqused[r])``; slots with ``j < 0``
    are empty: the plan's ``key_valid`` hides them, and they read the request's newest key (a written key,
    so no garbage reaches a kernel that weights hidden keys by 0)."""

    block_table: torch.Tensor
    page_size: int
    kv_seqlens: tuple
    kv_seqused: torch.Tensor | None = None

    def pages_needed(self) -> tuple[int, ...]:
        return tuple(-(-n // self.page_size) for n in self.kv_seqlens)

    def slot_index(self) -> torch.Tensor:
        """int64 ``[Tk]``: the flat pool slot (``page * page_size + offset``) of every logical key, computed
        on the table's device from host-known positions (no host read of the table)."""
        table = self.block_table
        if self.kv_seqused is None:
            req, pos = _paged_positions(self.kv_seqlens, self.page_size, table.shape[1], str(table.device))
            pages = table.reshape(-1).index_select(0, req).to(torch.int64)
            return pages * self.page_size + pos
        req, back = _windows(self.kv_seqlens, str(table.device))
        used = self.kv_seqused.to(torch.int64).index_select(0, req)
        j = back + used                                  # the key held by each window slot
        j = torch.where(j >= 0, j, used - 1).clamp(min=0)
        pages = table.reshape(-1).index_select(0, req * table.shape[1] + j // self.page_size).to(torch.int64)
        return pages * self.page_size + j % self.page_size

    def gather(self, pool: torch.Tensor) -> torch.Tensor:
        """The logical keys (or values) ``[Tk, Hkv, D]`` gathered from a page pool (only visible pages read)."""
        flat = pool.reshape(pool.shape[0] * pool.shape[1], *pool.shape[2:])
        return flat.index_select(0, self.slot_index())


@host_lru(64)
def _paged_positions(kv_seqlens: tuple, page_size: int, max_pages: int, device: str):
    """``(flat table index of each logical key's page, its slot in the page)`` as device int64 tensors."""
    req, pos = [], []
    for r, n in enumerate(kv_seqlens):
        j = torch.arange(n)
        req.append(r * max_pages + j // page_size)
        pos.append(j % page_size)
    cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.int64))
    return cat(req).to(device), cat(pos).to(device)


@host_lru(64)
def _windows(bounds: tuple, device: str):
    """``(request of each window slot, slot - window length)`` as device int64 tensors (windows packed)."""
    if bounds and min(bounds) == max(bounds):          # from_device_lengths: one bound for every request
        t = torch.arange(len(bounds) * bounds[0], device=device)
        return t // bounds[0], t % bounds[0] - bounds[0]
    req = torch.tensor([r for r, n in enumerate(bounds) for _ in range(n)], dtype=torch.int64)
    back = torch.tensor([j - n for n in bounds for j in range(n)], dtype=torch.int64)
    return req.to(device), back.to(device)


def window_key_valid(bounds: tuple, used: torch.Tensor) -> torch.Tensor:
    """bool ``[sum(bounds)]`` on ``used``'s device: window slot ``s`` of request ``r`` (``bounds[r]`` slots,
    keys right-aligned) holds a key, i.e. ``s >= bounds[r] - used[r]``. No host read."""
    req, back = _windows(tuple(bounds), str(used.device))
    return back + used.to(torch.int64).index_select(0, req) >= 0


# ---------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    """Tiles sharing one query range ``[q_start, q_start + q_len)`` (sorted by key start)."""

    q_start: int
    q_len: int
    tiles: tuple


@dataclass(frozen=True, eq=False)
class Plan:
    """One call's description (module docstring). ``packed``: several sequences along the token axis
    (``BlockDiagonal``, THD tensors). ``key_valid`` bool ``[B, Sk]``, ``dense`` (bool or additive float,
    broadcastable to ``[B, Hq, Sq, Sk]``) and ``sparse`` (:class:`BlockLayout`) restrict visibility; at
    most one is set. ``mods``: score modifiers; ``kv``: the paged layout (None: contiguous)."""

    seqlen_q: int
    seqlen_k: int
    tiles: tuple
    packed: bool = False
    key_valid: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    sparse: BlockLayout | None = None
    modifiers: Modifiers | None = None
    kv: PagedKv | None = None
    #: structure-derived values (tiles only: shared by plans that differ in tensors, modifiers or layout)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    #: values derived from the restriction tensors: see :meth:`tensor_derived`
    _tensor_cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- per-call parts ---------------------------------------------------------------------------
    @property
    def mods(self) -> Modifiers:
        """The score modifiers (:data:`NO_MODIFIERS` when none)."""
        return NO_MODIFIERS if self.modifiers is None else self.modifiers

    def with_call(self, mods: Modifiers | None = None, kv: PagedKv | None = None) -> "Plan":
        """This plan with the call's score modifiers and KV layout (the structure cache is shared)."""
        mods = None if mods is None or not mods.any else mods
        if mods is self.modifiers and kv is self.kv:
            return self
        return replace(self, modifiers=mods, kv=kv)

    # -- structure -----------------------------------------------------------------------------------
    @property
    def structured(self) -> bool:
        """Visibility follows from the tiles alone (no key_valid / dense / sparse tensor)."""
        return self.key_valid is None and self.dense is None and self.sparse is None

    @property
    def single(self) -> Tile | None:
        """The only tile, when the plan is one tile covering the whole call."""
        if len(self.tiles) != 1:
            return None
        t = self.tiles[0]
        return t if (t.q_start, t.q_len, t.k_start, t.k_len) == (0, self.seqlen_q, 0, self.seqlen_k) else None

    @property
    def structure_full(self) -> bool:
        """The tiles alone hide nothing: one tile over the whole call that every row sees whole."""
        t = self.single
        return t is not None and t.full

    @property
    def full(self) -> bool:
        """Every query sees every key (no mask at all)."""
        return self.structured and self.structure_full

    def groups(self) -> tuple[Group, ...]:
        """The tiles grouped by query range, in query order."""
        got = self._cache.get("groups")
        if got is None:
            out: list = []
            for t in self.tiles:
                if out and (out[-1][0], out[-1][1]) == (t.q_start, t.q_len):
                    out[-1][2].append(t)
                else:
                    out.append((t.q_start, t.q_len, [t]))
            got = self._cache["groups"] = tuple(Group(a, n, tuple(ts)) for a, n, ts in out)
        return got

    @property
    def max_runs(self) -> int:
        """The most key tiles any query row sees (1 for every classic mask; 2 for sink + window)."""
        got = self._cache.get("max_runs")
        if got is None:
            got = 0
            for g in self.groups():
                got = max(got, len(g.tiles))
            self._cache["max_runs"] = got
        return got

    def derived(self, key, build):
        """``build(plan)``: a value that follows from the plan's structure (its tiles and lengths) and ``key``,
        cached with the structure (shared by :meth:`with_call` copies; rebuilt while compiling). A backend keeps
        its per-plan lowering here, e.g. a kernel's tile table."""
        if torch.compiler.is_compiling():
            return build(self)
        key = ("derived", key)
        got = self._cache.get(key)
        if got is None:
            got = self._cache[key] = build(self)
        return got

    def layers(self) -> tuple["Plan", ...]:
        """Plans in which every row sees at most one tile (layer ``r``: the ``r``-th tile of each group),
        for kernels that take one key run per row: their results merge by the LSE rule. Sinks are left
        out (the merge applies them once)."""
        mods = self.mods.without_sinks()
        mods = mods if mods.any else None
        if self.max_runs <= 1:
            return (self,) if mods is self.modifiers else (replace(self, modifiers=mods),)
        got = self._cache.get("layers")
        if got is None:            # structure only: each layer's own cache is shared by every call
            got = self._cache["layers"] = tuple(
                Plan(self.seqlen_q, self.seqlen_k, tuple(g.tiles[r] for g in self.groups() if len(g.tiles) > r),
                     self.packed) for r in range(self.max_runs))
        return tuple(replace(s, key_valid=self.key_valid, dense=self.dense, sparse=self.sparse, modifiers=mods, kv=self.kv)
                     for s in got)

    @property
    def features(self) -> frozenset:
        """The capability names a backend needs to serve this plan (:data:`FEATURES`)."""
        got = self._cache.get("features")
        if got is None:
            f = set()
            if any(t.causal for t in self.tiles):
                f.add("causal")
            if any(t.window is not None for t in self.tiles):
                f.add("window")
            if self.packed:
                f.add("block_diagonal")
            if self.max_runs > 1:
                f.add("multi_tile")
            got = self._cache["features"] = frozenset(f)
        extra = set(self.mods.names())
        if self.key_valid is not None:
            extra.add("key_padding")
        if self.dense is not None:
            extra.add("dense")
        if self.sparse is not None:
            extra.add("block_sparse")
        if self.kv is not None:
            extra.add("paged")
        return got | extra if extra else got

    def empty_row_runs(self) -> tuple[tuple[int, int], ...]:
        """Global ``[start, stop)`` runs of rows that see no key by structure (Python ints). Rows hidden
        only by a tensor restriction depend on its values: see :meth:`empty_rows_on`."""
        got = self._cache.get("empty_runs")
        if got is None:
            seen = []
            for g in self.groups():      # groups are disjoint and sorted: sorting within each one is enough
                rows = []
                for a, z in (t.visible_rows() for t in g.tiles):
                    if z > a:            # insertion by comparison, not sorted(): sizes may be symbolic (compile)
                        i = len(rows)
                        while i and rows[i - 1][0] > g.q_start + a:
                            i -= 1
                        rows.insert(i, (g.q_start + a, g.q_start + z))
                seen += rows
            runs, pos = [], 0
            for a, z in seen + [(self.seqlen_q, self.seqlen_q)]:
                if a > pos:
                    runs.append((pos, a))
                pos = max(pos, z)
            got = self._cache["empty_runs"] = tuple(runs)
        return got

    @property
    def may_have_empty_rows(self) -> bool:
        """False only when no query row can be empty (the structure says so and no tensor hides keys, or the
        tensor is a host block layout that lists a block in every row of a structure that hides nothing)."""
        sp = self.sparse
        if (sp is not None and sp.host is not None and self.structure_full and sp.covers(self.seqlen_q, self.seqlen_k)
                and not torch.compiler.is_compiling()):       # the host counts are data to a compiled graph
            return 0 in sp.host[3]
        return bool(self.empty_row_runs()) or not self.structured

    def runs(self) -> tuple[tuple[int, int, int, int, Tile], ...]:
        """Maximal runs of consecutive tiles (one per group) that can run as one batched call: equal
        :meth:`Tile.shape_key`, consecutive query ranges, key starts a constant ``k_step`` apart
        (``k_step == k_len``: contiguous, e.g. CFG branches; smaller: overlapping sliding windows, which
        strided views serve without a copy). ``(q_start, k_start, count, k_step, tile)``. Single-run
        plans only (see :meth:`layers`)."""
        got = self._cache.get("runs")
        if got is None:
            out = []
            for t in self.tiles:
                if out:
                    q0, k0, n, step, first = out[-1]
                    if first.shape_key() == t.shape_key() and t.q_start == q0 + n * first.q_len:
                        this = t.k_start - (k0 + (n - 1) * step if n > 1 else k0)
                        if n == 1 and this >= 0 or n > 1 and this == step:
                            out[-1] = (q0, k0, n + 1, this if n == 1 else step, first)
                            continue
                out.append((t.q_start, t.k_start, 1, t.k_len, t))
            got = self._cache["runs"] = tuple(out)
        return got

    def varlen(self) -> "Varlen | None":
        """The plan as variable-length sequences, the form varlen kernels take (flash-attn, xformers'
        block-diagonal biases, attnlib's Triton kernels): tiles in query and key order (gaps become
        sequences with no queries or no keys), all full, or all causal bottom-right with one window. None
        when the plan has no such form. Cached."""
        if "varlen" not in self._cache:
            self._cache["varlen"] = _varlen(self)
        return self._cache["varlen"]

    def visible_pairs(self) -> int:
        """Visible (query, key) pairs by structure (per batch row and head; tensors may hide more)."""
        got = self._cache.get("pairs")
        if got is None:
            got = self._cache["pairs"] = sum(t.visible_pairs() for t in self.tiles)
        return got

    # -- tensors ------------------------------------------------------------------------------------
    def runs_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 CPU ``(lo, hi)`` ``[R, Sq]`` with ``R = max(1, max_runs)``: row ``i``'s ``r``-th visible key run
        by structure is ``lo[r, i] <= j <= hi[r, i]`` (global); unused runs have ``lo = 0, hi = -1``. Cached."""
        got = self._cache.get("intervals")
        if got is None:
            got = self._cache["intervals"] = _runs_table(self.groups(), self.seqlen_q, max(1, self.max_runs))
        return got

    def runs_table_on(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`runs_table` on ``device`` (copied once per device, asynchronously)."""
        device = torch.device(device)
        key = ("intervals", str(device))
        got = self._cache.get(key)
        if got is None:
            lo, hi = self.runs_table()
            got = (lo, hi) if device.type == "cpu" else (lo.to(device, non_blocking=True),
                                                          hi.to(device, non_blocking=True))
            self._cache[key] = got
        return got

    def aligned_keys(self, device=None) -> torch.Tensor:
        """int64 ``[Sq]``: the global key index aligned with each query row (``k_start + i_local + offset`` of
        its tiles; 0 for rows in no tile): ALiBi's distance is ``aligned[i] - j``. Cached per device."""
        device = torch.device("cpu" if device is None else device)
        key = ("aligned", str(device))
        got = self._cache.get(key)
        if got is None:
            a = torch.zeros(self.seqlen_q, dtype=torch.int64)
            for g in self.groups():
                t = g.tiles[0]
                a[g.q_start:g.q_start + g.q_len] = torch.arange(g.q_len) + t.offset + t.k_start
            got = self._cache[key] = a.to(device)
        return got

    def structure_grid(self, device=None) -> torch.Tensor:
        """bool ``[Sq, Sk]``: visibility by the tiles alone (cached per device)."""
        device = torch.device("cpu" if device is None else device)
        key = ("grid", str(device))
        got = self._cache.get(key)
        if got is None:
            lo, hi = self.runs_table_on(device)
            j = torch.arange(self.seqlen_k, device=device)
            got = ((j >= lo[..., None]) & (j <= hi[..., None])).any(0)
            self._cache[key] = got
        return got

    def materialize(self, device=None) -> torch.Tensor:
        """bool, True = may attend: ``[Sq, Sk]`` for structured plans; with a tensor restriction,
        broadcastable to ``[B, Hq, Sq, Sk]`` (``[B, 1, Sq, Sk]`` with ``key_valid``)."""
        if self.dense is not None:
            m = self.dense if device is None else self.dense.to(device)
            vis = m if m.dtype == torch.bool else m > float("-inf")
            if self.structure_full:
                return vis
            return self.structure_grid(vis.device) & vis
        if self.sparse is not None:
            lay = self.sparse.grid(self.seqlen_q, self.seqlen_k, device)
            return lay if self.structure_full else self.structure_grid(lay.device) & lay
        if self.key_valid is None:
            return self.structure_grid(device)
        valid = self.key_valid if device is None else self.key_valid.to(device)
        if self.structure_full:
            return valid[:, None, None, :].expand(-1, 1, self.seqlen_q, -1)
        return self.structure_grid(valid.device)[None, None] & valid[:, None, None, :]

    def bias(self, heads: int, device=None, dtype=torch.float32) -> torch.Tensor | None:
        """The additive score bias of the plan (ALiBi and a float ``DenseMask``), broadcastable to
        ``[B, Hq, Sq, Sk]``; None when there is none. Hidden keys are not marked here (see materialize)."""
        out = None
        if self.mods.alibi is not None:
            slopes = self.mods.alibi.to(device=device, dtype=dtype)
            slopes = slopes.reshape((1,) * (2 - slopes.dim()) + tuple(slopes.shape))[..., None, None]   # [B?, H, 1, 1]
            dev = slopes.device
            dist = (self.aligned_keys(dev)[:, None] - torch.arange(self.seqlen_k, device=dev)[None, :]).abs()
            out = -slopes * dist.to(dtype)
        if self.dense is not None and self.dense.dtype != torch.bool:
            d = self.dense.to(device=device, dtype=dtype)
            d = torch.where(d > float("-inf"), d, torch.zeros((), dtype=dtype, device=d.device))
            d = d.reshape((1,) * (4 - d.dim()) + tuple(d.shape))
            out = d if out is None else out + d
        return out

    def rows_seeing(self, flags: torch.Tensor) -> torch.Tensor:
        """bool ``[B, H, Sq]``: the rows that see at least one key flagged in ``flags`` (bool ``[B, H, Sk]``,
        H = 1 or the query heads), on the flags' device without a host read: prefix sums over each row's
        key runs (and the key validity), or the materialized mask for dense and block-sparse plans."""
        if self.dense is not None or self.sparse is not None:
            vis = self.materialize(flags.device)
            vis = vis.reshape((1,) * (4 - vis.dim()) + tuple(vis.shape))
            return (vis & flags[:, :, None, :]).any(-1)
        if self.key_valid is not None:
            flags = flags & self.key_valid.to(flags.device)[:, None, :]
        if self.structure_full:                            # every row sees every (valid) key
            return flags.any(-1, keepdim=True).expand(*flags.shape[:-1], self.seqlen_q)
        csum = torch.nn.functional.pad(flags.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
        lo, hi = self.runs_table_on(flags.device)                                    # [R, Sq]
        count = (csum[..., (hi + 1).clamp(min=0)] - csum[..., lo.clamp(max=self.seqlen_k)]).clamp(min=0)
        return count.sum(-2) > 0

    def restriction_tensors(self) -> tuple:
        """The tensors that restrict visibility beyond the tiles (key validity, a dense mask, a block layout)."""
        return tuple(t for t in (self.key_valid, self.dense, None if self.sparse is None else self.sparse.layout)
                     if t is not None)

    def tensor_derived(self, key, build):
        """``build(plan)``: a value that follows from the plan's restriction tensors (and ``key``), cached
        while those very tensors are unchanged. A mask reused across layers and steps is lowered once; an
        in-place write to its tensor bumps the tensor's version counter (a host field: no device read) and
        rebuilds the value. Built afresh while compiling and for inference tensors (no version counter)."""
        tensors = self.restriction_tensors()
        if torch.compiler.is_compiling() or any(t.is_inference() for t in tensors):
            return build(self)
        versions = tuple(t._version for t in tensors)
        got = self._tensor_cache.get(key)
        if got is not None and got[1] == versions and all(a is b for a, b in zip(got[0], tensors)):
            return got[2]
        value = build(self)
        self._tensor_cache[key] = (tensors, versions, value)
        return value

    def empty_rows_on(self, device) -> torch.Tensor | None:
        """bool, broadcastable to ``[B, Hq, Sq]``: rows that see no key; None when none can.
        Structured plans: from :meth:`empty_row_runs` (cached per device); with a tensor restriction:
        computed on the device (no host read; cached by :meth:`tensor_derived`)."""
        if not self.structured:
            return self.tensor_derived(("empty", str(device)), lambda p: p._empty_rows_restricted(device))
        if not self.empty_row_runs():
            return None
        device = torch.device(device)
        key = ("empty", str(device))
        got = self._cache.get(key)
        if got is None:
            rows = torch.zeros(self.seqlen_q, dtype=torch.bool)
            for s, e in self.empty_row_runs():
                rows[s:e] = True
            got = self._cache[key] = rows.to(device)
        return got

    def _empty_rows_restricted(self, device) -> torch.Tensor:
        if self.sparse is not None:
            return self.sparse.empty_rows(*self.runs_table_on(device))
        if self.dense is not None:
            m = self.materialize(device)
            m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
            return ~m.any(dim=-1)
        if self.key_valid is not None:
            valid = self.key_valid.to(device)
            if self.structure_full:
                return (~valid.any(dim=-1))[:, None, None]
            lo, hi = self.runs_table_on(valid.device)
            csum = torch.nn.functional.pad(valid.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
            count = (csum[:, (hi + 1).clamp(min=0)] - csum[:, lo.clamp(max=self.seqlen_k)]).clamp(min=0).sum(1)
            return (count <= 0)[:, None, :]

    # -- views ---------------------------------------------------------------------------------------
    def restrict(self, q_range: tuple[int, int], k_range: tuple[int, int]) -> "Plan":
        """The plan of the sub-call ``q[q0:q1]`` against ``k[k0:k1]`` (ring steps, chunked prefill): the same
        visibility and ALiBi positions, in the slice's own coordinates. Keeps the modifiers."""
        q0, q1 = _check_range(q_range, self.seqlen_q, "q_range")
        k0, k1 = _check_range(k_range, self.seqlen_k, "k_range")
        if self.kv is not None:
            raise ValueError("a paged plan cannot be restricted: gather its keys first")
        if (q0, q1, k0, k1) == (0, self.seqlen_q, 0, self.seqlen_k):
            return self
        tiles = tuple(c for c in (t.clip(q0, q1, k0, k1) for t in self.tiles) if c is not None)
        key_valid = None if self.key_valid is None else self.key_valid[:, k0:k1]
        dense = None
        if self.dense is not None:
            m = self.dense
            m4 = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
            dense = m4[:, :, slice(q0, q1) if m4.shape[2] != 1 else slice(None),
                       slice(k0, k1) if m4.shape[3] != 1 else slice(None)]
        sparse = None if self.sparse is None else replace(self.sparse, q_origin=self.sparse.q_origin + q0,
                                                          k_origin=self.sparse.k_origin + k0)
        return Plan(q1 - q0, k1 - k0, tiles, self.packed, key_valid, dense, sparse, self.modifiers)

    def restrict_heads(self, h0: int, h1: int, heads: int) -> "Plan":
        """The plan of query heads ``[h0, h1)`` of ``heads`` (Ulysses): per-head tensors and modifiers sliced."""
        dense = self.dense
        if dense is not None and dense.dim() >= 3 and dense.shape[-3] == heads:
            dense = dense[..., h0:h1, :, :]
        sparse = self.sparse
        if sparse is not None and sparse.layout.dim() >= 3 and sparse.layout.shape[-3] == heads:
            sparse = replace(sparse, layout=sparse.layout[..., h0:h1, :, :])
        return replace(self, dense=dense, sparse=sparse, modifiers=self.mods.heads(h0, h1))

    def describe(self) -> str:
        """A human-readable account of the plan (one line per run of tiles)."""
        kind = "packed" if self.packed else "dense"
        lines = [f"Plan: {self.seqlen_q} queries x {self.seqlen_k} keys, {len(self.tiles)} tile(s), {kind}"
                 + (f", up to {self.max_runs} key runs per row" if self.max_runs > 1 else "")]
        for q0, k0, n, step, t in self.runs():
            what = (f"causal offset {t.offset}" + (f", window {t.window}" if t.window is not None else "")
                    ) if t.causal else "full"
            k_end = k0 + (n - 1) * step + t.k_len
            span = f"q[{q0}:{q0 + n * t.q_len}] x k[{k0}:{k_end}]"
            count = f"{n} x " if n > 1 else ""
            slide = f" (keys step {step})" if n > 1 and step != t.k_len else ""
            lines.append(f"  {span}: {count}{t.q_len}x{t.k_len} {what}{slide}")
        empty = self.empty_row_runs()
        if empty:
            shown = ", ".join(f"{s}:{e}" for s, e in empty[:8]) + (" ..." if len(empty) > 8 else "")
            lines.append(f"  rows with no key: {shown}")
        if self.key_valid is not None:
            lines.append(f"  key validity: bool {list(self.key_valid.shape)} (per batch row)")
        if self.dense is not None:
            lines.append(f"  dense mask: {self.dense.dtype} {list(self.dense.shape)}")
        if self.sparse is not None:
            lay = self.sparse.layout
            lines.append(f"  block layout: {lay.dtype} {list(lay.shape)} on {lay.device}, blocks "
                         f"{self.sparse.bq}x{self.sparse.bk}")
        mods = []
        if self.mods.softcap is not None:
            mods.append(f"softcap {self.mods.softcap:g}")
        if self.mods.alibi is not None:
            mods.append(f"ALiBi slopes {list(self.mods.alibi.shape)}")
        if self.mods.sinks is not None:
            mods.append(f"sinks {list(self.mods.sinks.shape)}")
        if mods:
            lines.append("  score modifiers: " + ", ".join(mods))
        if self.kv is not None:
            lines.append(f"  paged keys: {len(self.kv.kv_seqlens)} requests, page size {self.kv.page_size}, "
                         f"block_table {list(self.kv.block_table.shape)}"
                         + ("" if self.kv.kv_seqused is None else ", key lengths on the device (right-aligned "
                            "windows)"))
        return "\n".join(lines)

    def __repr__(self):
        return self.describe()


def _check_range(r, n: int, name: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in r)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (start, stop) pair of ints, got {r!r}") from None
    if not 0 <= a <= b <= n:
        raise ValueError(f"{name}={r!r} must satisfy 0 <= start <= stop <= {n}")
    return a, b


def _runs_table(groups, sq: int, runs: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.zeros(runs, sq, dtype=torch.int64)
    hi = torch.full((runs, sq), -1, dtype=torch.int64)
    for g in groups:
        i = torch.arange(g.q_len, dtype=torch.int64)
        rows = slice(g.q_start, g.q_start + g.q_len)
        for r, t in enumerate(g.tiles):
            if t.k_len == 0:
                continue
            if t.causal:
                last = (i + t.offset).clamp(max=t.k_len - 1)
                first = (i + t.offset - t.window + 1).clamp(min=0) if t.window is not None else torch.zeros_like(i)
            else:
                first, last = torch.zeros_like(i), torch.full_like(i, t.k_len - 1)
            none = first > last
            lo[r, rows] = torch.where(none, 0, first + t.k_start)
            hi[r, rows] = torch.where(none, -1, last + t.k_start)
    return lo, hi


@dataclass(frozen=True, eq=False)
class Varlen:
    """Variable-length sequences: sequence ``s`` has queries ``q_seqlens[s]`` and keys ``kv_seqlens[s]``,
    packed in order; ``causal`` (bottom-right per sequence) and ``window`` apply to all. ``cu_seqlens``
    and max lengths are host values; :meth:`cu_on` caches device copies."""

    q_seqlens: tuple
    kv_seqlens: tuple
    causal: bool
    window: int | None
    _device: dict = field(default_factory=dict, repr=False)

    @property
    def max_seqlen_q(self) -> int:
        return max(self.q_seqlens) if self.q_seqlens else 0

    @property
    def max_seqlen_k(self) -> int:
        return max(self.kv_seqlens) if self.kv_seqlens else 0

    def cu_on(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 ``(cu_seqlens_q, cu_seqlens_k)`` on ``device`` (cached; built inside a compiled region)."""
        device = torch.device(device)
        got = None if torch.compiler.is_compiling() else self._device.get(str(device))
        if got is None:
            cu = [torch.tensor([0] + _prefix(lens), dtype=torch.int32) for lens in (self.q_seqlens, self.kv_seqlens)]
            got = tuple(t.to(device, non_blocking=True) for t in cu)
            if not torch.compiler.is_compiling():
                self._device[str(device)] = got
        return got


def _prefix(lens) -> list[int]:
    out, total = [], 0
    for n in lens:
        total += n
        out.append(total)
    return out


def _varlen(plan: Plan) -> Varlen | None:
    if plan.max_runs > 1 or plan.sparse is not None or plan.dense is not None or plan.key_valid is not None:
        return None
    tiles = plan.tiles
    causal = any(t.causal and not t.full for t in tiles)
    windows = {t.window for t in tiles if t.causal and not t.full}
    if len(windows) > 1:
        return None
    window = windows.pop() if windows else None
    q_lens, k_lens, qp, kp = [], [], 0, 0
    for t in tiles:
        if t.q_start < qp or t.k_start < kp:
            return None
        if causal:
            ok = (t.causal and t.bottom_right and t.window == window) or (
                t.full and t.q_len == 1 and (window is None or window >= t.k_len))
        else:
            ok = t.full
        if not ok:
            return None
        if t.q_start > qp or t.k_start > kp:             # rows or keys of no tile: a sequence that sees nothing
            q_lens.append(t.q_start - qp)
            k_lens.append(0)
            if t.k_start > kp:
                q_lens.append(0)
                k_lens.append(t.k_start - kp)
        q_lens.append(t.q_len)
        k_lens.append(t.k_len)
        qp, kp = t.q_start + t.q_len, t.k_start + t.k_len
    q_lens += [plan.seqlen_q - qp, 0]                   # trailing rows and keys of no tile: apart
    k_lens += [0, plan.seqlen_k - kp]
    q_lens, k_lens = zip(*[(a, b) for a, b in zip(q_lens, k_lens) if a or b]) if q_lens else ((), ())
    return Varlen(tuple(q_lens), tuple(k_lens), causal, window)


def full_plan(seqlen_q: int, seqlen_k: int) -> Plan:
    """Every query sees every key (``mask=None``); ALiBi aligns bottom-right (``offset = Sk - Sq``)."""
    return _full_plan(int(seqlen_q), int(seqlen_k))


@host_lru(256)
def _full_plan(sq: int, sk: int) -> Plan:
    return Plan(sq, sk, (Tile(0, sq, 0, sk, False, sk - sq),) if sq else ())


def plan_for(mask, seqlen_q: int, seqlen_k: int) -> Plan:
    """The plan of ``mask`` (``None`` or an ``attnlib.masks`` object) for ``Sq`` x ``Sk``: ``mask.plan``."""
    if mask is None:
        return full_plan(seqlen_q, seqlen_k)
    make = getattr(mask, "plan", None)
    if make is None:
        raise TypeError(f"mask must be None or one of attnlib.masks (Causal, BlockDiagonal, KeyPadding, DenseMask, "
                        f"BlockSparse), got {type(mask).__name__}; wrap a raw tensor as DenseMask(tensor)")
    return make(int(seqlen_q), int(seqlen_k))
