"""Qwen3-Omni blocks on attnlib: code predictor and thinker attention equal transformers on every
backend; KV-cache decode equals the full forward; the thinker->talker condition stream gives the
synchronous condition sequence for every chunking of the thinker output.
"""
import copy
import functools

import pytest
import torch

import attnlib
from attnlib.testing import max_abs_error
from models_ref.parity import (CODE_PREDICTOR_KWARGS, THINKER_KWARGS, assert_within_tolerance,
                               code_predictor_case, no_fallback, reference, seeded_block, thinker_attention_case,
                               thinker_inputs)
from models_ref.qwen3_omni import (WAIT, CodePredictor, KVCache, TalkerConditionStream, ThinkerAttention,
                                   sync_talker_conditions)

BACKENDS = [r["name"] for r in attnlib.list_backends() if r["available"]]
#: the parity references run where the GPU is, if there is one (the block-level invariants run on the CPU)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLOW_ON_CPU = {"flex", "triton"}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _no_silent_fallback():
    with no_fallback():
        yield


def _params():
    return [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in BACKENDS for d in DTYPES
            if not (b in SLOW_ON_CPU and d != torch.float32)]


def _transformers():
    return pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe",
                               reason="parity with transformers needs transformers>=5 installed")


#: the parity cases against transformers, and their references, per dtype (built once)
PARITY_CASES = {"code predictor": code_predictor_case, "thinker attention": thinker_attention_case}


@functools.lru_cache(maxsize=None)
def _reference(case, dtype):
    return reference(PARITY_CASES[case](), dtype, DEVICE)


def _check_parity(case, backend, dtype):
    """Our block of ``case`` on ``backend`` against transformers' (float64), under the tolerance policy."""
    _transformers()
    run, ref64, naive, _ = _reference(case, dtype)
    with attnlib.use_backend(backend):
        out = run()
    assert_within_tolerance(out, ref64, naive, dtype, f"{backend} {case}")


