"""flex vs sdpa on block-diagonal workloads (varlen packing, CFG branches): is flex worth it in auto order?

Variants per group: the per-sequence SDPA loop (baseline), attnlib ``sdpa`` (its varlen lowering: equal
blocks batched, others one call each on views), attnlib ``flex`` (one compiled kernel over a BlockMask),
and one SDPA call over a materialized ``[T, T]`` block-diagonal mask. Compilation and block-mask builds
happen in the warm-up rounds; the timed rounds are the steady state of repeated layers.

    pytest bench/bench_flex.py --benchmark-only --benchmark-json=/tmp/flex.json
    python bench/report.py /tmp/flex.json

On a shared machine the sequential pytest-benchmark rounds drift with other load; ``python
bench/bench_flex.py [rounds]`` times the variants round-robin (each round runs every variant once) and
prints the medians, which is what bench/results/flex_cpu.md records.
"""
import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib import BlockDiagonal

from harness import DEVICE, DTYPE, interleaved_medians, run as _run

H, D = 8, 64
ROUNDS = 10 if DEVICE == "cpu" else 100

#: 8 ragged sequences, 64..512 tokens (fixed draw)
VARLEN = [64, 317, 512, 133, 402, 96, 251, 480]
#: 2 CFG branches: same image tokens, different text lengths in the keys
CFG_Q, CFG_KV = [1024, 1024], [1024 + 226, 1024 + 77]


_GEN = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=_GEN).to(device=DEVICE, dtype=DTYPE)


def run(benchmark, group, variant, fn, baseline=False):
    _run(benchmark, group, variant, fn, baseline, rounds=ROUNDS, warmup_rounds=2)


def packed(q_lens, kv_lens):
    return rand(sum(q_lens), H, D), rand(sum(kv_lens), H, D), rand(sum(kv_lens), H, D)


def loop(q, k, v, mask: BlockDiagonal):
    """The hand-written reference: one SDPA call per sequence."""
    outs = []
    for qs, ks, vs in zip(mask.split(q), mask.split(k, kv=True), mask.split(v, kv=True)):
        # 4-D [1, H, L, D]: 3-D inputs would miss SDPA's fused CPU kernel and take the math path
        o = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                           vs.transpose(0, 1)[None], is_causal=mask.causal)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def dense_mask_sdpa(q, k, v, bool_mask):
    return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                          attn_mask=bool_mask)[0].transpose(0, 1)


CASES = {
    "varlen 8 seqs 64..512 (T=2255), H8 D64": BlockDiagonal(VARLEN),
    "varlen causal 8 seqs 64..512 (T=2255), H8 D64": BlockDiagonal(VARLEN, causal=True),
    "CFG 2 branches q 2x1024, kv 1250/1101, H8 D64": BlockDiagonal(CFG_Q, CFG_KV),
}
_INPUTS = {}


def inputs(group):
    if group not in _INPUTS:
        mask = CASES[group]
        q, k, v = packed(mask.q_seqlens, mask.kv_seqlens)
        _INPUTS[group] = (q, k, v, mask, mask.materialize(device=DEVICE))
    return _INPUTS[group]


@pytest.mark.parametrize("group", list(CASES))
def test_per_sequence_loop(benchmark, group):
    q, k, v, mask, _ = inputs(group)
    if mask.causal and mask.q_seqlens != mask.kv_seqlens:
        pytest.skip("the loop uses is_causal, top-left: only for equal q/kv lengths")
    run(benchmark, group, "per-sequence SDPA loop", lambda: loop(q, k, v, mask), baseline=True)


@pytest.mark.parametrize("group", list(CASES))
def test_attnlib_sdpa(benchmark, group):
    q, k, v, mask, _ = inputs(group)
    run(benchmark, group, "attnlib sdpa", lambda: attnlib.attention(q, k, v, mask, backend="sdpa"))


@pytest.mark.parametrize("group", list(CASES))
def test_attnlib_flex(benchmark, group):
    q, k, v, mask, _ = inputs(group)
    run(benchmark, group, "attnlib flex", lambda: attnlib.attention(q, k, v, mask, backend="flex"))


@pytest.mark.parametrize("group", list(CASES))
def test_dense_block_mask_sdpa(benchmark, group):
    q, k, v, _, bool_mask = inputs(group)
    run(benchmark, group, "SDPA + dense [T,T] mask", lambda: dense_mask_sdpa(q, k, v, bool_mask))


#: dense calls, for contrast (the auto order question is only about block-diagonal work)
DENSE = {"dense full 1x2048, H8 D64": None, "dense causal 1x2048, H8 D64": attnlib.Causal()}


def _guard_off(fn):
    """``fn`` with flex's CPU shape guard switched off (dynamic shapes, no padding): what the guard costs."""
    import os
    from attnlib.backends.flex import ENV_CPU_GUARD

    def call():
        os.environ[ENV_CPU_GUARD] = "0"
        try:
            return fn()
        finally:
            del os.environ[ENV_CPU_GUARD]
    return call


def variants(group):
    if group in DENSE:
        q, k, v = rand(1, 2048, H, D), rand(1, 2048, H, D), rand(1, 2048, H, D)
        mask = DENSE[group]
        out = {
            "raw SDPA": lambda: F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=mask is not None),
            "attnlib sdpa": lambda: attnlib.attention(q, k, v, mask, backend="sdpa"),
            "attnlib flex": lambda: attnlib.attention(q, k, v, mask, backend="flex"),
        }
        if DEVICE == "cpu":
            out["attnlib flex, CPU guard off"] = _guard_off(out["attnlib flex"])
        return out
    q, k, v, mask, bool_mask = inputs(group)
    out = {
        "per-sequence SDPA loop": lambda: loop(q, k, v, mask),
        "attnlib sdpa": lambda: attnlib.attention(q, k, v, mask, backend="sdpa"),
        "attnlib flex": lambda: attnlib.attention(q, k, v, mask, backend="flex"),
        "SDPA + dense [T,T] mask": lambda: dense_mask_sdpa(q, k, v, bool_mask),
    }
    if DEVICE == "cpu":
        out["attnlib flex, CPU guard off"] = _guard_off(out["attnlib flex"])
    return out


def interleaved(rounds: int = 15) -> None:
    """Round-robin timing, medians in ms, ratios to the per-sequence loop, as a markdown table."""
    print(f"torch {torch.__version__}, device {DEVICE}, dtype {str(DTYPE)[6:]}, threads {torch.get_num_threads()}, "
          f"{rounds} interleaved rounds")
    print()
    print("| workload | variant | median (ms) | vs first row |")
    print("|---|---|---:|---:|")
    for group in [*CASES, *DENSE]:
        med = {name: t * 1e3 for name, t in interleaved_medians(variants(group), rounds).items()}
        base = next(iter(med.values()))
        for name, ms in med.items():
            print(f"| {group} | {name} | {ms:.1f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    import sys
    interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
