"""attnlib's host cost per call where the kernels are tiny: small decoders (a talker, a code predictor)
and many short packed sequences. Ratios to a baseline timed in the same run, one thread.

Groups:
- tiny decode step (q ``[2, 1, 4, 16]``, k/v ``[2, 12, 2, 16]``): raw SDPA with the same boolean mask vs
  attnlib with ``KeyPadding`` (one mask object reused, as a model reuses it across layers) and ``Causal()``;
- many short packed sequences (8 / 64 / 512 sequences of 4-64 tokens, causal): a per-sequence SDPA loop vs
  one attnlib call with ``BlockDiagonal``;
- a tiny transformers Qwen2 ``generate`` on a padded batch: ``attn_implementation="sdpa"`` vs ``"attnlib"``.
"""
import random

import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib import BlockDiagonal, Causal, KeyPadding

from harness import run

torch.set_num_threads(1)

# -- tiny decode step ---------------------------------------------------------------------------------
Q, K, V = torch.randn(2, 1, 4, 16), torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
VALID = torch.ones(2, 12, dtype=torch.bool)
VALID[0, :3] = False                                  # a left-padded row
PADDING = KeyPadding(VALID)
BOOL = VALID[:, None, None, :]
GROUP = "tiny decode step (q [2,1,4,16], k/v [2,12,2,16])"


def test_tiny_decode_raw_sdpa(benchmark):
    qh, kh, vh = Q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2)
    run(benchmark, GROUP, "raw SDPA, bool mask", lambda: F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=BOOL, enable_gqa=True).transpose(1, 2), baseline=True, rounds=2000)


def test_tiny_decode_attnlib_key_padding(benchmark):
    run(benchmark, GROUP, "attnlib sdpa KeyPadding", lambda: attnlib.attention(Q, K, V, PADDING, backend="sdpa"),
        rounds=2000)


def test_tiny_decode_attnlib_causal(benchmark):
    run(benchmark, GROUP, "attnlib sdpa Causal()", lambda: attnlib.attention(Q, K, V, Causal(), backend="sdpa"),
        rounds=2000)


# -- many short packed sequences ---------------------------------------------------------------------------
def _packed(n: int, seed: int = 0):
    rng = random.Random(seed)
    lens = [rng.randint(4, 64) for _ in range(n)]
    mask = BlockDiagonal(lens, causal=True)
    q, k, v = (torch.randn(mask.total_q, 4, 16) for _ in range(3))
    return mask, q, k, v


@pytest.mark.parametrize("n", [8, 64, 512])
def test_many_short_loop(benchmark, n):
    mask, q, k, v = _packed(n)

    def loop():
        outs = []
        for qi, ki, vi in zip(mask.split(q), mask.split(k), mask.split(v)):
            outs.append(F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1),
                                                       is_causal=True).transpose(0, 1))
        return torch.cat(outs)
    run(benchmark, f"{n} packed causal sequences of 4-64 tokens (H4, D16)", "per-sequence SDPA loop", loop,
        baseline=True, rounds=50)


@pytest.mark.parametrize("n", [8, 64, 512])
def test_many_short_attnlib(benchmark, n):
    mask, q, k, v = _packed(n)
    run(benchmark, f"{n} packed causal sequences of 4-64 tokens (H4, D16)", "attnlib sdpa BlockDiagonal",
        lambda: attnlib.attention(q, k, v, mask, backend="sdpa"), rounds=50)


# -- a tiny transformers model, generating -------------------------------------------------------------------
def _qwen2(impl: str):
    transformers = pytest.importorskip("transformers")
    import attnlib.integrations.transformers as hf

    hf.register()
    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.set_attn_implementation(impl)
    ids = torch.randint(1, 97, (2, 9))
    pad = torch.ones(2, 9, dtype=torch.long)
    pad[0, :3] = 0                                       # left padding
    return model, ids, pad


@pytest.mark.parametrize("impl", ["sdpa", "attnlib"])
def test_tiny_generate(benchmark, impl):
    model, ids, pad = _qwen2(impl)

    def generate():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=pad, max_new_tokens=16, do_sample=False,
                                  pad_token_id=0)
    run(benchmark, "tiny Qwen2 generate (2 layers, padded batch of 2, 16 new tokens)", f"attn_implementation={impl!r}",
        generate, baseline=impl == "sdpa", rounds=20)
