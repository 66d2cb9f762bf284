"""attn_implementation="attnlib" in transformers gives eager's numbers on tiny random models."""
import copy
import warnings

import pytest
import torch

import attnlib
from attnlib import BlockDiagonal, Causal, KeyPadding
from attnlib.testing import assert_close_to_reference, reference_and_naive
from tests.hostreads import HostReadError, no_host_reads

transformers = pytest.importorskip("transformers")
import attnlib.integrations.transformers as hf  # noqa: E402

BACKENDS = [r["name"] for r in attnlib.list_backends() if r["available"] and r["name"] != "triton"]

hf.register()


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()


#: the size every tiny model here shares
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def tiny(model_cls, config_cls, **config):
    """A ``TINY`` random ``model_cls`` in eval mode, its weights drawn after ``torch.manual_seed(0)``."""
    torch.manual_seed(0)
    return model_cls(config_cls(**TINY, **config)).eval()


def token_ids(shape, seed):
    """Random token ids of the ``TINY`` vocabulary, drawn from a generator of their own."""
    return torch.randint(0, TINY["vocab_size"], tuple(shape), generator=torch.Generator().manual_seed(seed))


def tiny_llama(**overrides):
    return tiny(transformers.LlamaForCausalLM, transformers.LlamaConfig, num_key_value_heads=2,
                max_position_embeddings=128, **overrides)


def tiny_qwen2_sliding(window=3):
    return tiny(transformers.Qwen2ForCausalLM, transformers.Qwen2Config, num_key_value_heads=1,
                use_sliding_window=True, sliding_window=window, max_window_layers=0,
                layer_types=["sliding_attention", "full_attention"])


def tiny_mistral(window=4):
    return tiny(transformers.MistralForCausalLM, transformers.MistralConfig, num_key_value_heads=2,
                sliding_window=window, max_position_embeddings=128)


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    return model, copy.deepcopy(model).double()


def logits(model, impl, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs).logits


class TranslationRecorder:
    """Every MaskTranslation the attnlib attention function runs."""

    def __init__(self, monkeypatch):
        self.translations = []
        real = hf.translate

        def spy(*args, **kwargs):
            got, crop = real(*args, **kwargs)
            self.translations.append(got)
            return got, crop

        monkeypatch.setattr(hf, "translate", spy)

    def masks(self):
        return [p.mask for p in self.translations]


@pytest.fixture
def rec(monkeypatch):
    """The test's TranslationRecorder, recording from the test's first line."""
    return TranslationRecorder(monkeypatch)


def assert_causal_key_padding(rec, am, layers):
    assert len(rec.translations) == layers
    for t in rec.translations:
        assert t.path == "direct" and t.kind == "key_padding"
        assert t.mask.causal and t.mask.window is None and torch.equal(t.mask.valid, am.bool())


def assert_greedy_tokens_match_eager(model, backend=None, **kw):
    """``model.generate(**kw)`` gives eager's tokens under attn_implementation="attnlib" (on ``backend``)."""
    with torch.no_grad():
        model.set_attn_implementation("eager")
        want = model.generate(**kw)
        model.set_attn_implementation("attnlib")
        with attnlib.use_backend(backend):
            got = model.generate(**kw)
    assert torch.equal(got, want)


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
def test_sequences_packed_by_restarting_position_ids_do_not_see_each_other(backend, llama, rec):
    model, model64 = llama
    ids = token_ids((1, 9), 2)
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
def test_greedy_generation_with_kv_cache_matches_eager(backend, llama, rec):
    model, _ = llama
    ids = token_ids((2, 6), 3)
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    assert_greedy_tokens_match_eager(model, backend, input_ids=ids, attention_mask=am, max_new_tokens=6,
                                     do_sample=False, pad_token_id=0)
    # decode steps: one query against the cache, left padding as KeyPadding (never top-left causal)
    decode = [m for m in rec.masks() if isinstance(m, KeyPadding)]
    assert decode and all(m.valid.shape[0] == 2 and not m.valid[0, :2].any() for m in decode)


