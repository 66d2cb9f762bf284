"""attn_implementation="attnlib" in transformers gives eager's numbers on tiny random models."""
import copy
import warnings

import pytest
import torch

import attnlib
from attnlib import BlockDiagonal, Causal, KeyPadding
from attnlib.testing import assert_close_to_reference, reference_and_naive

transformers = pytest.importorskip("transformers")
import attnlib.integrations.transformers as hf  # noqa: E402

BACKENDS = [r["name"] for r in attnlib.list_backends() if r["available"] and r["name"] != "triton"]

hf.register()


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()


def tiny_llama(**overrides):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   **overrides)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    return model, copy.deepcopy(model).double()


def logits(model, impl, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs).logits


class PlanRecorder:
    """Every MaskPlan the attnlib attention function runs."""

    def __init__(self, monkeypatch):
        self.plans = []
        real = hf.translate

        def spy(*args, **kwargs):
            plan, crop = real(*args, **kwargs)
            self.plans.append(plan)
            return plan, crop

        monkeypatch.setattr(hf, "translate", spy)

    def masks(self):
        return [p.mask for p in self.plans]


def assert_matches_eager(model, model64, keep=None, **inputs):
    """attnlib fp32 vs eager fp64 reference, budget from eager fp32's own error (attnlib.testing)."""
    inputs64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    ref = logits(model64, "eager", **inputs64)
    naive = logits(model, "eager", **inputs)
    got = logits(model, "attnlib", **inputs)
    if keep is not None:
        ref, naive, got = ref[keep], naive[keep], got[keep]
    assert_close_to_reference(got, ref, naive, torch.float32, what="logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_batch_matches_eager_with_packed_causal_blocks(backend, llama, monkeypatch):
    rec = PlanRecorder(monkeypatch)
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(1))
    am = torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9, [0] + [1] * 8])
    with attnlib.use_backend(backend):
        assert_matches_eager(*llama, keep=am.bool(), input_ids=ids, attention_mask=am)
    # one causal block per prompt, padding dropped: no dense mask
    assert rec.masks() == [BlockDiagonal([6, 9, 8], causal=True)] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_right_padded_batch_matches_eager_without_a_dense_mask(backend, llama, monkeypatch):
    """Right padding (training batches): prompts run causal, the padded queries (which see the whole
    prompt) run as one full block per prompt -- two packed calls, no DenseMask."""
    rec = PlanRecorder(monkeypatch)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(10))
    am = torch.tensor([[1] * 6 + [0] * 2, [1] * 8])
    with attnlib.use_backend(backend):
        assert_matches_eager(*llama, keep=am.bool(), input_ids=ids, attention_mask=am)
    assert rec.masks()[0] == (BlockDiagonal([6, 8], causal=True), BlockDiagonal([2], [6]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequences_packed_by_restarting_position_ids_do_not_see_each_other(backend, llama, monkeypatch):
    model, model64 = llama
    rec = PlanRecorder(monkeypatch)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1]])
    with attnlib.use_backend(backend):
        assert_matches_eager(model, model64, input_ids=ids, position_ids=pos, use_cache=False)
        alone = logits(model, "attnlib", input_ids=ids[:, 3:7], use_cache=False)
        packed = logits(model, "attnlib", input_ids=ids, position_ids=pos, use_cache=False)
    assert rec.masks()[0] == BlockDiagonal([3, 4, 2], causal=True)
    # the middle sequence gives the logits it gives alone: nothing leaked in from its neighbours
    alone_ref = logits(model64, "eager", input_ids=ids[:, 3:7], use_cache=False)
    alone_naive = logits(model, "eager", input_ids=ids[:, 3:7], use_cache=False)
    assert_close_to_reference(packed[:, 3:7], alone_ref, alone_naive, torch.float32, what="packed vs alone")
    assert_close_to_reference(alone, alone_ref, alone_naive, torch.float32, what="alone")


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_with_kv_cache_matches_eager(backend, llama, monkeypatch):
    model, _ = llama
    rec = PlanRecorder(monkeypatch)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        want = model.generate(**kw)
        model.set_attn_implementation("attnlib")
        with attnlib.use_backend(backend):
            got = model.generate(**kw)
    assert torch.equal(got, want)
    # decode steps: one query against the cache, left padding as KeyPadding (never top-left causal)
    decode = [m for m in rec.masks() if isinstance(m, KeyPadding)]
    assert decode and all(m.valid.shape[0] == 2 and not m.valid[0, :2].any() for m in decode)


