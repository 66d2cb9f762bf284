"""The plan: the one place that says whether query ``i`` may see key ``j``.

Every mask, for a call with ``Sq`` queries and ``Sk`` keys, becomes one :class:`Plan`, built on the host
from Python ints (no device sync) and cached for structured masks. Its :class:`Block`\\ s tile the query
axis; block ``b`` owns query rows ``[q_start, q_start + q_len)`` and key rows ``[k_start, k_start + k_len)``.
Inside a block, with block-local indices ``i`` (query) and ``j`` (key), key ``j`` is visible iff

* ``0 <= j < k_len``, and
* causal blocks: ``j <= i + offset`` (``offset`` is the diagonal: ``k_len - q_len`` bottom-right, ``0``
  top-left, anything after :meth:`Plan.restrict`), and
* with a window ``W``: ``j > i + offset - W`` (the ``W`` newest keys, the diagonal included), and
* the plan's ``key_valid[b, j]`` (``KeyPadding``) and ``dense`` mask (``DenseMask``) where present.

Under these rules every query row of a structured plan sees one contiguous run of keys
(:meth:`Plan.intervals`), and the rows that see no key form at most two runs per block
(:meth:`Block.visible_rows`): they return output 0 and LSE ``-inf`` on every backend.

``materialize()`` of every mask, each backend's lowering and the integrations read this module; the
Triton kernels carry the same rule in device code (``attnlib_kernels._attn_fwd._visible``), and the tests
check the two against each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .caching import host_lru

__all__ = ["Block", "Plan", "plan_for"]


@dataclass(frozen=True)
class Block:
    """One diagonal block of a plan (see the module docstring for the visibility rule)."""

    q_start: int
    q_len: int
    k_start: int
    k_len: int
    causal: bool = False
    offset: int = 0
    window: int | None = None

    def key_span(self, i: int) -> tuple[int, int]:
        """Block-local ``(first, last)`` keys query ``i`` sees (inclusive); ``first > last``: none."""
        if not self.causal:
            return (0, self.k_len - 1)
        last = min(i + self.offset, self.k_len - 1)
        first = 0 if self.window is None else max(i + self.offset - self.window + 1, 0)
        return (first, last)

    def visible_rows(self) -> tuple[int, int]:
        """Block-local ``[start, stop)`` of the query rows that see at least one key (one run)."""
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
        """True when every query row of the block sees every key of the block."""
        if self.q_len == 0 or self.k_len == 0:
            return self.q_len == 0
        if not self.causal:
            return True
        first, _ = self.key_span(self.q_len - 1)
        return self.offset >= self.k_len - 1 and first <= 0

    def shape_key(self) -> tuple:
        """What two blocks must share to run as one batched call (sizes and mask, not positions)."""
        return (self.q_len, self.k_len, self.causal, self.offset if self.causal else 0, self.window)


@dataclass(frozen=True, eq=False)
class Plan:
    """A mask lowered for one call shape: blocks tiling the query axis, plus per-key validity.

    ``key_valid``: bool ``[B, Sk]`` (from ``KeyPadding``) or None; ``dense``: the ``DenseMask`` (an opaque
    tensor, bool or additive) or None. ``packed``: the blocks come from a ``BlockDiagonal`` (THD layout).
    """

    seqlen_q: int
    seqlen_k: int
    blocks: tuple
    packed: bool = False
    key_valid: torch.Tensor | None = None
    dense: object = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- structure --------------------------------------------------------------------------------
    @property
    def single(self) -> Block | None:
        """The only block, when there is one (dense layouts always have one)."""
        return self.blocks[0] if len(self.blocks) == 1 else None

    @property
    def structured(self) -> bool:
        """True when visibility follows from the blocks alone (no key_valid / dense tensor)."""
        return self.key_valid is None and self.dense is None

    @property
    def structure_full(self) -> bool:
        """The blocks alone hide nothing: one block, every query sees every key (tensors may still hide)."""
        return len(self.blocks) == 1 and self.blocks[0].full and self.blocks[0].k_len == self.seqlen_k \
            and self.blocks[0].q_len == self.seqlen_q

    @property
    def full(self) -> bool:
        """Every query sees every key (no mask at all)."""
        return self.structured and self.structure_full

    def empty_row_runs(self) -> tuple[tuple[int, int], ...]:
        """Global ``[start, stop)`` runs of query rows that see no key by structure (Python ints).

        Rows hidden only by ``key_valid`` / ``dense`` depend on tensor values: see :meth:`empty_rows_on`.
        """
        got = self._cache.get("empty_runs")
        if got is None:
            runs = []
            for b in self.blocks:
                a, z = b.visible_rows()
                for s, e in ((0, a), (z, b.q_len)):
                    if e > s:
                        s, e = s + b.q_start, e + b.q_start
                        if runs and runs[-1][1] == s:
                            runs[-1] = (runs[-1][0], e)
                        else:
                            runs.append((s, e))
            got = self._cache["empty_runs"] = tuple(runs)
        return got

    @property
    def may_have_empty_rows(self) -> bool:
        """False only when no query row can be empty (structure says so and no tensor hides keys)."""
        return bool(self.empty_row_runs()) or not self.structured

    def runs(self) -> tuple[tuple[int, int, int, Block], ...]:
        """Maximal runs of consecutive blocks with equal :meth:`Block.shape_key` (queries and keys
        contiguous): ``(q_start, k_start, count, block)`` -- equal-length packing and CFG branches
        become one batched call."""
        got = self._cache.get("runs")
        if got is None:
            out = []
            for b in self.blocks:
                if out:
                    q0, k0, n, first = out[-1]
                    if (first.shape_key() == b.shape_key() and b.q_start == q0 + n * first.q_len
                            and b.k_start == k0 + n * first.k_len):
                        out[-1] = (q0, k0, n + 1, first)
                        continue
                out.append((b.q_start, b.k_start, 1, b))
            got = self._cache["runs"] = tuple(out)
        return got

    # -- tensors ------------------------------------------------------------------------------------
    def intervals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 CPU ``(lo, hi)`` ``[Sq]``: by structure, row ``i`` sees keys ``lo[i] <= j <= hi[i]``
        (global indices); rows that see none have ``lo = 0, hi = -1``. Cached."""
        got = self._cache.get("intervals")
        if got is None:
            got = self._cache["intervals"] = _intervals(self.blocks, self.seqlen_q)
        return got

    def intervals_on(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`intervals` on ``device`` (copied once per device, asynchronously)."""
        device = torch.device(device)
        key = ("intervals", str(device))
        got = self._cache.get(key)
        if got is None:
            lo, hi = self.intervals()
            got = (lo, hi) if device.type == "cpu" else (lo.to(device, non_blocking=True),
                                                          hi.to(device, non_blocking=True))
            self._cache[key] = got
        return got

    def structure_grid(self, device=None) -> torch.Tensor:
        """bool ``[Sq, Sk]``: visibility by the blocks alone (cached per device)."""
        device = torch.device("cpu" if device is None else device)
        key = ("grid", str(device))
        got = self._cache.get(key)
        if got is None:
            lo, hi = self.intervals_on(device)
            j = torch.arange(self.seqlen_k, device=device)
            got = self._cache[key] = (j >= lo[:, None]) & (j <= hi[:, None])
        return got

    def materialize(self, device=None) -> torch.Tensor:
        """bool, True = may attend: ``[Sq, Sk]`` for structured plans, ``[B, 1, Sq, Sk]`` with
        ``key_valid``, broadcastable to ``[B, Hq, Sq, Sk]`` with a dense mask."""
        if self.dense is not None:
            m = self.dense.mask if device is None else self.dense.mask.to(device)
            return m if m.dtype == torch.bool else m > float("-inf")
        if self.key_valid is None:
            return self.structure_grid(device)
        valid = self.key_valid if device is None else self.key_valid.to(device)
        if self.structure_full:
            return valid[:, None, None, :].expand(-1, 1, self.seqlen_q, -1)
        return self.structure_grid(valid.device)[None, None] & valid[:, None, None, :]

    def empty_rows_on(self, device) -> torch.Tensor | None:
        """bool, broadcastable to ``[B, Hq, Sq]``: the rows that see no key; None when none can.

        Structured plans: from :meth:`empty_row_runs` (Python ints; the tensor is cached per device).
        With ``key_valid``/``dense``: computed on the device (no host read).
        """
        if self.dense is not None:
            m = self.materialize(device)
            while m.dim() < 4:
                m = m.unsqueeze(0)
            return ~m.any(dim=-1)
        if self.key_valid is not None:
            valid = self.key_valid.to(device)
            if self.structure_full:
                return (~valid.any(dim=-1))[:, None, None]
            lo, hi = self.intervals_on(valid.device)
            csum = torch.nn.functional.pad(valid.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
            count = csum[:, (hi + 1).clamp(min=0)] - csum[:, lo.clamp(max=self.seqlen_k)]   # [B, Sq]
            return (count <= 0)[:, None, :]
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

    # -- views ----------------------------------------------------------------------------------------
    def restrict(self, q_range: tuple[int, int], k_range: tuple[int, int]) -> "Plan":
        """The plan of the sub-call ``q[q0:q1]`` against ``k[k0:k1]`` (ring steps, chunked prefill):
        the same visibility, in the slice's own coordinates."""
        q0, q1 = _check_range(q_range, self.seqlen_q, "q_range")
        k0, k1 = _check_range(k_range, self.seqlen_k, "k_range")
        blocks = []
        for b in self.blocks:
            bq0, bq1 = max(b.q_start, q0), min(b.q_start + b.q_len, q1)
            if bq1 <= bq0:
                continue
            bk0, bk1 = max(b.k_start, k0), min(b.k_start + b.k_len, k1)
            bk1 = max(bk1, bk0)
            dq, dk = bq0 - b.q_start, bk0 - b.k_start
            blocks.append(Block(bq0 - q0, bq1 - bq0, min(bk0, k1) - k0, bk1 - bk0, b.causal,
                                b.offset + dq - dk if b.causal else 0, b.window))
        if not blocks:
            blocks = [Block(0, 0, 0, 0)]
        key_valid = None if self.key_valid is None else self.key_valid[:, k0:k1]
        dense = None
        if self.dense is not None:
            from .masks import DenseMask

            m = self.dense.mask
            m4 = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
            sq_ax = slice(q0, q1) if m4.shape[2] != 1 else slice(None)
            sk_ax = slice(k0, k1) if m4.shape[3] != 1 else slice(None)
            dense = DenseMask(m4[:, :, sq_ax, sk_ax])
        return Plan(q1 - q0, k1 - k0, tuple(blocks), self.packed, key_valid, dense)

    def describe(self) -> str:
        """A human-readable account of the plan (one line per block run)."""
        kind = "packed" if self.packed else "dense"
        lines = [f"Plan: {self.seqlen_q} queries x {self.seqlen_k} keys, {len(self.blocks)} block(s), {kind}"]
        for q0, k0, n, b in self.runs():
            what = "full" if not b.causal else (f"causal offset {b.offset}" +
                                                (f", window {b.window}" if b.window is not None else ""))
            span = f"q[{q0}:{q0 + n * b.q_len}] x k[{k0}:{k0 + n * b.k_len}]"
            count = f"{n} x " if n > 1 else ""
            lines.append(f"  {span}: {count}{b.q_len}x{b.k_len} {what}")
        empty = self.empty_row_runs()
        if empty:
            shown = ", ".join(f"{s}:{e}" for s, e in empty[:8]) + (" ..." if len(empty) > 8 else "")
            lines.append(f"  rows with no key: {shown}")
        if self.key_valid is not None:
            lines.append(f"  key validity: bool {list(self.key_valid.shape)} (per batch row)")
        if self.dense is not None:
            m = self.dense.mask
            lines.append(f"  dense mask: {m.dtype} {list(m.shape)}")
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


def _intervals(blocks, sq: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.zeros(sq, dtype=torch.int64)
    hi = torch.full((sq,), -1, dtype=torch.int64)
    for b in blocks:
        if b.q_len == 0 or b.k_len == 0:
            continue
        i = torch.arange(b.q_len, dtype=torch.int64)
        if b.causal:
            last = (i + b.offset).clamp(max=b.k_len - 1)
            first = (i + b.offset - b.window + 1).clamp(min=0) if b.window is not None else torch.zeros_like(i)
        else:
            first, last = torch.zeros_like(i), torch.full_like(i, b.k_len - 1)
        none = first > last
        lo[b.q_start:b.q_start + b.q_len] = torch.where(none, 0, first + b.k_start)
        hi[b.q_start:b.q_start + b.q_len] = torch.where(none, -1, last + b.k_start)
    return lo, hi


def plan_for(mask, seqlen_q: int, seqlen_k: int) -> Plan:
    """The plan of ``mask`` (``None`` or an ``attnlib.masks`` object) for ``Sq`` x ``Sk``.

    Structured masks (``None``, ``Causal``, ``BlockDiagonal``) are cached per (mask, Sq, Sk); tensor
    masks get a fresh (cheap) plan holding their tensor.
    """
    from .masks import BlockDiagonal, Causal, DenseMask, KeyPadding

    if mask is None or isinstance(mask, (Causal, BlockDiagonal)):
        return _structured_plan(mask, int(seqlen_q), int(seqlen_k))
    if isinstance(mask, KeyPadding):
        if mask.valid.shape[1] != seqlen_k:
            raise ValueError(f"KeyPadding covers {mask.valid.shape[1]} keys, asked for {seqlen_k}")
        block = Block(0, seqlen_q, 0, seqlen_k, mask.causal, seqlen_k - seqlen_q if mask.causal else 0, mask.window)
        return Plan(seqlen_q, seqlen_k, (block,), False, key_valid=mask.valid)
    if isinstance(mask, DenseMask):
        return Plan(seqlen_q, seqlen_k, (Block(0, seqlen_q, 0, seqlen_k),), False, dense=mask)
    raise TypeError(f"mask must be None or one of attnlib.masks (Causal, BlockDiagonal, KeyPadding, DenseMask), "
                    f"got {type(mask).__name__}")


@host_lru(1024)
def _structured_plan(mask, sq: int, sk: int) -> Plan:
    from .masks import BlockDiagonal

    if mask is None:
        return Plan(sq, sk, (Block(0, sq, 0, sk),))
    if isinstance(mask, BlockDiagonal):
        if (sq, sk) != (mask.total_q, mask.total_k):
            raise ValueError(f"BlockDiagonal covers {mask.total_q} query and {mask.total_k} key tokens, "
                             f"asked for {sq}x{sk}")
        blocks, q0, k0 = [], 0, 0
        for lq, lk in zip(mask.q_seqlens, mask.kv_seqlens):
            blocks.append(Block(q0, lq, k0, lk, mask.causal, lk - lq if mask.causal else 0, mask.window))
            q0 += lq
            k0 += lk
        return Plan(sq, sk, tuple(blocks), packed=True)
    return Plan(sq, sk, (Block(0, sq, 0, sk, True, mask.offset(sq, sk), mask.window),))


@host_lru(1024)
def block_plan(block: Block) -> Plan:
    """The dense plan of one block on its own (``q_len`` x ``k_len``, at the origin): how backends that
    run blocks one batched call at a time (:meth:`Plan.runs`) lower each of them."""
    local = replace(block, q_start=0, k_start=0)
    return Plan(block.q_len, block.k_len, (local,))