def test_generation_without_padding_decodes_with_no_mask_and_prefills_causal(llama, rec):
    model, _ = llama
    ids = token_ids((1, 5), 4)
    assert_greedy_tokens_match_eager(model, input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    kinds = [p.kind for p in rec.translations]
    assert kinds[:2] == ["causal", "causal"] and set(kinds[2:]) == {"none"}


@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_generation_matches_eager(llama, padded, rec):
    """The prefill fills an empty static cache: keys past the prompt are empty slots (cropped), the
    prompt runs Causal() or causal KeyPadding. Decode: one query against the slots, its position known
    only on the device: KeyPadding over the written slots."""
    model, _ = llama
    ids = token_ids((2, 5), 5)
    am = torch.tensor([[0, 0, 1, 1, 1], [1] * 5]) if padded else torch.ones(2, 5, dtype=torch.long)
    assert_greedy_tokens_match_eager(model, input_ids=ids, attention_mask=am, max_new_tokens=3, do_sample=False,
                                     pad_token_id=0, cache_implementation="static")
    prefill = rec.masks()[0]
    if padded:
        assert isinstance(prefill, KeyPadding) and prefill.causal and torch.equal(prefill.valid, am.bool())
    else:
        assert prefill == Causal()
    assert all(p.path == "direct" for p in rec.translations)
    # decode: one query over the static cache slots, the unwritten ones hidden (none left: no mask)
    assert {p.kind for p in rec.translations[2:]} <= {"key_padding", "none"} and rec.translations[2].kind == "key_padding"


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen2_sliding_window_layers_run_windowed_causal(backend, rec):
    model = tiny_qwen2_sliding(window=3)
    ids = token_ids((2, 8), 6)
    with attnlib.use_backend(backend):
        assert_matches_eager(model, copy.deepcopy(model).double(), input_ids=ids)
    assert Causal(window=3) in rec.masks() and Causal() in rec.masks()


def test_padded_bidirectional_encoder_runs_key_padding(rec):
    model = tiny(transformers.BertModel, transformers.BertConfig)
    ids = token_ids((2, 7), 12)
    am = torch.tensor([[1] * 5 + [0] * 2, [1] * 7])

    def hidden(m, impl):
        m.set_attn_implementation(impl)
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=am).last_hidden_state[am.bool()]

    got = hidden(model, "attnlib")
    assert_close_to_reference(got, hidden(copy.deepcopy(model).double(), "eager"), hidden(model, "eager"),
                              torch.float32, what="encoder states")
    assert all(isinstance(m, KeyPadding) and torch.equal(m.valid, am.bool()) for m in rec.masks())
    assert {p.path for p in rec.translations} == {"direct"}


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
def test_qwen2_5_vl_left_padded_images_match_eager(backend, qwen25_vl, rec):
    model, inputs = qwen25_vl
    with attnlib.use_backend(backend):
        assert_matches_eager(model, copy.deepcopy(model).double(), keep=inputs["attention_mask"].bool(), **inputs)
    text = [m for m in rec.masks() if isinstance(m, KeyPadding)]  # the text decoder (mRoPE positions)
    assert text and all(m.causal and torch.equal(m.valid, inputs["attention_mask"].bool()) for m in text)


def test_qwen2_5_vl_greedy_generation_matches_eager(qwen25_vl):
    model, inputs = qwen25_vl
    assert_greedy_tokens_match_eager(model, **inputs, max_new_tokens=4, do_sample=False)


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
    (dict(dropout=0.1), "dropout"),
    (dict(sinks=torch.zeros(1, 4, 6, 1)), "per-token sinks"),        # one sink per token, not per head
    (dict(position_bias=torch.zeros(1, 4, 6, 6)), "position_bias"),
])
def test_unsupported_features_raise_naming_the_feature(kwargs, feature):
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match=feature):
        hf.attnlib_attention_forward(_Module(), q, k, v, None, **kwargs)


def test_backend_selection_pin_context_and_env_are_honoured(monkeypatch, llama):
    import attnlib.dispatch

    used = []
    real = attnlib.dispatch.execute

    def spy(backend, call, *rest):         # the backend each call runs on (fast path or not)
        used.append(backend.name)
        return real(backend, call, *rest)

    monkeypatch.setattr(attnlib.dispatch, "execute", spy)
    model, _ = llama
    ids = token_ids((1, 4), 8)
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


