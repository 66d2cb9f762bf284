"""Recovering attnlib masks from the dense masks host libraries pass (attnlib.integrations._structure)."""
import pytest
import torch

import attnlib
from attnlib import BlockDiagonal, Causal, DenseMask, KeyPadding
from attnlib.integrations._structure import TensorKeyedCache, translate_dense
from attnlib.testing import assert_close_to_reference

try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def run_both(mask4, B, Sq, Sk, Hq=4, Hkv=2, D=8):
    """(translation, its output, exact DenseMask output) in float64 on the math backend."""
    q, k, v = rand(B, Sq, Hq, D), rand(B, Sk, Hkv, D, seed=1), rand(B, Sk, Hkv, D, seed=2)
    t = translate_dense(mask4, B, Sq, Sk)
    got = t.run(q, k, v, backend="math")
    want = attnlib.attention(q, k, v, DenseMask(mask4), backend="math")
    return t, got, want


def same(got, want):
    """Both computed in float64 on ``math``: the policy's float64 floor is the whole budget."""
    assert_close_to_reference(got, want, want, torch.float64, what="translation vs DenseMask")


def tril(sq, sk):
    return Causal().materialize(sq, sk)


def test_plain_causal_mask_becomes_causal():
    t, got, want = run_both(tril(6, 6)[None, None], 2, 6, 6)
    assert t.mask == Causal()
    same(got, want)


def test_sliding_window_mask_becomes_windowed_causal():
    t, got, want = run_both(Causal(window=3).materialize(7, 7)[None, None], 1, 7, 7)
    assert t.mask == Causal(window=3)
    same(got, want)


def test_empty_static_cache_tail_becomes_top_left_causal():
    t, _, _ = run_both(Causal(align="top_left").materialize(4, 9)[None, None], 1, 4, 9)
    assert t.mask == Causal(align="top_left")


def test_decode_step_with_left_padding_becomes_key_padding():
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    t, got, want = run_both(valid[:, None, None, :], 2, 1, 5)
    assert isinstance(t.mask, KeyPadding) and torch.equal(t.mask.valid, valid)
    same(got, want)


def test_left_padded_prompt_becomes_packed_causal_blocks_and_pad_rows_return_zero():
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    mask = (tril(6, 6)[None] & valid[:, None, :])[:, None]
    t, got, want = run_both(mask, 2, 6, 6)
    assert t.kind == "packed" and t.mask == BlockDiagonal([4, 6], causal=True)
    same(got, want)
    assert got[0, :2].abs().max() == 0  # padded queries see nothing: 0, never NaN


def test_sequences_packed_in_one_row_become_block_diagonal():
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    mask = ((seg[:, None] == seg[None, :]) & tril(8, 8))[None, None]
    t, got, want = run_both(mask, 1, 8, 8)
    assert t.mask == BlockDiagonal([3, 2, 3], causal=True)
    assert t.parts[0].q_index is None and t.parts[0].kv_index is None  # already packed: no gather
    same(got, want)


def test_bidirectional_segments_become_full_blocks():
    seg = torch.tensor([0, 0, 1, 1, 1])
    t, got, want = run_both((seg[:, None] == seg[None, :])[None, None], 1, 5, 5)
    assert t.mask == BlockDiagonal([2, 3])
    same(got, want)


def test_chunked_prefill_against_left_padded_cache_keeps_kv_offsets():
    valid = torch.tensor([[False, False, True, True, True, True, True, True], [True] * 8])
    mask = (tril(3, 8)[None] & valid[:, None, :])[:, None]
    t, got, want = run_both(mask, 2, 3, 8)
    assert t.mask == BlockDiagonal([3, 3], [6, 8], causal=True)
    same(got, want)


def test_row_with_a_hole_falls_back_to_dense_and_says_why():
    mask = tril(5, 5).clone()
    mask[4, 1] = False
    t, got, want = run_both(mask[None, None], 1, 5, 5)
    assert t.kind == "dense" and "contiguous" in t.reason
    same(got, want)


def test_right_padding_runs_prompt_causal_and_padded_queries_as_one_full_block():
    """Padded queries after a prompt all see the prompt's keys: a second, non-causal call, not a dense mask."""
    valid = torch.tensor([[True] * 9 + [False] * 3, [True] * 12])
    t, got, want = run_both((tril(12, 12)[None] & valid[:, None, :])[:, None], 2, 12, 12)
    assert t.mask == (BlockDiagonal([9, 12], causal=True), BlockDiagonal([3], [9]))
    same(got, want)


def test_overlapping_runs_without_causal_or_shared_shape_fall_back_to_dense():
    anti = Causal().materialize(8, 8).flip(0)  # query i sees keys 0 .. 7 - i
    t, got, want = run_both(anti[None, None], 1, 8, 8)
    assert t.kind == "dense" and "gather" in t.reason
    same(got, want)


def test_per_head_masks_and_score_biases_stay_dense():
    per_head = torch.stack([tril(4, 4), tril(4, 4).T])[None]
    assert translate_dense(per_head, 1, 4, 4).reason == "the mask differs between heads"
    bias = torch.zeros(1, 1, 4, 4, dtype=torch.float32)
    bias[..., 0] = 0.5
    t = translate_dense(bias, 1, 4, 4)
    assert t.kind == "dense" and t.mask.mask is bias


def test_transformers_style_additive_mask_is_read_as_bool():
    additive = torch.zeros(4, 4).masked_fill(~tril(4, 4), torch.finfo(torch.float32).min)
    assert translate_dense(additive[None, None], 2, 4, 4).mask == Causal()


def test_tensor_keyed_cache_keeps_one_translation_per_mask_tensor_until_it_changes():
    cache, built = TensorKeyedCache(), []
    mask = tril(4, 4)[None, None].clone()

    def build():
        built.append(1)
        return translate_dense(mask, 1, 4, 4)

    first = cache.get(mask, build)
    assert cache.get(mask, build) is first and len(built) == 1
    mask[0, 0, 3, 1] = False  # in-place edit bumps the version: translated again
    assert cache.get(mask, build).kind == "dense" and len(built) == 2


if given is not None:
    @given(st.integers(1, 3), st.integers(1, 7), st.integers(0, 4), st.sampled_from(["left", "right", "none"]),
           st.booleans(), st.integers(0, 2**31 - 1))
    def test_any_padded_or_packed_causal_mask_runs_exactly(B, Sq, extra, pad, pack, seed):
        """Whatever translation is chosen, it computes the dense mask's attention exactly."""
        g = torch.Generator().manual_seed(seed)
        Sk = Sq + extra
        mask = tril(Sq, Sk).expand(B, Sq, Sk).clone()
        if pad != "none":
            n_pad = torch.randint(0, Sk, (B,), generator=g)
            ar = torch.arange(Sk)
            valid = ar[None] >= n_pad[:, None] if pad == "left" else ar[None] < (Sk - n_pad)[:, None]
            mask &= valid[:, None, :]
        if pack and Sq == Sk and Sk > 1:
            cut = int(torch.randint(1, Sk, (1,), generator=g))
            seg = (torch.arange(Sk) >= cut).long()
            mask &= (seg[:, None] == seg[None, :])
        _, got, want = run_both(mask[:, None], B, Sq, Sk)
        same(got, want)
