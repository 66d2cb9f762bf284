"""A paged KV cache for model code: page pools per layer, per-sequence page lists kept on the host.

The cache owns, for every layer, a key pool and a value pool ``[num_pages, page_size, Hkv, D]``. Which
pages a sequence uses, how long it is and how many sequences share a page are Python ints on the host, so
nothing here reads a tensor on the host, and page ids are in range by construction.

One step of a serving loop::

    step = cache.step({seq_a: 1, seq_b: 1, seq_c: 57})     # decode a and b, prefill 57 tokens of c
    for layer in range(num_layers):
        ...                                                 # q, k, v of the new tokens, packed [T, H, D]
        k_pool, v_pool = step.update(layer, k, v)           # scatter the new keys/values into their pages
        out = attnlib.attention(q, k_pool, v_pool, step.mask, block_table=step.block_table)

``step`` builds the ``block_table`` (int32 on the pools' device) and the ``BlockDiagonal`` mask once; every
layer passes the same objects, so the plan is built once per step. :meth:`PagedKVCache.fork` shares a
sequence's pages (CFG branches, beams with one prompt) and a write into a shared page copies it first.

For captured CUDA graphs, :meth:`PagedKVCache.static_step` keeps the table, the key lengths and the write
slots in fixed device buffers that :meth:`StaticStep.advance` refills before each replay; the mask is
``BlockDiagonal.from_device_lengths`` over them, so one graph serves every decode step.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from .api import attention
from .masks import BlockDiagonal

__all__ = ["PagedKVCache", "PagedStep", "StaticStep"]


class PagedKVCache:
    """Page pools for ``num_layers`` layers and the page lists of the sequences that use them.

    Args:
        num_layers: layers, each with its own key and value pool.
        num_pages: pages per pool (the capacity: ``num_pages * page_size`` tokens, shared by all sequences).
        page_size: tokens per page.
        num_kv_heads, head_dim: the key shape per token; ``head_dim_v`` the value's (default ``head_dim``).
        dtype, device: of the pools.

    Sequences are ints handed out by :meth:`new_sequence` and :meth:`fork`.
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *,
                 head_dim_v: int | None = None, dtype: torch.dtype = torch.float32, device="cpu"):
        for name, val in (("num_layers", num_layers), ("num_pages", num_pages), ("page_size", page_size),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"PagedKVCache({name}=...) must be a positive int, got {val!r}")
        dv = head_dim if head_dim_v is None else head_dim_v
        self.page_size = page_size
        self.num_pages = num_pages
        self.device = torch.device(device)
        self.k = [torch.zeros(num_pages, page_size, num_kv_heads, head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.v = [torch.zeros(num_pages, page_size, num_kv_heads, dv, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self._free = list(range(num_pages - 1, -1, -1))      # pop() hands out the lowest page id first
        self._refs = [0] * num_pages
        self._pages: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}
        self._next = 0

    # -- sequences -------------------------------------------------------------------------------
    def new_sequence(self) -> int:
        """A new empty sequence; returns its id."""
        seq = self._next
        self._next += 1
        self._pages[seq], self._lens[seq] = [], 0
        return seq

    def fork(self, seq: int) -> int:
        """A new sequence holding ``seq``'s tokens, sharing its pages (no copy now; a write into a shared
        page copies that page first). Returns the new id."""
        self._check(seq)
        new = self.new_sequence()
        self._pages[new] = list(self._pages[seq])
        self._lens[new] = self._lens[seq]
        for p in self._pages[new]:
            self._refs[p] += 1
        return new

    def free(self, seq: int) -> None:
        """Forget ``seq``; pages no other sequence holds return to the pool."""
        self._check(seq)
        for p in self._pages.pop(seq):
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)
        del self._lens[seq]

    def length(self, seq: int) -> int:
        """Tokens stored for ``seq``."""
        self._check(seq)
        return self._lens[seq]

    def pages(self, seq: int) -> list[int]:
        """``seq``'s page ids, in order (a copy)."""
        self._check(seq)
        return list(self._pages[seq])

    @property
    def sequences(self) -> list[int]:
        return list(self._pages)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def pages_in_use(self) -> int:
        """Pages held by at least one sequence (a shared page counts once)."""
        return self.num_pages - len(self._free)

    @property
    def pages_referenced(self) -> int:
        """Pages the sequences would hold without sharing (a page shared by ``n`` sequences counts ``n`` times)."""
        return sum(len(p) for p in self._pages.values())

    def _check(self, seq) -> None:
        if seq not in self._pages:
            raise KeyError(f"sequence {seq!r} is not in this cache (new_sequence() or fork() hand out ids; free() "
                           "forgets them)")

    # -- steps -----------------------------------------------------------------------------------
    def step(self, new_tokens: Mapping[int, int] | Iterable[tuple[int, int]], *, causal: bool = True,
             window: int | None = None) -> "PagedStep":
        """Reserve slots for the new tokens of a step and build its metadata.

        ``new_tokens``: ``{seq: n}`` (or ``(seq, n)`` pairs) in the order the new tokens are packed along
        the token axis; ``n >= 1`` (prefill, a chunk of it, or 1 for decode, mixed freely). The lengths
        advance now; :meth:`PagedStep.update` writes each layer's keys and values. ``causal`` and ``window``
        go into the step's ``BlockDiagonal`` (bottom-right per sequence)."""
        items = _items(new_tokens)
        slots, starts = self._reserve(items)
        seqs = tuple(s for s, _ in items)
        q_lens = tuple(n for _, n in items)
        kv_lens = tuple(self._lens[s] for s in seqs)
        width = max(len(self._pages[s]) for s in seqs)
        table = torch.tensor([self._pages[s] + [0] * (width - len(self._pages[s])) for s in seqs], dtype=torch.int32)
        return PagedStep(self, seqs, starts, BlockDiagonal(q_lens, kv_lens, causal=causal, window=window),
                         _to(table, self.device), _to(torch.tensor(slots, dtype=torch.int64), self.device))

    def static_step(self, seqs: Sequence[int], max_seqlen_k: int, *, tokens: int = 1, causal: bool = True,
                    window: int | None = None) -> "StaticStep":
        """Fixed device buffers for decode steps of ``seqs`` (``tokens`` new tokens each, every step) whose
        key counts stay ``<= max_seqlen_k``: one CUDA graph captured over a step serves all of them. Call
        :meth:`StaticStep.advance` before each step (the first one included)."""
        seqs = tuple(seqs)
        for s in seqs:
            self._check(s)
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"static_step got a sequence twice: {list(seqs)}")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"static_step(tokens=...) must be a positive int, got {tokens!r}")
        return StaticStep(self, seqs, tokens, max_seqlen_k, causal, window)

    def _reserve(self, items: list[tuple[int, int]]) -> tuple[list[int], tuple[int, ...]]:
        """Pages for ``n`` more tokens of each sequence (copy-on-write of a shared last page first); returns
        the flat pool slots of the new tokens in order and the lengths before the step."""
        ps = self.page_size
        need, refs = 0, {}                  # refs: shared last pages' counts as the copies below leave them
        for s, n in items:
            self._check(s)
            length, pages = self._lens[s], self._pages[s]
            need += -(-(length + n) // ps) - len(pages)
            if length % ps and refs.setdefault(pages[-1], self._refs[pages[-1]]) > 1:
                need += 1
                refs[pages[-1]] -= 1
        if need > len(self._free):
            raise RuntimeError(f"PagedKVCache is out of pages: this step needs {need} new pages, {len(self._free)} "
                               f"are free (of {self.num_pages}); free finished sequences or build a bigger cache")
        copies, slots, starts = [], [], []
        for s, n in items:
            length, pages = self._lens[s], self._pages[s]
            if length % ps and self._refs[pages[-1]] > 1:          # the next write lands in a shared page
                new = self._free.pop()
                copies.append((pages[-1], new))
                self._refs[pages[-1]] -= 1
                self._refs[new] = 1
                pages[-1] = new
            while len(pages) * ps < length + n:
                p = self._free.pop()
                self._refs[p] = 1
                pages.append(p)
            slots += [pages[j // ps] * ps + j % ps for j in range(length, length + n)]
            starts.append(length)
            self._lens[s] = length + n
        if copies:
            src = _to(torch.tensor([a for a, _ in copies]), self.device)
            dst = _to(torch.tensor([b for _, b in copies]), self.device)
            for pool in self.k + self.v:
                pool.index_copy_(0, dst, pool.index_select(0, src))
        return slots, tuple(starts)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Scatter ``k``/``v`` (``[T, Hkv, D]``) into ``layer``'s pools at the flat ``slots`` (int64 ``[T]``
        on the device); returns the pools. An ``index_copy_``: no host read, traceable."""
        kp, vp = self.k[layer], self.v[layer]
        if k.shape[1:] != kp.shape[2:] or v.shape[1:] != vp.shape[2:] or k.dim() != 3:
            raise ValueError(f"new keys/values must be [T, Hkv, D] = [T, {kp.shape[2]}, {kp.shape[3]}] / "
                             f"[T, {vp.shape[2]}, {vp.shape[3]}], got k {tuple(k.shape)}, v {tuple(v.shape)}")
        if k.shape[0] != slots.shape[0] or v.shape[0] != slots.shape[0]:
            raise ValueError(f"this step writes {slots.shape[0]} new tokens, got k {tuple(k.shape)} and v "
                             f"{tuple(v.shape)}")
        kp.view(-1, *kp.shape[2:]).index_copy_(0, slots, k.to(kp.dtype))
        vp.view(-1, *vp.shape[2:]).index_copy_(0, slots, v.to(vp.dtype))
        return kp, vp

    def __repr__(self):
        kp = self.k[0]
        return (f"PagedKVCache({len(self.k)} layers, {self.num_pages} pages of {self.page_size} x {kp.shape[2]} heads "
                f"x {kp.shape[3]}, {kp.dtype} on {kp.device}; {len(self._pages)} sequences, {self.pages_in_use} "
                f"pages in use)")


class PagedStep:
    """One step's metadata: ``seqs`` (packing order), ``q_seqlens`` (new tokens), ``kv_seqlens`` (tokens
    after the step), ``starts`` (tokens before it: the new tokens' first position), ``mask`` (the
    ``BlockDiagonal``), ``block_table`` (int32 ``[R, pages]`` on the device), ``slots`` (int64 ``[T]``: where
    the new tokens go). Pass the same ``mask`` and ``block_table`` to every layer."""

    def __init__(self, cache: PagedKVCache, seqs, starts, mask: BlockDiagonal, block_table: torch.Tensor,
                 slots: torch.Tensor):
        self.cache = cache
        self.seqs = seqs
        self.starts = starts
        self.mask = mask
        self.block_table = block_table
        self.slots = slots
        self._masks = {(mask.causal, mask.window): mask}

    @property
    def q_seqlens(self) -> tuple[int, ...]:
        return self.mask.q_seqlens

    @property
    def kv_seqlens(self) -> tuple[int, ...]:
        return self.mask.kv_seqlens

    @property
    def num_tokens(self) -> int:
        return self.mask.total_q

    def mask_for(self, *, causal: bool | None = None, window: int | None = None) -> BlockDiagonal:
        """The step's mask with another ``causal`` flag (default: the step's) and ``window`` (default: none),
        e.g. for sliding-window layers or a bidirectional image block; one object per variant and step,
        so each variant is planned once per step."""
        causal = self.mask.causal if causal is None else causal
        got = self._masks.get((causal, window))
        if got is None:
            m = self.mask
            got = (BlockDiagonal(m.q_seqlens, m.kv_seqlens, causal=causal, window=window) if m.kv_seqused is None else
                   BlockDiagonal.from_device_lengths(m.q_seqlens, m.kv_seqused, m.max_seqlen_k, causal=causal,
                                                     window=window))
            self._masks[(causal, window)] = got
        return got

    def positions(self, device=None) -> torch.Tensor:
        """int64 ``[T]``: each new token's position in its sequence (for RoPE)."""
        pos = torch.cat([torch.arange(s, s + n) for s, n in zip(self.starts, self.q_seqlens)])
        return _to(pos, self.cache.device if device is None else torch.device(device))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the step's new keys/values (packed ``[T, Hkv, D]``) for ``layer``; returns the layer's
        ``(k_pool, v_pool)`` for the attention call."""
        return self.cache.write(layer, self.slots, k, v)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs):
        """:meth:`update`, then ``attnlib.attention`` of ``q`` (packed ``[T, Hq, D]``) over the pages (keyword
        arguments as for ``attnlib.attention``: ``backend``, ``return_lse``, score modifiers)."""
        kp, vp = self.update(layer, k, v)
        return attention(q, kp, vp, self.mask, block_table=self.block_table, **kwargs)

    def __repr__(self):
        return (f"{type(self).__name__}(seqs={list(self.seqs)}, q_seqlens={list(self.q_seqlens)}, "
                f"mask={self.mask!r})")


class StaticStep(PagedStep):
    """Decode steps in fixed device buffers (see :meth:`PagedKVCache.static_step`): ``block_table`` int32
    ``[R, ceil(max_seqlen_k / page_size)]``, ``kv_seqused`` int32 ``[R]``, ``slots`` and ``positions_buffer``
    int64 ``[R * tokens]``, and ``mask = BlockDiagonal.from_device_lengths(...)`` over ``kv_seqused``.
    :meth:`advance` reserves the next step's slots on the host and copies the new values into the
    buffers (host-to-device copies only), so a graph captured over one step replays the next."""

    def __init__(self, cache: PagedKVCache, seqs, tokens: int, max_seqlen_k: int, causal: bool, window):
        dev = cache.device
        width = -(-max_seqlen_k // cache.page_size)
        self.max_seqlen_k = max_seqlen_k
        self.tokens = tokens
        self.kv_seqused = torch.zeros(len(seqs), dtype=torch.int32, device=dev)
        self.positions_buffer = torch.zeros(len(seqs) * tokens, dtype=torch.int64, device=dev)
        mask = BlockDiagonal.from_device_lengths([tokens] * len(seqs), self.kv_seqused, max_seqlen_k, causal=causal,
                                                 window=window)
        super().__init__(cache, seqs, (), mask, torch.zeros(len(seqs), width, dtype=torch.int32, device=dev),
                         torch.zeros(len(seqs) * tokens, dtype=torch.int64, device=dev))

    @property
    def kv_seqlens(self) -> tuple[int, ...]:
        """The key counts after the current step (host ints; the device holds them in ``kv_seqused``)."""
        return tuple(s + self.tokens for s in self.starts)

    def positions(self, device=None) -> torch.Tensor:
        """The buffer of the new tokens' positions (refilled by :meth:`advance`)."""
        return self.positions_buffer

    def advance(self) -> None:
        """Reserve ``tokens`` more slots per sequence and refill the buffers; raises ``ValueError`` when a
        sequence would pass ``max_seqlen_k`` (before anything changes)."""
        cache, n = self.cache, self.tokens
        for s in self.seqs:
            if cache.length(s) + n > self.max_seqlen_k:
                raise ValueError(f"sequence {s} would hold {cache.length(s) + n} keys, past this static step's "
                                 f"max_seqlen_k={self.max_seqlen_k}; build a new static_step with a larger bound")
        slots, starts = cache._reserve([(s, n) for s in self.seqs])
        self.starts = starts
        width = self.block_table.shape[1]
        table = [cache._pages[s] + [0] * (width - len(cache._pages[s])) for s in self.seqs]
        pos = [p for s in starts for p in range(s, s + n)]
        for buf, host in ((self.block_table, torch.tensor(table, dtype=torch.int32)),
                          (self.kv_seqused, torch.tensor(self.kv_seqlens, dtype=torch.int32)),
                          (self.slots, torch.tensor(slots, dtype=torch.int64)),
                          (self.positions_buffer, torch.tensor(pos, dtype=torch.int64))):
            buf.copy_(host, non_blocking=buf.device.type == "cuda")


def _items(new_tokens) -> list[tuple[int, int]]:
    items = list(new_tokens.items()) if isinstance(new_tokens, Mapping) else [tuple(x) for x in new_tokens]
    if not items:
        raise ValueError("a step needs at least one sequence with new tokens")
    seen = set()
    for s, n in items:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"new tokens per sequence must be ints >= 1, got {n!r} for sequence {s!r}")
        if s in seen:
            raise ValueError(f"sequence {s!r} appears twice in one step")
        seen.add(s)
    return items


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` (pinned and asynchronous on CUDA)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
