"""GPU benchmark of attnlib's Triton attention kernels: TFLOP/s forward and backward against PyTorch's
FlashAttention-2 kernel (SDPA flash backend; ``varlen_attn`` for packed batches) and cuDNN SDPA.

Run on a CUDA machine (skips everywhere else, including under ``TRITON_INTERPRET=1``)::

    python -m pytest bench/bench_triton_attention.py --benchmark-json=/tmp/attn.json
    python bench/report.py /tmp/attn.json       # time ratios to SDPA-flash per group

Cases (bf16, 16k tokens per call as in FlashAttention's own benchmark: batch = 16384 // S, heads =
2048 // D): head dim 64 and 128, S = 1k .. 16k, causal and non-causal, forward and backward, plus a
varlen mix of 8 packed sequences (bottom-right causal per block). FLOPs: forward ``4 * B * H * S^2 * D``
(halved when causal), backward 2.5x forward. At the end the module writes
``bench/results/triton_attention_<gpu>.md`` with TFLOP/s per implementation and the ratio to SDPA-flash
(targets: forward >= 0.9x, backward >= 0.8x at D=128).

Without a GPU, ``python bench/bench_triton_attention.py --compile-check`` compiles every kernel
configuration for sm_90 (no device needed) and prints shared memory, registers and spills.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch

if __name__ != "__main__":
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("triton attention GPU benchmark: needs CUDA (and TRITON_INTERPRET off)", allow_module_level=True)
    pytest.importorskip("triton")
    pytest.importorskip("pytest_benchmark")

DTYPE = torch.bfloat16
TOKENS = 16384
HIDDEN = 2048
SEQLENS = [1024, 2048, 4096, 8192, 16384]
HEAD_DIMS = [64, 128]
IMPLS = ["sdpa_flash", "cudnn", "triton"]
VARLEN_LENS = [4096, 2048, 1500, 1024, 700, 513, 300, 64]          # 10,240 tokens

_RESULTS: dict[tuple, float] = {}   # (case, impl) -> TFLOP/s


def _flops(b, h, sq, sk, d, causal, backward):
    f = 4.0 * b * h * sq * sk * d * (0.5 if causal else 1.0)
    return f * 2.5 if backward else f


def _sdpa(q, k, v, causal, backend):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    with sdpa_kernel(which):  # BSHD -> BHSD views; Sq == Sk so top-left is_causal == bottom-right
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal).transpose(1, 2)


def _dense_fn(impl, causal):
    from attnlib_kernels.attention import attention

    if impl == "triton":
        return lambda q, k, v: attention(q, k, v, scale=q.shape[-1] ** -0.5, causal=causal)
    return lambda q, k, v: _sdpa(q, k, v, causal, impl)


def _varlen_fn(impl, cu, max_len):
    from attnlib_kernels.attention import attention

    if impl == "triton":
        return lambda q, k, v: attention(q, k, v, scale=q.shape[-1] ** -0.5, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                         max_seqlen_q=max_len, max_seqlen_k=max_len, causal=True,
                                         check_cu_seqlens=False)
    if impl == "sdpa_flash":
        from torch.nn.attention.varlen import varlen_attn

        return lambda q, k, v: varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0))
    raise ValueError(impl)


def _measure(benchmark, group, impl, fn, inputs, flops, backward):
    """Time ``fn`` (or its backward) and record TFLOP/s; failures of a baseline skip, not fail."""
    q, k, v = inputs
    try:
        if backward:
            q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
            out = fn(q, k, v)
            dout = torch.randn_like(out)

            def step():
                return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        else:
            def step():
                return fn(q, k, v)
        step()
        torch.cuda.synchronize()
    except (RuntimeError, NotImplementedError) as exc:
        if impl == "triton":
            raise
        pytest.skip(f"{impl} cannot run {group}: {str(exc).splitlines()[0]}")

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.group = group
    benchmark.extra_info.update(variant=impl, baseline=impl == "sdpa_flash", torch=torch.__version__,
                                device=torch.cuda.get_device_name())
    benchmark.pedantic(timed, rounds=20, warmup_rounds=3, iterations=1)
    tflops = flops / benchmark.stats.stats.median / 1e12
    benchmark.extra_info["tflops"] = round(tflops, 1)
    _RESULTS[(group, impl)] = tflops


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("s", SEQLENS)
def test_dense(benchmark, s, d, causal, backward, impl):
    b, h = max(1, TOKENS // s), HIDDEN // d
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(b, s, h, d, device="cuda", dtype=DTYPE, generator=g) for _ in range(3)]
    group = f"{'bwd' if backward else 'fwd'} d={d} S={s} {'causal' if causal else 'full'}"
    _measure(benchmark, group, impl, _dense_fn(impl, causal), inputs, _flops(b, h, s, s, d, causal, backward),
             backward)


@pytest.mark.parametrize("impl", ["sdpa_flash", "triton"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_varlen_mix(benchmark, d, backward, impl):
    h = HIDDEN // d
    total = sum(VARLEN_LENS)
    cu = torch.tensor([0] + [sum(VARLEN_LENS[:i + 1]) for i in range(len(VARLEN_LENS))], dtype=torch.int32,
                      device="cuda")
    if impl == "sdpa_flash":
        pytest.importorskip("torch.nn.attention.varlen", reason="varlen_attn needs torch >= 2.10")
    fn = _varlen_fn(impl, cu, max(VARLEN_LENS))
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(total, h, d, device="cuda", dtype=DTYPE, generator=g) for _ in range(3)]
    flops = sum(_flops(1, h, n, n, d, True, backward) for n in VARLEN_LENS)
    group = f"{'bwd' if backward else 'fwd'} d={d} varlen mix causal"
    _measure(benchmark, group, impl, fn, inputs, flops, backward)


@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    if not _RESULTS:
        return
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    lines = [f"# Triton attention vs PyTorch FA2 (SDPA flash / varlen_attn) and cuDNN, {DTYPE}",
             "", f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
             f"triton {__import__('triton').__version__}. TFLOP/s (median); ratio = triton / sdpa_flash.", "",
             "| case | sdpa_flash | cudnn | triton | triton / flash |", "|---|---:|---:|---:|---:|"]
    for group in dict.fromkeys(g for g, _ in _RESULTS):
        row = [_RESULTS.get((group, i)) for i in IMPLS]
        ratio = f"{row[2] / row[0]:.2f}x" if row[0] and row[2] else ""
        cells = " | ".join(f"{x:.1f}" if x else "-" for x in row)
        lines.append(f"| {group} | {cells} | {ratio} |")
    out = pathlib.Path(__file__).parent / "results" / f"triton_attention_{gpu}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------
# compile check without a GPU: shared memory, registers and spills of every shipped configuration
# ------------------------------------------------------------------------------------------------
def compile_check(arch: int = 90) -> list[str]:  # pragma: no cover - a developer tool
    import itertools
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from attnlib_kernels._attn_bwd import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
    from attnlib_kernels._attn_fwd import _attn_fwd_kernel
    from attnlib_kernels.attention import kernel_config

    bindir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next((p for p in (bindir / "ptxas-blackwell", bindir / "ptxas") if p.exists()), None)
    types = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    pointers = {"Lse": "*fp32", "Delta": "*fp32", "KeyValid": "*i8", "CuQ": "*i32", "CuK": "*i32"}
    kernels = {"fwd": _attn_fwd_kernel, "bwd_dkdv": _attn_bwd_dkdv_kernel, "bwd_dq": _attn_bwd_dq_kernel}
    # (varlen, causal, top_left, window, key_valid)
    masks = [(False, False, False, False, False), (False, True, False, False, False),
             (True, True, False, True, False), (False, True, True, False, True)]
    lines = []
    for kind, (d, dv), dtype, mask in itertools.product(kernels, [(64, 64), (128, 128), (256, 256), (96, 96)],
                                                        [torch.bfloat16, torch.float32], masks):
        fn = kernels[kind]
        cfg = kernel_config(kind, d, dv, dtype, torch.device("cuda"), deterministic=True)
        const = dict(GROUP=2, D=d, DV=dv, IS_VARLEN=mask[0], CAUSAL=mask[1], TOP_LEFT=mask[2], HAS_WINDOW=mask[3],
                     HAS_KEY_VALID=mask[4], BLOCK_Q=cfg.block_q, BLOCK_K=cfg.block_k,
                     BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
                     IEEE=dtype == torch.float32)
        sig = {}
        for name in fn.arg_names:
            if name in const:
                sig[name] = "constexpr"
            elif name in pointers:
                sig[name] = pointers[name]
            elif name[0].isupper():
                sig[name] = types[dtype]
            else:
                sig[name] = "fp32" if "scale" in name else "i32"
        k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        regs = spills = "?"
        if ptxas is not None:
            with tempfile.TemporaryDirectory() as tmp:
                src = pathlib.Path(tmp) / "k.ptx"
                src.write_text(k.asm["ptx"])
                err = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}a", str(src), "-o", str(src) + ".o"],
                                     capture_output=True, text=True).stderr
            r, s = re.search(r"Used (\d+) registers", err), re.search(r"(\d+) bytes spill stores", err)
            regs, spills = (r.group(1) if r else "?"), (s.group(1) if s else "?")
        line = (f"{kind:8s} d={d:3d}/{dv:3d} {str(dtype)[6:]:8s} mask={''.join('x' if m else '.' for m in mask)} "
                f"tile={cfg.block_q}x{cfg.block_k} warps={cfg.num_warps} stages={cfg.num_stages} "
                f"smem={k.metadata.shared} regs={regs} spill_bytes={spills}")
        print(line, flush=True)
        lines.append(line)
    return lines


if __name__ == "__main__":  # pragma: no cover
    if "--compile-check" in sys.argv:
        compile_check()
    else:
        print(__doc__)
