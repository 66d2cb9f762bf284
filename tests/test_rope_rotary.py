"""Rotary application and tables: parity with transformers / diffusers, partial rotary, layouts, dtypes,
autograd, kernel dispatch; QwenImage RoPE parity with diffusers; mRoPE tables parity with transformers."""
import subprocess
import sys

import pytest
import torch

from attnlib.rope import (MRotaryEmbedding, QwenEmbedLayer3DRope, QwenEmbedRope, RotaryEmbedding, apply_mrope,
                          apply_rotary, apply_rotary_qk, apply_rotary_torch)
from attnlib.rope import rotary as rotary_mod


def naive_rotary(x, cos, sin, interleaved):
    """Pair by pair in float64: the definition."""
    x, cos, sin = x.double(), cos.double(), sin.double()
    R = cos.shape[-1]
    out = x.clone()
    for f in range(R):
        i, j = (2 * f, 2 * f + 1) if interleaved else (f, f + R)
        c, s = cos[..., f].unsqueeze(-1), sin[..., f].unsqueeze(-1)
        out[..., i] = x[..., i] * c - x[..., j] * s
        out[..., j] = x[..., j] * c + x[..., i] * s
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["bshd_shared", "bshd_per_batch", "packed"])
@pytest.mark.parametrize("R", [8, 5])  # full and partial rotary of a 16-dim head
def test_rotation_matches_the_pairwise_definition(interleaved, layout, R):
    torch.manual_seed(0)
    B, S, H, D = 2, 5, 3, 16
    x = torch.randn(B, S, H, D) if layout != "packed" else torch.randn(B * S, H, D)
    shape = {"bshd_shared": (S, R), "bshd_per_batch": (B, S, R), "packed": (B * S, R)}[layout]
    ang = torch.randn(shape)
    out = apply_rotary(x, ang.cos(), ang.sin(), interleaved=interleaved)
    ref = naive_rotary(x, ang.cos(), ang.sin(), interleaved)
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(out[..., 2 * R:], x[..., 2 * R:])  # partial rotary leaves the rest untouched


