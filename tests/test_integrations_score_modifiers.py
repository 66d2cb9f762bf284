"""Score modifiers through the integrations: transformers models with logit softcap (Gemma 2) and learnable
sinks (gpt-oss), and Gemma 3's sliding windows, give eager's logits and tokens under attn_implementation="attnlib";
the diffusers processors and the vLLM-Omni layer pass softcap / ALiBi / sinks to attnlib.attention."""
import copy
import warnings

import pytest
import torch

import attnlib
from attnlib.testing import assert_close_to_reference, reference_and_naive

transformers = pytest.importorskip("transformers")
import attnlib.integrations.transformers as hf  # noqa: E402

hf.register()


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()


#: tiny sizes; ``initializer_range`` large enough that scores pass the softcap and the sinks matter
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=3, initializer_range=0.5)
#: one sliding-window layer (window 3, shorter than the prompts) and one full layer
LAYERS = ["sliding_attention", "full_attention"]


def gemma2():
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **TINY, attn_logit_softcapping=1.0, query_pre_attn_scalar=16, layer_types=LAYERS))


def gemma3():
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **TINY, query_pre_attn_scalar=16, layer_types=LAYERS))


def gpt_oss():
    return transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **TINY, num_local_experts=4, num_experts_per_tok=2, layer_types=LAYERS))


#: model -> the backend that serves its modifier cheaply on the CPU (sdpa refuses softcap; flex compiles)
MODELS = {"gemma2": (gemma2, "math"), "gemma3": (gemma3, "sdpa"), "gpt_oss": (gpt_oss, "sdpa")}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    make, backend = MODELS[request.param]
    torch.manual_seed(0)
    m = make().eval()
    m64 = copy.deepcopy(m).double()
    if hasattr(m64, "set_experts_implementation"):
        m64.set_experts_implementation("eager")        # the grouped-mm experts take no float64
    return request.param, m, m64, backend


#: a left-padded batch: the first prompt has 6 tokens, the second 9 (both longer than the window)
AM = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])
IDS = torch.randint(1, 97, AM.shape, generator=torch.Generator().manual_seed(0))
POS = (AM.cumsum(-1) - 1).clamp(min=0)                  # positions as generate computes them


def _logits(m, impl, backend=None, **inputs):
    m.set_attn_implementation(impl)
    with torch.no_grad(), attnlib.use_backend(backend):
        return m(**inputs).logits


def _alone_float64(m64, row):
    """Float64 eager logits of prompt ``row`` alone, unpadded: the reference (eager's float64 turns a
    left-padded row into NaN: its fully masked padding rows divide 0 by 0)."""
    real = AM[row].bool()
    return _logits(m64, "eager", input_ids=IDS[row:row + 1, real])[0]


def test_left_padded_logits_match_eager(model, monkeypatch):
    name, m, m64, backend = model
    masks, real_translate = [], hf.translate

    def spy(*args, **kwargs):
        got = real_translate(*args, **kwargs)
        masks.append(got[0].mask)
        return got

    monkeypatch.setattr(hf, "translate", spy)
    got = _logits(m, hf.NAME, backend, input_ids=IDS, attention_mask=AM, position_ids=POS)
    # the padding itself, causal, and windowed in the sliding layer: no dense mask
    assert [(type(x).__name__, x.causal, x.window) for x in masks] == [("KeyPadding", True, 3),
                                                                        ("KeyPadding", True, None)]
    naive = _logits(m, "eager", input_ids=IDS, attention_mask=AM, position_ids=POS)
    worst = 0.0
    for row in range(AM.shape[0]):
        real = AM[row].bool()
        ref = _alone_float64(m64, row)
        assert_close_to_reference(got[row, real], ref, naive[row, real], torch.float32,
                                  what=f"{name} logits, row {row}")
        worst = max(worst, (got[row, real].double() - ref).abs().max().item())
    print(f"{name} on {backend}: max |logit - eager float64| = {worst:.2e}")


