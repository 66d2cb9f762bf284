"""GPU benchmark of the Triton rotary kernels: GB/s against the memory-bandwidth limit and torch.

Run on a CUDA machine (skips everywhere else)::

    python -m pytest bench/bench_rotary_kernels.py --benchmark-json=/tmp/rotary.json
    python bench/report.py /tmp/rotary.json    # time ratios to the torch baseline per S

Each case rotates q ``[1, S, 32, 128]`` and k ``[1, S, 8, 128]`` (bf16, Llama/Qwen GQA shapes)
for S = 4k .. 32k. Bytes moved = read q and k + write q and k (+ the cos/sin table where the
variant reads one). GB/s is reported for

* ``copy``: ``torch.Tensor.copy_`` of the same q and k bytes: the achievable bandwidth limit;
* ``triton_table``: ``apply_rotary_qk`` (one launch, cos/sin table [S, 64] float32);
* ``triton_pos``: ``apply_rotary_pos_qk`` (cos/sin computed in-kernel from positions);
* ``triton_mrope``: ``apply_mrope_qk`` with Qwen3-VL interleaved sections (24, 20, 20);
* ``torch``: the plain-PyTorch rotary (``attnlib.rope.apply_rotary_torch``) on q and k.

At the end the module writes ``bench/results/rotary_kernels_<gpu>.md`` with the table and the
fraction of copy bandwidth each variant reaches (target: >= 80 %).
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("rotary GPU benchmark: needs CUDA (and TRITON_INTERPRET off)", allow_module_level=True)

pytest.importorskip("triton")
pytest.importorskip("pytest_benchmark")

from attnlib_kernels import rotary  # noqa: E402

SEQLENS = [4096, 8192, 16384, 32768]
HQ, HKV, D = 32, 8, 128
R = D // 2
DTYPE = torch.bfloat16
VARIANTS = ["copy", "triton_table", "triton_pos", "triton_mrope", "torch"]

_RESULTS: dict[tuple[int, str], float] = {}  # (S, variant) -> GB/s


def _torch_rotary(x, cos, sin):
    """The torch path users would otherwise run (attnlib.rope's when present)."""
    try:
        from attnlib.rope import apply_rotary_torch

        return apply_rotary_torch(x, cos, sin)
    except ImportError:  # pragma: no cover - fallback with the same math
        c, s = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)
        xf = x.float()
        a, b = xf[..., :R], xf[..., R : 2 * R]
        return torch.cat((a * c - b * s, b * c + a * s), -1).to(x.dtype)


def _inputs(S):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, S, HQ, D, device="cuda", dtype=DTYPE, generator=g)
    k = torch.randn(1, S, HKV, D, device="cuda", dtype=DTYPE, generator=g)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D))
    pos = torch.arange(S, device="cuda")
    freqs = pos[:, None].float() * inv_freq
    pos3 = torch.stack([pos, pos // 7, pos % 97])[:, None, :]  # [3, 1, S]
    return q, k, freqs.cos(), freqs.sin(), pos[None], pos3, inv_freq


def _case(variant, S):
    q, k, cos, sin, pos, pos3, inv_freq = _inputs(S)
    qk_bytes = (q.numel() + k.numel()) * q.element_size() * 2  # read + write
    if variant == "copy":
        q2, k2 = torch.empty_like(q), torch.empty_like(k)
        return (lambda: (q2.copy_(q), k2.copy_(k))), qk_bytes
    if variant == "triton_table":
        fn = lambda: rotary.apply_rotary_qk(q, k, cos, sin)  # noqa: E731
        ref = (_torch_rotary(q, cos, sin), _torch_rotary(k, cos, sin))
        extra = 2 * cos.numel() * cos.element_size()
    elif variant == "triton_pos":
        fn = lambda: rotary.apply_rotary_pos_qk(q, k, pos, inv_freq)  # noqa: E731
        ref = (_torch_rotary(q, cos, sin), _torch_rotary(k, cos, sin))
        extra = pos.numel() * pos.element_size()
    elif variant == "triton_mrope":
        fn = lambda: rotary.apply_mrope_qk(q, k, pos3, inv_freq, (24, 20, 20), interleaved_sections=True)  # noqa: E731
        ref = None
        extra = pos3.numel() * pos3.element_size()
    else:
        fn = lambda: (_torch_rotary(q, cos, sin), _torch_rotary(k, cos, sin))  # noqa: E731
        ref = None
        extra = 2 * cos.numel() * cos.element_size()
    if ref is not None:  # never time a wrong kernel
        out = fn()
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r, atol=2e-2, rtol=2.0**-7)
    return fn, qk_bytes + extra


@pytest.mark.parametrize("S", SEQLENS, ids=[f"S{s // 1024}k" for s in SEQLENS])
@pytest.mark.parametrize("variant", VARIANTS)
def test_rotary_qk_bandwidth(benchmark, variant, S):
    fn, nbytes = _case(variant, S)

    def run():
        fn()
        torch.cuda.synchronize()

    for _ in range(3):
        run()
    # bench/report.py groups by benchmark.group and divides by the entry marked baseline (torch).
    benchmark.group = f"rotary_qk S={S}"
    benchmark.pedantic(run, rounds=30, iterations=5, warmup_rounds=2)
    seconds = benchmark.stats.stats.median
    gbps = nbytes / seconds / 1e9
    benchmark.extra_info.update(
        variant=variant, baseline=(variant == "torch"), bytes=nbytes, gb_per_s=round(gbps, 1), S=S,
        torch=torch.__version__, device=torch.cuda.get_device_name(),
    )
    _RESULTS[(S, variant)] = gbps


@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    if not _RESULTS:
        return
    name = torch.cuda.get_device_name().replace(" ", "_")
    lines = [
        f"# Rotary kernels, {torch.cuda.get_device_name()}, torch {torch.__version__}",
        "",
        f"q [1, S, {HQ}, {D}] + k [1, S, {HKV}, {D}], {str(DTYPE).replace('torch.', '')}, rotate-half, R = {R}.",
        "GB/s = (read + write of q and k + cos/sin or positions) / median time; "
        "% = share of `copy` (torch copy_ of the same q, k bytes).",
        "",
        "| S | " + " | ".join(VARIANTS) + " |",
        "|---|" + "---|" * len(VARIANTS),
    ]
    for S in SEQLENS:
        copy = _RESULTS.get((S, "copy"))
        cells = []
        for v in VARIANTS:
            g = _RESULTS.get((S, v))
            if g is None:
                cells.append("-")
            elif copy and v != "copy":
                cells.append(f"{g:.0f} ({100 * g / copy:.0f} %)")
            else:
                cells.append(f"{g:.0f}")
        lines.append(f"| {S} | " + " | ".join(cells) + " |")
    out = pathlib.Path(__file__).parent / "results" / f"rotary_kernels_{name}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
