"""Triton rotary / mRoPE kernels against plain-torch references (CPU, TRITON_INTERPRET=1).

The references below are written from the definitions (and, for mRoPE, checked against
transformers' Qwen2.5-VL / Qwen3-VL rotary embeddings when transformers is importable).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must happen before triton is imported

import pytest
import torch

pytest.importorskip("triton")
rotary = pytest.importorskip("attnlib_kernels.rotary")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA and TRITON_INTERPRET is off: the kernels cannot run", allow_module_level=True)

# Under the interpreter the kernels run on CPU tensors; on a GPU machine without it, on CUDA ones.
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"


@pytest.fixture(autouse=True)
def _tensors_on_kernel_device():
    with torch.device(DEVICE):
        yield

# Tolerance per dtype: the kernel computes in float32 like the reference, so the outputs differ by
# float32 noise, which can flip the final rounding: at most one ulp of the output dtype.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=2.0**-10),
    torch.bfloat16: dict(atol=8e-3, rtol=2.0**-7),
}


# ------------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------------


def ref_rotary(x, cos, sin, interleaved=False):
    """x [..., S, H, D] (or [T, H, D]); cos/sin broadcastable to x[..., 0, :R]. float32 math."""
    R = cos.shape[-1]
    xf = x.float()
    c = cos.float().unsqueeze(-2)
    s = sin.float().unsqueeze(-2)
    out = xf.clone()
    if interleaved:
        a, b = xf[..., 0 : 2 * R : 2], xf[..., 1 : 2 * R : 2]
        out[..., 0 : 2 * R : 2] = a * c - b * s
        out[..., 1 : 2 * R : 2] = b * c + a * s
    else:
        a, b = xf[..., :R], xf[..., R : 2 * R]
        out[..., :R] = a * c - b * s
        out[..., R : 2 * R] = b * c + a * s
    return out.to(x.dtype)


def ref_freq_rows(R, section, interleaved_sections):
    """Row per frequency, written independently of the kernel module."""
    s0, s1, s2 = section
    if not interleaved_sections:  # Qwen2/2.5-VL: chunks [t | h | w]
        return torch.tensor([0] * s0 + [1] * s1 + [2] * s2)
    rows = torch.zeros(R, dtype=torch.long)  # Qwen3-VL: start all-temporal, overwrite strided slices
    rows[1 : 3 * s1 : 3] = 1
    rows[2 : 3 * s2 : 3] = 2
    return rows


def ref_mrope_cos_sin(position_ids, inv_freq, section, interleaved_sections):
    """position_ids [3, ...tokens] -> cos, sin [...tokens, R] (float32)."""
    R = inv_freq.shape[0]
    freqs = position_ids[..., None].float() * inv_freq.float()  # [3, ..., R]
    rows = ref_freq_rows(R, section, interleaved_sections)
    pick = torch.stack([freqs[int(r), ..., f] for f, r in enumerate(rows)], dim=-1)
    return pick.cos(), pick.sin()


def inv_freq_for(R, theta=10000.0):
    return 1.0 / (theta ** (torch.arange(0, 2 * R, 2, dtype=torch.float32) / (2 * R)))


def rand_angles(*shape):
    a = torch.rand(*shape) * 6.0 - 3.0
    return a.cos(), a.sin()


class LaunchCounter:
    """Counts launches of the rotary kernel (wraps the module-level JIT function)."""

    def __init__(self, monkeypatch):
        self.count = 0
        kernel = rotary._rotary_qk_kernel
        counter = self

        class Wrapped:
            def __getitem__(self, grid):
                counter.count += 1
                return kernel[grid]

        monkeypatch.setattr(rotary, "_rotary_qk_kernel", Wrapped())


@pytest.fixture
def launches(monkeypatch):
    return LaunchCounter(monkeypatch)


# ------------------------------------------------------------------------------------------------
# Table-driven rotary
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotary_matches_reference_for_both_pairings_and_dtypes(interleaved, dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 16, dtype=dtype)
    cos, sin = rand_angles(5, 8)
    out = rotary.apply_rotary(x, cos, sin, interleaved=interleaved)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref_rotary(x, cos, sin, interleaved), **TOL[dtype])


def test_pairings_differ_so_the_flag_is_honoured():
    torch.manual_seed(1)
    x = torch.randn(1, 3, 1, 8)
    cos, sin = rand_angles(3, 4)
    a = rotary.apply_rotary(x, cos, sin, interleaved=False)
    b = rotary.apply_rotary(x, cos, sin, interleaved=True)
    assert (a - b).abs().max() > 0.1


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_partial_rotary_leaves_dims_past_2R_bitwise_untouched(interleaved):
    torch.manual_seed(2)
    x = torch.randn(1, 4, 2, 20, dtype=torch.bfloat16)  # D = 20 (not a power of two), R = 3
    cos, sin = rand_angles(4, 3)
    out = rotary.apply_rotary(x, cos, sin, interleaved=interleaved)
    assert torch.equal(out[..., 6:], x[..., 6:])
    torch.testing.assert_close(out, ref_rotary(x, cos, sin, interleaved), **TOL[torch.bfloat16])


def test_cos_sin_in_x_dtype_are_accepted():
    torch.manual_seed(3)
    x = torch.randn(1, 4, 2, 8, dtype=torch.float16)
    cos, sin = rand_angles(4, 4)
    cos16, sin16 = cos.half(), sin.half()
    out = rotary.apply_rotary(x, cos16, sin16)
    torch.testing.assert_close(out, ref_rotary(x, cos16, sin16), **TOL[torch.float16])


def test_per_batch_tables_rotate_each_sample_with_its_own_angles():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 2, 8)
    cos, sin = rand_angles(2, 3, 4)
    out = rotary.apply_rotary(x, cos, sin)
    torch.testing.assert_close(out, ref_rotary(x, cos, sin), atol=1e-5, rtol=0)
    # and a [1, S, R] table broadcasts over the batch exactly like [S, R]
    torch.testing.assert_close(
        rotary.apply_rotary(x, cos[:1], sin[:1]), rotary.apply_rotary(x, cos[0], sin[0]), atol=0, rtol=0
    )


def test_packed_thd_input_uses_one_table_row_per_token():
    torch.manual_seed(5)
    x = torch.randn(7, 3, 8)  # T = 7 tokens of several packed sequences
    cos, sin = rand_angles(7, 4)
    out = rotary.apply_rotary(x, cos, sin)
    torch.testing.assert_close(out, ref_rotary(x, cos, sin), atol=1e-5, rtol=0)


def test_strided_views_of_a_fused_qkv_projection_are_read_in_place():
    torch.manual_seed(6)
    qkv = torch.randn(2, 4, 3, 5, 8)  # [B, S, 3, H, D]
    q_view = qkv[:, :, 0]  # non-contiguous in S and H, unit stride in D
    cos, sin = rand_angles(4, 4)
    out = rotary.apply_rotary(q_view, cos, sin)
    torch.testing.assert_close(out, ref_rotary(q_view.contiguous(), cos, sin), **TOL[torch.float32])
    assert torch.equal(qkv[:, :, 0], q_view)  # the input is not written
    # a head dim that is not unit-stride is copied first, still correct
    xt = torch.randn(2, 4, 8, 2).transpose(-1, -2)
    torch.testing.assert_close(rotary.apply_rotary(xt, cos, sin), ref_rotary(xt, cos, sin), **TOL[torch.float32])


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_qk_with_gqa_head_counts_are_rotated_in_one_launch(interleaved, launches):
    torch.manual_seed(7)
    q = torch.randn(2, 5, 4, 16, dtype=torch.bfloat16)
    k = torch.randn(2, 5, 2, 16, dtype=torch.bfloat16)
    cos, sin = rand_angles(5, 6)
    qo, ko = rotary.apply_rotary_qk(q, k, cos, sin, interleaved=interleaved)
    assert launches.count == 1
    torch.testing.assert_close(qo, ref_rotary(q, cos, sin, interleaved), **TOL[torch.bfloat16])
    torch.testing.assert_close(ko, ref_rotary(k, cos, sin, interleaved), **TOL[torch.bfloat16])


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test extra
    given = None

if given is not None:

    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        B=st.integers(1, 2), S=st.integers(1, 9), Hkv=st.integers(1, 3), groups=st.integers(1, 3),
        D=st.integers(2, 40), r_frac=st.floats(0.0, 1.0), interleaved=st.booleans(), packed=st.booleans(),
        dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16),
    )
    def test_any_small_shape_matches_reference(B, S, Hkv, groups, D, r_frac, interleaved, packed, dtype, seed):
        torch.manual_seed(seed)
        R = max(1, int(r_frac * (D // 2)))
        shape = (B * S,) if packed else (B, S)
        q = torch.randn(*shape, Hkv * groups, D, dtype=dtype)
        k = torch.randn(*shape, Hkv, D, dtype=dtype)
        cos, sin = rand_angles(*shape[-1:] if packed else (S,), R)
        qo, ko = rotary.apply_rotary_qk(q, k, cos, sin, interleaved=interleaved)
        torch.testing.assert_close(qo, ref_rotary(q, cos, sin, interleaved), **TOL[dtype])
        torch.testing.assert_close(ko, ref_rotary(k, cos, sin, interleaved), **TOL[dtype])
        assert torch.equal(qo[..., 2 * R:], q[..., 2 * R:])


def test_qk_output_equals_rotating_q_and_k_separately_bitwise():
    torch.manual_seed(8)
    q, k = torch.randn(9, 3, 12), torch.randn(9, 1, 12)
    cos, sin = rand_angles(9, 5)
    qo, ko = rotary.apply_rotary_qk(q, k, cos, sin)
    assert torch.equal(qo, rotary.apply_rotary(q, cos, sin))
    assert torch.equal(ko, rotary.apply_rotary(k, cos, sin))


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_qk_gradients_match_reference_and_backward_is_one_kernel_launch(interleaved, launches):
    torch.manual_seed(9)
    q = torch.randn(2, 3, 4, 10, requires_grad=True)
    k = torch.randn(2, 3, 2, 10, requires_grad=True)
    cos, sin = rand_angles(3, 4)
    qo, ko = rotary.apply_rotary_qk(q, k, cos, sin, interleaved=interleaved)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo * gq).sum() + (ko * gk).sum(), (q, k))
    assert launches.count == 2  # forward + backward
    rq, rk = torch.autograd.grad(
        (ref_rotary(q, cos, sin, interleaved) * gq).sum() + (ref_rotary(k, cos, sin, interleaved) * gk).sum(), (q, k)
    )
    torch.testing.assert_close(dq, rq, atol=1e-5, rtol=0)
    torch.testing.assert_close(dk, rk, atol=1e-5, rtol=0)


def test_gradient_of_only_q_output_gives_zero_k_grad():
    q = torch.randn(1, 2, 2, 8, requires_grad=True)
    k = torch.randn(1, 2, 1, 8, requires_grad=True)
    cos, sin = rand_angles(2, 4)
    qo, _ = rotary.apply_rotary_qk(q, k, cos, sin)
    dq, dk = torch.autograd.grad(qo.sum(), (q, k))
    assert torch.equal(dk, torch.zeros_like(k))
    torch.testing.assert_close(dq, torch.autograd.grad(ref_rotary(q, cos, sin).sum(), q)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_cos_sin_gradients_flow_when_the_table_is_learnable(interleaved):
    torch.manual_seed(10)
    x = torch.randn(2, 3, 2, 10)
    ang = torch.randn(3, 4)
    cos, sin = ang.cos().requires_grad_(), ang.sin().requires_grad_()
    g = torch.randn(2, 3, 2, 10)
    dc, ds = torch.autograd.grad((rotary.apply_rotary(x, cos, sin, interleaved=interleaved) * g).sum(), (cos, sin))
    rc, rs = torch.autograd.grad((ref_rotary(x, cos, sin, interleaved) * g).sum(), (cos, sin))
    torch.testing.assert_close(dc, rc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ds, rs, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Positions computed in-kernel
# ------------------------------------------------------------------------------------------------


def test_packed_varlen_positions_equal_per_sequence_tables():
    torch.manual_seed(11)
    R = 4
    inv = inv_freq_for(R)
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 0, 1, 2])  # three sequences packed, lengths 4, 2, 3
    q, k = torch.randn(9, 2, 8), torch.randn(9, 1, 8)
    qo, ko = rotary.apply_rotary_pos_qk(q, k, positions, inv)
    freqs = positions[:, None].float() * inv
    torch.testing.assert_close(qo, ref_rotary(q, freqs.cos(), freqs.sin()), atol=1e-5, rtol=0)
    torch.testing.assert_close(ko, ref_rotary(k, freqs.cos(), freqs.sin()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pos_shape", ["BS", "S"])
def test_dense_positions_per_batch_or_shared(pos_shape):
    torch.manual_seed(12)
    R = 3
    inv = inv_freq_for(R)
    q, k = torch.randn(2, 4, 2, 8), torch.randn(2, 4, 1, 8)
    pos = torch.tensor([[5, 6, 7, 8], [0, 1, 2, 3]]) if pos_shape == "BS" else torch.arange(4)
    qo, ko = rotary.apply_rotary_pos_qk(q, k, pos, inv, interleaved=True)
    pb = pos if pos.dim() == 2 else pos.expand(2, 4)
    freqs = pb[..., None].float() * inv
    torch.testing.assert_close(qo, ref_rotary(q, freqs.cos(), freqs.sin(), True), atol=1e-5, rtol=0)
    torch.testing.assert_close(ko, ref_rotary(k, freqs.cos(), freqs.sin(), True), atol=1e-5, rtol=0)


def test_large_positions_keep_float32_accuracy():
    # 32k-token positions give angles ~3e4 rad: the in-kernel sin/cos must range-reduce correctly.
    R = 8
    inv = inv_freq_for(R)
    positions = torch.tensor([0, 1, 4095, 16384, 32767, 65535])
    q = torch.randn(6, 1, 16, dtype=torch.float64).float()
    qo, _ = rotary.apply_rotary_pos_qk(q, q[:, :1], positions, inv)
    freqs = positions[:, None].double() * inv.double()
    exact = ref_rotary(q.double(), freqs.cos(), freqs.sin())
    # fp32 angle rounding alone is ~|angle| * 6e-8 ~ 4e-3 at 65535: compare with the fp32 reference
    freqs32 = positions[:, None].float() * inv
    torch.testing.assert_close(qo, ref_rotary(q, freqs32.cos(), freqs32.sin()), atol=5e-5, rtol=0)
    assert (qo.double() - exact).abs().max() < 2e-2


def test_a_sequence_rotates_bitwise_identically_alone_batched_or_packed():
    # Batch invariance: each output element is computed by the same float32 ops whatever the tiling.
    torch.manual_seed(22)
    inv = inv_freq_for(8)
    lens = [5, 3, 7]
    seqs_q = [torch.randn(n, 4, 16, dtype=torch.bfloat16) for n in lens]
    seqs_k = [torch.randn(n, 2, 16, dtype=torch.bfloat16) for n in lens]
    alone = [rotary.apply_rotary_pos_qk(q[None], k[None], torch.arange(len(q)), inv) for q, k in zip(seqs_q, seqs_k)]
    packed_q, packed_k = rotary.apply_rotary_pos_qk(
        torch.cat(seqs_q), torch.cat(seqs_k), torch.cat([torch.arange(n) for n in lens]), inv
    )
    S = max(lens)  # right-padded batch
    pad = lambda xs: torch.stack([torch.cat([x, x.new_zeros(S - len(x), *x.shape[1:])]) for x in xs])  # noqa: E731
    batch_q, batch_k = rotary.apply_rotary_pos_qk(pad(seqs_q), pad(seqs_k), torch.arange(S), inv)
    for i, (n, (aq, ak)) in enumerate(zip(lens, alone)):
        off = sum(lens[:i])
        assert torch.equal(aq[0], packed_q[off : off + n]) and torch.equal(ak[0], packed_k[off : off + n])
        assert torch.equal(aq[0], batch_q[i, :n]) and torch.equal(ak[0], batch_k[i, :n])


def test_positions_gradient_is_the_inverse_rotation():
    torch.manual_seed(13)
    inv = inv_freq_for(4)
    pos = torch.tensor([3, 1, 4, 1, 5])
    q = torch.randn(5, 2, 8, requires_grad=True)
    k = torch.randn(5, 2, 8, requires_grad=True)
    qo, ko = rotary.apply_rotary_pos_qk(q, k, pos, inv)
    g = torch.randn_like(qo)
    dq, dk = torch.autograd.grad((qo * g).sum() + ko.sum(), (q, k))
    freqs = pos[:, None].float() * inv
    rq, rk = torch.autograd.grad(
        (ref_rotary(q, freqs.cos(), freqs.sin()) * g).sum() + ref_rotary(k, freqs.cos(), freqs.sin()).sum(), (q, k)
    )
    torch.testing.assert_close(dq, rq, atol=1e-5, rtol=0)
    torch.testing.assert_close(dk, rk, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# mRoPE
# ------------------------------------------------------------------------------------------------


def _mrope_positions(B, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (3, B, S), generator=g, device="cpu").to(DEVICE)


@pytest.mark.parametrize(
    "section,interleaved_sections",
    [((2, 3, 3), False), ((1, 4, 3), False), ((3, 3, 2), True), ((4, 2, 2), True)],
    ids=["sectioned-2-3-3", "sectioned-1-4-3", "interleaved-3-3-2", "interleaved-4-2-2"],
)
def test_mrope_matches_reference_for_sectioned_and_interleaved_layouts(section, interleaved_sections):
    torch.manual_seed(14)
    R = 8
    inv = inv_freq_for(R, theta=1e6)
    pos = _mrope_positions(2, 5)
    q, k = torch.randn(2, 5, 4, 16, dtype=torch.bfloat16), torch.randn(2, 5, 2, 16, dtype=torch.bfloat16)
    qo, ko = rotary.apply_mrope_qk(q, k, pos, inv, section, interleaved_sections=interleaved_sections)
    cos, sin = ref_mrope_cos_sin(pos, inv, section, interleaved_sections)
    torch.testing.assert_close(qo, ref_rotary(q, cos, sin), **TOL[torch.bfloat16])
    torch.testing.assert_close(ko, ref_rotary(k, cos, sin), **TOL[torch.bfloat16])


def test_interleaved_rows_for_qwen3_default_section_follow_thw_pattern():
    rows = rotary.mrope_freq_rows(64, (24, 20, 20), interleaved_sections=True)
    assert rows[:6] == [0, 1, 2, 0, 1, 2]
    assert rows[57:60] == [0, 1, 2] and rows[60:] == [0, 0, 0, 0]
    assert rows.count(1) == 20 and rows.count(2) == 20 and rows.count(0) == 24
    assert rows == ref_freq_rows(64, (24, 20, 20), True).tolist()
    assert rotary.mrope_freq_rows(8, (2, 3, 3), False) == [0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("interleaved_sections", [False, True])
def test_mrope_with_equal_rows_is_plain_rope(interleaved_sections):
    # Text tokens carry t = h = w: mRoPE must reduce to 1-D rotary exactly.
    torch.manual_seed(15)
    inv = inv_freq_for(6)
    p = torch.tensor([0, 1, 2, 7, 8, 9, 10])
    q, k = torch.randn(7, 3, 12), torch.randn(7, 1, 12)
    a = rotary.apply_mrope_qk(q, k, p.expand(3, 7), inv, (2, 2, 2), interleaved_sections=interleaved_sections)
    b = rotary.apply_rotary_pos_qk(q, k, p, inv)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_packed_mrope_positions_match_dense():
    torch.manual_seed(16)
    inv = inv_freq_for(8)
    pos = _mrope_positions(1, 6, seed=3)
    q, k = torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16)
    dense = rotary.apply_mrope_qk(q, k, pos, inv, (3, 3, 2), interleaved_sections=True)
    packed = rotary.apply_mrope_qk(q[0], k[0], pos[:, 0], inv, (3, 3, 2), interleaved_sections=True)
    assert torch.equal(dense[0][0], packed[0]) and torch.equal(dense[1][0], packed[1])


def test_mrope_with_gpt_j_pairing_uses_pair_index_as_frequency():
    torch.manual_seed(17)
    inv = inv_freq_for(4)
    pos = _mrope_positions(1, 3, seed=4)
    q = torch.randn(1, 3, 2, 8)
    qo, _ = rotary.apply_mrope_qk(q, q, pos, inv, (1, 2, 1), rotary_interleaved=True)
    cos, sin = ref_mrope_cos_sin(pos, inv, (1, 2, 1), False)
    torch.testing.assert_close(qo, ref_rotary(q, cos, sin, interleaved=True), atol=1e-5, rtol=0)


def test_mrope_gradients_match_reference():
    torch.manual_seed(18)
    inv = inv_freq_for(4)
    pos = _mrope_positions(1, 4, seed=5)
    q = torch.randn(1, 4, 2, 8, requires_grad=True)
    k = torch.randn(1, 4, 1, 8, requires_grad=True)
    qo, ko = rotary.apply_mrope_qk(q, k, pos, inv, (2, 1, 1), interleaved_sections=True)
    g = torch.randn_like(qo)
    dq, dk = torch.autograd.grad((qo * g).sum() + (ko * ko.detach()).sum(), (q, k))
    cos, sin = ref_mrope_cos_sin(pos, inv, (2, 1, 1), True)
    rq, rk = torch.autograd.grad(
        (ref_rotary(q, cos, sin) * g).sum() + (ref_rotary(k, cos, sin) * ko.detach()).sum(), (q, k)
    )
    torch.testing.assert_close(dq, rq, atol=1e-5, rtol=0)
    torch.testing.assert_close(dk, rk, atol=1e-5, rtol=0)


def _transformers_rotary(model):
    pytest.importorskip("transformers")
    if model == "qwen3_vl":
        try:
            from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig as Cfg
            from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding as Emb
        except ImportError as e:  # pragma: no cover - depends on the installed version
            pytest.skip(f"transformers has no Qwen3-VL: {e}")
        section = [3, 3, 2]
    else:
        try:
            from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig as Cfg
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding as Emb
        except ImportError as e:  # pragma: no cover
            pytest.skip(f"transformers has no Qwen2.5-VL: {e}")
        section = [2, 3, 3]
    try:
        cfg = Cfg(
            head_dim=16, hidden_size=32, num_attention_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        )
        emb = Emb(cfg)
    except Exception as e:  # pragma: no cover - config API differs across versions
        pytest.skip(f"cannot build transformers' rotary embedding here: {e}")
    return emb, section


@pytest.mark.parametrize("model", ["qwen2_5_vl", "qwen3_vl"])
def test_mrope_equals_transformers_rotary_embedding(model):
    emb, section = _transformers_rotary(model)
    torch.manual_seed(19)
    pos = _mrope_positions(2, 5, seed=6)
    q, k = torch.randn(2, 5, 2, 16), torch.randn(2, 5, 1, 16)
    cos, sin = emb(q, pos)  # [B, S, D] (frequencies repeated over the two halves), float32 here
    R = cos.shape[-1] // 2
    assert torch.equal(cos[..., :R], cos[..., R:])
    qo, ko = rotary.apply_mrope_qk(
        q, k, pos, emb.inv_freq, section, interleaved_sections=(model == "qwen3_vl")
    )
    # transformers' apply_rotary_pos_emb on BSHD: q * cos + rotate_half(q) * sin
    def hf(x):
        x1, x2 = x[..., :R], x[..., R:]
        return x * cos[:, :, None] + torch.cat((-x2, x1), -1) * sin[:, :, None]

    torch.testing.assert_close(qo, hf(q), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko, hf(k), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# The torch implementation in attnlib.rope (when it exists)
# ------------------------------------------------------------------------------------------------


def test_kernel_matches_attnlib_rope_torch_reference():
    rope = pytest.importorskip("attnlib.rope")
    ref = getattr(rope, "_apply_rotary_torch", None) or getattr(rope, "apply_rotary_torch", None)
    if ref is None:
        pytest.skip("attnlib.rope exposes no torch-only apply_rotary reference")
    torch.manual_seed(20)
    x = torch.randn(2, 4, 3, 12, dtype=torch.bfloat16)
    cos, sin = rand_angles(4, 5)
    for interleaved in (False, True):
        torch.testing.assert_close(
            rotary.apply_rotary(x, cos, sin, interleaved=interleaved),
            ref(x, cos, sin, interleaved=interleaved),
            **TOL[torch.bfloat16],
        )


@pytest.mark.parametrize("interleaved", [False, True], ids=["sectioned", "interleaved"])
def test_mrope_kernel_matches_attnlib_rope_apply_mrope(interleaved):
    rope = pytest.importorskip("attnlib.rope")
    if not (hasattr(rope, "apply_mrope") and hasattr(rope, "rotary_inv_freq")):
        pytest.skip("attnlib.rope has no apply_mrope yet")
    section = (3, 3, 2) if interleaved else (2, 3, 3)
    theta = 1e6
    pos = _mrope_positions(2, 5, seed=7)
    torch.manual_seed(21)
    q, k = torch.randn(2, 5, 4, 16, dtype=torch.bfloat16), torch.randn(2, 5, 2, 16, dtype=torch.bfloat16)
    with pytest.MonkeyPatch.context() as mp:  # make sure attnlib.rope runs its torch path
        mp.setenv("ATTNLIB_ROTARY_KERNEL", "0")
        rq, rk = rope.apply_mrope(q, k, pos, section, theta=theta, interleaved=interleaved)
    inv = rope.rotary_inv_freq(16, theta).to(DEVICE)
    qo, ko = rotary.apply_mrope_qk(q, k, pos, inv, section, interleaved_sections=interleaved)
    torch.testing.assert_close(qo, rq, **TOL[torch.bfloat16])
    torch.testing.assert_close(ko, rk, **TOL[torch.bfloat16])


# ------------------------------------------------------------------------------------------------
# Validation: clear errors, before any kernel runs
# ------------------------------------------------------------------------------------------------


def _bad_calls():
    x = torch.randn(2, 4, 2, 8)
    k1 = torch.randn(2, 4, 1, 8)
    c, s = rand_angles(4, 4)
    inv = inv_freq_for(4)
    pos3 = torch.zeros(3, 2, 4, dtype=torch.long)
    return [
        ("R", lambda: rotary.apply_rotary(x, *rand_angles(4, 5))),  # R > D/2
        ("R", lambda: rotary.apply_rotary(x, torch.ones(4, 8), torch.zeros(4, 8))),  # duplicated table
        ("cos/sin", lambda: rotary.apply_rotary(x, *rand_angles(5, 4))),  # wrong S
        ("cos", lambda: rotary.apply_rotary(x, c, s[:, :3])),  # shape mismatch
        ("cos", lambda: rotary.apply_rotary(x, c.double(), s)),  # dtype
        ("x", lambda: rotary.apply_rotary(torch.randn(4, 8), c, s)),  # rank
        ("x", lambda: rotary.apply_rotary(x.long(), c, s)),  # dtype
        ("k", lambda: rotary.apply_rotary_qk(x, torch.randn(2, 5, 1, 8), c, s)),  # token dims differ
        ("head dim", lambda: rotary.apply_rotary_qk(x, torch.randn(2, 4, 1, 10), c, s)),
        ("mrope_section", lambda: rotary.apply_mrope_qk(x, k1, pos3, inv, (1, 1, 1))),  # sum != R
        ("mrope_section", lambda: rotary.apply_mrope_qk(x, k1, pos3, inv, (2, 2))),
        # interleaved: height wants 3 frequencies f = 1, 4, 7 but only 1 fits below R = 4
        ("mrope_section", lambda: rotary.apply_mrope_qk(x, k1, pos3, inv, (0, 3, 1), interleaved_sections=True)),
        ("position_ids", lambda: rotary.apply_mrope_qk(x, k1, pos3[:2], inv, (2, 1, 1))),
        ("position_ids", lambda: rotary.apply_mrope_qk(x, k1, pos3.float() > 0, inv, (2, 1, 1))),
        ("inv_freq", lambda: rotary.apply_rotary_pos_qk(x, k1, torch.arange(4), inv_freq_for(5))),
        ("inv_freq", lambda: rotary.apply_rotary_pos_qk(x, k1, torch.arange(4), inv[None])),
        ("positions", lambda: rotary.apply_rotary_pos_qk(x, k1, torch.arange(5), inv)),
        ("inv_freq requires grad", lambda: rotary.apply_rotary_pos_qk(x, k1, torch.arange(4), inv.requires_grad_())),
        ("positions", lambda: rotary.apply_rotary_pos_qk(x[0], k1[0], torch.arange(4).expand(2, 4), inv)),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_raises_naming_the_argument_before_any_launch(i, launches):
    needle, call = _bad_calls()[i]
    with pytest.raises((ValueError, TypeError), match=needle.replace("/", ".")):
        call()
    assert launches.count == 0


def test_shape_errors_are_value_errors_and_dtype_errors_type_errors():
    x = torch.randn(2, 4, 2, 8)
    with pytest.raises(ValueError, match="R <= D // 2"):
        rotary.apply_rotary(x, *rand_angles(4, 5))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        rotary.apply_rotary(x.double(), *rand_angles(4, 4))
    with pytest.raises(ValueError, match="sums to 3"):
        rotary.apply_mrope_qk(x, x, torch.zeros(3, 2, 4), inv_freq_for(4), (1, 1, 1))


@pytest.mark.parametrize("interleaved", [False, True], ids=["sectioned", "interleaved"])
def test_attnlib_rope_apply_mrope_dispatches_to_the_fused_kernel(interleaved, monkeypatch):
    """Where the kernels can run (CUDA; here forced under the interpreter), ``attnlib.rope.apply_mrope``
    is one fused launch, equal to its own table path, gradients included."""
    from attnlib.rope import mrope as mrope_mod
    calls = []
    real = rotary.apply_mrope_qk

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(rotary, "apply_mrope_qk", spy)
    monkeypatch.setattr(mrope_mod, "kernel_for", lambda x, *others: rotary)
    section = (3, 3, 2) if interleaved else (2, 3, 3)
    pos = _mrope_positions(2, 5, seed=3)
    torch.manual_seed(5)
    q = torch.randn(2, 5, 4, 20, device=DEVICE, requires_grad=True)   # 16 rotated dims, 4 passed through
    k = torch.randn(2, 5, 2, 20, device=DEVICE, requires_grad=True)
    qo, ko = mrope_mod.apply_mrope(q, k, pos, section, theta=1e4, interleaved=interleaved)
    assert len(calls) == 1 and calls[0]["interleaved_sections"] is interleaved
    (qo.square().sum() + ko.sum()).backward()
    gq, gk = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None

    monkeypatch.setattr(mrope_mod, "kernel_for", lambda x, *others: None)
    rq, rk = mrope_mod.apply_mrope(q, k, pos, section, theta=1e4, interleaved=interleaved)
    assert len(calls) == 1
    (rq.square().sum() + rk.sum()).backward()
    torch.testing.assert_close(qo, rq, **TOL[torch.float32])
    torch.testing.assert_close(ko, rk, **TOL[torch.float32])
    torch.testing.assert_close(gq, q.grad, **TOL[torch.float32])
    torch.testing.assert_close(gk, k.grad, **TOL[torch.float32])