def test_the_modifiers_change_the_logits(model):
    """The checks above can fail: without the model's softcap / sinks the logits move far past the tolerance."""
    name, m, _, backend = model
    if name == "gemma3":
        pytest.skip("Gemma 3 passes no score modifier (its softcap applies to the final logits only)")
    want = _logits(m, hf.NAME, backend, input_ids=IDS, attention_mask=AM, position_ids=POS)
    saved = {}
    for layer in m.model.layers:
        attn = layer.self_attn
        saved[attn] = (getattr(attn, "attn_logit_softcapping", None), getattr(attn, "sinks", None))
        if name == "gemma2":
            attn.attn_logit_softcapping = None
        else:
            attn.sinks = torch.nn.Parameter(torch.full_like(attn.sinks, -1e4))       # a sink that takes nothing
    try:
        without = _logits(m, hf.NAME, backend, input_ids=IDS, attention_mask=AM, position_ids=POS)
    finally:
        for attn, (cap, sinks) in saved.items():
            if name == "gemma2":
                attn.attn_logit_softcapping = cap
            else:
                attn.sinks = sinks
    real = AM.bool()
    assert (want[real] - without[real]).abs().max() > 0.1


def test_output_attentions_weights_include_the_modifiers(model):
    """output_attentions=True: the weights of the softcapped scores, the sink's share in no key's weight, as eager."""
    name, m, _, _ = model
    inputs = dict(input_ids=IDS, attention_mask=AM, position_ids=POS, output_attentions=True)
    m.set_attn_implementation("eager")
    with torch.no_grad():
        want = m(**inputs).attentions
    m.set_attn_implementation(hf.NAME)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)                 # the reference path is slow: it warns once
        got = m(**inputs).attentions
    real = AM.bool()
    for w_got, w_want in zip(got, want):
        torch.testing.assert_close(w_got.permute(0, 2, 1, 3)[real], w_want.permute(0, 2, 1, 3)[real],
                                   atol=1e-5, rtol=1e-4)
    if name == "gpt_oss":                                              # the sinks take most of some rows
        assert got[0].permute(0, 2, 1, 3)[real].sum(-1).min() < 0.5


def _generate(m, impl, backend=None, **kw):
    m.set_attn_implementation(impl)
    with torch.no_grad(), attnlib.use_backend(backend):
        return m.generate(**kw, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                          output_logits=True)


def test_greedy_generation_with_cache_matches_eager(model):
    """Prefill of a left-padded batch, then decode past the sliding window with a dynamic cache."""
    name, m, m64, backend = model
    got = _generate(m, hf.NAME, backend, input_ids=IDS, attention_mask=AM)
    want = _generate(m, "eager", input_ids=IDS, attention_mask=AM)
    assert torch.equal(got.sequences, want.sequences)
    for row in range(AM.shape[0]):
        real = AM[row].bool()
        ref = _generate(m64, "eager", input_ids=IDS[row:row + 1, real])
        assert torch.equal(ref.sequences[0], torch.cat([IDS[row, real], want.sequences[row, AM.shape[1]:]]))
        for step, (g, r, n) in enumerate(zip(got.logits, ref.logits, want.logits)):
            assert_close_to_reference(g[row], r[0], n[row], torch.float32, what=f"{name} row {row} step {step}")


def test_gemma2_softcap_on_flex_matches_math():
    """One compiled backend: flex serves the softcap as a score_mod (the float64 comparison above runs math)."""
    torch.manual_seed(0)
    m = gemma2().eval()
    inputs = dict(input_ids=IDS, attention_mask=AM, position_ids=POS)
    want = _logits(m, hf.NAME, "math", **inputs)
    naive = _logits(m, "eager", **inputs)
    got = _logits(m, hf.NAME, "flex", **inputs)
    real = AM.bool()
    assert_close_to_reference(got[real], want[real].double(), naive[real], torch.float32, what="flex vs math")


