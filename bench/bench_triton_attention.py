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

Plan workloads through ``attnlib.attention(..., backend="triton")``, each group with its own baseline timed
in the same run (``python bench/report.py`` prints the ratios; the module also writes them to
``bench/results/triton_plans_<gpu>.md``):

- score modifiers: softcap, ALiBi, sinks and all three vs the plain call (goal: <= 1.15x), fwd and bwd;
- block-sparse: random per-head device layouts at 10 % and 25 % density (64 x 64 blocks) vs the dense
  call, fwd and bwd; TFLOP/s count visible blocks only;
- chunked video attention: ``Causal(chunk=frame, window=3, sink=frame)`` vs plain causal at the same length;
- paged decode: one query per request (32 query heads, 8 kv heads, D=128), batch 8 / 64, caches 1k .. 32k,
  shuffled pages of 16 / 64 / 256 vs the same call on contiguous packed keys, with split-K and in one pass
  (deterministic mode); tokens/s and GB/s of K/V read in ``extra_info``.

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
_PLANS: dict[tuple, tuple] = {}     # (group, variant) -> (median seconds, TFLOP/s or 0, is the baseline)


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


def _measure(benchmark, group, impl, fn, inputs, flops, backward, baseline=None):
    """Time ``fn`` (or its backward) and record TFLOP/s; failures of a baseline skip, not fail. ``baseline``:
    whether this is the group's baseline (default: SDPA-flash)."""
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
        if impl not in ("sdpa_flash", "cudnn"):
            raise
        pytest.skip(f"{impl} cannot run {group}: {str(exc).splitlines()[0]}")

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.group = group
    benchmark.extra_info.update(variant=impl, baseline=impl == "sdpa_flash" if baseline is None else baseline,
                                torch=torch.__version__, device=torch.cuda.get_device_name())
    benchmark.pedantic(timed, rounds=20, warmup_rounds=3, iterations=1)
    median = benchmark.stats.stats.median
    tflops = flops / median / 1e12 if flops else 0.0
    benchmark.extra_info["tflops"] = round(tflops, 1)
    if baseline is None:
        _RESULTS[(group, impl)] = tflops
    else:
        _PLANS[(group, impl)] = (median, tflops, bool(baseline))


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


# ------------------------------------------------------------------------------------------------
# plan workloads through the triton backend: modifiers, block-sparse, chunked video, paged decode
# ------------------------------------------------------------------------------------------------
MODIFIERS = ["plain", "softcap", "alibi", "sinks", "all"]


def _modifiers(variant, h):
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], device="cuda")
    sinks = torch.zeros(h, device="cuda", dtype=torch.float32)
    return {"plain": {}, "softcap": {"softcap": 30.0}, "alibi": {"alibi_slopes": slopes},
            "sinks": {"sinks": sinks}, "all": {"softcap": 30.0, "alibi_slopes": slopes, "sinks": sinks}}[variant]


def _attnlib_fn(mask, **kw):
    import attnlib

    return lambda q, k, v: attnlib.attention(q, k, v, mask, backend="triton", **kw)


@pytest.mark.parametrize("variant", MODIFIERS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_modifiers(benchmark, d, causal, backward, variant):
    from attnlib.masks import Causal

    s = 4096
    b, h = TOKENS // s, HIDDEN // d
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(b, s, h, d, device="cuda", dtype=DTYPE, generator=g) for _ in range(3)]
    group = f"modifiers {'bwd' if backward else 'fwd'} d={d} S={s} {'causal' if causal else 'full'}"
    fn = _attnlib_fn(Causal() if causal else None, **_modifiers(variant, h))
    _measure(benchmark, group, variant, fn, inputs, _flops(b, h, s, s, d, causal, backward), backward,
             baseline=variant == "plain")