def test_from_pretrained_with_attn_implementation_attnlib(tmp_path, llama, rec):
    model, model64 = llama
    model.save_pretrained(tmp_path)  # local round trip: no download
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="attnlib").eval()
    assert loaded.config._attn_implementation == "attnlib"
    ids = token_ids((1, 5), 9)
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
    ids = token_ids((2, 7), 11)
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


# ---------------------------------------------------------------------------------------------
# the mask builder: attnlib masks straight from transformers' mask arguments
# ---------------------------------------------------------------------------------------------
from transformers import masking_utils as mu  # noqa: E402


def _truth(kw):
    """transformers' own dense mask for these arguments (what "sdpa" attends with)."""
    return mu.sdpa_mask(**dict(kw, allow_is_causal_skip=False, allow_is_bidirectional_skip=False))


def _as_dense(obj, B, Sq, Sk):
    """bool [B, 1, Sq, Sk] of what the attention function runs for a TransformersMask."""
    t, crop = obj.resolve(B, Sq, Sk)
    n = Sk if crop is None else crop
    m = t.mask
    if t.kind == "none":
        got = torch.ones(B, 1, Sq, n, dtype=torch.bool)
    elif t.kind == "packed":
        full = torch.zeros(B * Sq, B * n, dtype=torch.bool)   # flat rows b*Sq+i, flat keys b*Sk+j
        for part in t.parts:
            pm = part.mask.materialize()
            rows = torch.arange(B * Sq) if part.q_index is None else part.q_index
            cols = torch.arange(B * n) if part.kv_index is None else part.kv_index
            for r in range(pm.shape[0]):
                full[rows[r], cols[pm[r]]] = True
        got = torch.stack([full[b * Sq:(b + 1) * Sq, b * n:(b + 1) * n] for b in range(B)])[:, None]
        off_rows = full.clone()
        for b in range(B):
            off_rows[b * Sq:(b + 1) * Sq, b * n:(b + 1) * n] = False
        assert not off_rows.any(), "a packed sequence sees another row"
    else:
        got = m.materialize(Sq, n).expand(B, 1, Sq, n) if not isinstance(m, attnlib.DenseMask) else m.mask
    return torch.nn.functional.pad(got.expand(B, 1, Sq, n), (0, Sk - n), value=False)


def _kw(B, Sq, Sk, q_offset=0, kv_offset=0, fn=None, pad=None, local_size=None):
    return dict(batch_size=B, q_length=Sq, kv_length=Sk, q_offset=q_offset, kv_offset=kv_offset,
                mask_function=fn or mu.causal_mask_function, attention_mask=pad, local_size=local_size,
                allow_is_causal_skip=True, dtype=torch.float32, config=None, use_vmap=False, device="cpu")


PADS = {  # 2-D padding masks over the absolute positions 0..9
    "none": None,
    "left": torch.tensor([[0, 0, 0] + [1] * 7, [1] * 10]),
    "right": torch.tensor([[1] * 6 + [0] * 4, [1] * 10]),
    "holes": torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 0, 1, 1, 1, 1]]),
}

# (Sq, q_offset, kv_offset, Sk): where the queries and keys sit on the absolute positions
GEOMETRIES = {
    "prefill": (6, 0, 0, 6),
    "decode": (1, 7, 0, 8),
    "chunk": (3, 5, 0, 8),
    "sliding_cache_decode": (1, 8, 6, 3),        # a full DynamicSlidingWindowLayer (W=3) holds 2 old keys
    "sliding_cache_chunk": (2, 7, 5, 4),
    "fresh_static_prefill": (5, 0, 0, 9),         # keys 5..8 are empty static-cache slots
    "static_decode": (1, torch.tensor(6), 0, 9),  # a filled StaticLayer: the offset is a device tensor
    "static_chunk": (3, torch.tensor(4), 0, 9),
}


@pytest.mark.parametrize("window", [None, 1, 2, 3, 5])
@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_built_masks_equal_transformers_dense_masks(geometry, pad, window):
    """Every causal / sliding-window geometry and padding pattern: the attnlib mask attends exactly
    where transformers' sdpa_mask does (transformers' sliding_window W = the W newest keys, the
    query's own included: attnlib's window=W), built without the dense path."""
    Sq, q_off, kv_off, Sk = GEOMETRIES[geometry]
    fn = mu.causal_mask_function if window is None else mu.sliding_window_causal_mask_function(window)
    p = PADS[pad]
    kw = _kw(2, Sq, Sk, q_off, kv_off, fn, None if p is None else p.bool()[:, :int(q_off) + Sq], local_size=window)
    obj = hf.build_mask(**kw)
    assert isinstance(obj, hf.TransformersMask) and obj.path == "direct", obj
    assert torch.equal(_as_dense(obj, 2, Sq, Sk), _truth(kw)), obj


