"""QwenImage on attnlib equals diffusers' QwenImageTransformer2DModel, on every backend.

Tiny random configs built here (no downloads). Tolerances: ``attnlib.testing.tolerance`` -- the error
of our block against diffusers in float64 may be at most ``ERROR_RATIO`` times diffusers' own error in
the same dtype, plus the dtype floor.
"""
import copy
import functools

import pytest
import torch

import attnlib
from attnlib.testing import max_abs_error, tolerance
from models_ref.parity import QWEN_IMAGE_CONFIG, no_fallback, qwen_image_case, qwen_image_inputs, reference
from models_ref.qwen_image import QwenImageTransformer2DModel, joint_key_padding

BACKENDS = [r["name"] for r in attnlib.list_backends() if r["available"]]
#: the parity references run where the GPU is, if there is one (the block-level invariants run on the CPU)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: backends that compile per shape (flex) or interpret kernels (triton) on this CPU: float32 only
SLOW_ON_CPU = {"flex", "triton"}
DTYPES = [torch.float32, torch.bfloat16]

diffusers = pytest.importorskip("diffusers", reason="parity with diffusers needs diffusers installed")


@functools.lru_cache(maxsize=None)
def _reference(dtype):
    return reference(qwen_image_case(), dtype, DEVICE)


def _backend_dtype_params():
    return [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in BACKENDS for d in DTYPES
            if not (b in SLOW_ON_CPU and d != torch.float32)]


@pytest.fixture(autouse=True)
def _no_silent_fallback():
    with no_fallback():
        yield


def _model(**overrides):
    cfg = dict(QWEN_IMAGE_CONFIG, **overrides)
    torch.manual_seed(0)
    ours = QwenImageTransformer2DModel(**cfg).eval()
    torch.nn.init.normal_(ours.proj_out.weight, std=0.2)
    host = diffusers.QwenImageTransformer2DModel(**cfg).eval()
    host.load_state_dict(ours.state_dict(), strict=True)
    return ours, host


def test_state_dict_loads_strictly_in_both_directions():
    ours, host = _model()
    assert set(ours.state_dict()) == set(host.state_dict())
    ours.load_state_dict(host.state_dict(), strict=True)
    for name, p in host.state_dict().items():
        assert ours.state_dict()[name].shape == p.shape, name


@pytest.mark.parametrize("backend,dtype", _backend_dtype_params())
@torch.no_grad()
def test_cfg_batch_with_padded_negative_prompt_matches_diffusers(backend, dtype):
    """Row 0: 9-token prompt; row 1: 3-token negative prompt right-padded to 9 (mask)."""
    ours_fn, ref, naive, _ = _reference(dtype)
    with attnlib.use_backend(backend):
        out = ours_fn()
    err, tol = max_abs_error(out, ref), tolerance(max_abs_error(naive, ref), dtype, ref)
    assert err <= tol, f"{backend} {dtype}: max |ours - diffusers float64| = {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_cfg_batch_equals_each_prompt_alone_unpadded(backend):
    """Batching a long prompt with a short padded one changes neither: padding is masked, and text RoPE
    positions depend on the token index (not on the mask sum), so trimming the padding is invisible."""
    ours, _ = _model()
    x, e, mask, t, shapes = qwen_image_inputs(torch.float32, batch_valid=(9, 3), width=9)
    ref64 = copy.deepcopy(ours).double()
    with attnlib.use_backend(backend):
        batched = ours(x, e, mask, t, shapes)
    for row, n in enumerate((9, 3)):
        args = (x[row:row + 1], e[row:row + 1, :n], mask[row:row + 1, :n], t[row:row + 1], shapes[:1])
        with attnlib.use_backend("math"):
            alone64 = ref64(args[0].double(), args[1].double(), args[2], args[3].double(), args[4])
            naive = ours(*args)
        tol = tolerance(max_abs_error(naive, alone64), torch.float32, alone64)
        err = max_abs_error(batched[row:row + 1], alone64)
        assert err <= tol, f"row {row} ({n} valid tokens): batched differs from alone by {err:.3g} > {tol:.3g}"


@torch.no_grad()
def test_padded_text_keys_are_invisible_to_every_query():
    """Changing the embeddings of padded text tokens changes no image output."""
    ours, _ = _model()
    x, e, mask, t, shapes = qwen_image_inputs(torch.float32, batch_valid=(9, 3), width=9)
    e2 = e.clone()
    e2[1, 3:] = 100.0 * torch.randn_like(e2[1, 3:])
    torch.testing.assert_close(ours(x, e2, mask, t, shapes), ours(x, e, mask, t, shapes), rtol=0, atol=0)


