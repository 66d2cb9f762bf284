"""attnlib's sdpa backend against raw SDPA and hand-written loops (targets as ratios).

Targets: varlen <= 1.1x the per-sequence loop, CFG <= 1.1x separate calls, decode <= 1.1x raw SDPA,
small-call overhead <= 5 %.
"""
import torch
import torch.nn.functional as F

import attnlib
from attnlib import BlockDiagonal, Causal

from harness import DEVICE, DTYPE, run

H, D = 8, 64


def rand(*shape):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE)


def raw_sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw).transpose(1, 2)


# -- small dense call: front-door overhead ---------------------------------------------------------
SMALL = (rand(1, 128, H, D), rand(1, 128, H, D), rand(1, 128, H, D))


def test_small_call_raw_sdpa(benchmark):
    run(benchmark, "small dense call (1x128, H8, D64)", "raw SDPA", lambda: raw_sdpa(*SMALL), baseline=True)


def test_small_call_attnlib(benchmark):
    run(benchmark, "small dense call (1x128, H8, D64)", "attnlib sdpa", lambda: attnlib.attention(*SMALL, backend="sdpa"))


def test_small_call_attnlib_auto(benchmark):
    run(benchmark, "small dense call (1x128, H8, D64)", "attnlib auto", lambda: attnlib.attention(*SMALL))


# -- packed varlen ------------------------------------------------------------------------------------
LENS = [317, 64, 1021, 250, 513, 128, 700, 90]
VARLEN = BlockDiagonal(LENS)
VQ, VK, VV = rand(sum(LENS), H, D), rand(sum(LENS), H, D), rand(sum(LENS), H, D)


def _loop():
    outs = []
    for q, k, v in zip(VARLEN.split(VQ), VARLEN.split(VK), VARLEN.split(VV)):
        outs.append(raw_sdpa(q[None], k[None], v[None])[0])
    return torch.cat(outs)


def test_varlen_per_sequence_loop(benchmark):
    run(benchmark, "varlen 8 seqs (3083 tokens)", "per-sequence SDPA loop", _loop, baseline=True)


def test_varlen_attnlib(benchmark):
    run(benchmark, "varlen 8 seqs (3083 tokens)", "attnlib sdpa BlockDiagonal",
        lambda: attnlib.attention(VQ, VK, VV, VARLEN, backend="sdpa"))


DENSE_BLOCK = VARLEN.materialize(device=DEVICE)


def test_varlen_dense_block_mask(benchmark):
    run(benchmark, "varlen 8 seqs (3083 tokens)", "SDPA with dense [T,T] block mask",
        lambda: raw_sdpa(VQ[None], VK[None], VV[None], attn_mask=DENSE_BLOCK))


# -- CFG branches with different cache lengths -------------------------------------------------------
CFG = BlockDiagonal([1024, 1024, 1024], [1536, 1280, 1024])
CQ, CK, CV = rand(CFG.total_q, H, D), rand(CFG.total_k, H, D), rand(CFG.total_k, H, D)


def test_cfg_separate_calls(benchmark):
    def separate():
        return [raw_sdpa(q[None], k[None], v[None]) for q, k, v in
                zip(CFG.split(CQ), CFG.split(CK, kv=True), CFG.split(CV, kv=True))]
    run(benchmark, "CFG 3 branches (q 1024, kv 1536/1280/1024)", "separate SDPA calls", separate, baseline=True)


def test_cfg_attnlib(benchmark):
    run(benchmark, "CFG 3 branches (q 1024, kv 1536/1280/1024)", "attnlib sdpa one call",
        lambda: attnlib.attention(CQ, CK, CV, CFG, backend="sdpa"))


# -- decode against an 8k cache -----------------------------------------------------------------------
DQ, DK, DV = rand(4, 1, 32, 128), rand(4, 8192, 8, 128), rand(4, 8192, 8, 128)


def test_decode_raw_sdpa(benchmark):
    run(benchmark, "decode 1 query vs 8k cache (B4, Hq32, Hkv8, D128)", "raw SDPA (enable_gqa)",
        lambda: raw_sdpa(DQ, DK, DV, enable_gqa=True), baseline=True)


def test_decode_attnlib(benchmark):
    run(benchmark, "decode 1 query vs 8k cache (B4, Hq32, Hkv8, D128)", "attnlib sdpa Causal()",
        lambda: attnlib.attention(DQ, DK, DV, Causal(), backend="sdpa"))


def test_decode_attnlib_lse(benchmark):
    run(benchmark, "decode 1 query vs 8k cache (B4, Hq32, Hkv8, D128)", "attnlib sdpa Causal() + LSE",
        lambda: attnlib.attention(DQ, DK, DV, Causal(), backend="sdpa", return_lse=True))
