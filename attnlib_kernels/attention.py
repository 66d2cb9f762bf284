"""attnlib's own attention kernels: one Triton kernel family for every attnlib plan.

Two entry points compute ``softmax(score(q, k) + mask) v`` without ever materializing a mask:

* :func:`attention` takes masks as arguments (the classic API): dense BSHD (``q [B, Sq, Hq, D]``,
  ``k [B, Sk, Hkv, D]``, ``v [B, Sk, Hkv, Dv]``) or packed THD (``q [Tq, Hq, D]``, ``k/v [Tk, Hkv, *]`` with
  ``cu_seqlens_q/k``: query block ``b`` = rows ``cu_q[b]:cu_q[b+1]`` sees only key rows ``cu_k[b]:cu_k[b+1]``);
  ``causal`` (bottom-right by default, ``top_left=True`` for ``j <= i``), ``window`` W; ``key_valid [B, Sk]``.
* :func:`attention_tiles` takes a :class:`TileTable`: the plan's query groups, each seeing up to ``R`` key
  runs with their own offset, causal flag and window (block-diagonal sequences, chunked causal, sink +
  window, restricted ring steps, ...), plus any of ``key_valid``, a block-sparse layout (host or device) or
  a paged KV layout (``block_table`` over page pools).

Both take the score modifiers ``softcap`` (``s <- c tanh(s / c)``), ALiBi slopes (``s <- s - slope_h
|i + offset - j|``) and sinks (one logit per head in every row's softmax denominator, no value; the LSE
includes it), in that order, in the forward and backward kernels.

Causal alignment, per batch row or packed block with ``Sq`` queries and ``Sk`` keys (``1`` = may
attend)::

    Sq=2, Sk=5, bottom-right (default)        Sq=2, Sk=5, top_left=True
        1 1 1 1 0                                 1 0 0 0 0
        1 1 1 1 1                                 1 1 0 0 0

    with window=2 (bottom-right): query i sees keys j with i + 3 - 2 < j <= i + 3
        0 0 1 1 0
        0 0 0 1 1

GQA/MQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``; K/V are never expanded.
A query row with no visible key gets output 0 and LSE ``-inf`` (with a sink: LSE = the sink).

Autograd: gradients for q, k, v, sinks (and through the returned LSE) come from the FA2-style backward
kernels in :mod:`attnlib_kernels._attn_bwd`; nothing is recomputed in PyTorch.

Determinism / batch invariance: the kernels use no atomics; query tiles are aligned to each group's start
and key tiles to each run's own start. With ``deterministic=True`` the tile configuration depends only on
(device kind, head dims, dtype, block-sparse block sizes) -- never on the batch or on sequence lengths --
and the split-K decode kernel is off, so one sequence's output and LSE are bitwise identical whether it
runs alone, right-padded in a dense batch with ``key_valid``, or packed with other sequences (e.g. CFG
branches). With ``deterministic=False`` the query tile may shrink for short queries and long decode calls
split their keys (both change the bits, not the accuracy).

On CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before ``triton`` is imported).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch

__all__ = ["attention", "attention_tiles", "TileTable", "kernel_config", "triton_available", "MAX_HEAD_DIM",
           "MAX_PAGE_SIZE"]

MAX_HEAD_DIM = 256
#: the largest page of a paged KV layout the kernels read (any size 1..MAX_PAGE_SIZE)
MAX_PAGE_SIZE = 4096
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


_TRITON_IMPORTABLE: list = []     # computed once: a plain value that torch.compile reads without tracing the import


def _triton_importable() -> bool:
    if not _TRITON_IMPORTABLE:
        try:
            import triton  # noqa: F401
            _TRITON_IMPORTABLE.append(True)
        except ImportError:
            _TRITON_IMPORTABLE.append(False)
    return _TRITON_IMPORTABLE[0]


def triton_available(device: torch.device | str | None = None) -> bool:
    """True when the kernels can run on ``device``: CUDA with triton, or CPU under the interpreter."""
    if not _triton_importable():
        return False
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type == "cuda":
        if torch.cuda.is_available():
            return True
    if dev is None or dev.type == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return False


# --------------------------------------------------------------------------------------------
# tile configurations
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel. ``block_q`` tiles queries, ``block_k`` keys."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


def _interpreted(device: torch.device) -> bool:
    return device.type != "cuda"


def kernel_config(kind: str, head_dim: int, head_dim_v: int, dtype: torch.dtype, device: torch.device,
                  *, max_seqlen_q: int | None = None, deterministic: bool = False,
                  sparse_blocks: tuple[int, int] | None = None) -> KernelConfig:
    """The tile configuration for ``kind`` in {"fwd", "bwd_dkdv", "bwd_dq", "bwd_pre", "split"}.

    Depends only on the device kind, head dims and dtype (and, for block-sparse layouts, their block sizes
    ``sparse_blocks = (bq, bk)``: the forward then uses square-ish tiles of the largest power of two up to 64
    that divides the layout's blocks, both backward kernels one such tile up to 32, so each kernel tile lies in
    one layout block); with
    ``deterministic=False`` the forward may also use a smaller query tile when ``max_seqlen_q`` is small
    (decode-like calls). Chosen by hand for H100-class GPUs (sm_90; also valid on sm_80): no autotuning, so a
    config is reproducible and batch invariance holds.
    """
    if kind not in _CONFIGS:
        raise ValueError(f"unknown kernel kind {kind!r}")
    if _interpreted(device):
        # interpreter: tiny tiles keep the numpy emulation fast and exercise multi-tile paths
        return KernelConfig(16, 16, 1, 1)
    d = max(head_dim, head_dim_v)
    wide = dtype == torch.float32  # fp32 tiles take twice the shared memory / registers
    table = _CONFIGS[kind][1 if wide else 0]
    cfg = next(c for limit, c in table if d <= limit)
    if sparse_blocks is not None:
        fwd = next(c for limit, c in _CONFIGS["fwd"][1 if wide else 0] if d <= limit)
        cap = min(fwd.block_q, fwd.block_k, 64 if kind == "fwd" else 32)   # the backward holds more per tile
        return KernelConfig(_sparse_tile(sparse_blocks[0], cap), _sparse_tile(sparse_blocks[1], cap),
                            cfg.num_warps, 1 if kind != "fwd" else cfg.num_stages)
    if kind == "fwd" and not deterministic and max_seqlen_q is not None and max_seqlen_q <= 64 and cfg.block_q > 64:
        cfg = KernelConfig(64, cfg.block_k, cfg.num_warps, cfg.num_stages)
    return cfg


def _sparse_tile(block: int, cap: int) -> int:
    """The largest power of two <= ``cap`` dividing ``block``; ``cap`` when that is under 16 (tl.dot's minimum:
    the kernels then read the layout per element)."""
    t = 1
    while t < cap and block % (2 * t) == 0:
        t *= 2
    return t if t >= 16 else cap


_K = KernelConfig
#: (block_q, block_k, warps, stages) per kind, per (fp16/bf16, fp32), per head-dim bucket ``(max d, config)``;
#: checked with the sm_90 compile check of bench/bench_triton_attention.py (--compile-check) for shared
#: memory and register spills. fwd / bwd_dq: block_q query rows per program, block_k key rows per step;
#: bwd_dkdv: block_k key rows per program, block_q query rows per step; split (decode): block_q is the most
#: (query x head) rows a program takes, block_k the key step; its key chunk is _SPLIT_TILES key steps.
_CONFIGS = {
    "fwd": (((128, _K(128, 64, 8, 3)), (MAX_HEAD_DIM, _K(64, 32, 8, 2))),
            ((64, _K(32, 32, 4, 1)), (MAX_HEAD_DIM, _K(16, 16, 4, 1)))),
    "bwd_dkdv": (((64, _K(32, 128, 8, 2)), (128, _K(16, 64, 8, 1)), (MAX_HEAD_DIM, _K(32, 32, 8, 1))),
                 ((128, _K(16, 32, 4, 1)), (MAX_HEAD_DIM, _K(16, 16, 4, 1)))),
    "bwd_dq": (((64, _K(128, 64, 8, 2)), (128, _K(64, 32, 8, 2)), (MAX_HEAD_DIM, _K(32, 32, 8, 1))),
               ((64, _K(32, 16, 4, 1)), (MAX_HEAD_DIM, _K(16, 16, 4, 1)))),
    "bwd_pre": (((128, _K(64, 16, 4, 1)), (MAX_HEAD_DIM, _K(32, 16, 4, 1))),) * 2,
    "split": (((128, _K(64, 64, 4, 2)), (MAX_HEAD_DIM, _K(64, 32, 4, 1))),
              ((128, _K(32, 32, 4, 1)), (MAX_HEAD_DIM, _K(16, 16, 4, 1)))),
}
#: split-K decode: key chunk = _SPLIT_TILES key steps (GPU; 2 under the interpreter), used when some group's
#: visible keys span at least two chunks
_SPLIT_TILES = 8


# Configs that fail to launch for lack of shared memory run with fewer pipeline stages, then warps, once, and
# are remembered, so every later call with the same key uses the same (deterministic) config. Tile sizes never
# change: the tile tables are built for them.
_CONFIG_OVERRIDES: dict[tuple, tuple[int, int]] = {}


def _launch(kernel, grid, cfg_key: tuple, warps: int, stages: int, args: tuple, kwargs: dict):
    warps, stages = _CONFIG_OVERRIDES.get(cfg_key, (warps, stages))
    while True:
        try:
            kernel[grid](*args, **kwargs, num_warps=warps, num_stages=stages)
            return
        except Exception as exc:  # triton.runtime.errors.OutOfResources on small-smem GPUs
            if type(exc).__name__ != "OutOfResources":
                raise
            if stages > 1:
                stages -= 1
            elif warps > 4:
                warps //= 2
            else:
                raise
            _CONFIG_OVERRIDES[cfg_key] = (warps, stages)


# --------------------------------------------------------------------------------------------
# the tile table
# --------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _key_bounds(q0: int, nrows: int, lq: int, run: tuple, bk: int) -> tuple[int, int]:
    """Host twin of the kernels' ``_key_range``: run-local key tiles ``[lo, hi)`` rows ``[q0, q0 + nrows)`` walk."""
    _, lk, off, causal, window = run
    if q0 >= lq:
        return 0, 0
    hi, lo = lk, 0
    if causal:
        hi = min(lk, q0 + nrows + off)
        if window is not None:
            lo = (max(q0 + off - window + 1, 0) // bk) * bk
    return lo, max(hi, lo)


def _row_span(i0: int, i1: int, run: tuple) -> tuple[int, int]:
    """Run-local ``[first, last]`` keys seen by any row of ``[i0, i1)`` (``first > last``: none)."""
    _, lk, off, causal, window = run
    if not causal:
        return (0, lk - 1) if i1 > i0 else (0, -1)
    first, last = None, -1
    for i in (i0, i1 - 1):
        lo = 0 if window is None else max(i + off - window + 1, 0)
        hi = min(i + off, lk - 1)
        if hi >= lo:
            first = lo if first is None else min(first, lo)
            last = max(last, hi)
    if first is None:                     # the rows between may still see something (windows)
        lo_row = max(i0, -off)
        if lo_row < i1:
            first = 0 if window is None else max(lo_row + off - window + 1, 0)
            last = min(lo_row + off, lk - 1)
    return (first, last) if first is not None else (0, -1)


class TileTable:
    """The host description of a call's tiles that the kernels read (one int32 tensor per tile configuration
    and device, built once and cached here).

    ``groups``: ``(q_start, q_len, runs)`` with query rows ``[q_start, q_start + q_len)`` (disjoint, ascending)
    and ``runs`` up to ``R`` key runs ``(k_start, k_len, offset, causal, window)``: group-local query ``i``
    sees run-local key ``j`` (global ``k_start + j``) iff the run is not causal or ``j <= i + offset``, and
    with ``window`` also ``j > i + offset - window``; ALiBi's distance is ``|i + offset - j|``. Rows in no
    group see no key. ``kv_seqlens``: for paged keys, the requests' key counts (the runs then lie in the
    packed logical key order, request 0 first); a group's runs must lie in one request.

    Each kernel's work list is derived per tile size: query tiles (aligned to their group's start, heaviest
    first) for the forward and dQ, key tiles of key *segments* (the key axis cut at every run boundary) with
    the (group, run) pairs covering them for dK/dV, key chunks for split-K decode, and the geometry of a
    block-sparse layout's coarse tile lists.
    """

    def __init__(self, seqlen_q: int, seqlen_k: int, groups, *, kv_seqlens=None):
        self.seqlen_q, self.seqlen_k = int(seqlen_q), int(seqlen_k)
        out, pos = [], 0
        for q_start, q_len, runs in groups:
            q_start, q_len = int(q_start), int(q_len)
            if q_start < pos or q_len < 0:
                raise ValueError(f"TileTable groups must be disjoint and ascending, got rows {q_start}:"
                                 f"{q_start + q_len} after row {pos}")
            if q_len == 0:
                continue
            if q_start > pos:
                out.append((pos, q_start - pos, ()))
            rs = []
            for k_start, k_len, offset, causal, window in runs:
                k_start, k_len = int(k_start), int(k_len)
                if k_len == 0:
                    continue
                if k_start < 0 or k_len < 0 or k_start + k_len > self.seqlen_k:
                    raise ValueError(f"TileTable run keys {k_start}:{k_start + k_len} outside 0:{self.seqlen_k}")
                if window is not None and int(window) < 1:
                    raise ValueError(f"TileTable run window must be >= 1 or None, got {window}")
                rs.append((k_start, k_len, int(offset), bool(causal),
                           None if window is None or not causal else int(window)))
            out.append((q_start, q_len, tuple(rs)))
            pos = q_start + q_len
        if pos > self.seqlen_q:
            raise ValueError(f"TileTable groups reach row {pos} but the call has {self.seqlen_q} queries")
        if pos < self.seqlen_q:
            out.append((pos, self.seqlen_q - pos, ()))
        self.groups = tuple(out)
        self.runs = max([1] + [len(r) for _, _, r in self.groups])
        self.any_causal = any(r[3] for _, _, rs in self.groups for r in rs)
        self.any_window = any(r[4] is not None for _, _, rs in self.groups for r in rs)
        self.max_q_len = max([0] + [n for _, n, _ in self.groups])
        self.kv_seqlens = None if kv_seqlens is None else tuple(int(n) for n in kv_seqlens)
        self._requests = self._group_requests()
        self._packed: dict = {}
        self._device: dict = {}
        self._launch: dict = {}

    # -- constructors of the classic masks --------------------------------------------------------------
    @classmethod
    def dense(cls, seqlen_q: int, seqlen_k: int, *, causal: bool = False, top_left: bool = False,
              window: int | None = None) -> "TileTable":
        """Every row sees ``[0, Sk)``: bottom-right aligned (``offset = Sk - Sq``) or top-left (``0``)."""
        off = 0 if top_left else seqlen_k - seqlen_q
        groups = [(0, seqlen_q, [(0, seqlen_k, off, causal, window)])] if seqlen_q else []
        return cls(seqlen_q, seqlen_k, groups)

    @classmethod
    def varlen(cls, q_lens, k_lens, *, causal: bool = False, top_left: bool = False, window: int | None = None,
               paged: bool = False) -> "TileTable":
        """Packed sequences: block ``b``'s queries see only block ``b``'s keys (``paged``: the keys are the
        requests of a paged layout)."""
        groups, q0, k0 = [], 0, 0
        for lq, lk in zip(q_lens, k_lens):
            off = 0 if top_left else lk - lq
            groups.append((q0, lq, [(k0, lk, off, causal, window)]))
            q0, k0 = q0 + lq, k0 + lk
        return cls(q0, k0, groups, kv_seqlens=tuple(k_lens) if paged else None)

    # -- host work lists ----------------------------------------------------------------------------------
    def _group_requests(self) -> tuple:
        if self.kv_seqlens is None:
            return tuple((0, 0) for _ in self.groups)
        starts, pos = [], 0
        for n in self.kv_seqlens:
            starts.append(pos)
            pos += n
        if pos != self.seqlen_k:
            raise ValueError(f"kv_seqlens sum to {pos} keys but the table has {self.seqlen_k}")
        out = []
        for q_start, _, runs in self.groups:
            req = (0, 0)
            for r, s in enumerate(starts):
                for k_start, k_len, *_ in runs:
                    if s <= k_start < s + self.kv_seqlens[r]:
                        if k_start + k_len > s + self.kv_seqlens[r]:
                            raise ValueError(f"the runs of query group at row {q_start} cross request {r}'s keys")
                        req = (r, s)
            out.append(req)
        return tuple(out)

    def runs_aligned(self, bk: int) -> bool:
        """Every run starts at a multiple of ``bk`` keys from its request's first key (paged keys: then each
        key tile of a run lies in one page when the page size is a multiple of ``bk``)."""
        return all((k_start - base) % bk == 0 for (_, _, runs), (_, base) in zip(self.groups, self._requests)
                   for k_start, *_ in runs)

    def _query_work(self, bq: int, bk: int) -> list[int]:
        """Flat ``(group, q0)`` per query tile, heaviest (most key tiles) first."""
        items = []
        for gi, (_, q_len, runs) in enumerate(self.groups):
            for q0 in range(0, q_len, bq):
                nrows = min(bq, q_len - q0)
                cost = 0
                for run in runs:
                    lo, hi = _key_bounds(q0, nrows, q_len, run, bk)
                    cost += _cdiv(hi - lo, bk)
                items.append((-cost, len(items), gi, q0))
        out = []
        for _, _, gi, q0 in sorted(items):
            out += [gi, q0]
        return out

    def _key_work(self, bk: int) -> tuple[list[int], list[int]]:
        """``(items, contributions)``: per key tile of each key segment ``(k0, k_end, first, end, request,
        request base)`` (heaviest first) and the flat ``(group, run)`` pairs covering each segment."""
        bounds = {0, self.seqlen_k}
        runs = []
        for gi, (_, q_len, rs) in enumerate(self.groups):
            for ri, (k_start, k_len, *_rest) in enumerate(rs):
                bounds.add(k_start)
                bounds.add(k_start + k_len)
                runs.append((k_start, k_start + k_len, gi, ri, q_len))
        runs.sort()
        bounds = sorted(bounds)
        starts = []
        if self.kv_seqlens is not None:
            pos = 0
            for n in self.kv_seqlens:
                starts.append(pos)
                pos += n
        contrib, items, active, nxt = [], [], [], 0
        for s, e in zip(bounds[:-1], bounds[1:]):
            while nxt < len(runs) and runs[nxt][0] <= s:
                active.append(runs[nxt])
                nxt += 1
            active = [r for r in active if r[1] > s]
            c0 = len(contrib) // 2
            cost = 0
            for _, _, gi, ri, q_len in sorted(active, key=lambda r: (r[2], r[3])):
                contrib += [gi, ri]
                cost += q_len
            c1 = len(contrib) // 2
            req, base = 0, 0
            for r, st in enumerate(starts):
                if st <= s:
                    req, base = r, st
            for k0 in range(s, e, bk):
                items.append((-cost, len(items), k0, e, c0, c1, req, base))
        flat = []
        for item in sorted(items):
            flat += list(item[2:])
        return flat, contrib

    def _split_work(self, bk: int, chunk: int) -> tuple[list[int], list[int], list[int], int]:
        """Split-K decode: ``(items (group, run, k_lo, k_hi), per group (first item, count), per row its group,
        the most chunks of one group)``; chunks cover the keys the group's rows may see, aligned to the run."""
        items, per_group, row_group, most = [], [], [], 0
        for gi, (_, q_len, runs) in enumerate(self.groups):
            first = len(items) // 4
            for ri, run in enumerate(runs):
                lo, hi = _key_bounds(0, q_len, q_len, run, bk)
                for ks in range(lo, hi, chunk):
                    items += [gi, ri, ks, min(ks + chunk, hi)]
            count = len(items) // 4 - first
            most = max(most, count)
            per_group += [first, count]
            row_group += [gi] * q_len
        return items, per_group, row_group, most

    def _sparse_geometry(self, bq: int, bk: int, lay: tuple) -> dict:
        """Index arrays that turn a block layout into kernel-tile lists (on the device, no host read): for each
        query tile the layout rows it spans (``rows [Tq, nQt]``), for each key tile the layout columns
        (``cols [Tk, nKt]``), and which tile pairs the run's rule leaves visible (``struct [nQt, nKt]``)."""
        lbq, lbk, q_origin, k_origin = lay
        real = [(gi, g, r) for gi, g in enumerate(self.groups) for r in g[2]]
        if len(real) > 1:
            raise ValueError("a block-sparse layout needs a table with one key run (one tile)")
        if not real:
            return {"sparse": 0}
        gi, (q_start, q_len, _), run = real[0]
        k_start, k_len = run[0], run[1]
        nqt, nkt = _cdiv(q_len, bq), _cdiv(k_len, bk)

        def spans(start, n, tile, block, origin, count):
            first = [(start + t * tile + origin) // block for t in range(count)]
            last = [(start + min(t * tile + tile, n) - 1 + origin) // block for t in range(count)]
            depth = max(b - a + 1 for a, b in zip(first, last))
            return [min(a + d, b) for d in range(depth) for a, b in zip(first, last)], depth

        rows, tq = spans(q_start, q_len, bq, lbq, q_origin, nqt)
        cols, tk = spans(k_start, k_len, bk, lbk, k_origin, nkt)
        struct = []
        for qt in range(nqt):
            first, last = _row_span(qt * bq, min(qt * bq + bq, q_len), run)
            for kt in range(nkt):
                struct.append(int(kt * bk <= last and kt * bk + bk - 1 >= first and first <= last))
        exact = (lbq % bq == 0 and (q_start + q_origin) % bq == 0 and lbk % bk == 0 and (k_start + k_origin) % bk == 0)
        return {"sparse": 1, "exact": int(exact), "lay_bq": lbq, "lay_bk": lbk, "lay_q0": q_origin,
                "lay_k0": k_origin, "nqt": nqt, "nkt": nkt, "tq": tq, "tk": tk,
                "rows": rows, "cols": cols, "struct": struct}

    def packed(self, tiles: "_Tiles") -> tuple[list[int], dict]:
        """The flat int32 table for a tile configuration and the offsets of its parts (cached)."""
        got = None if torch.compiler.is_compiling() else self._packed.get(tiles)
        if got is not None:
            return got
        ints: list[int] = []
        where = {"R": self.runs, "GW": 4 + 5 * self.runs, "n_groups": len(self.groups)}
        for (q_start, q_len, runs), (req, base) in zip(self.groups, self._requests):
            ints += [q_start, q_len, req, base]
            for k_start, k_len, off, causal, window in runs:
                ints += [k_start, k_len, off, int(causal), window or 0]
            ints += [0, 0, 0, 0, 0] * (self.runs - len(runs))

        def put(name, values):
            where[name] = len(ints)
            ints.extend(values)

        qf = self._query_work(tiles.fwd[0], tiles.fwd[1])
        put("off_qf", qf)
        where["n_qf"] = len(qf) // 2
        if tiles.dq[:2] == tiles.fwd[:2]:
            where["off_qd"], where["n_qd"] = where["off_qf"], where["n_qf"]
        else:
            qd = self._query_work(tiles.dq[0], tiles.dq[1])
            put("off_qd", qd)
            where["n_qd"] = len(qd) // 2
        kw, contrib = self._key_work(tiles.dkdv[1])
        put("off_kw", kw)
        where["n_kw"] = len(kw) // 6
        put("off_ct", contrib)
        if tiles.split is not None:
            items, per_group, row_group, most = self._split_work(tiles.split[1], tiles.split[1] * tiles.split[2])
            put("off_items", items)
            where["n_items"] = len(items) // 4
            put("off_gitems", per_group)
            put("off_rowg", row_group)
            where["split_most"] = most
        if tiles.sparse is not None:
            for suffix, (bq, bk) in (("", tiles.fwd[:2]), ("_b", tiles.dq[:2])):
                geo = self._sparse_geometry(bq, bk, tiles.sparse)
                for name in ("rows", "cols", "struct"):
                    if name in geo:
                        put("off_" + name + suffix, geo.pop(name))
                where.update({n + (suffix if n not in ("sparse", "lay_bq", "lay_bk", "lay_q0", "lay_k0") else ""): x
                              for n, x in geo.items()})
        if self.kv_seqlens is not None:
            cu, pos = [0], 0
            for n in self.kv_seqlens:
                pos += n
                cu.append(pos)
            put("off_cukv", cu)
            where["n_req"] = len(self.kv_seqlens)
        got = (ints, where)
        if not torch.compiler.is_compiling():
            self._packed[tiles] = got
        return got

    def on(self, device, tiles: "_Tiles") -> tuple[torch.Tensor, dict]:
        """``(int32 table on device, offsets)`` for a tile configuration (copied once per device)."""
        ints, where = self.packed(tiles)
        key = (str(device), tiles)
        got = None if torch.compiler.is_compiling() else self._device.get(key)
        if got is None:
            got = torch.tensor(ints if ints else [0], dtype=torch.int32).to(device, non_blocking=True)
            if not torch.compiler.is_compiling():
                self._device[key] = got
        return got, where

    def __repr__(self):
        return (f"TileTable({self.seqlen_q} queries x {self.seqlen_k} keys, {len(self.groups)} groups, "
                f"up to {self.runs} runs per row)")


@dataclass(frozen=True)
class _Tiles:
    """The tile sizes a table is packed for: (block_q, block_k, warps, stages) per kernel, the split-K decode
    config (rows, block_k, chunk tiles, warps, stages) or None, and the block-sparse layout geometry
    (bq, bk, q_origin, k_origin) or None."""

    fwd: tuple
    dq: tuple
    dkdv: tuple
    pre: tuple
    split: tuple | None = None
    sparse: tuple | None = None


# --------------------------------------------------------------------------------------------
# launches
# --------------------------------------------------------------------------------------------
#: the op's integer metadata, in schema order (custom ops take a flat ``int[]``)
@dataclass(frozen=True)
class _Meta:
    fwd_q: int
    fwd_k: int
    fwd_w: int
    fwd_s: int
    dq_q: int
    dq_k: int
    dq_w: int
    dq_s: int
    kv_q: int
    kv_k: int
    kv_w: int
    kv_s: int
    pre_q: int
    pre_w: int
    R: int
    GW: int
    n_groups: int
    off_qf: int
    n_qf: int
    off_qd: int
    n_qd: int
    off_kw: int
    n_kw: int
    off_ct: int
    any_causal: int
    any_window: int
    page: int              # 0: contiguous keys
    page_tiles: int        # paged: bit 0/1/2 -> the forward / dQ / split-K key tiles each lie in one page
    deterministic: int
    sparse: int
    exact: int
    lay_bq: int
    lay_bk: int
    lay_q0: int
    lay_k0: int
    nqt: int
    nkt: int
    tq: int
    tk: int
    off_rows: int
    off_cols: int
    off_struct: int
    exact_b: int           # the backward kernels' tile lists (their own, smaller tiles)
    nqt_b: int
    nkt_b: int
    tq_b: int
    tk_b: int
    off_rows_b: int
    off_cols_b: int
    off_struct_b: int
    split: int
    split_rows: int
    split_k: int
    split_w: int
    split_s: int
    off_items: int
    n_items: int
    off_gitems: int
    off_rowg: int
    off_cukv: int
    n_req: int
    seqlen_k: int          # keys of the table (paged: the logical keys)

    def to_list(self) -> list[int]:
        return [int(getattr(self, n)) for n in _META_FIELDS]

    @classmethod
    def from_list(cls, values) -> "_Meta":
        return cls(*[int(v) for v in values])


#: the metadata's field names in schema order (a plain tuple: torch.compile reads it without tracing
#: dataclasses.fields), and where the block-sparse flag sits in the list
_META_FIELDS = tuple(f.name for f in fields(_Meta))
_SPARSE = _META_FIELDS.index("sparse")


def _pow2(n: int) -> int:
    """Head-dim tile: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (max(1, n) - 1).bit_length())


_DUMMIES: dict[tuple, torch.Tensor] = {}


def _dummy(device, dtype=torch.int32):
    """A 1-element placeholder for pointer arguments a kernel variant never reads (cached: no launch)."""
    key = (str(device), dtype)
    t = _DUMMIES.get(key)
    if t is None:
        t = _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return t


def _strides3(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _kv_view(x, paged: bool):
    """``(tensor, (batch, row, head) strides)`` of keys/values: BSHD, or a page pool as rows of slots."""
    if paged:
        flat = x.reshape(x.shape[0] * x.shape[1], x.shape[2], x.shape[3])
        return flat, (0, flat.stride(0), flat.stride(1))
    return x, _strides3(x)


def _scalars(scale: float, softcap: float):
    """``(qk_scale, cap_scale, cap_log2)``: score scales in log2 units (softcap 0: none)."""
    if softcap > 0:
        return scale * _LOG2E, scale / softcap, softcap * _LOG2E
    return scale * _LOG2E, 0.0, 0.0


def _alibi_args(alibi, device):
    if alibi is None:
        return _dummy(device, torch.float32), 0
    a = alibi.to(torch.float32).contiguous()
    return a, (a.stride(0) if a.dim() == 2 and a.shape[0] > 1 else 0)


def _lead_strides(t, dims: int = 2):
    """Strides of the (batch, head) leading dims of a [B?, H?, ...] list tensor (0 where broadcast)."""
    return tuple(t.stride(i) if t.shape[i] > 1 else 0 for i in range(dims))


def _sparse_lists(layout, table, m: _Meta, transposed: bool, backward: bool = False):
    """The coarse kernel-tile lists of a block layout, on its device (no host read): ``(num, idx)`` int32
    ``[B?, H?, n]`` and ``[B?, H?, n, m]`` -- the listed key tiles of each query tile (ascending), or with
    ``transposed`` the query tiles listing each key tile; for the forward's tiles or the backward's."""
    sfx = "_b" if backward else ""
    nqt, nkt, tq, tk = (getattr(m, n + sfx) for n in ("nqt", "nkt", "tq", "tk"))
    off_rows, off_cols, off_struct = (getattr(m, n + sfx) for n in ("off_rows", "off_cols", "off_struct"))
    lay = layout.reshape((1,) * (4 - layout.dim()) + tuple(layout.shape))
    rows = table[off_rows:off_rows + tq * nqt].view(tq, nqt).long()
    cols = table[off_cols:off_cols + tk * nkt].view(tk, nkt).long()
    coarse = lay.index_select(2, rows[0])
    for t in range(1, tq):
        coarse = coarse | lay.index_select(2, rows[t])
    fine = coarse.index_select(3, cols[0])
    for t in range(1, tk):
        fine = fine | coarse.index_select(3, cols[t])
    fine = fine & table[off_struct:off_struct + nqt * nkt].view(nqt, nkt).bool()
    if transposed:
        fine = fine.transpose(-1, -2)
    num = fine.sum(-1, dtype=torch.int32)
    idx = torch.sort((~fine).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32).contiguous()
    return num, idx


def _layout_args(layout, m: _Meta, device, exact: int):
    """The element-wise layout (int8 [B?, H?, nQ, nK]) and its lead/row strides, or dummies."""
    if not m.sparse or exact:
        return _dummy(device, torch.int8), (0, 0, 0)
    lay = layout.reshape((1,) * (4 - layout.dim()) + tuple(layout.shape)).to(torch.int8).contiguous()
    return lay, _lead_strides(lay) + (lay.stride(2),)


def _common(q, k, v, table, key_valid, alibi, block_table, m: _Meta, softcap: float):
    """Arguments and flags every kernel of a call shares."""
    dev = q.device
    paged = m.page > 0
    kt, ks = _kv_view(k, paged)
    vt, vs = _kv_view(v, paged)
    kvm = key_valid.view(torch.int8) if key_valid is not None else _dummy(dev, torch.int8)
    alibi_t, stride_ab = _alibi_args(alibi, dev)
    bt = block_table if block_table is not None else _dummy(dev)
    flags = dict(GROUP=q.shape[2] // k.shape[2], D=q.shape[-1], DV=v.shape[-1], GW=m.GW,
                 HAS_CAUSAL=bool(m.any_causal), HAS_WINDOW=bool(m.any_window), HAS_KEY_VALID=key_valid is not None,
                 SOFTCAP=softcap > 0, HAS_ALIBI=alibi is not None, PAGED=int(paged), PAGE=max(m.page, 1),
                 BLOCK_D=_pow2(q.shape[-1]), BLOCK_DV=_pow2(v.shape[-1]), IEEE=q.dtype == torch.float32)
    strides = dict(kv=(kt, ks, vt, vs), mb=kvm.stride(0) if key_valid is not None else 0, ab=stride_ab,
                   bt=bt.stride(0) if block_table is not None else 0)
    return kvm, alibi_t, bt, flags, strides


def _paged_mode(m: _Meta, kernel: int) -> int:
    """The kernels' ``PAGED`` flag: 0 contiguous keys, 2 one page per key tile (bit ``kernel`` of
    ``page_tiles``), 1 a page lookup per key."""
    if not m.page:
        return 0
    return 2 if (m.page_tiles >> kernel) & 1 else 1


def _forward(q, k, v, table, key_valid, alibi, sinks, block_table, layout, m: _Meta, scale: float, softcap: float):
    from attnlib_kernels._attn_fwd import _attn_fwd_kernel, _attn_fwd_split_kernel, _attn_split_merge_kernel

    b, sq, hq, _ = q.shape
    dv = v.shape[-1]
    dev = q.device
    out = torch.empty((b, sq, hq, dv), dtype=q.dtype, device=dev)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=dev)
    if sq == 0:
        return out, lse
    kvm, alibi_t, bt, flags, st = _common(q, k, v, table, key_valid, alibi, block_table, m, softcap)
    kt, ks, vt, vs = st["kv"]
    sinks_t = sinks.to(torch.float32).contiguous() if sinks is not None else _dummy(dev, torch.float32)
    qk_scale, cap_scale, cap_log2 = _scalars(scale, softcap)
    hkv = k.shape[2]
    if m.split:
        rows = m.split_rows
        opart = torch.empty((max(m.n_items, 1), b, hkv, rows, dv), dtype=torch.float32, device=dev)
        lpart = torch.empty((max(m.n_items, 1), b, hkv, rows), dtype=torch.float32, device=dev)
        if m.n_items:
            args = (q, kt, vt, opart, lpart, table, kvm, alibi_t, bt, *_strides3(q), *ks, *vs,
                    *lpart.stride()[:3], st["mb"], st["ab"], st["bt"], m.off_items, qk_scale, cap_scale, cap_log2)
            kw = dict(flags, ROWS=rows, BLOCK_K=m.split_k, PAGED=_paged_mode(m, 2))
            _launch(_attn_fwd_split_kernel, (m.n_items, hkv, b), ("split", dev.type, rows, m.split_k, q.dtype,
                                                                   flags["D"], dv), m.split_w, m.split_s, args, kw)
        _attn_split_merge_kernel[(sq, hq, b)](
            opart, lpart, out, lse, table, sinks_t, *lpart.stride()[:3], *_strides3(out), *lse.stride()[:2],
            m.off_gitems, m.off_rowg, GROUP=flags["GROUP"], DV=dv, GW=m.GW, HAS_SINKS=sinks is not None,
            BLOCK_DV=flags["BLOCK_DV"], num_warps=1)
        return out, lse
    if m.sparse:
        kv_num, kv_idx = _sparse_lists(layout, table, m, transposed=False)
        ns, is_ = _lead_strides(kv_num) + (kv_num.stride(2),), _lead_strides(kv_idx) + (kv_idx.stride(2),)
    else:
        kv_num = kv_idx = _dummy(dev)
        ns = is_ = (0, 0, 0)
    lay, ys = _layout_args(layout, m, dev, m.exact)
    args = (q, kt, vt, out, lse, table, kvm, alibi_t, sinks_t, bt, kv_num, kv_idx, lay,
            *_strides3(q), *ks, *vs, *_strides3(out), *lse.stride()[:2], st["mb"], st["ab"], st["bt"], *ns, *is_,
            *ys, m.off_qf, m.lay_q0, m.lay_k0, max(m.lay_bq, 1), max(m.lay_bk, 1), qk_scale, cap_scale, cap_log2)
    kw = dict(flags, R=m.R, HAS_SINKS=sinks is not None, SPARSE=bool(m.sparse), LAYOUT=bool(m.sparse and not m.exact),
              PAGED=_paged_mode(m, 0),
              BLOCK_Q=m.fwd_q, BLOCK_K=m.fwd_k)
    _launch(_attn_fwd_kernel, (m.n_qf, hq, b), ("fwd", dev.type, m.fwd_q, m.fwd_k, q.dtype, flags["D"], dv),
            m.fwd_w, m.fwd_s, args, kw)
    return out, lse


def _backward(dout, dlse, q, k, v, out, lse, table, key_valid, alibi, sinks, block_table, layout, m: _Meta,
              scale: float, softcap: float):
    from attnlib_kernels._attn_bwd import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess

    b, sq, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[-1]
    dev = q.device
    paged = m.page > 0
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    out = out if out.stride(-1) == 1 else out.contiguous()
    lse = lse.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    kvm, alibi_t, bt, flags, st = _common(q, k, v, table, key_valid, alibi, block_table, m, softcap)
    kt, ks, vt, vs = st["kv"]
    if paged:
        dk = torch.empty((1, m.seqlen_k, hkv, d), dtype=k.dtype, device=dev)
        dvv = torch.empty((1, m.seqlen_k, hkv, dv), dtype=v.dtype, device=dev)
    else:
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dvv = torch.empty_like(v, memory_format=torch.contiguous_format)
    qk_scale, cap_scale, cap_log2 = _scalars(scale, softcap)

    # 1. delta = rowsum(dO * O) - dLSE
    delta = torch.empty((b, hq, sq), dtype=torch.float32, device=dev)
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    if sq:
        _attn_bwd_preprocess[(_cdiv(sq, m.pre_q), hq, b)](
            out, dout, dlse if dlse is not None else delta, delta, *_strides3(out), *_strides3(dout), sq, hq,
            DV=dv, HAS_DLSE=dlse is not None, BLOCK_Q=m.pre_q, BLOCK_DV=flags["BLOCK_DV"], num_warps=m.pre_w)
    lay, ys = _layout_args(layout, m, dev, m.exact_b)
    sparse_kw = dict(SPARSE=bool(m.sparse), LAYOUT=bool(m.sparse and not m.exact_b))
    # 2. dK, dV: one program per (key work item, kv head), summing its GQA group in registers
    if m.sparse:
        q_num, q_idx = _sparse_lists(layout, table, m, transposed=True, backward=True)
        ns, is_ = _lead_strides(q_num) + (q_num.stride(2),), _lead_strides(q_idx) + (q_idx.stride(2),)
    else:
        q_num = q_idx = _dummy(dev)
        ns = is_ = (0, 0, 0)
    if m.n_kw:
        args = (q, kt, vt, dout, lse, delta, dk, dvv, table, kvm, alibi_t, bt, q_num, q_idx, lay,
                *_strides3(q), *ks, *vs, *_strides3(dout), *_strides3(dk), *_strides3(dvv), st["mb"], st["ab"],
                st["bt"], *ns, *is_, *ys, sq, hq, m.off_kw, m.off_ct, m.lay_q0, m.lay_k0, max(m.lay_bq, 1),
                max(m.lay_bk, 1), qk_scale, scale, cap_scale, cap_log2)
        kw = dict(flags, **sparse_kw, BLOCK_Q=m.kv_q, BLOCK_K=m.kv_k)
        _launch(_attn_bwd_dkdv_kernel, (m.n_kw, hkv, b), ("bwd_dkdv", dev.type, m.kv_q, m.kv_k, q.dtype, d, dv),
                m.kv_w, m.kv_s, args, kw)
    # 3. dQ: one program per (query work item, query head)
    if m.sparse:
        kv_num, kv_idx = _sparse_lists(layout, table, m, transposed=False, backward=True)
        ns, is_ = _lead_strides(kv_num) + (kv_num.stride(2),), _lead_strides(kv_idx) + (kv_idx.stride(2),)
    else:
        kv_num = kv_idx = _dummy(dev)
    if sq:
        args = (q, kt, vt, dout, lse, delta, dq, table, kvm, alibi_t, bt, kv_num, kv_idx, lay,
                *_strides3(q), *ks, *vs, *_strides3(dout), *_strides3(dq), st["mb"], st["ab"], st["bt"], *ns, *is_,
                *ys, sq, hq, m.off_qd, m.lay_q0, m.lay_k0, max(m.lay_bq, 1), max(m.lay_bk, 1),
                qk_scale, scale, cap_scale, cap_log2)
        kw = dict(flags, R=m.R, **sparse_kw, BLOCK_Q=m.dq_q, BLOCK_K=m.dq_k, PAGED=_paged_mode(m, 1))
        _launch(_attn_bwd_dq_kernel, (m.n_qd, hq, b), ("bwd_dq", dev.type, m.dq_q, m.dq_k, q.dtype, d, dv),
                m.dq_w, m.dq_s, args, kw)
    if paged:     # logical keys -> page pool slots (shared pages add up)
        slots = _paged_slots(table, block_table, m, k.shape[1])
        dk = torch.zeros_like(k).reshape(-1, hkv, d).index_put_((slots,), dk[0], accumulate=True).view_as(k)
        dvv = torch.zeros_like(v).reshape(-1, hkv, dv).index_put_((slots,), dvv[0], accumulate=True).view_as(v)
    dsinks = q.new_empty(0, dtype=torch.float32)
    if sinks is not None:      # d sink_h = -sum_i P_sink_i * delta_i, P_sink = exp(sink - lse)
        p_sink = torch.exp(sinks.float()[None, :, None] - lse)
        p_sink = torch.where(torch.isfinite(lse), p_sink, torch.zeros_like(p_sink))
        dsinks = -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)
    return dq, dk, dvv, dsinks


def _paged_slots(table, block_table, m: _Meta, page: int) -> torch.Tensor:
    """int64 pool slot of every logical key, computed on the device from the table (no host read)."""
    cu = table[m.off_cukv:m.off_cukv + m.n_req + 1].long()
    g = torch.arange(m.seqlen_k, device=table.device)
    req = torch.searchsorted(cu[1:], g, right=True)
    pos = g - cu[req]
    pages = block_table.long()[req, pos // page]
    return pages * page + pos % page


# --------------------------------------------------------------------------------------------
# the kernels as torch.library custom ops: torch.compile / torch.export see one opaque node per call
# (shapes from the fake implementations), autograd through the backward op
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("attnlib::triton_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, key_valid: Optional[torch.Tensor],
            alibi: Optional[torch.Tensor], sinks: Optional[torch.Tensor], block_table: Optional[torch.Tensor],
            layout: Optional[torch.Tensor], meta: list[int], scale: float,
            softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Sq, Hq, Dv], lse float32 [B, Hq, Sq])`` of BSHD q (k/v: BSHD or page pools) on the int32 tile
    ``table``; ``meta`` is :class:`_Meta` as a list, ``softcap`` 0 means none (custom-op schemas take plain
    values)."""
    return _forward(q, k, v, table, key_valid, alibi, sinks, block_table, layout, _Meta.from_list(meta), scale,
                    softcap)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, table, key_valid, alibi, sinks, block_table, layout, meta, scale, softcap):
    b, sq, hq, _ = q.shape
    return q.new_empty((b, sq, hq, v.shape[-1])), q.new_empty((b, hq, sq), dtype=torch.float32)


@torch.library.custom_op("attnlib::triton_attention_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, table: torch.Tensor, key_valid: Optional[torch.Tensor],
            alibi: Optional[torch.Tensor], sinks: Optional[torch.Tensor], block_table: Optional[torch.Tensor],
            layout: Optional[torch.Tensor], meta: list[int], scale: float,
            softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dsinks)`` from the saved output and LSE (``dsinks`` is empty without sinks)."""
    return _backward(dout, dlse, q, k, v, out, lse, table, key_valid, alibi, sinks, block_table, layout,
                     _Meta.from_list(meta), scale, softcap)


@_bwd_op.register_fake
def _bwd_fake(dout, dlse, q, k, v, out, lse, table, key_valid, alibi, sinks, block_table, layout, meta, scale,
              softcap):
    dsinks = torch.empty_like(sinks) if sinks is not None else q.new_empty(0, dtype=torch.float32)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), dsinks)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, table, key_valid, alibi, sinks, block_table, layout, meta, scale, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, table, key_valid, alibi, sinks, block_table, layout)
    ctx.args = (meta, scale, softcap)


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, table, key_valid, alibi, sinks, block_table, layout = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dsinks = _bwd_op(dout, dlse, q, k, v, out, lse, table, key_valid, alibi, sinks, block_table, layout,
                                 *ctx.args)
    return dq, dk, dv, None, None, None, (dsinks if sinks is not None else None), None, None, None, None, None


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# --------------------------------------------------------------------------------------------
# configuration of one call
# --------------------------------------------------------------------------------------------
def _visible_keys(table: TileTable, bk: int) -> int:
    """The most keys (rounded out to key tiles) any group's rows may see: what split-K would divide (cached)."""
    got = None if torch.compiler.is_compiling() else table._launch.get(("visible", bk))
    if got is None:
        got = 0
        for _, q_len, runs in table.groups:
            n = 0
            for run in runs:
                lo, hi = _key_bounds(0, q_len, q_len, run, bk)
                n += hi - lo
            got = max(got, n)
        if not torch.compiler.is_compiling():
            table._launch[("visible", bk)] = got
    return got


def _tiles_for(table: TileTable, q, k, v, deterministic: bool, sparse) -> _Tiles:
    d, dv, dtype, dev = q.shape[-1], v.shape[-1], q.dtype, q.device
    sb = None if sparse is None else sparse[:2]
    cfg = {kind: kernel_config(kind, d, dv, dtype, dev, max_seqlen_q=table.max_q_len, deterministic=deterministic,
                               sparse_blocks=sb if kind != "bwd_pre" else None)
           for kind in ("fwd", "bwd_dq", "bwd_dkdv", "bwd_pre")}
    split = None
    if not deterministic and sparse is None:
        sc = kernel_config("split", d, dv, dtype, dev)
        rows = table.max_q_len * (q.shape[2] // k.shape[2])
        chunk_tiles = 2 if _interpreted(dev) else _SPLIT_TILES
        if 0 < rows <= sc.block_q and _visible_keys(table, sc.block_k) >= 2 * chunk_tiles * sc.block_k:
            split = (_pow2(rows), sc.block_k, chunk_tiles, sc.num_warps, sc.num_stages)

    def four(c):
        return (c.block_q, c.block_k, c.num_warps, c.num_stages)
    return _Tiles(four(cfg["fwd"]), four(cfg["bwd_dq"]), four(cfg["bwd_dkdv"]), four(cfg["bwd_pre"]), split,
                  None if sparse is None else tuple(sparse))


def _meta_for(tiles: _Tiles, where: dict, table: TileTable, page: int, deterministic: bool) -> _Meta:
    """The op's metadata: tile sizes, the offsets of the packed table's parts and the call's flags."""
    split = tiles.split or (0, 0, 0, 0, 0)
    values = dict(zip(("fwd_q", "fwd_k", "fwd_w", "fwd_s"), tiles.fwd))
    values.update(zip(("dq_q", "dq_k", "dq_w", "dq_s"), tiles.dq))
    values.update(zip(("kv_q", "kv_k", "kv_w", "kv_s"), tiles.dkdv))
    values.update(pre_q=tiles.pre[0], pre_w=tiles.pre[2], any_causal=int(table.any_causal),
                  any_window=int(table.any_window), page=page, deterministic=int(deterministic),
                  split=int(tiles.split is not None), split_rows=split[0], split_k=split[1], split_w=split[3],
                  split_s=split[4], seqlen_k=table.seqlen_k,
                  page_tiles=sum(int(page > 0 and page % bk == 0 and table.runs_aligned(bk)) << i
                                 for i, bk in enumerate((tiles.fwd[1], tiles.dq[1], split[1] or 1))))
    return _Meta(**{n: values.get(n, where.get(n, 0)) for n in _META_FIELDS})


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _check_common(q, k, v, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype={t.dtype} is not supported; use float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float, got {scale}; the usual value is head_dim ** -0.5")


def _check_heads(q, k, v, packed: bool = False):
    hq, d = q.shape[-2], q.shape[-1]
    hkv, dk = k.shape[-2], k.shape[-1]
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in all but the last dim")
    if d != dk:
        raise ValueError(f"q head dim {d} != k head dim {dk}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"Hq={hq} must be a multiple of Hkv={hkv} (GQA/MQA)")
    for name, n in (("q/k head dim", d), ("v head dim", v.shape[-1])):
        if not 1 <= n <= MAX_HEAD_DIM:
            raise ValueError(f"{name} {n} is not supported by the triton kernels (1..{MAX_HEAD_DIM})")
    if hq > 65535 or (not packed and q.shape[0] > 65535):
        raise ValueError(f"batch={q.shape[0]}, Hq={hq}: the kernels launch one grid row per batch row and per head, "
                         "at most 65535 each; split the call")


def _check_modifiers(q, batch: int, hq: int, softcap, alibi_slopes, sinks):
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (
                math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be a positive finite float or None, got {softcap!r}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
            raise TypeError("alibi_slopes must be a float32 tensor [Hq] or [B, Hq]")
        if tuple(alibi_slopes.shape) not in ((hq,), (batch, hq), (1, hq)):
            raise ValueError(f"alibi_slopes must be [Hq] = [{hq}] or [B, Hq] = [{batch}, {hq}], got "
                             f"{tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or not sinks.dtype.is_floating_point:
            raise TypeError("sinks must be a floating tensor [Hq]")
        if tuple(sinks.shape) != (hq,):
            raise ValueError(f"sinks must be [Hq] = [{hq}], got {tuple(sinks.shape)}")
        if sinks.device != q.device:
            raise ValueError(f"sinks is on {sinks.device} but q is on {q.device}")


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------
def _prepare(q, k, v, table, scale, key_valid, softcap, alibi_slopes, sinks, block_layout, block_table,
             deterministic):
    """Validated op arguments ``(q, k, v, table, key_valid, alibi, sinks, block_table, layout, meta, scale, softcap)``
    of a call, or None when it has no query (or no batch row)."""
    _check_common(q, k, v, scale)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention_tiles needs BSHD q [B, Sq, Hq, D] and k/v [B, Sk, Hkv, *] (or page pools); got "
                         f"ranks {q.dim()}, {k.dim()}, {v.dim()}")
    _check_heads(q, k, v)
    b, sq, hq, _ = q.shape
    if not isinstance(table, TileTable):
        raise TypeError(f"table must be a TileTable, got {type(table).__name__}")
    if sq != table.seqlen_q:
        raise ValueError(f"the table covers {table.seqlen_q} queries but q has {sq}")
    page = 0
    if block_table is not None:
        if table.kv_seqlens is None:
            raise ValueError("block_table needs a TileTable built with kv_seqlens (the requests' key counts)")
        if b != 1:
            raise ValueError(f"block_table needs batch 1 (requests are packed along the query axis), got {b}")
        if not isinstance(block_table, torch.Tensor) or block_table.dtype not in (torch.int32, torch.int64) \
                or block_table.dim() != 2:
            raise TypeError("block_table must be an int32 tensor [R, max_pages]")
        if block_table.shape[0] != len(table.kv_seqlens):
            raise ValueError(f"block_table has {block_table.shape[0]} rows for {len(table.kv_seqlens)} requests")
        page = k.shape[1]
        if not 1 <= page <= MAX_PAGE_SIZE:
            raise ValueError(f"page size {page} is not supported by the triton kernels (1..{MAX_PAGE_SIZE})")
        need = max([0] + [-(-n // page) for n in table.kv_seqlens])
        if need > block_table.shape[1]:
            raise ValueError(f"block_table has {block_table.shape[1]} page columns but a request needs {need} "
                             f"pages of {page}: widen block_table")
        block_table = block_table.to(torch.int32).contiguous()
    elif k.shape[0] != b or k.shape[1] != table.seqlen_k:
        raise ValueError(f"k {tuple(k.shape)} must be [B={b}, Sk={table.seqlen_k}, Hkv, D] for this table")
    if key_valid is not None:
        if not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool:
            raise TypeError("key_valid must be a bool tensor [B, Sk] (True = key may be seen)")
        if tuple(key_valid.shape) != (b, table.seqlen_k) or key_valid.device != q.device:
            raise ValueError(f"key_valid must be [B, Sk] = [{b}, {table.seqlen_k}] on q's device, got "
                             f"{tuple(key_valid.shape)} on {key_valid.device}")
        key_valid = key_valid.contiguous()
    _check_modifiers(q, b, hq, softcap, alibi_slopes, sinks)
    layout, sparse = None, None
    if block_layout is not None:
        layout, lbq, lbk, q_origin, k_origin = block_layout
        if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool or not 2 <= layout.dim() <= 4:
            raise TypeError("block_layout[0] must be a bool tensor [nQ, nK], [Hq, nQ, nK] or [B, Hq, nQ, nK]")
        if layout.device != q.device:
            raise ValueError(f"the block layout is on {layout.device} but q is on {q.device}")
        sparse = (int(lbq), int(lbk), int(q_origin), int(k_origin))
    if sum(x is not None for x in (key_valid, layout, block_table)) > 1:
        raise ValueError("give at most one of key_valid, block_layout and block_table")
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    if b == 0 or sq == 0:
        return None
    table_t, meta = _launch_plan(table, q, k, v, bool(deterministic), sparse, page)
    if not meta[_SPARSE]:
        layout = None
    return (q, k, v, table_t, key_valid, alibi_slopes, sinks, block_table, layout, meta, float(scale),
            float(softcap or 0.0))


def _launch_plan(table: TileTable, q, k, v, deterministic: bool, sparse, page: int):
    """``(int32 table on q's device, op metadata list)`` for a call's shapes (cached in the table per tile
    configuration: a few dict lookups per call once warm)."""
    tiles = _tiles_for(table, q, k, v, deterministic, sparse)
    key = (str(q.device), tiles, page, deterministic)
    got = None if torch.compiler.is_compiling() else table._launch.get(key)
    if got is None:
        table_t, where = table.on(q.device, tiles)
        got = (table_t, _meta_for(tiles, where, table, page, deterministic).to_list())
        if not torch.compiler.is_compiling():
            table._launch[key] = got
    return got


def attention_tiles(q, k, v, table: TileTable, *, scale: float, key_valid=None, softcap: float | None = None,
                    alibi_slopes=None, sinks=None, block_layout=None, block_table=None, return_lse: bool = False,
                    deterministic: bool = False):
    """Attention of BSHD ``q [B, Sq, Hq, D]`` against ``k [B, Sk, Hkv, D]``, ``v [B, Sk, Hkv, Dv]`` on a
    :class:`TileTable` (shared by the ``B`` batch rows); returns ``out`` or ``(out, lse [B, Hq, Sq])``.

    Args:
        table: the query groups and their key runs (``TileTable.dense``, ``TileTable.varlen`` or any plan).
        key_valid: bool ``[B, Sk]``, False hides the key.
        softcap, alibi_slopes (float32 ``[Hq]`` / ``[B, Hq]``), sinks (``[Hq]``, differentiable): the score
            modifiers, applied in that order.
        block_layout: ``(layout, bq, bk, q_origin, k_origin)``: query ``i`` may see key ``j`` only if
            ``layout[..., (i + q_origin) // bq, (j + k_origin) // bk]`` (bool ``[nQ, nK]``, ``[Hq, nQ, nK]`` or
            ``[B, Hq, nQ, nK]`` on q's device; a table with one key run). Only listed kernel tiles are visited;
            layout blocks that are multiples of 16 (aligned) need no per-element test.
        block_table: int32 ``[R, max_pages]``: ``k``/``v`` are page pools ``[num_pages, page, Hkv, D]``, batch 1,
            and the table was built with ``kv_seqlens`` (logical key ``j`` of request ``r`` is slot
            ``j % page`` of page ``block_table[r, j // page]``); any page size 1..``MAX_PAGE_SIZE``.
        deterministic: fixed tile configuration and no split-K (see the module docstring).
    """
    args = _prepare(q, k, v, table, scale, key_valid, softcap, alibi_slopes, sinks, block_layout, block_table,
                    deterministic)
    if args is None:
        b, sq, hq = q.shape[0], q.shape[1], q.shape[2]
        out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
        lse = torch.full((b, hq, sq), float("-inf"), dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    out, lse = _fwd_op(*args)
    return (out, lse) if return_lse else out


def attention_tiles_backward(q, k, v, out, lse, dout, dlse, table: TileTable, *, scale: float, key_valid=None,
                             softcap: float | None = None, alibi_slopes=None, block_layout=None, block_table=None,
                             deterministic: bool = False):
    """``(dq, dk, dv)`` of an :func:`attention_tiles` call from a final ``out``/``lse`` (which may merge this call
    with others, sinks included: each part's gradient follows from its own keys) and ``dout``/``dlse`` (either
    may be None): the backward kernels without autograd (ring attention, composite calls)."""
    args = _prepare(q, k, v, table, scale, key_valid, softcap, alibi_slopes, None, block_layout, block_table,
                    deterministic)
    if args is None:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    q, k, v, rest = args[0], args[1], args[2], args[3:]
    dout = torch.zeros(out.shape, dtype=q.dtype, device=q.device) if dout is None else dout.to(q.dtype)
    dq, dk, dv, _ = _bwd_op(dout, dlse, q, k, v, out, lse.float(), *rest)
    return dq, dk, dv


def op_args(q, k, v, *, scale: float, causal: bool = False):
    """The arguments of one ``attnlib::triton_attention_fwd`` call for dense BSHD tensors (tests: opcheck)."""
    table = _dense_table(q.shape[1], k.shape[1], causal, False, None)
    table_t, meta = _launch_plan(table, q, k, v, True, None, 0)
    return (q, k, v, table_t, None, None, None, None, None, meta, float(scale), 0.0)


@functools.lru_cache(maxsize=256)
def _dense_table(sq: int, sk: int, causal: bool, top_left: bool, window) -> TileTable:
    return TileTable.dense(sq, sk, causal=causal, top_left=top_left, window=window)


@functools.lru_cache(maxsize=256)
def _varlen_table(q_lens: tuple, k_lens: tuple, causal: bool, top_left: bool, window) -> TileTable:
    return TileTable.varlen(q_lens, k_lens, causal=causal, top_left=top_left, window=window)


def attention(q, k, v, *, scale: float,
              cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
              causal: bool = False, top_left: bool = False,
              window: int | None = None,
              key_valid=None,
              softcap: float | None = None, alibi_slopes=None, sinks=None,
              return_lse: bool = False,
              deterministic: bool = False,
              check_cu_seqlens: bool = True):
    """Attention with masks as arguments; returns ``out`` or ``(out, lse)``.

    Args:
        q, k, v: dense ``[B, Sq, Hq, D]``, ``[B, Sk, Hkv, D]``, ``[B, Sk, Hkv, Dv]`` or packed
            ``[Tq, Hq, D]``, ``[Tk, Hkv, D]``, ``[Tk, Hkv, Dv]``; fp16, bf16 or fp32; D, Dv <= 256.
        scale: positive softmax scale (usually ``D ** -0.5``).
        cu_seqlens_q, cu_seqlens_k: int32 ``[N + 1]`` block boundaries (packed mode). Block ``b``'s
            queries see only block ``b``'s keys; blocks may have different q and kv lengths. They are read
            on the host once per call (one device sync); :func:`attention_tiles` with a cached
            :class:`TileTable` avoids it.
        max_seqlen_q, max_seqlen_k: Python ints, the longest block (packed mode; checked when given).
        causal: key ``j`` visible to query ``i`` iff ``j <= i + (Sk - Sq)`` (bottom-right, per block);
            ``top_left=True``: iff ``j <= i``.
        window: with ``causal``, also require ``j > i + off - window`` (the W newest keys incl. the
            diagonal), ``off = Sk - Sq`` or 0 for top-left.
        key_valid: bool ``[B, Sk]`` (dense only), False hides the key.
        softcap, alibi_slopes, sinks: score modifiers (see :func:`attention_tiles`); ALiBi's distance is
            ``|i + off - j|`` with the block's ``off``.
        return_lse: also return the float32 log-sum-exp of the scores, ``[B, Hq, Sq]`` dense or ``[Hq, Tq]``
            packed; ``-inf`` for rows that see no key (the sink with sinks). Differentiable.
        deterministic: fixed tile configuration (see module docstring): batch-invariant bits.
        check_cu_seqlens: verify cu_seqlens (starts at 0, non-decreasing, sums to the token count).

    Output: q's layout and dtype, last dim Dv.
    """
    _check_inputs(q, k, v, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  causal, top_left, window, key_valid, check_cu_seqlens)
    packed = cu_seqlens_q is not None
    top_left = bool(top_left and causal)
    if packed:
        cq = [int(x) for x in cu_seqlens_q.detach().to("cpu", torch.int64).tolist()]
        ck = [int(x) for x in cu_seqlens_k.detach().to("cpu", torch.int64).tolist()]
        q_lens = tuple(b - a for a, b in zip(cq[:-1], cq[1:]))
        k_lens = tuple(b - a for a, b in zip(ck[:-1], ck[1:]))
        table = _varlen_table(q_lens, k_lens, bool(causal), top_left, window)
        _check_modifiers(q, 1, q.shape[1], softcap, alibi_slopes, sinks)
        out, lse = attention_tiles(q[None], k[None], v[None], table, scale=scale, softcap=softcap,
                                   alibi_slopes=None if alibi_slopes is None else alibi_slopes.reshape(-1),
                                   sinks=sinks, return_lse=True, deterministic=deterministic)
        out, lse = out[0], lse[0]
    else:
        table = _dense_table(q.shape[1], k.shape[1], bool(causal), top_left, window)
        out, lse = attention_tiles(q, k, v, table, scale=scale, key_valid=key_valid, softcap=softcap,
                                   alibi_slopes=alibi_slopes, sinks=sinks, return_lse=True,
                                   deterministic=deterministic)
    return (out, lse) if return_lse else out
def _check_inputs(q, k, v, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  causal, top_left, window, key_valid, check_cu_seqlens):
    _check_common(q, k, v, scale)

    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if packed:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("packed mode needs both cu_seqlens_q and cu_seqlens_k (pass the same tensor "
                             "twice for self-attention)")
        if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
            raise ValueError(f"packed (cu_seqlens) mode needs q [Tq, Hq, D], k/v [Tk, Hkv, D]; got ranks "
                             f"{q.dim()}, {k.dim()}, {v.dim()}")
        if key_valid is not None:
            raise ValueError("key_valid is for dense [B, S, H, D] inputs; in packed mode give each sequence "
                             "its true length through cu_seqlens instead")
    else:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"dense mode needs q [B, Sq, Hq, D], k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv]; got "
                             f"ranks {q.dim()}, {k.dim()}, {v.dim()} (for packed [T, H, D] pass cu_seqlens_q/k)")
        if not (q.shape[0] == k.shape[0] == v.shape[0]):
            raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    _check_heads(q, k, v, packed)
    if top_left and not causal:
        raise ValueError("top_left=True selects the causal alignment; it needs causal=True")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"window must be a Python int or None, got {type(window).__name__}")
        if not causal:
            raise ValueError("window needs causal=True (it is the causal sliding window of the W newest keys)")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")

    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m is not None and (isinstance(m, bool) or not isinstance(m, int)):
            raise TypeError(f"{name} must be a Python int (no device sync), got {type(m).__name__}")

    if packed:
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if not isinstance(cu, torch.Tensor):
                raise TypeError(f"{name} must be an int32 tensor, got {type(cu).__name__}")
            if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 2:
                raise ValueError(f"{name} must be a 1-D int32 tensor [N + 1], got dtype={cu.dtype} "
                                 f"shape={tuple(cu.shape)}")
            if cu.device != q.device:
                raise ValueError(f"{name} is on {cu.device} but q is on {q.device}; move it to q's device")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel() - 1} blocks but cu_seqlens_k has "
                             f"{cu_seqlens_k.numel() - 1}")
        if check_cu_seqlens:
            for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]),
                                    ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
                c = cu.detach().to("cpu", torch.int64)
                if int(c[0]) != 0 or bool((c[1:] < c[:-1]).any()):
                    raise ValueError(f"{name} must start at 0 and be non-decreasing, got {c.tolist()}")
                if int(c[-1]) != total:
                    raise ValueError(f"{name} ends at {int(c[-1])} but the tensor has {total} tokens; "
                                     "the sequence lengths must sum to the token count")
                longest = int((c[1:] - c[:-1]).max())
                given = max_seqlen_q if name == "cu_seqlens_q" else max_seqlen_k
                if given is not None and given < longest:
                    raise ValueError(f"max_seqlen_{name[-1]}={given} is shorter than the longest block "
                                     f"({longest}) in {name}")
    if key_valid is not None:
        if not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool:
            raise TypeError("key_valid must be a bool tensor [B, Sk] (True = key may be seen)")
        if tuple(key_valid.shape) != (q.shape[0], k.shape[1]):
            raise ValueError(f"key_valid has shape {tuple(key_valid.shape)}, expected [B, Sk] = "
                             f"{[q.shape[0], k.shape[1]]}")
        if key_valid.device != q.device:
            raise ValueError(f"key_valid is on {key_valid.device} but q is on {q.device}; move it to q's device")
    if not triton_available(q.device):
        raise RuntimeError(f"the triton attention kernels cannot run on {q.device}: they need CUDA with triton, "
                           "or TRITON_INTERPRET=1 set before triton is imported (CPU)")