def test_text_rope_comes_from_the_padded_width_and_equals_diffusers():
    ours, host = _model()
    shapes, width = [[(1, 4, 6)]] * 2, 9
    cos, sin = ours.rope_tables(shapes, width, "cpu")
    img, txt = host.pos_embed(shapes, max_txt_seq_len=width, device=torch.device("cpu"))
    want = torch.cat([txt, img])                                   # diffusers: complex, [text; image] order here
    assert cos.shape == (width + 24, sum(QWEN_IMAGE_CONFIG["axes_dims_rope"]) // 2)
    torch.testing.assert_close(cos, want.real, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, want.imag, rtol=0, atol=1e-6)


def test_joint_mask_marks_image_keys_valid_and_keeps_text_pattern():
    text = torch.tensor([[1, 1, 0, 1], [0, 0, 1, 1]])
    kp = joint_key_padding(text, 3)
    assert kp.valid.tolist() == [[True, True, False, True, True, True, True],
                                 [False, False, True, True, True, True, True]]
    assert joint_key_padding(None, 3) is None


@pytest.mark.parametrize("variant", [
    dict(zero_cond_t=True), dict(use_layer3d_rope=True), dict(use_additional_t_cond=True)],
    ids=["zero_cond_t", "layer3d_rope", "additional_t_cond"])
@torch.no_grad()
def test_config_variants_match_diffusers(variant):
    ours, host = _model(**variant)
    x, e, mask, t, _ = qwen_image_inputs(torch.float32, batch_valid=(9, 3), width=9, grid=(1, 2, 6))
    x = torch.cat([x, x], dim=1)                                    # two 1x2x6 grids per sample
    shapes = [[(1, 2, 6), (1, 2, 6)]] * 2
    kwargs = {"additional_t_cond": torch.tensor([0, 1])} if variant.get("use_additional_t_cond") else {}
    host64 = copy.deepcopy(host).double()
    ref = host64(x.double(), e.double(), mask, t.double(), shapes, **kwargs).sample
    naive = host(x, e, mask, t, shapes, **kwargs).sample
    out = ours(x, e, mask, t, shapes, **kwargs)
    tol = tolerance(max_abs_error(naive, ref), torch.float32, ref)
    assert max_abs_error(out, ref) <= tol


def test_bad_mask_shape_is_rejected_before_any_kernel():
    ours, _ = _model()
    x, e, mask, t, shapes = qwen_image_inputs(torch.float32)
    with pytest.raises(ValueError, match="encoder_hidden_states_mask"):
        ours(x, e, mask[:, :4], t, shapes)


def _grad_backends():
    out = []
    for b in BACKENDS:
        ok = attnlib.get_backend(b).capabilities.autograd_on(DEVICE) and b not in SLOW_ON_CPU
        out.append(pytest.param(b, marks=[] if ok else pytest.mark.skip(reason=f"{b}: no CPU autograd / slow here")))
    return out


@pytest.mark.parametrize("backend", _grad_backends())
def test_parameter_gradients_match_diffusers(backend):
    """Training through attnlib: every parameter's gradient equals diffusers' (padded CFG batch)."""
    ours, host = _model()
    host64 = copy.deepcopy(host).double()
    x, e, mask, t, shapes = qwen_image_inputs(torch.float32)
    w = torch.randn(2, x.shape[1], 16, generator=torch.Generator().manual_seed(9))

    def grads(model, dtype, **ctx):
        model.zero_grad()
        out = model(x.to(dtype), e.to(dtype), mask, t.to(dtype), shapes)
        out = out.sample if hasattr(out, "sample") else out
        (out * w.to(dtype)).sum().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    ref, naive = grads(host64, torch.float64), grads(host, torch.float32)
    with attnlib.use_backend(backend):
        got = grads(ours, torch.float32)
    unused = sorted(n for n in ref if ref[n] is None)          # the last block's text MLP feeds nothing
    assert unused == sorted(n for n in got if got[n] is None)
    worst = max((max_abs_error(got[n], ref[n]) - tolerance(max_abs_error(naive[n], ref[n]), torch.float32, ref[n]), n)
                for n in ref if ref[n] is not None)
    assert worst[0] <= 0, f"{backend}: gradient of {worst[1]} exceeds the tolerance by {worst[0]:.3g}"