def test_sliding_window_convention_is_the_w_newest_keys_including_the_query():
    dense = _truth(_kw(1, 5, 5, fn=mu.sliding_window_causal_mask_function(3)))[0, 0]
    assert dense.sum(-1).tolist() == [1, 2, 3, 3, 3] and dense[4, 2:].all() and not dense[4, :2].any()
    obj = hf.build_mask(**_kw(1, 5, 5, fn=mu.sliding_window_causal_mask_function(3), local_size=3))
    assert obj.mask == Causal(window=3)


@pytest.mark.parametrize("pad", PADS)
def test_bidirectional_masks_are_key_padding(pad):
    p = PADS[pad]
    kw = _kw(2, 4, 10, fn=mu.bidirectional_mask_function, pad=None if p is None else p.bool())
    kw["allow_is_bidirectional_skip"] = True
    obj = hf.build_mask(**kw)
    assert obj.path == "direct" and (obj.mask is None if p is None else isinstance(obj.mask, KeyPadding))
    assert torch.equal(_as_dense(obj, 2, 4, 10), _truth(kw))


@pytest.mark.parametrize("window", [None, 2])
def test_packed_position_ids_become_one_block_diagonal_read_once(window, monkeypatch):
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    seg = mu.find_packed_sequence_indices(pos)
    base = mu.causal_mask_function if window is None else mu.sliding_window_causal_mask_function(window)
    fn = mu.and_masks(mu.remap_positions_for_packed_sequence(base, pos), mu.packed_sequence_mask_function(seg))
    kw = _kw(2, 6, 6, fn=fn, local_size=window)
    obj = hf.build_mask(**kw)
    assert torch.equal(_as_dense(obj, 2, 6, 6), _truth(kw))
    assert obj.mask == BlockDiagonal([3, 2, 1, 4, 2], causal=True, window=window) and obj.path == "lengths"
    reads = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or [])
    assert obj.resolve(2, 6, 6)[0] is obj.resolve(2, 6, 6)[0] and not reads  # built once, reused by every layer


def test_unrecognised_mask_functions_take_the_exact_dense_path():
    custom = mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv != 1)   # e.g. an image-token overlay
    chunked = mu.chunked_causal_mask_function(2, torch.zeros(2, dtype=torch.long))
    bidir_window = mu.sliding_window_bidirectional_mask_function(2)
    for fn in (custom, chunked, bidir_window):
        kw = _kw(2, 5, 5, fn=fn, pad=PADS["left"].bool()[:, :5])
        obj = hf.build_mask(**kw)
        assert obj.path == "dense" and "mask_function" in obj._why
        assert torch.equal(_as_dense(obj, 2, 5, 5), _truth(kw))
        assert obj.translation().path == "dense"


def test_a_model_that_asks_for_a_materialized_mask_gets_the_tensor():
    """allow_is_causal_skip=False from the model (it adds ALiBi or concatenates the mask): transformers'
    own tensor, which the attention function then analyses."""
    kw = dict(_kw(2, 5, 5, pad=PADS["left"].bool()[:, :5]), allow_is_causal_skip=False)
    got = hf.build_mask(**kw)
    assert isinstance(got, torch.Tensor) and torch.equal(got, _truth(kw))
    # ... but a compileable cache's decode step (transformers clears the flag itself) stays structured
    kw = dict(_kw(2, 1, 9, torch.tensor(6), pad=PADS["left"].bool()[:, :7]), allow_is_causal_skip=False)
    assert isinstance(hf.build_mask(**kw), hf.TransformersMask)


def test_a_prepared_mask_passed_back_in_is_reused():
    obj = hf.build_mask(**_kw(2, 1, 9, torch.tensor(6), pad=PADS["left"].bool()[:, :7]))
    assert hf.build_mask(**_kw(2, 1, 9, torch.tensor(6), pad=obj)) is obj
    assert obj.ndim == 4 and obj.shape == (2, 1, 1, 9)


