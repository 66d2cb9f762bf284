"""GPU benchmark of the attention backends: flash vs sdpa vs xformers vs flex (vs triton), bf16.

Run on a CUDA machine (collects and skips everywhere else)::

    python -m pytest bench/bench_gpu_backends.py --benchmark-json=/tmp/gpu_backends.json
    python bench/report.py /tmp/gpu_backends.json

Workloads, every one through ``attnlib.attention(..., backend=name)`` so the lowering is timed too:

* ``causal``: dense ``[1, S, H, D]`` self-attention with ``Causal()``;
* ``varlen``: ``S`` tokens packed as sequences of mixed lengths (1/2, 1/4, 1/8, ... of S) with a causal
  ``BlockDiagonal`` mask (the packed-prefill / CFG-branch shape).

Head dim 64 (H = 32) and 128 (H = 16), S = 1k .. 16k. TFLOP/s counts the visible (query, key) pairs
(``attnlib.benchmark.visible_pairs``: 2 * (D + Dv) FLOPs each). A backend that cannot serve a case is skipped
with its ``why_not``; every timed case is first checked against the float64 ``math`` reference with the
tolerance policy of ``attnlib.testing`` (on the last query head, as ``attnlib bench`` does for big calls). At
the end the module writes ``bench/results/gpu_backends_<gpu>.md``. For the named workloads of
``attnlib bench --device cuda`` (decode, CFG, video, ...) run that instead.
"""
from __future__ import annotations

import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU backend benchmark: needs CUDA", allow_module_level=True)

pytest.importorskip("pytest_benchmark")

import attnlib  # noqa: E402
from attnlib import BlockDiagonal, Causal, benchmark as ab  # noqa: E402
from attnlib.inputs import validate_call  # noqa: E402
from attnlib.registry import get_backend  # noqa: E402
from attnlib.testing import compare  # noqa: E402

BACKENDS = ["flash", "sdpa", "xformers", "flex", "triton"]
SEQLENS = [1024, 4096, 16384]
HEAD_DIMS = {64: 32, 128: 16}          # head dim -> query heads
WORKLOADS = ["causal", "varlen"]
DTYPE = torch.bfloat16

_RESULTS: dict[tuple[str, int, int, str], tuple[float, float]] = {}   # (workload, D, S, backend) -> (ms, TFLOP/s)


def _varlen_lengths(S: int) -> list[int]:
    lens, left, part = [], S, S // 2
    while left > 0:
        n = max(1, min(part, left))
        lens.append(n)
        left -= n
        part = max(part // 2, 64)
    return lens


def _inputs(workload: str, S: int, D: int) -> ab.Problem:
    H = HEAD_DIMS[D]
    g = torch.Generator(device="cuda").manual_seed(0)
    if workload == "causal":
        shape, mask = (1, S, H, D), Causal()
    else:
        shape, mask = (S, H, D), BlockDiagonal(_varlen_lengths(S), causal=True)
    q, k, v = (torch.randn(*shape, device="cuda", dtype=DTYPE, generator=g) for _ in range(3))
    return ab.Problem(q, k, v, mask)


@pytest.mark.parametrize("S", SEQLENS, ids=[f"S{s // 1024}k" for s in SEQLENS])
@pytest.mark.parametrize("D", list(HEAD_DIMS), ids=[f"D{d}" for d in HEAD_DIMS])
@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_backend_speed(benchmark, backend, workload, D, S):
    p = _inputs(workload, S, D)
    q, k, v, mask = p.q, p.k, p.v, p.mask
    flops = ab.problem_flops(p)
    impl = get_backend(backend)
    why = impl.why_not(validate_call(q, k, v, mask))
    if why:
        pytest.skip(f"{backend} cannot serve {workload} D={D} S={S}: {'; '.join(why)}")

    def run():
        return attnlib.attention(q, k, v, mask, backend=backend)

    out = run()                         # never time a wrong kernel (also compiles flex / triton)
    subset = ab.check_subset(p)
    ref, naive = ab.reference(p, subset)
    check = compare(out[subset.index] if subset.index else out, ref, naive, DTYPE, "out")
    assert check.passed, f"{backend} {workload} D={D} S={S}: max error {check.error:.3g} > tolerance {check.tol:.3g}"
    del out, ref, naive
    for _ in range(2):
        run()
    torch.cuda.synchronize()

    def timed():
        run()
        torch.cuda.synchronize()

    benchmark.group = f"{workload} D={D} S={S}"
    rounds = 20 if S <= 4096 else 8
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(backend=backend, baseline=(backend == "sdpa"), implementation=impl.implementation,
                                tflops=round(flops / seconds / 1e12, 1), torch=torch.__version__,
                                device=torch.cuda.get_device_name())
    _RESULTS[(workload, D, S, backend)] = (seconds * 1e3, flops / seconds / 1e12)


@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    if not _RESULTS:
        return
    gpu = torch.cuda.get_device_name()
    impls = {b: (get_backend(b).implementation or get_backend(b).unavailable_reason() or "") for b in BACKENDS}
    lines = [f"# Attention backends, {gpu}, torch {torch.__version__}", "",
             "bf16, H = 32 for D = 64 and H = 16 for D = 128. Cell: median ms (TFLOP/s); `-` = cannot serve.", ""]
    lines += [f"- `{b}`: {impls[b]}" for b in BACKENDS] + [""]
    for workload in WORKLOADS:
        for D in HEAD_DIMS:
            lines += [f"## {workload}, D = {D}", "", "| S | " + " | ".join(BACKENDS) + " |",
                      "|---|" + "---|" * len(BACKENDS)]
            for S in SEQLENS:
                cells = []
                for b in BACKENDS:
                    r = _RESULTS.get((workload, D, S, b))
                    cells.append("-" if r is None else f"{r[0]:.3f} ({r[1]:.0f})")
                lines.append(f"| {S} | " + " | ".join(cells) + " |")
            lines.append("")
    out = pathlib.Path(__file__).parent / "results" / f"gpu_backends_{gpu.replace(' ', '_')}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines))
