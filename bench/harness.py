"""The one benchmark harness: every entry is a variant in a group, ratios to the group's baseline.

``bench/report.py`` turns pytest-benchmark's JSON into the markdown tables of ``bench/results/``.
"""
import statistics
import time

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run(benchmark, group, variant, fn, baseline=False, rounds=None, warmup_rounds=3):
    """Time ``fn`` (synchronized) as ``variant`` of ``group``; ``baseline=True`` marks the reference."""
    benchmark.group = group
    benchmark.extra_info.update(variant=variant, baseline=baseline, torch=torch.__version__, device=DEVICE)

    def timed():
        fn()
        sync()
    benchmark.pedantic(timed, rounds=rounds or (30 if DEVICE == "cpu" else 100), warmup_rounds=warmup_rounds,
                       iterations=1)


def interleaved_medians(fns, rounds):
    """Median seconds of each callable in ``fns`` (a name -> fn dict), timed round-robin.

    Two warm-up calls each (compiles, plans, caches), then ``rounds`` rounds that call every variant once, so
    a change in machine load hits all variants alike; the ratios between them are what a table should show.
    """
    for fn in fns.values():
        fn(), fn()
        sync()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}