def test_generation_without_padding_decodes_with_no_mask_and_prefills_causal(llama, monkeypatch):
    model, _ = llama
    rec = PlanRecorder(monkeypatch)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(4))
    kw = dict(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        want = model.generate(**kw)
        model.set_attn_implementation("attnlib")
        got = model.generate(**kw)
    assert torch.equal(got, want)
    kinds = [p.kind for p in rec.plans]
    assert kinds[:2] == ["causal", "causal"] and set(kinds[2:]) == {"none"}


@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_generation_matches_eager(llama, padded, monkeypatch):
    """Unpadded: the prefill has no mask and keys past the prompt are empty cache slots (cropped, as
    sdpa's top-left is_causal ignores them). Padded: prefill packs the prompts, decode is KeyPadding."""
    model, _ = llama
    rec = PlanRecorder(monkeypatch)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(5))
    am = torch.tensor([[0, 0, 1, 1, 1], [1] * 5]) if padded else torch.ones(2, 5, dtype=torch.long)
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=3, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    with torch.no_grad():
        model.set_attn_implementation("eager")
        want = model.generate(**kw)
        model.set_attn_implementation("attnlib")
        got = model.generate(**kw)
    assert torch.equal(got, want)
    prefill = rec.masks()[0]
    assert prefill == (BlockDiagonal([3, 5], causal=True) if padded else Causal())
    # decode: one query over the static cache slots, the unwritten ones hidden (none left: no mask)
    assert {p.kind for p in rec.plans[2:]} <= {"key_padding", "none"} and rec.plans[2].kind == "key_padding"


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen2_sliding_window_layers_run_windowed_causal(backend, monkeypatch):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, use_sliding_window=True,
                                   sliding_window=3, max_window_layers=0,
                                   layer_types=["sliding_attention", "full_attention"])
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    rec = PlanRecorder(monkeypatch)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(6))
    with attnlib.use_backend(backend):
        assert_matches_eager(model, copy.deepcopy(model).double(), input_ids=ids)
    assert Causal(window=3) in rec.masks() and Causal() in rec.masks()


def test_padded_bidirectional_encoder_runs_key_padding(monkeypatch):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4)
    model = transformers.BertModel(cfg).eval()
    rec = PlanRecorder(monkeypatch)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(12))
    am = torch.tensor([[1] * 5 + [0] * 2, [1] * 7])

    def hidden(m, impl):
        m.set_attn_implementation(impl)
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=am).last_hidden_state[am.bool()]

    got = hidden(model, "attnlib")
    assert_close_to_reference(got, hidden(copy.deepcopy(model).double(), "eager"), hidden(model, "eager"),
                              torch.float32, what="encoder states")
    assert all(isinstance(m, KeyPadding) and torch.equal(m.valid, am.bool()) for m in rec.masks())


@pytest.fixture(scope="module")
def qwen25_vl():
    torch.manual_seed(0)
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=8, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        image_token_id=150, video_token_id=153, vision_start_token_id=151, vision_end_token_id=152)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    thw = torch.tensor([[1, 4, 8], [1, 4, 4]])  # 8 and 4 image tokens after the 2x2 merge
    pixels = torch.randn(int(thw.prod(-1).sum()), 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(7))
    ids = torch.tensor([[0, 0, 5, 151] + [150] * 8 + [152, 7, 8, 9],
                        [5, 6, 7, 151] + [150] * 4 + [152, 7, 8, 9, 10, 11, 12, 13]])
    am = torch.tensor([[0, 0] + [1] * 14, [1] * 16])
    return model, dict(input_ids=ids, attention_mask=am, pixel_values=pixels, image_grid_thw=thw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen2_5_vl_left_padded_images_match_eager(backend, qwen25_vl, monkeypatch):
    model, inputs = qwen25_vl
    rec = PlanRecorder(monkeypatch)
    with attnlib.use_backend(backend):
        assert_matches_eager(model, copy.deepcopy(model).double(), keep=inputs["attention_mask"].bool(), **inputs)
    assert BlockDiagonal([14, 16], causal=True) in rec.masks()  # the text decoder (mRoPE positions)


def test_qwen2_5_vl_greedy_generation_matches_eager(qwen25_vl):
    model, inputs = qwen25_vl
    with torch.no_grad():
        model.set_attn_implementation("eager")
        want = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        model.set_attn_implementation("attnlib")
        got = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2
    training = False


def _qkv(B=1, S=6, Hq=4, Hkv=2, D=8):
    return rand(B, Hq, S, D), rand(B, Hkv, S, D, seed=1), rand(B, Hkv, S, D, seed=2)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_flash_style_cu_seq_lens_kwargs_run_as_block_diagonal():
    q, k, v = _qkv()
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out, weights = hf.attnlib_attention_forward(_Module(), q, k, v, None, scaling=0.125, cu_seq_lens_q=cu,
                                                cu_seq_lens_k=cu)
    assert weights is None and out.shape == (1, 6, 4, 8)
    (ref, _), (naive, _) = reference_and_naive(*(t.transpose(1, 2)[0] for t in (q, k, v)),
                                               BlockDiagonal([2, 4], causal=True), 0.125, packed=True)
    assert_close_to_reference(out[0], ref, naive, torch.float32)


@pytest.mark.parametrize("kwargs, feature", [
    (dict(softcap=30.0), "softcap"),
    (dict(dropout=0.1), "dropout"),
    (dict(output_attentions=True), "output_attentions"),
    (dict(s_aux=torch.zeros(4)), "sinks"),
    (dict(position_bias=torch.zeros(1, 4, 6, 6)), "position_bias"),
])
def test_unsupported_features_raise_naming_the_feature(kwargs, feature):
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match=feature):
        hf.attnlib_attention_forward(_Module(), q, k, v, None, **kwargs)


