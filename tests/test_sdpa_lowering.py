"""How the sdpa backend lowers masks: what reaches torch's SDPA, and what never does."""
import pytest
import torch

import attnlib
from attnlib import BlockDiagonal, Causal, KeyPadding
from attnlib.backends import sdpa as sdpa_mod


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = sdpa_mod.F.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "is_causal": is_causal,
                      "mask": None if attn_mask is None else tuple(attn_mask.shape), **kw})
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(sdpa_mod.F, "scaled_dot_product_attention", record)
    return calls


def t(*shape):
    return torch.randn(*shape)


def test_bottom_right_causal_never_uses_is_causal_when_lengths_differ(spy):
    attnlib.attention(t(1, 4, 2, 8), t(1, 9, 2, 8), t(1, 9, 2, 8), Causal(), backend="sdpa")
    assert spy[-1]["is_causal"] is False and spy[-1]["mask"] == (4, 9)
    attnlib.attention(t(1, 9, 2, 8), t(1, 9, 2, 8), t(1, 9, 2, 8), Causal(), backend="sdpa")
    assert spy[-1]["is_causal"] is True and spy[-1]["mask"] is None


def test_one_token_decode_needs_no_mask(spy):
    attnlib.attention(t(2, 1, 4, 8), t(2, 50, 4, 8), t(2, 50, 4, 8), Causal(), backend="sdpa")
    assert spy[-1]["mask"] is None and spy[-1]["is_causal"] is False


def test_gqa_never_expands_kv(spy):
    # a query-independent mask: each kv group's query heads fold into the query axis
    attnlib.attention(t(1, 5, 8, 8), t(1, 5, 2, 8), t(1, 5, 2, 8), backend="sdpa")
    assert spy[-1]["q"] == (1, 2, 20, 8) and spy[-1]["k"] == (1, 2, 5, 8) and "enable_gqa" not in spy[-1]
    # a causal mask depends on the query position: enable_gqa
    attnlib.attention(t(1, 5, 8, 8), t(1, 5, 2, 8), t(1, 5, 2, 8), Causal(), backend="sdpa")
    assert spy[-1]["k"] == (1, 2, 5, 8) and spy[-1]["enable_gqa"] is True


def test_equal_length_blocks_become_one_batched_call(spy):
    attnlib.attention(t(12, 2, 8), t(12, 2, 8), t(12, 2, 8), BlockDiagonal([4, 4, 4]), backend="sdpa")
    assert len(spy) == 1 and spy[0]["q"] == (3, 2, 4, 8) and spy[0]["mask"] is None


def test_block_diagonal_never_builds_a_token_by_token_mask(spy):
    m = BlockDiagonal([3, 5, 5, 2], [7, 5, 5, 9], causal=True)
    attnlib.attention(t(15, 2, 8), t(26, 2, 8), t(26, 2, 8), m, backend="sdpa")
    assert [c["q"][0] for c in spy] == [1, 2, 1]       # runs: [3x7], [5x5, 5x5], [2x9]
    assert all(c["mask"] is None or c["mask"] == (c["q"][2], c["k"][2]) for c in spy)


def test_cfg_branches_with_different_cache_lengths_run_as_one_call_each(spy):
    m = BlockDiagonal([6, 6, 6], [20, 14, 9])
    attnlib.attention(t(18, 2, 8), t(43, 2, 8), t(43, 2, 8), m, backend="sdpa")
    assert [c["k"][2] for c in spy] == [20, 14, 9]


def test_fully_masked_rows_give_zero_output_and_finite_gradients():
    q, k, v = (t(2, 6, 2, 8).requires_grad_() for _ in range(3))
    valid = torch.tensor([[False] * 6, [True] * 3 + [False] * 3])
    out, lse = attnlib.attention(q, k, v, KeyPadding(valid), backend="sdpa", return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isinf(lse[0]).all() and (lse[0] < 0).all()
    out.sum().backward()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
    assert torch.equal(k.grad[1, 3:], torch.zeros_like(k.grad[1, 3:]))  # padded keys get no gradient


def test_zero_length_key_blocks_return_zero():
    m = BlockDiagonal([2, 3], [0, 4])
    out, lse = attnlib.attention(t(5, 2, 8), t(4, 2, 8), t(4, 2, 8), m, backend="sdpa", return_lse=True)
    assert torch.equal(out[:2], torch.zeros(2, 2, 8)) and torch.isinf(lse[:, :2]).all()
    assert torch.isfinite(lse[:, 2:]).all()