def test_rotate_half_matches_transformers_apply_rotary_pos_emb():
    tr = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(1)
    B, S, H, D = 2, 7, 4, 32
    q, k = torch.randn(B, S, H, D), torch.randn(B, S, 2, D)
    cos, sin = RotaryEmbedding(D, theta=500000.0).cos_sin(torch.arange(S).expand(B, S))
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), torch.cat((cos, cos), -1),
                                        torch.cat((sin, sin), -1), unsqueeze_dim=1)
    q_out, k_out = apply_rotary_qk(q, k, cos, sin)
    torch.testing.assert_close(q_out, q_ref.transpose(1, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(k_out, k_ref.transpose(1, 2), rtol=0, atol=1e-6)


def test_rotary_embedding_table_matches_transformers_default_rope():
    tr = pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    ref = LlamaRotaryEmbedding(config)
    pos = torch.tensor([[0, 3, 17, 4095]])
    cos_ref, sin_ref = ref(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = RotaryEmbedding(32).cos_sin(pos)
    assert torch.equal(torch.cat((cos, cos), -1), cos_ref) and torch.equal(torch.cat((sin, sin), -1), sin_ref)


def test_cos_sin_accepts_float_and_any_shape_and_caches_tables():
    rope = RotaryEmbedding(8, theta=100.0)
    cos, sin = rope.cos_sin(torch.tensor([[0.5, 2.0]]))
    assert cos.shape == (1, 2, 4) and cos.dtype == torch.float32
    torch.testing.assert_close(cos[0, 0], torch.cos(0.5 * 100.0 ** (-torch.arange(0, 8, 2) / 8)))
    assert rope.table(6)[0] is rope.table(6)[0]
    assert torch.equal(rope.table(6)[1], rope.cos_sin(torch.arange(6))[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_is_rotated_in_float32_and_returned_in_its_dtype(dtype):
    torch.manual_seed(2)
    x = torch.randn(1, 6, 2, 8).to(dtype)
    cos, sin = RotaryEmbedding(8).cos_sin(torch.arange(6))
    out = apply_rotary(x, cos, sin)
    assert out.dtype == dtype
    ref = naive_rotary(x, cos, sin, False).to(dtype)
    assert torch.equal(out, ref)  # float32 math then one rounding == float64 math then one rounding here


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradients_in_x_cos_and_sin(interleaved):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 2, 6, dtype=torch.float64, requires_grad=True)
    ang = torch.randn(3, 2, dtype=torch.float64)
    cos, sin = ang.cos().requires_grad_(), ang.sin().requires_grad_()
    # float32 math: check the analytic gradient against float64 finite differences loosely
    torch.autograd.gradcheck(lambda a, c, s: apply_rotary(a, c, s, interleaved=interleaved).double(), (x, cos, sin),
                             eps=1e-3, atol=1e-3, rtol=1e-3)


def test_shape_errors_name_the_argument():
    x = torch.randn(2, 4, 3, 8)
    with pytest.raises(ValueError, match="R=5"):
        apply_rotary(x, torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"\[S, R\] or \[B, S, R\]"):
        apply_rotary(x, torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="same shape"):
        apply_rotary(x, torch.randn(4, 4), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"packed x \[T=5"):
        apply_rotary(torch.randn(5, 3, 8), torch.randn(4, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="must agree"):
        apply_rotary_qk(x, torch.randn(3, 4, 3, 8), torch.randn(4, 4), torch.randn(4, 4))


def test_cpu_tensors_never_reach_the_kernel_module(monkeypatch):
    calls = []

    class Fake:
        def apply_rotary(self, *a, **k):
            calls.append("x")

        apply_rotary_qk = apply_rotary

    monkeypatch.setattr(rotary_mod, "_kernel_module", Fake())
    x = torch.randn(1, 2, 1, 4)
    cos, sin = torch.ones(2, 2), torch.zeros(2, 2)
    assert torch.equal(apply_rotary(x, cos, sin), x)
    apply_rotary_qk(x, x, cos, sin)
    assert calls == []


def test_rope_imports_and_runs_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, attnlib.rope as r\n"
            "x = torch.randn(1, 3, 2, 4); c, s = r.RotaryEmbedding(4).cos_sin(torch.arange(3))\n"
            "assert r.apply_rotary(x, c, s).shape == x.shape and r.rotary._rotary_kernels() is None\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("interleaved", [False, True])
def test_cuda_dispatch_matches_the_torch_reference(interleaved):
    torch.manual_seed(4)
    x = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
    cos, sin = RotaryEmbedding(48).cos_sin(torch.arange(64, device="cuda"))
    out = apply_rotary(x, cos, sin, interleaved=interleaved)
    ref = apply_rotary_torch(x, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    q, k = apply_rotary_qk(x, x[:, :, :2], cos, sin, interleaved=interleaved)
    torch.testing.assert_close(k.float(), ref[:, :, :2].float(), rtol=1e-2, atol=1e-2)


# -- QwenImage ----------------------------------------------------------------------------------------------
def diffusers_qwen():
    pytest.importorskip("diffusers")
    from diffusers.models.transformers import transformer_qwenimage as dq
    return dq


@pytest.mark.parametrize("scale_rope", [True, False])
@pytest.mark.parametrize("shapes", [[(1, 4, 6)], [(1, 5, 3), (2, 4, 6)], [(3, 2, 2)]])
def test_qwen_embed_rope_equals_diffusers(scale_rope, shapes):
    dq = diffusers_qwen()
    axes = (4, 6, 6)
    ref = dq.QwenEmbedRope(10000, list(axes), scale_rope=scale_rope)
    img_shapes = [list(shapes)] * 2  # diffusers' per-batch form
    vid_ref, txt_ref = ref(img_shapes, device=torch.device("cpu"), max_txt_seq_len=7)
    txt = torch.zeros(2, 7, 32)  # the padded text tensor: its width is the text length
    (ic, is_), (tc, ts) = QwenEmbedRope(10000, axes, scale_rope=scale_rope)(img_shapes, txt)
    assert ic.shape == (sum(f * h * w for f, h, w in shapes), 8) and tc.shape == (7, 8)
    for ours, theirs in ((ic, vid_ref.real), (is_, vid_ref.imag), (tc, txt_ref.real), (ts, txt_ref.imag)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-7)
    # and applied: interleaved pairing == diffusers' complex multiplication
    torch.manual_seed(5)
    x = torch.randn(2, ic.shape[0], 3, 16)
    torch.testing.assert_close(apply_rotary(x, ic, is_, interleaved=True),
                               dq.apply_rotary_emb_qwen(x, vid_ref, use_real=False), rtol=0, atol=1e-6)


def test_qwen_layered_rope_puts_the_condition_image_at_frame_minus_one_like_diffusers():
    dq = diffusers_qwen()
    shapes = [[(1, 4, 4), (1, 4, 4), (1, 4, 4), (1, 6, 2)]]
    vid_ref, txt_ref = dq.QwenEmbedLayer3DRope(10000, [4, 6, 6], scale_rope=True)(shapes, 5)
    (ic, is_), (tc, ts) = QwenEmbedLayer3DRope(10000, (4, 6, 6), scale_rope=True)(shapes, 5)
    for ours, theirs in ((ic, vid_ref.real), (is_, vid_ref.imag), (tc, txt_ref.real), (ts, txt_ref.imag)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-7)
    # the condition image's frame angle is -1 * inv_freq (first frame column: inv_freq = 1)
    assert ic[-1, 0].item() == pytest.approx(torch.cos(torch.tensor(-1.0)).item())
    assert is_[-1, 0].item() == pytest.approx(-torch.sin(torch.tensor(1.0)).item())


def test_qwen_text_starts_after_the_largest_image_extent():
    rope = QwenEmbedRope(10000, (2, 2, 2), scale_rope=True)
    (_, _), (tc, ts) = rope([(1, 3, 9), (1, 6, 2)], 4)
    # one frequency per axis (inv_freq 1): text angle = position; positions 4..7 (max(9 // 2, 6 // 2) = 4)
    expected = torch.tensor([4.0, 5.0, 6.0, 7.0])
    torch.testing.assert_close(tc, expected.cos()[:, None].expand(4, 3))
    torch.testing.assert_close(ts, expected.sin()[:, None].expand(4, 3))


def test_qwen_rope_rejects_mask_sums_and_batches_with_different_images():
    rope = QwenEmbedRope(10000, (4, 6, 6))
    with pytest.raises(TypeError, match="never a mask sum"):
        rope([(1, 2, 2)], torch.tensor([3, 5]))
    with pytest.raises(ValueError, match="per batch entry"):
        rope([[(1, 2, 2)], [(1, 4, 4)]], 3)


# -- mRoPE tables -----------------------------------------------------------------------------------------
def hf_mrope_rotary(kind):
    pytest.importorskip("transformers")
    if kind == "qwen2_vl":
        from transformers import Qwen2VLConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding as E, apply_rotary_pos_emb
        config = Qwen2VLConfig(text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                 "mrope_section": [4, 2, 2]})).text_config
        return E(config), apply_rotary_pos_emb, [4, 2, 2], False
    if kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding as E, apply_rotary_pos_emb
        config = Qwen2_5_VLConfig(text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                    "mrope_section": [2, 3, 3]})).text_config
        return E(config), apply_rotary_pos_emb, [2, 3, 3], False
    if kind == "qwen3_vl":
        from transformers import Qwen3VLConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding as E, apply_rotary_pos_emb
        config = Qwen3VLConfig(text_config=dict(hidden_size=64, num_attention_heads=2, head_dim=32, num_key_value_heads=2,
                                                rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                                                                 "mrope_section": [6, 5, 5]})).text_config
        return E(config), apply_rotary_pos_emb, [6, 5, 5], True
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeThinkerTextRotaryEmbedding as E, apply_rotary_pos_emb)
    config = Qwen3OmniMoeTextConfig(hidden_size=64, num_attention_heads=2, head_dim=32, num_key_value_heads=2,
                                    rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                                                     "mrope_section": [6, 5, 5], "interleaved": True})
    return E(config), apply_rotary_pos_emb, [6, 5, 5], True


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_omni"])
def test_mrope_tables_and_application_match_transformers(kind):
    emb, apply_ref, section, interleaved = hf_mrope_rotary(kind)
    torch.manual_seed(6)
    B, S, D = 2, 9, 2 * sum(section)
    pos = torch.randint(0, 300, (3, B, S))
    cos_ref, sin_ref = emb(torch.zeros(1), pos)
    cos, sin = MRotaryEmbedding(D, emb.config.rope_parameters["rope_theta"], section, interleaved).cos_sin(pos)
    assert torch.equal(torch.cat((cos, cos), -1), cos_ref) and torch.equal(torch.cat((sin, sin), -1), sin_ref)
    q, k = torch.randn(B, S, 4, D), torch.randn(B, S, 2, D)
    q_ref, k_ref = apply_ref(q.transpose(1, 2), k.transpose(1, 2), cos_ref, sin_ref)
    q_out, k_out = apply_mrope(q, k, pos, section, theta=emb.config.rope_parameters["rope_theta"], interleaved=interleaved)
    torch.testing.assert_close(q_out, q_ref.transpose(1, 2), rtol=0, atol=1e-5)
    torch.testing.assert_close(k_out, k_ref.transpose(1, 2), rtol=0, atol=1e-5)