@pytest.mark.parametrize("variant", ["dense", "sparse_25", "sparse_10"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("s", [8192, 16384])
def test_block_sparse(benchmark, s, backward, variant):
    from attnlib.masks import BlockSparse

    d, block = 128, 64
    b, h = 1, HIDDEN // d
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(b, s, h, d, device="cuda", dtype=DTYPE, generator=g) for _ in range(3)]
    n = s // block
    if variant == "dense":
        fn, flops = _attnlib_fn(None), _flops(b, h, s, s, d, False, backward)
    else:       # a per-head layout drawn on the device (as a top-k selection would be): no host read
        density = int(variant.split("_")[1]) / 100
        layout = torch.rand(h, n, n, device="cuda", generator=g) < density
        layout |= torch.eye(n, dtype=torch.bool, device="cuda")
        fn = _attnlib_fn(BlockSparse(layout, block))
        visible = int(layout.sum())            # outside the timed region
        flops = 4.0 * visible * block * block * d * (2.5 if backward else 1.0)
    group = f"block-sparse {'bwd' if backward else 'fwd'} d={d} S={s}"
    _measure(benchmark, group, variant, fn, inputs, flops, backward, baseline=variant == "dense")


@pytest.mark.parametrize("variant", ["causal", "chunked"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_chunked_video(benchmark, backward, variant):
    from attnlib.masks import Causal

    d, frame, frames = 128, 1560, 12              # 12 frames of 1560 tokens (a 480p latent video)
    s = frame * frames
    b, h = 1, HIDDEN // d
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(b, s, h, d, device="cuda", dtype=DTYPE, generator=g) for _ in range(3)]
    mask = Causal() if variant == "causal" else Causal(chunk=frame, window=3, sink=frame)
    pairs = mask.plan(s, s).visible_pairs()
    flops = 4.0 * b * h * pairs * d * (2.5 if backward else 1.0)
    group = f"chunked video {'bwd' if backward else 'fwd'} d={d} {frames}x{frame}"
    _measure(benchmark, group, variant, _attnlib_fn(mask), inputs, flops, backward, baseline=variant == "causal")


PAGED_VARIANTS = ["contiguous"] + [f"{kind} page={p}" for p in (16, 64, 256) for kind in ("paged", "paged one-pass")]


@pytest.mark.parametrize("variant", PAGED_VARIANTS)
@pytest.mark.parametrize("cache", [1024, 8192, 32768])
@pytest.mark.parametrize("batch", [8, 64])
def test_paged_decode(benchmark, batch, cache, variant):
    import attnlib
    from attnlib.masks import BlockDiagonal

    hq, hkv, d = 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    kv_lens = [cache - i for i in range(batch)]                   # ragged: partial last pages
    mask = BlockDiagonal([1] * batch, kv_lens, causal=True)
    q = torch.randn(batch, hq, d, device="cuda", dtype=DTYPE, generator=g)
    if variant == "contiguous":
        k = torch.randn(sum(kv_lens), hkv, d, device="cuda", dtype=DTYPE, generator=g)
        v = torch.randn_like(k)
        fn = lambda q, k, v: attnlib.attention(q, k, v, mask, backend="triton")  # noqa: E731
    else:
        page = int(variant.split("page=")[1])
        per_req = [-(-n // page) for n in kv_lens]
        pages = sum(per_req)
        order = torch.randperm(pages, device="cuda", generator=g).to(torch.int32)    # shuffled pages
        table = torch.zeros(batch, max(per_req), dtype=torch.int32, device="cuda")
        pos = 0
        for r, n in enumerate(per_req):
            table[r, :n] = order[pos:pos + n]
            pos += n
        k = torch.randn(pages, page, hkv, d, device="cuda", dtype=DTYPE, generator=g)
        v = torch.randn_like(k)

        def fn(q, k, v):
            if "one-pass" in variant:                 # deterministic mode: no split-K
                with _deterministic():
                    return attnlib.attention(q, k, v, mask, backend="triton", block_table=table)
            return attnlib.attention(q, k, v, mask, backend="triton", block_table=table)
    group = f"paged decode B={batch} cache={cache}"
    _measure(benchmark, group, variant, fn, (q, k, v), 0.0, False, baseline=variant == "contiguous")
    kv_bytes = 2 * sum(kv_lens) * hkv * d * 2
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(tokens_per_s=round(batch / median), kv_gb_per_s=round(kv_bytes / median / 1e9, 1))


class _deterministic:
    """``torch.use_deterministic_algorithms(True)`` for a block: the triton backend then runs one pass."""

    def __enter__(self):
        self.was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.was)


@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    if _PLANS:
        _write_plans()
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


def _write_plans():
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    lines = [f"# Triton attention on plans: modifiers, block-sparse, chunked video, paged decode ({DTYPE})", "",
             f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
             f"triton {__import__('triton').__version__}. Median time; ratio to the group's baseline (same run).", "",
             "| group | variant | median (ms) | TFLOP/s | ratio |", "|---|---|---:|---:|---:|"]
    for group in dict.fromkeys(g for g, _ in _PLANS):
        rows = {v: x for (g, v), x in _PLANS.items() if g == group}
        base = next((x[0] for x in rows.values() if x[2]), None)
        for variant, (median, tflops, is_base) in rows.items():
            ratio = "baseline" if is_base else (f"{median / base:.3f}x" if base else "")
            lines.append(f"| {group} | {variant} | {median * 1e3:.3f} | {tflops:.1f} | {ratio} |")
    out = pathlib.Path(__file__).parent / "results" / f"triton_plans_{gpu}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------
# compile check without a GPU: shared memory, registers and spills of every shipped configuration
# ------------------------------------------------------------------------------------------------
#: kernel variants of the compile check: name -> constexpr flags (missing flags are off)
VARIANTS = {
    "plain": {},
    "causal": {"HAS_CAUSAL": True},
    "runs2+window": {"R": 2, "HAS_CAUSAL": True, "HAS_WINDOW": True},
    "key_valid": {"HAS_CAUSAL": True, "HAS_KEY_VALID": True},
    "modifiers": {"HAS_CAUSAL": True, "SOFTCAP": True, "HAS_ALIBI": True, "HAS_SINKS": True},
    "sparse": {"HAS_CAUSAL": True, "SPARSE": True},
    "sparse+layout": {"SPARSE": True, "LAYOUT": True},
    "paged16": {"HAS_CAUSAL": True, "PAGED": 1, "PAGE": 16},          # a page lookup per key
    "paged256": {"HAS_CAUSAL": True, "PAGED": 2, "PAGE": 256},        # one page per key tile
}
_FLAGS = ("HAS_CAUSAL", "HAS_WINDOW", "HAS_KEY_VALID", "SOFTCAP", "HAS_ALIBI", "HAS_SINKS", "PAGED", "SPARSE", "LAYOUT")


def compile_check(arch: int = 90, head_dims=((64, 64), (128, 128), (256, 256), (96, 96)),
                  dtypes=(torch.bfloat16, torch.float32), variants=None, only=None) -> list[str]:  # pragma: no cover
    """Compile every kernel (forward, split-K decode and its merge, dK/dV, dQ) in every variant of
    ``VARIANTS`` for ``sm_<arch>`` without a GPU; one line per kernel with shared memory, registers and
    spills (ptxas from triton's bundle)."""
    import itertools
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from attnlib_kernels._attn_bwd import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
    from attnlib_kernels._attn_fwd import _attn_fwd_kernel, _attn_fwd_split_kernel, _attn_split_merge_kernel
    from attnlib_kernels.attention import kernel_config

    bindir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next((p for p in (bindir / "ptxas-blackwell", bindir / "ptxas") if p.exists()), None)
    types = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    pointers = {"Lse": "*fp32", "Delta": "*fp32", "DLse": "*fp32", "OutPart": "*fp32", "LsePart": "*fp32",
                "Alibi": "*fp32", "Sinks": "*fp32", "KeyValid": "*i8", "Layout": "*i8", "Table": "*i32",
                "BlockTable": "*i32", "KvNum": "*i32", "KvIdx": "*i32", "QNum": "*i32", "QIdx": "*i32"}
    kernels = {"fwd": _attn_fwd_kernel, "split": _attn_fwd_split_kernel, "bwd_dkdv": _attn_bwd_dkdv_kernel,
               "bwd_dq": _attn_bwd_dq_kernel, "merge": _attn_split_merge_kernel}
    lines = []
    for kind, name, (d, dv), dtype in itertools.product(only or kernels, variants or VARIANTS, head_dims, dtypes):
        flags = VARIANTS[name]
        fn = kernels[kind]
        if kind in ("split", "merge") and (flags.get("SPARSE") or name not in ("plain", "modifiers", "paged16",
                                                                                  "paged256")):
            continue          # split-K decode: no block-sparse layouts; a few variants are enough
        if kind == "merge" and (d, dv) != head_dims[0]:
            continue
        sparse = (64, 64) if flags.get("SPARSE") else None
        cfg = kernel_config("fwd" if kind == "merge" else kind, d, dv, dtype, torch.device("cuda"),
                            deterministic=True, sparse_blocks=sparse if kind != "split" else None)
        const = dict(GROUP=2, D=d, DV=dv, R=flags.get("R", 1), GW=4 + 5 * flags.get("R", 1), PAGE=flags.get("PAGE", 1),
                     BLOCK_Q=cfg.block_q, BLOCK_K=cfg.block_k, ROWS=16,
                     BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
                     IEEE=dtype == torch.float32, **{f: flags.get(f, False) for f in _FLAGS})
        const = {n: c for n, c in const.items() if n in fn.arg_names}
        sig = {}
        for arg in fn.arg_names:
            if arg in const:
                sig[arg] = "constexpr"
            elif arg in pointers:
                sig[arg] = pointers[arg]
            elif arg[0].isupper():
                sig[arg] = types[dtype]
            else:
                sig[arg] = "fp32" if "scale" in arg or "cap_" in arg else "i32"
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
        tile = f"{const.get('ROWS', cfg.block_q) if kind == 'split' else cfg.block_q}x{cfg.block_k}"
        line = (f"{kind:8s} {name:13s} d={d:3d}/{dv:3d} {str(dtype)[6:]:8s} tile={tile} warps={cfg.num_warps} "
                f"stages={cfg.num_stages} smem={k.metadata.shared} regs={regs} spill_bytes={spills}")
        print(line, flush=True)
        lines.append(line)
    return lines


if __name__ == "__main__":  # pragma: no cover
    if "--compile-check" in sys.argv:
        quick = "--quick" in sys.argv          # one head dim, bf16: a smoke test of every kernel variant
        pick = {a.split("=")[0]: a.split("=")[1].split(",") for a in sys.argv if a.startswith(("--kernels=",
                                                                                                  "--variants="))}
        compile_check(head_dims=((128, 128),) if quick else ((64, 64), (128, 128), (256, 256), (96, 96)),
                      dtypes=(torch.bfloat16,) if quick else (torch.bfloat16, torch.float32),
                      variants=pick.get("--variants"), only=pick.get("--kernels"))
    else:
        print(__doc__)