# ---------------------------------------------------------------------------------------------
# models: padding patterns, generation, sliding windows, packing -- and nothing read on the host
# ---------------------------------------------------------------------------------------------
AMS = {
    "left": torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9, [0] + [1] * 8]),
    "right": torch.tensor([[1] * 6 + [0] * 3, [1] * 9, [1] * 8 + [0]]),
    "holes": torch.tensor([[1, 1, 0, 0, 1, 1, 1, 1, 1], [1] * 9, [0, 1, 0, 1, 1, 1, 0, 1, 1]]),
}


@pytest.mark.parametrize("am,seed", [
    pytest.param(AMS["left"], 1, id="left"),
    pytest.param(torch.tensor([[1] * 6 + [0] * 2, [1] * 8]), 10, id="right"),   # right padding: training batches
    pytest.param(AMS["holes"], 13, id="holes"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_padded_batch_matches_eager_with_causal_key_padding(backend, am, seed, llama, rec):
    """Left and right padding and holes: the 2-D padding mask itself, causal over the keys -- no DenseMask,
    nothing read on the host."""
    ids = token_ids(am.shape, seed)
    with attnlib.use_backend(backend):
        assert_matches_eager(*llama, keep=am.bool(), input_ids=ids, attention_mask=am)
    assert_causal_key_padding(rec, am, layers=2)


def generate(model, impl, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.generate(**kw, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)


def assert_generation_matches(model, model64, rec, **kw):
    """Greedy tokens equal eager's and sdpa's; every step's logits within the policy, the reference
    being sdpa in float64 (eager's float64 generation turns rows with leading padding into NaN)."""
    want = generate(model, "eager", **kw)
    got = generate(model, "attnlib", **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert torch.equal(got.sequences, generate(model, "sdpa", **kw).sequences)
    ref = generate(model64, "sdpa", **kw)
    assert torch.equal(ref.sequences, want.sequences)
    for step, (g, r, n) in enumerate(zip(got.logits, ref.logits, want.logits)):
        assert_close_to_reference(g, r, n, torch.float32, what=f"logits of step {step}")
    assert rec.translations and all(p.path == "direct" for p in rec.translations), [p.describe() for p in rec.translations]


@pytest.mark.parametrize("pattern", AMS)
def test_padded_generation_prefill_and_decode_match_eager_and_sdpa(pattern, llama, rec):
    model, model64 = llama
    am = AMS[pattern]
    ids = token_ids(am.shape, 14)
    assert_generation_matches(model, model64, rec, input_ids=ids, attention_mask=am, max_new_tokens=4)
    prefill, decode = rec.translations[:2], rec.translations[2:]
    assert all(p.mask.causal and torch.equal(p.mask.valid, am.bool()) for p in prefill)
    # decode: one query, KeyPadding over the prompt's validity and the generated keys
    assert len(decode) == 2 * 3 and all(isinstance(p.mask, KeyPadding) and not p.mask.causal for p in decode)
    assert all(torch.equal(p.mask.valid[:, :9], am.bool()) and p.mask.valid[:, 9:].all() for p in decode)


@pytest.mark.parametrize("pattern", ["none", "left", "holes"])
@pytest.mark.parametrize("make", [tiny_qwen2_sliding, tiny_mistral], ids=["qwen2_hybrid", "mistral"])
def test_sliding_window_generation_matches_eager_and_sdpa(make, pattern, rec):
    """Windows shorter than the prompt; decode past the window, where the sliding cache keeps only the
    newest keys (a key offset in the mask arguments)."""
    model = make()
    am = AMS.get(pattern, torch.ones(3, 9, dtype=torch.long))
    ids = token_ids(am.shape, 15)
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=4)
    assert_generation_matches(model, copy.deepcopy(model).double(), rec, **kw)
    window = model.config.sliding_window
    windowed = [p.mask for p in rec.translations if getattr(p.mask, "window", None) == window]
    assert len(windowed) == (1 if make is tiny_qwen2_sliding else 2)   # the prefill's sliding layers
    # decode in the sliding layers: the newest `window` keys of the cache, as validity
    sliding_decode = [p.mask for i, p in enumerate(rec.translations[2:]) if make is tiny_mistral or i % 2 == 0]
    assert all(m is None or m.valid.shape[1] <= window for m in sliding_decode)


@pytest.mark.parametrize("make", [tiny_qwen2_sliding, tiny_llama], ids=["qwen2_sliding", "llama"])
def test_packed_position_ids_in_two_rows_match_eager(make, rec):
    model = make()
    ids = token_ids((2, 8), 16)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]])
    assert_matches_eager(model, copy.deepcopy(model).double(), input_ids=ids, position_ids=pos, use_cache=False)
    masks = {p.mask for p in rec.translations}
    window = getattr(model.config, "sliding_window", None)
    want = {BlockDiagonal([5, 3, 2, 6], causal=True)} | ({BlockDiagonal([5, 3, 2, 6], causal=True, window=window)}
                                                        if window else set())
    assert masks == want and {p.path for p in rec.translations} == {"lengths"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", AMS)
def test_padded_prefill_and_decode_read_no_tensor_on_the_host(backend, pattern, llama):
    """The mask builder, the adapter and attnlib's backends on the CPU: no tensor read into Python
    (the packed path, which reads the sequence lengths once per forward, is not covered)."""
    model, _ = llama
    model.set_attn_implementation("attnlib")
    am = AMS[pattern]
    ids = token_ids(am.shape, 17)
    am_next = torch.cat([am, torch.ones(3, 1, dtype=am.dtype)], 1)
    with torch.no_grad(), attnlib.use_backend(backend):
        cache = transformers.DynamicCache(config=model.config)
        with no_host_reads():
            model(input_ids=ids, attention_mask=am, cache=cache)              # prefill
            model(input_ids=ids[:, :1], attention_mask=am_next, cache=cache)  # one decode step
        assert hf.last_translation().path == "direct"
    # the check bites: transformers' dense mask analysed on the host trips it
    dense = mu.sdpa_mask(**_kw(3, 9, 9, pad=am.bool()))
    with no_host_reads(), pytest.raises(HostReadError):
        hf.translate(torch.zeros(3, 4, 9, 8), torch.zeros(3, 2, 9, 8), dense, causal=True)


def test_the_attention_function_receives_attnlib_masks_not_tensors(llama, monkeypatch):
    model, _ = llama
    got = []
    real = hf.translate

    def spy(query, key, attention_mask, **kw):
        got.append(attention_mask)
        return real(query, key, attention_mask, **kw)

    monkeypatch.setattr(hf, "translate", spy)
    model.set_attn_implementation("attnlib")
    ids = token_ids((3, 9), 18)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=AMS["left"])
        model(input_ids=ids)
    assert len(got) == 4 and all(isinstance(m, hf.TransformersMask) for m in got)
    assert got[0] is got[1] and got[2] is got[3]            # one object per forward, shared by the layers
    assert isinstance(got[0].mask, KeyPadding) and got[0].mask.causal and got[2].mask == Causal()


@pytest.mark.parametrize("padded", [False, True])
def test_chunks_into_a_filled_static_cache_run_an_exact_device_built_mask(padded, llama, rec):
    """The second chunk's position is a device tensor (the static cache's length): the mask is built on
    the device as a DenseMask -- exact, no host read -- and the logits equal eager's."""
    model, model64 = llama
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]) if padded else torch.ones(2, 8, dtype=torch.long)
    ids = token_ids((2, 8), 19)

    def chunked(m, impl):
        m.set_attn_implementation(impl)
        cache = transformers.StaticCache(config=m.config, max_cache_len=12)
        with torch.no_grad():
            m(input_ids=ids[:, :5], attention_mask=am[:, :5], cache=cache)
            return m(input_ids=ids[:, 5:], attention_mask=am, cache=cache).logits

    got = chunked(model, "attnlib")
    assert_close_to_reference(got, chunked(model64, "eager"), chunked(model, "eager"), torch.float32,
                              what="second chunk's logits")
    second = rec.translations[2:]
    assert len(second) == 2 and all(p.path == "direct" and p.kind == "dense" for p in second)