def test_interleaved_sections_assign_frequencies_round_robin():
    # R = 8, section [4, 2, 2]: f = 0..7 -> T H W T H W T T
    pos = torch.tensor([0.0, 1.0, 2.0]).view(3, 1, 1) * torch.ones(3, 1, 1)
    rope = MRotaryEmbedding(16, 1.0, [4, 2, 2], interleaved=True)  # theta=1: inv_freq = 1, angle = position
    cos, sin = rope.cos_sin(pos)
    assert torch.atan2(sin, cos)[0, 0].tolist() == pytest.approx([0, 1, 2, 0, 1, 2, 0, 0])
    sectioned = MRotaryEmbedding(16, 1.0, [4, 2, 2]).cos_sin(pos)
    assert torch.atan2(sectioned[1], sectioned[0])[0, 0].tolist() == pytest.approx([0, 0, 0, 0, 1, 1, 2, 2])


def test_mrope_section_must_cover_the_rotary_frequencies():
    with pytest.raises(ValueError, match="summing to head_dim // 2 = 8"):
        MRotaryEmbedding(16, 10000.0, [4, 2, 1])
    with pytest.raises(ValueError, match=r"\[3, B, S\]"):
        MRotaryEmbedding(16, 10000.0, [4, 2, 2]).cos_sin(torch.zeros(2, 5))


@pytest.mark.parametrize("interleaved", [False, True])
def test_inference_and_autograd_paths_compute_the_same_values(interleaved):
    torch.manual_seed(7)
    x = torch.randn(2, 5, 3, 12)
    ang = torch.randn(5, 4)
    fast = apply_rotary_torch(x, ang.cos(), ang.sin(), interleaved=interleaved)
    slow = apply_rotary_torch(x.clone().requires_grad_(), ang.cos(), ang.sin(), interleaved=interleaved)
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=1e-6)
    assert torch.equal(fast[..., 8:], x[..., 8:])