# ---------------------------------------------------------------------------------------------------
# code predictor
# ---------------------------------------------------------------------------------------------------
def test_code_predictor_state_dict_loads_strictly_from_transformers():
    tf = _transformers()
    from models_ref.parity import code_predictor_config
    host = tf.Qwen3OmniMoeTalkerCodePredictorModel(code_predictor_config())
    ours = CodePredictor.from_config(code_predictor_config())
    ours.load_state_dict(host.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(host.state_dict())


@pytest.mark.parametrize("backend,dtype", _params())
@torch.no_grad()
def test_code_predictor_full_and_cached_decode_match_transformers(backend, dtype):
    """``[full forward | prefill 2 + decode 3 one by one]`` vs transformers' full forward (float64)."""
    _check_parity("code predictor", backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_code_predictor_step_by_step_decode_equals_full_forward(backend):
    m = seeded_block(CodePredictor, CODE_PREDICTOR_KWARGS, 0, std=0.2)
    x = torch.randn(2, 6, CODE_PREDICTOR_KWARGS["hidden_size"])
    ref64 = copy.deepcopy(m).double()(x.double())
    with attnlib.use_backend("math"):
        naive = m(x)
    cache = KVCache()
    with attnlib.use_backend(backend):
        steps = [m(x[:, :2], cache)] + [m(x[:, i:i + 1], cache) for i in range(2, 6)]
    assert cache.length() == 6
    assert_within_tolerance(torch.cat(steps, dim=1), ref64, naive, what=f"{backend} decode")


@torch.no_grad()
def test_sliding_window_layers_decode_like_their_full_forward():
    kw = dict(CODE_PREDICTOR_KWARGS, layer_types=["sliding_attention", "full_attention"], sliding_window=3)
    torch.manual_seed(1)
    m = CodePredictor(**kw).eval().double()
    x = torch.randn(1, 7, kw["hidden_size"], dtype=torch.float64)
    full = m(x)
    cache = KVCache()
    steps = torch.cat([m(x[:, :1], cache)] + [m(x[:, i:i + 1], cache) for i in range(1, 7)], dim=1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-6)
    # the window matters: without it the first layer would see every key
    m.layers[0].self_attn.sliding_window = None
    assert max_abs_error(m(x), full) > 1e-3


# ---------------------------------------------------------------------------------------------------
# thinker attention
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,dtype", _params())
@torch.no_grad()
def test_thinker_attention_with_padding_and_mrope_matches_transformers(backend, dtype):
    """Left-padded batch, an image's 3-D positions in row 0; valid query rows compared."""
    _check_parity("thinker attention", backend, dtype)


def test_thinker_mrope_tables_equal_transformers_interleaved_mrope():
    tf = _transformers()
    from models_ref.parity import thinker_text_config
    h, pos, _ = thinker_inputs(torch.float32)
    cos, sin = tf.Qwen3OmniMoeThinkerTextRotaryEmbedding(thinker_text_config())(h, pos)
    ours = ThinkerAttention(**THINKER_KWARGS)
    c, s = ours.rope_tables(pos)
    half = c.shape[-1]
    torch.testing.assert_close(c, cos[..., :half], rtol=0, atol=0)
    torch.testing.assert_close(s, sin[..., :half], rtol=0, atol=0)
    torch.testing.assert_close(cos[..., half:], cos[..., :half], rtol=0, atol=0)   # transformers duplicates


def _thinker(dtype=torch.float32):
    return seeded_block(ThinkerAttention, THINKER_KWARGS, 7, std=0.2).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_thinker_padded_prefill_then_decode_equals_full_forward(backend):
    m = _thinker()
    h, pos, valid = thinker_inputs(torch.float32)
    g = torch.Generator().manual_seed(3)
    extra = torch.randn(2, 2, h.shape[-1], generator=g)
    h_all = torch.cat([h, extra], dim=1)
    last = pos[..., -1:]
    pos_all = torch.cat([pos, last + 1, last + 2], dim=-1)
    valid_all = torch.cat([valid, torch.ones(2, 2, dtype=torch.bool)], dim=1)
    ref64 = copy.deepcopy(m).double()(h_all.double(), m.rope_tables(pos_all), valid_all)
    with attnlib.use_backend("math"):
        naive = m(h_all, m.rope_tables(pos_all), valid_all)
    cache = KVCache()
    s = h.shape[1]
    with attnlib.use_backend(backend):
        parts = [m(h, m.rope_tables(pos), valid, cache)]
        for i in range(2):
            parts.append(m(extra[:, i:i + 1], m.rope_tables(pos_all[..., s + i:s + i + 1]), valid_all[:, :s + i + 1],
                           cache))
    out = torch.cat(parts, dim=1)
    assert_within_tolerance(out[valid_all], ref64[valid_all], naive[valid_all], what=f"{backend} thinker decode")
    assert torch.equal(out[~valid_all], torch.zeros_like(out[~valid_all]))   # padded query rows: exactly 0


def test_thinker_rejects_a_mask_of_the_wrong_width():
    m = _thinker()
    h, pos, valid = thinker_inputs(torch.float32)
    with pytest.raises(ValueError, match="attention_mask must be bool"):
        m(h, m.rope_tables(pos), valid[:, 1:])


# ---------------------------------------------------------------------------------------------------
# thinker -> talker condition stream
# ---------------------------------------------------------------------------------------------------
IM_END = 99
D = 4
EOS, PAD = torch.full((D,), -1.0), torch.full((D,), -2.0)


def _thinker_output(n_text: int, ends_with_im_end: bool, trailing: int = 0):
    ids = list(range(10, 10 + n_text)) + ([IM_END] if ends_with_im_end else []) + [7] * trailing
    embeds = torch.arange(len(ids), dtype=torch.float32)[:, None].repeat(1, D)
    return ids, embeds


def _label(c):
    if c is WAIT:
        return "WAIT"
    if torch.equal(c, EOS):
        return "eos"
    if torch.equal(c, PAD):
        return "pad"
    return int(c[0])


def test_sync_rule_first_token_to_prefill_im_end_never_then_one_eos_then_pad():
    ids, embeds = _thinker_output(3, True, trailing=2)
    prefill, steps = sync_talker_conditions(ids, embeds, 5, im_end_id=IM_END, tts_eos=EOS, tts_pad=PAD)
    assert _label(prefill) == 0
    assert [_label(c) for c in steps] == [1, 2, "eos", "pad", "pad"]


def test_a_step_whose_condition_has_not_arrived_waits_and_advances_nothing():
    ids, embeds = _thinker_output(3, True)
    s = TalkerConditionStream(im_end_id=IM_END, tts_eos=EOS, tts_pad=PAD)
    assert s.prefill() is WAIT
    s.push(ids[:2], embeds[:2])
    assert _label(s.prefill()) == 0
    assert _label(s.next()) == 1
    assert s.next() is WAIT and s.next() is WAIT       # token 2 not here yet; nothing advanced
    assert s.steps_taken == 1
    s.push(ids[2:3], embeds[2:3])
    assert _label(s.next()) == 2
    assert s.next() is WAIT                            # is token 2 the last text token? unknown until im_end
    s.push(ids[3:], embeds[3:])
    assert [_label(s.next()) for _ in range(3)] == ["eos", "pad", "pad"]


def test_im_end_is_never_a_condition_and_later_tokens_are_ignored():
    ids, embeds = _thinker_output(2, True, trailing=3)
    s = TalkerConditionStream(im_end_id=IM_END, tts_eos=EOS, tts_pad=PAD)
    s.push(ids, embeds)
    got = [_label(s.prefill())] + [_label(s.next()) for _ in range(4)]
    assert got == [0, 1, "eos", "pad", "pad"]
    assert s.ended


def test_thinker_stopping_without_im_end_still_ends_the_text():
    ids, embeds = _thinker_output(2, False)
    s = TalkerConditionStream(im_end_id=IM_END, tts_eos=EOS, tts_pad=PAD)
    s.push(ids, embeds)
    assert _label(s.prefill()) == 0 and _label(s.next()) == 1 and s.next() is WAIT
    s.finish()
    assert [_label(s.next()) for _ in range(2)] == ["eos", "pad"]


def test_empty_answer_gives_eos_to_prefill():
    s = TalkerConditionStream(im_end_id=IM_END, tts_eos=EOS, tts_pad=PAD)
    s.push([IM_END], torch.zeros(1, D))
    assert _label(s.prefill()) == "eos" and _label(s.next()) == "pad"


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.given(
    n_text=st.integers(0, 8), ends_with_im_end=st.booleans(), trailing=st.integers(0, 2),
    cuts=st.lists(st.integers(0, 12), max_size=6), pulls=st.lists(st.integers(0, 4), min_size=8, max_size=8),
    steps=st.integers(1, 12))
def test_every_chunking_of_the_thinker_output_gives_the_sync_sequence(n_text, ends_with_im_end, trailing, cuts,
                                                                      pulls, steps):
    ids, embeds = _thinker_output(n_text, ends_with_im_end, trailing)
    want_prefill, want = sync_talker_conditions(ids, embeds, steps, im_end_id=IM_END, tts_eos=EOS, tts_pad=PAD)
    want = [_label(want_prefill)] + [_label(c) for c in want]

    bounds = sorted({min(c, len(ids)) for c in cuts} | {0, len(ids)})
    chunks = list(zip(bounds[:-1], bounds[1:]))
    s = TalkerConditionStream(im_end_id=IM_END, tts_eos=EOS, tts_pad=PAD)
    got = []

    def pull(k):
        for _ in range(k):
            if len(got) == len(want):
                return
            c = s.prefill() if not got else s.next()
            if c is not WAIT:
                got.append(_label(c))

    for i, (a, b) in enumerate(chunks):
        s.push(ids[a:b], embeds[a:b])
        pull(pulls[i % len(pulls)])
    s.finish()                                          # the thinker is done (im_end or not)
    pull(len(want) + 1)
    assert got == want
