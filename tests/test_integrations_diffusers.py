"""attnlib's QwenImage processor gives diffusers' default numbers on a tiny random QwenImage transformer."""
import copy

import pytest
import torch

import attnlib
from attnlib import KeyPadding
from attnlib.testing import assert_close_to_reference

diffusers = pytest.importorskip("diffusers")
from attnlib.integrations.diffusers import FluxAttnProcessor, QwenImageAttnProcessor, use_attnlib  # noqa: E402

BACKENDS = [r["name"] for r in attnlib.list_backends() if r["available"] and r["name"] != "triton"]


@pytest.fixture(scope="module")
def qwen_image():
    torch.manual_seed(0)
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=24, axes_dims_rope=(4, 6, 6)).eval()
    return model, copy.deepcopy(model).double()


def inputs(text_mask, dtype=torch.float32, frames=1, height=4, width=6):
    g = torch.Generator().manual_seed(1)
    B = text_mask.shape[0]
    return dict(hidden_states=torch.randn(B, frames * height * width, 16, generator=g, dtype=dtype),
                encoder_hidden_states=torch.randn(B, text_mask.shape[1], 24, generator=g, dtype=dtype),
                encoder_hidden_states_mask=text_mask, timestep=torch.full((B,), 0.5, dtype=dtype),
                img_shapes=[[(frames, height, width)]] * B)


def run(model, processor, **kw):
    model.set_attn_processor(processor)
    with torch.no_grad():
        return model(**kw).sample


def default_processor():
    return diffusers.models.transformers.transformer_qwenimage.QwenDoubleStreamAttnProcessor2_0()


PROMPT_MASKS = {
    "padded_prompts": torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5]).bool(),
    "unpadded": torch.ones(2, 5, dtype=torch.bool),
}


@pytest.mark.parametrize("case", sorted(PROMPT_MASKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_qwenimage_attnlib_processor_matches_default_processor(backend, case, qwen_image, monkeypatch):
    model, model64 = qwen_image
    masks = []
    real = attnlib.integrations.diffusers.attention

    def spy(q, k, v, mask=None, **kw):
        masks.append(mask)
        return real(q, k, v, mask, **kw)

    monkeypatch.setattr(attnlib.integrations.diffusers, "attention", spy)
    tm = PROMPT_MASKS[case]
    ref = run(model64, default_processor(), **inputs(tm, torch.float64))
    naive = run(model, default_processor(), **inputs(tm))
    got = run(model, QwenImageAttnProcessor(backend=backend), **inputs(tm))
    assert_close_to_reference(got, ref, naive, torch.float32, what="QwenImage sample")
    if case == "padded_prompts":  # the text mask is a KeyPadding over [text, image] keys, no dense mask
        assert all(isinstance(m, KeyPadding) and m.valid.shape == (3, 7 + 24) and m.valid[:, 7:].all() for m in masks)
        assert torch.equal(masks[0].valid[:, :7], tm)
    else:
        assert masks == [None, None]


def test_processor_follows_use_backend_when_not_pinned(qwen_image, monkeypatch):
    import attnlib.dispatch

    model, _ = qwen_image
    used = []
    real = attnlib.dispatch.select_backend
    monkeypatch.setattr(attnlib.dispatch, "select_backend", lambda call, b: used.append(real(call, b).name) or real(call, b))
    use_attnlib(model)
    tm = PROMPT_MASKS["padded_prompts"]
    with torch.no_grad(), attnlib.use_backend("math"):
        model(**inputs(tm))
    assert set(used) == {"math"}


def test_use_attnlib_names_unsupported_models():
    class SD3Transformer2DModel(torch.nn.Module):
        pass

    with pytest.raises(NotImplementedError, match="SD3Transformer2DModel"):
        use_attnlib(SD3Transformer2DModel())


def test_processor_rejects_an_extra_attention_mask(qwen_image):
    model, _ = qwen_image
    attn = model.transformer_blocks[0].attn
    x, txt = torch.randn(1, 4, 64), torch.randn(1, 3, 64)
    with pytest.raises(NotImplementedError, match="encoder_hidden_states_mask"):
        QwenImageAttnProcessor()(attn, x, txt, attention_mask=torch.ones(1, 7, dtype=torch.bool))


@pytest.mark.parametrize("backend", BACKENDS)
def test_flux_attnlib_processor_matches_default_in_double_and_single_stream_blocks(backend):
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=24, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6)).eval()
    model64 = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(2)
    h, w, txt = 3, 4, 5
    grid = torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    img_ids = torch.stack(grid, -1)  # (frame, row, column) position of each image token
    kw = dict(hidden_states=torch.randn(2, h * w, 16, generator=g),
              encoder_hidden_states=torch.randn(2, txt, 24, generator=g),
              pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.tensor([0.3, 0.7]),
              img_ids=img_ids.reshape(-1, 3).float(), txt_ids=torch.zeros(txt, 3))
    kw64 = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}
    default = diffusers.models.transformers.transformer_flux.FluxAttnProcessor
    ref = run(model64, default(), **kw64)
    naive = run(model, default(), **kw)
    got = run(model, FluxAttnProcessor(backend=backend), **kw)
    assert_close_to_reference(got, ref, naive, torch.float32, what="Flux sample")
