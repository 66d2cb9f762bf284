"""The plan is the one visibility rule: checked against the independent oracle, restricted, printed."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnlib.masks import BlockDiagonal, Causal, DenseMask, KeyPadding
from attnlib.plan import Tile, plan_for
from tests.reference64 import visibility

lengths = st.integers(0, 9)


@st.composite
def masks_and_shapes(draw):
    kind = draw(st.sampled_from(["none", "causal", "top_left", "block", "padding", "padding_causal"]))
    window = draw(st.one_of(st.none(), st.integers(1, 6)))
    if kind == "block":
        n = draw(st.integers(1, 4))
        ql = draw(st.lists(lengths, min_size=n, max_size=n))
        kl = draw(st.lists(lengths, min_size=n, max_size=n))
        causal = draw(st.booleans())
        m = BlockDiagonal(ql, kl, causal=causal, window=window if causal else None)
        return m, m.total_q, m.total_k, 1
    sq, sk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    if kind == "none":
        return None, sq, sk, 1
    if kind in ("causal", "top_left"):
        return Causal(align="top_left" if kind == "top_left" else "bottom_right", window=window), sq, sk, 1
    b = draw(st.integers(1, 3))
    valid = torch.tensor(draw(st.lists(st.booleans(), min_size=b * sk, max_size=b * sk))).view(b, sk)
    causal = kind == "padding_causal"
    return KeyPadding(valid, causal=causal, window=window if causal else None), sq, sk, b


def _oracle(mask, b, sq, sk):
    keep, _ = visibility(mask, b, sq, sk)
    return keep.expand(b, 1, sq, sk)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(masks_and_shapes())
def test_plan_materialize_and_empty_rows_match_the_oracle(case):
    mask, sq, sk, b = case
    plan = plan_for(mask, sq, sk)
    want = _oracle(mask, b, sq, sk)
    got = plan.materialize()
    assert torch.equal(got.expand(b, 1, sq, sk), want)
    empty = plan.empty_rows_on("cpu")
    want_empty = ~want.any(-1)                                        # [B, 1, Sq]
    if empty is None:
        assert not want_empty.any()
    else:
        assert torch.equal(empty.expand(b, 1, sq), want_empty)
    if plan.structured:   # the structural runs name exactly the empty rows
        rows = torch.zeros(sq, dtype=torch.bool)
        for s, e in plan.empty_row_runs():
            rows[s:e] = True
        assert torch.equal(rows, want_empty[0, 0])
        lo, hi = plan.runs_table()
        j = torch.arange(sk)
        assert torch.equal(((j >= lo[..., None]) & (j <= hi[..., None])).any(0), want[0, 0])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(masks_and_shapes(), st.data())
def test_restrict_is_the_slice_of_the_whole(case, data):
    mask, sq, sk, b = case
    q0 = data.draw(st.integers(0, sq))
    q1 = data.draw(st.integers(q0, sq))
    k0 = data.draw(st.integers(0, sk))
    k1 = data.draw(st.integers(k0, sk))
    whole = _oracle(mask, b, sq, sk)
    part = plan_for(mask, sq, sk).restrict((q0, q1), (k0, k1))
    assert (part.seqlen_q, part.seqlen_k) == (q1 - q0, k1 - k0)
    assert torch.equal(part.materialize().expand(b, 1, q1 - q0, k1 - k0), whole[:, :, q0:q1, k0:k1])
    # restricting twice composes
    if q1 > q0 and k1 > k0:
        again = part.restrict((1 if q1 - q0 > 1 else 0, q1 - q0), (0, k1 - k0))
        lo = 1 if q1 - q0 > 1 else 0
        assert torch.equal(again.materialize().expand(b, 1, q1 - q0 - lo, k1 - k0), whole[:, :, q0 + lo:q1, k0:k1])


def test_dense_mask_plan_and_restrict():
    m = torch.rand(2, 1, 5, 7) > 0.5
    plan = plan_for(DenseMask(m), 5, 7)
    assert torch.equal(plan.materialize(), m)
    assert torch.equal(plan.restrict((1, 4), (2, 6)).materialize(), m[:, :, 1:4, 2:6])
    bias = torch.randn(5, 7).masked_fill(~m[0, 0], float("-inf"))
    assert torch.equal(plan_for(DenseMask(bias), 5, 7).empty_rows_on("cpu")[0, 0], ~m[0, 0].any(-1))


def test_structured_plans_are_cached_and_built_from_python_ints():
    a = plan_for(BlockDiagonal([3, 2], causal=True), 5, 5)
    assert plan_for(BlockDiagonal([3, 2], causal=True), 5, 5) is a
    assert a.tiles == (Tile(0, 3, 0, 3, True, 0, None), Tile(3, 2, 3, 2, True, 0, None))
    assert [(q0, k0, n) for q0, k0, n, _, _ in a.runs()] == [(0, 0, 1), (3, 3, 1)]
    cfg = plan_for(BlockDiagonal([4, 4], [6, 6]), 8, 12)
    assert [(q0, k0, n, step) for q0, k0, n, step, _ in cfg.runs()] == [(0, 0, 2, 6)]   # CFG branches: one batched call
    assert plan_for(Causal(), 1, 9).full and not plan_for(Causal(), 2, 9).full


def test_describe_names_blocks_offsets_and_empty_rows():
    text = plan_for(BlockDiagonal([2, 3], [3, 1], causal=True), 5, 4).describe()
    assert "q[0:2] x k[0:3]: 2x3 causal offset 1" in text
    assert "q[2:5] x k[3:4]: 3x1 causal offset -2" in text
    assert "rows with no key: 2:4" in text
    assert "window 3" in plan_for(Causal(window=3), 4, 4).describe()


def test_restrict_checks_its_ranges():
    plan = plan_for(Causal(), 4, 4)
    with pytest.raises(ValueError, match="q_range"):
        plan.restrict((2, 5), (0, 4))
    with pytest.raises(TypeError, match="k_range"):
        plan.restrict((0, 4), "all")


def test_key_padding_causal_fields_are_validated():
    v = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs causal=True"):
        KeyPadding(v, window=2)
    with pytest.raises(TypeError, match="causal"):
        KeyPadding(v, causal=1)
    assert KeyPadding(v, causal=True, window=2).features() == {"key_padding", "causal", "window"}


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_a_mask_written_in_place_is_lowered_again(backend):
    """Lowered masks are cached while their tensors are unchanged: an in-place write (a static cache's validity
    advancing one slot per decode step) must reach the next call, on the fast path too."""
    import attnlib
    from tests.reference64 import attention64

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, s, 4, 8, generator=g) for s in (1, 6, 6))
    valid = torch.zeros(2, 6, dtype=torch.bool)
    valid[:, :2] = True
    mask = KeyPadding(valid)
    for step in range(2, 6):
        valid[:, step] = True                          # in place, same mask object
        out = attnlib.attention(q, k, v, mask, backend=backend)
        ref = attention64(q, k, v, KeyPadding(valid.clone()))[0]
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():                       # no version counter: lowered at every call
        frozen = torch.zeros(2, 6, dtype=torch.bool)
        frozen[:, :3] = True
        m = KeyPadding(frozen)
        first = attnlib.attention(q, k, v, m, backend=backend)
        frozen[:, 3:] = True
        second = attnlib.attention(q, k, v, m, backend=backend)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second.double(), attention64(q, k, v, None)[0], atol=1e-5, rtol=1e-5)