def test_cu_seq_lens_refine_an_unpadded_mask_and_are_read_once(monkeypatch):
    q, k, v = _qkv()
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    obj = hf.build_mask(**_kw(1, 6, 6))
    assert obj.plain and obj.mask == Causal()
    first = hf.translate(q, k, obj, causal=True, cu_seqlens=(cu, cu))[0]
    assert first.mask == BlockDiagonal([2, 4], causal=True) and first.path == "lengths"
    reads = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or [])
    assert hf.translate(q, k, obj, causal=True, cu_seqlens=(cu, cu))[0] is first and not reads


def test_static_cache_generation_with_sliding_layers_matches_eager(rec):
    """A hybrid static cache: full layers decode with a device-built KeyPadding; the sliding layers'
    decode step cannot be told apart from a model asking for a tensor, so it takes the exact dense path."""
    model = tiny_qwen2_sliding()
    am = AMS["left"]
    ids = token_ids(am.shape, 20)
    assert_greedy_tokens_match_eager(model, input_ids=ids, attention_mask=am, max_new_tokens=3, do_sample=False,
                                     pad_token_id=0, cache_implementation="static")
    sliding, full = rec.translations[0::2], rec.translations[1::2]
    assert sliding[0].mask.window == 3 and full[0].mask.causal and all(p.path == "direct" for p in full)
    assert all(p.path == "dense" and "materialized" in p.why for p in sliding[1:])


