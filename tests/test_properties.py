"""Property tests: random varlen splits, paddings and causal parameters against per-sequence math."""
import pytest
import torch
from hypothesis import given, strategies as st

import attnlib
from attnlib import BlockDiagonal, Causal, KeyPadding
from attnlib.testing import assert_close_to_reference, reference_and_naive

FAST = [r["name"] for r in attnlib.list_backends() if r["available"] and r["name"] in ("sdpa", "math")]

lengths = st.lists(st.integers(0, 9), min_size=1, max_size=5).filter(lambda xs: sum(xs) > 0)


@pytest.mark.parametrize("backend", FAST)
@given(q_lens=lengths, extra=st.lists(st.integers(0, 4), min_size=5, max_size=5), causal=st.booleans(),
       window=st.one_of(st.none(), st.integers(1, 6)), hkv=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_packed_blocks_equal_each_sequence_alone(backend, q_lens, extra, causal, window, hkv, seed):
    kv_lens = [n + e for n, e in zip(q_lens, extra)]
    window = window if causal else None
    m = BlockDiagonal(q_lens, kv_lens, causal=causal, window=window)
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(m.total_q, 2, 8, generator=g), torch.randn(m.total_k, hkv, 8, generator=g), \
        torch.randn(m.total_k, hkv, 8, generator=g)
    out, lse = attnlib.attention(q, k, v, m, backend=backend, return_lse=True)
    for b, (qs, ks, vs) in enumerate(zip(m.split(q), m.split(k, kv=True), m.split(v, kv=True))):
        if qs.shape[0] == 0:
            continue
        mask = Causal(window=window) if causal else None
        (ref, ref_lse), (naive, naive_lse) = reference_and_naive(qs, ks, vs, mask, 8 ** -0.5, packed=True)
        assert_close_to_reference(m.split(out)[b], ref, naive, torch.float32)
        assert_close_to_reference(lse[:, m.cu_seqlens_q[b]:m.cu_seqlens_q[b + 1]], ref_lse, naive_lse, torch.float32, "lse")


@pytest.mark.parametrize("backend", FAST)
@given(b=st.integers(1, 3), sq=st.integers(1, 7), sk=st.integers(1, 9), seed=st.integers(0, 2**16),
       p=st.floats(0.0, 1.0))
def test_any_key_padding_pattern_matches_the_reference(backend, b, sq, sk, seed, p):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(b, sk, generator=g) < p
    q, k, v = torch.randn(b, sq, 2, 8, generator=g), torch.randn(b, sk, 2, 8, generator=g), torch.randn(b, sk, 2, 8, generator=g)
    out, lse = attnlib.attention(q, k, v, KeyPadding(valid), backend=backend, return_lse=True)
    (ref, ref_lse), (naive, naive_lse) = reference_and_naive(q, k, v, KeyPadding(valid), 8 ** -0.5, packed=False)
    assert_close_to_reference(out, ref, naive, torch.float32)
    assert_close_to_reference(lse, ref_lse, naive_lse, torch.float32, "lse")
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("backend", FAST)
@given(sq=st.integers(1, 9), sk=st.integers(1, 12), top_left=st.booleans(), window=st.one_of(st.none(), st.integers(1, 8)),
       seed=st.integers(0, 2**16))
def test_any_causal_alignment_and_window_matches_the_reference(backend, sq, sk, top_left, window, seed):
    mask = Causal(align="top_left" if top_left else "bottom_right", window=window)
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(1, sq, 2, 8, generator=g), torch.randn(1, sk, 1, 8, generator=g), torch.randn(1, sk, 1, 8, generator=g)
    out, lse = attnlib.attention(q, k, v, mask, backend=backend, return_lse=True)
    (ref, ref_lse), (naive, naive_lse) = reference_and_naive(q, k, v, mask, 8 ** -0.5, packed=False)
    assert_close_to_reference(out, ref, naive, torch.float32)
    assert_close_to_reference(lse, ref_lse, naive_lse, torch.float32, "lse")