def test_backend_selection_pin_context_and_env_are_honoured(monkeypatch, llama):
    import attnlib.api

    used = []
    real = attnlib.api.select_backend

    def spy(call, backend):
        chosen = real(call, backend)
        used.append(chosen.name)
        return chosen

    monkeypatch.setattr(attnlib.api, "select_backend", spy)
    model, _ = llama
    ids = torch.randint(0, 97, (1, 4), generator=torch.Generator().manual_seed(8))
    hf.register("attnlib_math", backend="math")
    logits(model, "attnlib_math", input_ids=ids)
    assert set(used) == {"math"}
    for name in BACKENDS:
        used.clear()
        with attnlib.use_backend(name):
            logits(model, "attnlib", input_ids=ids)
        assert set(used) == {name}
    used.clear()
    monkeypatch.setenv("DIFFUSION_ATTENTION_BACKEND", "_native_math")
    logits(model, "attnlib", input_ids=ids)
    assert set(used) == {"math"}


def test_from_pretrained_with_attn_implementation_attnlib(tmp_path, llama, monkeypatch):
    model, model64 = llama
    model.save_pretrained(tmp_path)  # local round trip: no download
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="attnlib").eval()
    assert loaded.config._attn_implementation == "attnlib"
    rec = PlanRecorder(monkeypatch)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert rec.masks() == [Causal(), Causal()]
    assert_close_to_reference(got, logits(model64, "eager", input_ids=ids), logits(model, "eager", input_ids=ids),
                              torch.float32, what="logits")


def _trains_here(name):
    """Whether backend ``name`` itself serves a call that needs gradients on the CPU."""
    q = torch.zeros(1, 2, 2, 8, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warning of a backend that cannot
        return attnlib.resolve_backend(q, q, q, None, backend=name) == name


@pytest.mark.parametrize("backend", [b for b in BACKENDS if _trains_here(b)])
def test_training_gradients_on_a_right_padded_batch_match_eager(backend, llama):
    """Fine-tuning path: loss over real tokens, gradients through the packed gather/scatter."""
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(11))
    am = torch.tensor([[1] * 5 + [0] * 2, [1] * 7])
    labels = ids.masked_fill(am == 0, -100)

    def grads(model, impl):
        model.set_attn_implementation(impl)
        model.zero_grad()
        model(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    model, model64 = llama
    ref, naive = grads(model64, "eager"), grads(model, "eager")
    with attnlib.use_backend(backend):
        got = grads(model, "attnlib")
    model.zero_grad()
    model64.zero_grad()
    assert_close_to_reference(got, ref, naive, torch.float32, what="parameter gradients")


def test_a_fallback_inside_a_transformers_model_warns_at_the_users_line(llama):
    """The warning skips attnlib's, transformers' and torch's frames: it points at this test's call."""
    model, _ = llama
    model.set_attn_implementation("attnlib")
    ids = torch.randint(0, 97, (1, 5))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with attnlib.use_backend("flash"), torch.no_grad():
            model(input_ids=ids)                                   # flash cannot run here -> one fallback
    hits = [x for x in w if "attnlib: backend" in str(x.message)]
    if not hits:
        pytest.skip("flash can serve this call here: no fallback to point at")
    assert all(x.filename == __file__ for x in hits), [x.filename for x in hits]