@pytest.mark.parametrize("pattern", ["left", "none"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2_sliding], ids=["llama", "qwen2_sliding"])
def test_the_forward_compiles_as_one_graph(make, pattern):
    """Nothing in the mask builder or the adapter breaks a torch.compile graph (backend pinned: the
    use_backend() context variable is read outside the graph); compiled logits equal eager-mode ones.
    While compiling, masks whose closures dynamo cannot read (sliding windows, and the packed-sequence
    mask transformers always builds there without a padding mask) run as device-built DenseMasks."""
    hf.register("attnlib_sdpa", backend="sdpa")
    model = make()
    model.set_attn_implementation("attnlib_sdpa")
    am = AMS[pattern] if pattern != "none" else None
    ids = token_ids((3, 9), 21)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(input_ids=ids, attention_mask=am, use_cache=False).logits
        want = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    torch._dynamo.reset()
    keep = slice(None) if am is None else am.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)


def test_output_attentions_returns_the_weights_of_the_mask_that_ran(monkeypatch):
    """output_attentions=True: weights (and outputs) from the reference path, one warning, equal to eager on every
    query row that sees a key (padding rows get weight 0, attnlib's rule)."""
    monkeypatch.setattr(hf, "_weights_warned", [False])
    model = tiny_llama()
    ids = token_ids((2, 9), seed=3)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0                                              # left padding
    model.set_attn_implementation("eager")
    want = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    model.set_attn_implementation(hf.NAME)
    with pytest.warns(RuntimeWarning, match="output_attentions=True computes the attention weights"):
        got = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == TINY["num_hidden_layers"]
    real = mask.bool()
    for w_got, w_want in zip(got.attentions, want.attentions):
        assert w_got.shape == w_want.shape
        torch.testing.assert_close(w_got.permute(0, 2, 1, 3)[real], w_want.permute(0, 2, 1, 3)[real],
                                   atol=1e-5, rtol=1e-4)
        assert torch.equal(w_got[1, :, :3], torch.zeros_like(w_got[1, :, :3]))
    torch.testing.assert_close(got.logits[real], want.logits[real], atol=1e-4, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, attention_mask=mask, output_attentions=True)      # warned once


def test_the_documented_example_runs_as_written_and_generates_eagers_tokens():
    """docs/integrations.md's transformers example: no download, a left-padded batch generated greedily; the
    fallback warning (flash on a machine without it) points at the example's line."""
    import pathlib

    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "integrations.md").read_text()
    start = doc.index("```python\n", doc.index("## transformers")) + len("```python\n")
    code = doc[start:doc.index("```", start)]
    namespace = {}
    torch.manual_seed(0)                 # the example's random weights and prompts: the same every run
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        exec(compile(code, "docs-integrations", "exec"), namespace)
    model, out = namespace["model"], namespace["out"]
    assert out.shape == (2, 17) and model.config._attn_implementation == "attnlib"
    assert all(x.filename == "docs-integrations" for x in w if "attnlib:" in str(x.message))
    model.set_attn_implementation("eager")
    want = model.generate(input_ids=namespace["ids"], attention_mask=namespace["padding"], max_new_tokens=5,
                          do_sample=False)
    assert torch.equal(out, want)