# -- the other integrations pass the options through ---------------------------------------------------------
H, HKV, D = 4, 2, 16
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])
SINKS = torch.tensor([0.3, -1.0, 2.0, 0.0])


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mods", [dict(softcap=2.0), dict(alibi_slopes=SLOPES), dict(sinks=SINKS)],
                         ids=["softcap", "alibi", "sinks"])
def test_vllm_omni_layer_passes_score_modifiers(mods):
    from attnlib.integrations.vllm_omni import Attention, AttentionMetadata

    q, k, v = rand(2, 6, H, D), rand(2, 6, HKV, D, seed=1), rand(2, 6, HKV, D, seed=2)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]).bool()
    layer = Attention(H, D, True, None, num_kv_heads=HKV, backend="math", **mods)
    out = layer(q, k, v, AttentionMetadata(attn_mask=keep))
    mask = attnlib.KeyPadding(keep, causal=True)
    (ref, _), (naive, _) = reference_and_naive(q, k, v, mask, D ** -0.5, **mods)
    assert_close_to_reference(out, ref, naive, torch.float32)
    plain = attnlib.attention(q, k, v, mask, backend="math")
    assert (out - plain).abs().max() > 0.01                                   # the modifier took effect


def test_vllm_omni_layer_with_a_4d_mask_runs_alibi_in_the_hosts_positions():
    """A right-padded 4-D mask translates to gathered packed blocks (the padded queries in a block of
    their own), which move positions: with ALiBi the layer runs the host's mask as it is."""
    import dataclasses

    from attnlib.integrations.vllm_omni import Attention, AttentionMetadata

    q, k, v = rand(2, 6, H, D), rand(2, 6, HKV, D, seed=1), rand(2, 6, HKV, D, seed=2)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]).bool()
    layer = Attention(H, D, True, None, num_kv_heads=HKV, backend="math", alibi_slopes=SLOPES)
    out = layer(q, k, v, AttentionMetadata(attn_mask=keep[:, None, None, :].expand(2, 1, 6, 6)))
    translation = layer.last_translation
    assert translation.kind == "packed" and translation.parts[0].q_index is not None
    dense = attnlib.DenseMask(attnlib.Causal().materialize(6, 6)[None, None] & keep[:, None, None, :])
    (ref, _), (naive, _) = reference_and_naive(q, k, v, dense, D ** -0.5, alibi_slopes=SLOPES)
    assert_close_to_reference(out, ref, naive, torch.float32)
    # the gathered blocks themselves count the padded queries' distances from their block
    moved = dataclasses.replace(translation, source=None).run(q, k, v, scale=D ** -0.5, backend="math",
                                                               alibi_slopes=SLOPES)
    assert (moved - ref.float()).abs().max() > 0.01


def test_vllm_omni_layer_learns_its_sinks():
    from attnlib.integrations.vllm_omni import Attention

    sinks = torch.nn.Parameter(SINKS.clone())
    layer = Attention(H, D, False, None, num_kv_heads=HKV, backend="math", sinks=sinks)
    assert any(p is sinks for p in layer.parameters())
    layer(rand(1, 5, H, D), rand(1, 5, HKV, D, seed=1), rand(1, 5, HKV, D, seed=2)).sum().backward()
    assert sinks.grad is not None and sinks.grad.abs().sum() > 0


def test_diffusers_processor_passes_score_modifiers(monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    from attnlib.integrations import diffusers as adapter

    seen = []
    real = adapter.attention
    monkeypatch.setattr(adapter, "attention", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    torch.manual_seed(0)
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=24, axes_dims_rope=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 24, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 5, 24, generator=g),
                  encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.bool), timestep=torch.full((1,), 0.5),
                  img_shapes=[[(1, 4, 6)]])
    outs = {}
    for cap in (None, 0.5):
        adapter.use_attnlib(model, backend="math", softcap=cap)
        with torch.no_grad():
            outs[cap] = model(**inputs).sample
    assert [kw["softcap"] for kw in seen] == [None, 0.5]
    assert (outs[None] - outs[0.5]).abs().max() > 1e-3
