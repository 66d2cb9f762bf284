"""Hosts compiled with attnlib inside: no more graph breaks than the host's own SDPA path, same numbers."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

import attnlib.integrations.transformers as hf  # noqa: E402
from attnlib.integrations.diffusers import QwenImageAttnProcessor  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _qwen2(impl):
    hf.register()
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, num_key_value_heads=2)).eval()
    model.set_attn_implementation(impl)
    return model


def _breaks(fn, *args, **kwargs):
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(fn)(*args, **kwargs)
    return ex.graph_count, ex.graph_break_count


IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
PADDED = torch.ones(2, 12, dtype=torch.long)
PADDED[1, :4] = 0


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_transformers_model_graph_breaks_equal_sdpa_and_compiled_logits_equal_eager(padded):
    kwargs = dict(input_ids=IDS, attention_mask=PADDED if padded else None)
    host = _breaks(_qwen2("sdpa"), **kwargs)
    ours_model = _qwen2(hf.NAME)
    ours = _breaks(ours_model, **kwargs)
    assert ours == host == (1, 0)
    torch._dynamo.reset()
    with torch.no_grad():
        want = ours_model(**kwargs).logits
        got = torch.compile(ours_model, fullgraph=True, backend="aot_eager")(**kwargs).logits
    real = PADDED.bool() if padded else torch.ones(2, 12, dtype=torch.bool)
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def _qwen_image():
    torch.manual_seed(0)
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=24, axes_dims_rope=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(1)
    text_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]).bool()
    inputs = dict(hidden_states=torch.randn(2, 24, 16, generator=g), encoder_hidden_states=torch.randn(2, 7, 24, generator=g),
                  encoder_hidden_states_mask=text_mask, timestep=torch.full((2,), 0.5), img_shapes=[[(1, 4, 6)]] * 2)
    return model, inputs


def test_diffusers_qwenimage_graph_breaks_equal_native_and_compiled_output_equals_eager():
    model, inputs = _qwen_image()
    host = _breaks(model, **inputs)
    with torch.no_grad():
        native = model(**inputs).sample
    model.set_attn_processor(QwenImageAttnProcessor())
    ours = _breaks(model, **inputs)
    assert ours == host == (1, 0)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(**inputs).sample
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs).sample
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager, native, atol=1e-4, rtol=1e-4)
