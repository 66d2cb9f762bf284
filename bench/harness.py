"""The one benchmark harness: every entry is a variant in a group, ratios to the group's baseline.

``bench/report.py`` turns pytest-benchmark's JSON into the markdown tables of ``bench/results/``.
"""
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
