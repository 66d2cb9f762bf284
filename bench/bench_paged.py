"""Paged vs contiguous decode, per backend: one decode step (one new token per request) of one layer.

Group = (backend, requests, cache length, page size); baseline = the same call on contiguous packed keys
(``BlockDiagonal([1] * B, lens, causal=True)``). Variants: ``paged`` (``block_table`` + host lengths, as
``PagedKVCache.step`` builds it) and ``paged, device lengths`` (``PagedKVCache.static_step``: lengths on
the device, bounded by the longest cache, what a captured CUDA graph replays). The requests' lengths are
ragged (``L/2 .. L``) and their pages interleaved the way decode growth allocates them. H=16, Hkv=4,
D=64; the tables print tokens/s (new tokens per second of one layer) and the ratio to the baseline. A
second table gives the memory page sharing saves for CFG branches and beams (no timing).

    python bench/bench_paged.py [rounds]            # round-robin timing, markdown (bench/results/paged_cpu.md)
    ATTNLIB_BENCH_FULL=1 python bench/bench_paged.py   # the big grid: B 8/32/64 x caches 1k-32k x pages 16/64/256
    ATTNLIB_BENCH_THREADS=1 python bench/bench_paged.py  # torch threads (on a loaded machine, 1 avoids stalls)
    pytest bench/bench_paged.py --benchmark-json=/tmp/paged.json && python bench/report.py /tmp/paged.json
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

import attnlib
from attnlib import BlockDiagonal
from attnlib.kvcache import PagedKVCache

from harness import DEVICE, DTYPE, interleaved_medians, run as _run

if os.environ.get("ATTNLIB_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["ATTNLIB_BENCH_THREADS"]))

H, HKV, D = 16, 4, 64
FULL = os.environ.get("ATTNLIB_BENCH_FULL") == "1"
#: (requests, cache length, page size)
CASES = ([(b, L, p) for b in (8, 32, 64) for L in (1024, 4096, 16384, 32768) for p in (16, 64, 256)] if FULL else
         [(8, 1024, 16), (8, 1024, 256), (8, 4096, 64), (32, 4096, 16)])
#: the largest cache a case may hold (keys of all requests): bigger cases of the full grid are skipped
MAX_KEYS = 1 << 20
BACKENDS = ["sdpa", "flex"] + (["math"] if FULL else [])


def _lengths(b: int, L: int) -> list[int]:
    g = torch.Generator().manual_seed(b * 7 + L)
    return torch.randint(L // 2, L + 1, (b,), generator=g).tolist()


class Case:
    """A one-layer paged cache holding ``b`` ragged requests, the same keys contiguous, and the step inputs."""

    def __init__(self, b: int, L: int, page: int):
        lens = _lengths(b, L)
        g = torch.Generator().manual_seed(0)
        pages = sum(-(-(n + 1) // page) for n in lens) + 1
        cache = PagedKVCache(1, pages, page, HKV, D, dtype=DTYPE, device=DEVICE)
        seqs = [cache.new_sequence() for _ in lens]
        grown = [0] * b
        while grown != lens:          # grow page by page, round-robin: pages interleave as in decode
            items = {s: min(page, n - m) for s, n, m in zip(seqs, lens, grown) if n > m}
            step = cache.step(items)
            t = step.num_tokens
            step.update(0, torch.randn(t, HKV, D, generator=g).to(DEVICE, DTYPE),
                        torch.randn(t, HKV, D, generator=g).to(DEVICE, DTYPE))
            grown = [cache.length(s) for s in seqs]
        self.q = torch.randn(b, H, D, generator=g).to(DEVICE, DTYPE)
        new = torch.randn(b, HKV, D, generator=g).to(DEVICE, DTYPE)
        self.step = cache.step({s: 1 for s in seqs})               # host lengths
        self.step.update(0, new, new)
        self.kp, self.vp = cache.k[0], cache.v[0]
        kv = attnlib.plan.PagedKv(self.step.block_table, page, self.step.kv_seqlens)
        self.k, self.v = kv.gather(self.kp), kv.gather(self.vp)     # the same keys, contiguous
        self.mask = self.step.mask
        used = torch.tensor(self.step.kv_seqlens, dtype=torch.int32, device=DEVICE)
        bound = L + 1                                               # every request's keys after this step
        table = torch.zeros(b, -(-bound // page), dtype=torch.int32, device=DEVICE)
        table[:, :self.step.block_table.shape[1]] = self.step.block_table
        self.device_mask = BlockDiagonal.from_device_lengths([1] * b, used, bound, causal=True)
        self.device_table = table
        self.cache = cache

    def variants(self, backend: str) -> dict:
        q, kw = self.q, dict(backend=backend)
        return {
            "contiguous": lambda: attnlib.attention(q, self.k, self.v, self.mask, **kw),
            "paged": lambda: attnlib.attention(q, self.kp, self.vp, self.mask, block_table=self.step.block_table, **kw),
            "paged, device lengths": lambda: attnlib.attention(q, self.kp, self.vp, self.device_mask,
                                                               block_table=self.device_table, **kw),
        }


_CASES: dict = {}


def _case(b, L, page) -> Case:
    key = (b, L, page)
    if key not in _CASES:
        _CASES.clear()                 # one case in memory at a time
        _CASES[key] = Case(b, L, page)
    return _CASES[key]


def _group(backend, b, L, page) -> str:
    return f"{backend}: decode B={b}, cache {L // 2}..{L}, page {page}"


def _params():
    return [pytest.param(be, *c, id=f"{be}-B{c[0]}-L{c[1]}-p{c[2]}") for be, c in itertools.product(BACKENDS, CASES)
            if c[0] * c[1] <= MAX_KEYS]


@pytest.mark.parametrize("variant", ["contiguous", "paged", "paged, device lengths"])
@pytest.mark.parametrize("backend,b,L,page", _params())
def test_decode(benchmark, backend, b, L, page, variant):
    fn = _case(b, L, page).variants(backend)[variant]
    _run(benchmark, _group(backend, b, L, page), variant, fn, baseline=variant == "contiguous", rounds=10,
         warmup_rounds=2)


# ---------------------------------------------------------------------------------------------------
# memory saved by page sharing
# ---------------------------------------------------------------------------------------------------
def sharing_rows(page: int = 16, prompt: int = 1000, decoded: int = 64):
    """``(scene, pages in use, pages without sharing, bytes saved per layer)`` for CFG branches and beams."""
    rows = []
    for scene, forks in (("CFG: 2 branches", 1), ("beam search: 4 beams", 3), ("beam search: 8 beams", 7)):
        cache = PagedKVCache(1, 4096, page, HKV, D, dtype=torch.float32)
        root = cache.new_sequence()
        cache.step({root: prompt})
        seqs = [root] + [cache.fork(root) for _ in range(forks)]
        for _ in range(decoded):
            cache.step({s: 1 for s in seqs})
        per_page = 2 * page * HKV * D * 4            # keys + values, float32
        rows.append((scene, cache.pages_in_use, cache.pages_referenced,
                     (cache.pages_referenced - cache.pages_in_use) * per_page))
    return rows


def test_page_sharing_saves_memory():
    for scene, used, unshared, saved in sharing_rows():
        assert used < unshared and saved > 0, scene


# ---------------------------------------------------------------------------------------------------
# round-robin runner
# ---------------------------------------------------------------------------------------------------
def interleaved(rounds: int = 11) -> None:
    print(f"torch {torch.__version__}, device {DEVICE}, dtype {str(DTYPE)[6:]}, threads {torch.get_num_threads()}, "
          f"H={H} Hkv={HKV} D={D}, {rounds} interleaved rounds")
    print()
    print("| backend | B | cache | page | variant | median (ms) | tokens/s | vs contiguous |")
    print("|---|---:|---|---:|---|---:|---:|---:|")
    for b, L, page in CASES:
        if b * L > MAX_KEYS:
            continue
        case = _case(b, L, page)
        for backend in BACKENDS:
            med = interleaved_medians(case.variants(backend), rounds)
            base = med["contiguous"]
            for name, s in med.items():
                print(f"| {backend} | {b} | {L // 2}..{L} | {page} | {name} | {s * 1e3:.2f} | {b / s:,.0f} | "
                      f"{s / base:.2f}x |")
    print()
    print("| scene (page 16, prompt 1000, 64 tokens decoded per branch) | pages in use | pages without sharing | "
          "saved per layer (K+V fp32) |")
    print("|---|---:|---:|---:|")
    for scene, used, unshared, saved in sharing_rows():
        print(f"| {scene} | {used} | {unshared} | {saved / 2 ** 20:.1f} MiB ({1 - used / unshared:.0%}) |")


if __name__ == "__main__":
    import sys
    interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 11)
