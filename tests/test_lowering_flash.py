"""The ``flash`` backend on a CPU machine: its pure lowering, and the whole backend against fakes.

The fakes implement flash-attn's *documented* semantics (``flash_attn_interface.py`` docstrings and
``flash_api.cpp``): bottom-right causal, ``window_size=(left, right)`` relative to the bottom-right
diagonal with ``-1`` = unlimited and values ``>= seqlen_k`` normalized to ``-1``, GQA by head groups,
an all-masked row gives output 0 and LSE ``+inf``, LSE ``[B, H, Sq]`` dense / ``[H, Tq]`` varlen, the
same head size for q/k/v, fp16/bf16 only. The only liberty: they run on the CPU.
"""
import sys
import types

import pytest
import torch

import attnlib
from attnlib import BlockDiagonal, Causal, DenseMask, KeyPadding
from attnlib.backends import flash
from attnlib.backends.flash import (FlashSplit, KEY_PADDING_CAUSAL_REASON, FlashDense, FlashKeyPadding, FlashVarlen, Refused,
                                    flash_window_size, lower, lower_key_padding, pad_head_dims, pad_keys, unpad_keys,
                                    varlen_lse_to_dense)
from attnlib.inputs import validate_call
from attnlib.dispatch import execute
from attnlib.plan import plan_for
from attnlib import registry
from attnlib.registry import get_backend
from tests.graphs import assert_one_node_and_eager_numbers
from fakes import causal_plans, install_modules, key_padding_plans, pretend_cuda, sweep_conformance

# ---------------------------------------------------------------------------------------------
# pure lowering
# ---------------------------------------------------------------------------------------------


def test_window_of_w_newest_keys_is_flash_window_w_minus_1_left_0_right():
    assert flash_window_size(None) == (-1, -1)
    assert flash_window_size(1) == (0, 0)
    assert flash_window_size(8) == (7, 0)


def _lowered(mask, sq, sk):
    return lower(plan_for(mask, sq, sk))


def test_bottom_right_causal_is_native_and_top_left_truncates_keys_when_keys_outnumber_queries():
    assert _lowered(None, 5, 9) == FlashDense()
    assert _lowered(Causal(window=4), 6, 29) == FlashDense(True, (3, 0))
    assert _lowered(Causal(align="top_left"), 6, 29) == FlashDense(True, (-1, -1), key_stop=6)
    assert _lowered(Causal(align="top_left"), 7, 7) == FlashDense(True)
    assert _lowered(Causal(), 1, 9) == FlashDense()           # every query sees every key: no causal at all
    # top-left with more queries than keys: the first 6 rows see a prefix (bottom-right there), the rest every key
    assert _lowered(Causal(align="top_left"), 12, 7) == FlashSplit(6, 6)
    bad = _lowered(Causal(align="top_left", window=3), 12, 7)
    assert isinstance(bad, Refused) and "windowed" in bad.reason and "12" in bad.reason
    assert _lowered(Causal(align="top_left"), 12, 1) == FlashDense()     # one key: every row sees it
    mask = BlockDiagonal([3, 1], [4, 1], causal=True)
    low = _lowered(mask, 4, 5)
    assert isinstance(low, FlashVarlen) and (low.varlen.q_seqlens, low.varlen.kv_seqlens) == ((3, 1), (4, 1))


def test_restricted_plans_cut_keys_or_are_refused():
    whole = plan_for(Causal(), 8, 8)
    # rows 0..3 against every key: offset 0 < Sk - Sq = 4 -> the first 4 keys, bottom-right
    assert lower(whole.restrict((0, 4), (0, 8))) == FlashDense(True, key_stop=4)
    assert lower(whole.restrict((4, 8), (2, 8))) == FlashDense(True)                # offset 2 == 6 - 4: native
    assert lower(whole.restrict((0, 2), (4, 8))) == FlashDense(True, key_stop=0)    # offset -4: no row sees a key
    # a diagonal right of bottom-right: rows split into a bottom-right prefix and rows that see every key
    assert lower(whole.restrict((4, 8), (0, 6))) == FlashSplit(1, 5)
    assert lower(whole.restrict((0, 8), (2, 6))) == FlashSplit(5, 3)
    assert lower(whole.restrict((7, 8), (0, 6))) == FlashDense()      # the last row sees all 6 keys
    # a restricted packed plan is still variable-length sequences: the keys no row sees form their own
    packed = lower(plan_for(BlockDiagonal([2, 2], causal=True), 4, 4).restrict((0, 2), (0, 4)))
    assert isinstance(packed, FlashVarlen) and (packed.varlen.q_seqlens, packed.varlen.kv_seqlens) == ((2, 0), (2, 2))


def test_key_padding_causal_runs_only_where_every_query_sees_the_same_key_positions():
    valid = torch.ones(2, 9, dtype=torch.bool)
    assert _lowered(KeyPadding(valid), 4, 9) == FlashKeyPadding(0, 9)
    assert _lowered(KeyPadding(valid, causal=True), 1, 9) == FlashKeyPadding(0, 9)               # decode
    assert _lowered(KeyPadding(valid, causal=True, window=3), 1, 9) == FlashKeyPadding(6, 9)     # its window
    refused = _lowered(KeyPadding(valid, causal=True), 4, 9)
    assert refused == Refused(KEY_PADDING_CAUSAL_REASON)
    assert "KeyPadding(causal=True)" in refused.reason and "cannot keep key positions" in refused.reason
    assert _lowered(KeyPadding(valid[:, :0], causal=True), 3, 0) == FlashKeyPadding(0, 0)


def _valid_patterns():
    valid = torch.ones(4, 9, dtype=torch.bool)
    valid[0, 6:] = False          # right padding: 6 keys
    valid[1, :4] = False          # left padding: 5 keys
    valid[2, [1, 2, 5]] = False   # holes: 6 keys
    valid[3] = False              # nothing visible
    return valid


def test_key_padding_cu_seqlens_count_valid_keys_for_left_right_and_holes():
    valid = _valid_patterns()
    low = lower_key_padding(valid, seqlen_q=3)
    assert low.cu_seqlens_k.dtype == torch.int32 and low.cu_seqlens_q.dtype == torch.int32
    assert low.cu_seqlens_k.tolist() == [0, 6, 11, 17, 17]
    assert low.cu_seqlens_q.tolist() == [0, 3, 6, 9, 12]     # queries are never dropped
    assert (low.max_seqlen_q, low.max_seqlen_k) == (3, 9)
    # the index walks keys in order, batch row by batch row
    assert low.key_index[:6].tolist() == [0, 1, 2, 3, 4, 5]
    assert low.key_index[6:11].tolist() == [13, 14, 15, 16, 17]
    assert low.key_index[11:].tolist() == [18, 21, 22, 24, 25, 26]


def test_unpad_then_repad_keys_round_trips_with_zeros_at_padding():
    valid = _valid_patterns()
    k = torch.randn(4, 9, 2, 5)
    low = lower_key_padding(valid, 3)
    packed = unpad_keys(k, low.key_index)
    assert packed.shape == (17, 2, 5)
    back = pad_keys(packed, low.key_index, 4, 9)
    assert torch.equal(back[valid], k[valid])
    assert torch.count_nonzero(back[~valid]) == 0
    # sequence b of the packed keys is exactly the valid keys of batch row b
    cu = low.cu_seqlens_k.tolist()
    assert torch.equal(packed[cu[2]:cu[3]], k[2][valid[2]])


def test_varlen_lse_of_equal_sequences_reads_back_as_dense_b_h_s():
    lse = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3 * 4)     # [H=2, B*Sq = 3*4]
    dense = varlen_lse_to_dense(lse, 3, 4)
    assert dense.shape == (3, 2, 4)
    assert dense[1, 0].tolist() == [4.0, 5.0, 6.0, 7.0] and dense[2, 1].tolist() == [20.0, 21.0, 22.0, 23.0]


def test_head_dims_are_zero_padded_to_one_multiple_of_8():
    q, k, v = torch.randn(1, 2, 1, 24), torch.randn(1, 3, 1, 24), torch.randn(1, 3, 1, 16)
    q2, k2, v2 = pad_head_dims(q, k, v)
    assert q2.shape[-1] == k2.shape[-1] == v2.shape[-1] == 24
    assert torch.count_nonzero(v2[..., 16:]) == 0
    q3, k3, v3 = pad_head_dims(torch.randn(1, 2, 1, 12), torch.randn(1, 2, 1, 12), torch.randn(1, 2, 1, 20))
    assert q3.shape[-1] == v3.shape[-1] == 24 and torch.count_nonzero(q3[..., 12:]) == 0
    same = torch.randn(1, 2, 1, 32)
    assert pad_head_dims(same, same, same)[0] is same


# ---------------------------------------------------------------------------------------------
# unavailable on this machine, precisely
# ---------------------------------------------------------------------------------------------


def test_on_a_cpu_machine_without_flash_attn_the_reason_names_both_missing_pieces(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    monkeypatch.setattr(registry, "_warned", set())      # one warning per reason: keep the registry's own set clean
    flash._detect.cache_clear()
    row = {r["name"]: r for r in attnlib.list_backends()}["flash"]
    assert not row["available"]
    assert "flash-attn not installed" in row["reason"] and "pip install flash-attn" in row["reason"]
    assert "no CUDA device" in row["reason"]
    q = torch.randn(1, 4, 2, 16)
    with pytest.warns(RuntimeWarning, match="flash"):
        assert attnlib.resolve_backend(q, q, q, backend="flash") == "sdpa"


# ---------------------------------------------------------------------------------------------
# honest fakes
# ---------------------------------------------------------------------------------------------


def _fa_visible(sq, sk, causal, window):
    """flash-attn's visibility rule (flash_api.cpp normalization included), bool [Sq, Sk]."""
    left, right = window
    left = -1 if left >= sk else left
    right = -1 if right >= sk else right
    right = 0 if causal else right
    i, j = torch.arange(sq).unsqueeze(1), torch.arange(sk).unsqueeze(0)
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        keep &= j >= i + sk - sq - left
    if right >= 0:
        keep &= j <= i + sk - sq + right
    return keep


def _fa_one_sequence(q, k, v, scale, causal, left, right, softcap=0.0, alibi=None):
    """flash-attn semantics for one sequence. q [Sq,Hq,D], k/v [Sk,Hkv,D] -> out [Sq,Hq,D], lse [Hq,Sq];
    ``softcap`` (> 0: ``c tanh(s / c)``) and ALiBi (``-slope * |i + Sk - Sq - j|``) as flash-attn 2 documents."""
    sq, sk = q.shape[0], k.shape[0]
    if sk == 0:   # flash-attn exits early: output 0, LSE +inf
        return q.new_zeros(sq, q.shape[1], v.shape[-1]), torch.full((q.shape[1], sq), float("inf"))
    keep = _fa_visible(sq, sk, causal, (left, right))
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
        s = s - alibi.float().view(-1, 1, 1) * (i + sk - sq - j).abs()
    s = s.masked_fill(~keep, float("-inf"))
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den > 0, den, torch.ones_like(den))
    out = torch.einsum("hqk,khd->qhd", p, vf)
    lse = torch.where(den > 0, torch.log(den) + m, torch.full_like(den, float("inf"))).squeeze(-1)
    return out.to(q.dtype), lse.detach()


def _fa_checks(q, k, v):
    assert q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only supports fp16 and bf16"
    assert q.dtype == k.dtype == v.dtype
    assert q.shape[-1] == k.shape[-1] == v.shape[-1], "q, k, v must have the same head size"
    assert q.shape[-1] <= 256 and q.shape[-2] % k.shape[-2] == 0
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1


def _fa_dense(q, k, v, scale, causal, window, softcap=0.0, alibi=None):
    _fa_checks(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    slopes = (lambda b: None) if alibi is None else (lambda b: alibi if alibi.dim() == 1 else alibi[b])
    outs, lses = zip(*[_fa_one_sequence(q[b], k[b], v[b], scale, causal, *window, softcap, slopes(b))
                       for b in range(q.shape[0])])
    return torch.stack(outs), torch.stack(lses)           # [B,Sq,H,D], [B,H,Sq]


def _fa_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window, calls, softcap=0.0, alibi=None):
    _fa_checks(q, k, v)
    assert cu_q.dtype == cu_k.dtype == torch.int32 and cu_q.device == q.device
    assert isinstance(max_q, int) and isinstance(max_k, int)
    calls.append({"cu_q": cu_q, "cu_k": cu_k, "max_q": max_q, "max_k": max_k, "causal": causal, "window": window})
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    left, right = window
    if left >= max_k:
        left = -1
    if right >= max_k:
        right = -1
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        assert cq[b + 1] - cq[b] <= max_q and ck[b + 1] - ck[b] <= max_k
        slopes = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[b])
        o, l = _fa_one_sequence(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], scale, causal, left, right,
                                softcap, slopes)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses, dim=1)         # [Tq,H,D], [H,Tq]


def _fake_module(name, calls, flash_attn_func, flash_attn_varlen_func, **attrs):
    """A fake flash-attn module: its two entry points, and ``calls``, what they were called with."""
    mod = types.ModuleType(name)
    mod.calls, mod.flash_attn_func, mod.flash_attn_varlen_func = calls, flash_attn_func, flash_attn_varlen_func
    for attr, value in attrs.items():
        setattr(mod, attr, value)
    return mod


def make_fake_fa2():
    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, deterministic=False, return_attn_probs=False):
        calls.append({"dense": True, "causal": causal, "window": window_size, "k": tuple(k.shape)})
        out, lse = _fa_dense(q, k, v, softmax_scale, causal, tuple(window_size), softcap, alibi_slopes)
        return (out, lse, torch.empty(0)) if return_attn_probs else out

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
        out, lse = _fa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                              tuple(window_size), calls, softcap, alibi_slopes)
        return (out, lse, torch.empty(0)) if return_attn_probs else out

    return _fake_module("flash_attn", calls, flash_attn_func, flash_attn_varlen_func, __version__="2.8.3")


def make_fake_fa3():
    """An FA3 build whose functions always return ``(out, lse)`` (no return_attn_probs)."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, window_size=(-1, -1), softcap=0.0,
                        num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0):
        return _fa_dense(q, k, v, softmax_scale, causal, tuple(window_size), softcap)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                               seqused_k=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0):
        return _fa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                          tuple(window_size), calls, softcap)

    return _fake_module("flash_attn_interface", calls, flash_attn_func, flash_attn_varlen_func)


def make_fake_fa4():
    """FA4 (flash_attn.cute): ``window_size=(None, None)``, ``return_lse``, always a tuple."""
    calls = []

    def _window(causal, window_size):
        left, right = window_size
        assert left is None or left >= 0, "FA4 takes None, not -1, for an unlimited window"
        assert right is None or right >= 0
        return (-1 if left is None else left, -1 if right is None else right)

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None,
                        softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, return_lse=False):
        out, lse = _fa_dense(q, k, v, softmax_scale, causal, _window(causal, window_size), softcap)
        return out, (lse if return_lse else None)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                               seqused_q=None, seqused_k=None, page_table=None, softmax_scale=None, causal=False,
                               window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
                               deterministic=False, return_lse=False):
        out, lse = _fa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                              _window(causal, window_size), calls, softcap)
        return out, (lse if return_lse else None)

    return _fake_module("flash_attn.cute", calls, flash_attn_func, flash_attn_varlen_func)


def make_fake_torch_varlen(calls):
    """``torch.nn.attention.varlen.varlen_attn`` as documented: causal only as ``window_size == (-1, 0)``."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        if not enable_gqa:
            assert query.shape[1] == key.shape[1], "Try setting enable_gqa=True for GQA."
        is_causal = window_size == (-1, 0)
        out, lse = _fa_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, is_causal,
                              tuple(window_size), calls)
        return (out, lse) if return_aux is not None and return_aux.lse else out

    return varlen_attn


#: the fake module of each flash-attn implementation
FAKES = {"fa2": make_fake_fa2, "fa3": make_fake_fa3, "fa4": make_fake_fa4}


@pytest.fixture
def on_fake(monkeypatch):
    """Install a fake implementation, let the backend believe in CUDA and accept CPU tensors."""
    pretend_cuda(monkeypatch, flash, flash.FlashBackend)
    monkeypatch.delenv(flash.ENV_IMPL, raising=False)

    def install(kind):
        calls = []
        if kind in FAKES:
            mod = FAKES[kind]()
            install_modules(monkeypatch, {mod.__name__: mod})
            calls = mod.calls
        else:
            monkeypatch.setattr(flash, "_torch_varlen_attn", lambda: make_fake_torch_varlen(calls))
        monkeypatch.setenv(flash.ENV_IMPL, kind)
        flash._detect.cache_clear()
        assert flash._detect()[0].kind == kind
        return calls

    yield install
    flash._detect.cache_clear()


def _served(kind, install, dtypes_gqa, grad=False):
    install(kind)
    return sweep_conformance("flash", dtypes_gqa, grad=grad, label=f"{kind} ")


#: what flash-attn cannot take: arbitrary dense masks, block layouts, and causal padded prompts (more than one
#: query); per implementation, the score modifiers it lacks (FA3/FA4: no ALiBi; PyTorch's kernels: neither)
NOT_SERVED = {"dense_bool", "dense_additive", "key_padding_causal", "key_padding_causal_window", "block_sparse",
              "block_sparse_heads_causal"}
NO_ALIBI = {"alibi", "alibi_varlen", "softcap_alibi_sinks"}
NO_SOFTCAP = {"softcap", "softcap_alibi_sinks"}
NOT_SERVED_BY = {"fa2": NOT_SERVED | {"softcap_alibi_sinks"}, "fa3": NOT_SERVED | NO_ALIBI,
                 "fa4": NOT_SERVED | NO_ALIBI, "torch": NOT_SERVED | NO_ALIBI | NO_SOFTCAP}


def test_fa2_lowering_matches_math_on_every_conformance_case_it_serves(on_fake):
    skipped = _served("fa2", on_fake, [(torch.float16, 1), (torch.bfloat16, 4)])
    assert set(skipped) == NOT_SERVED_BY["fa2"]      # ALiBi + a sink tile: a diagonal flash cannot place
    assert all("dense" in why for name, why in skipped.items() if name.startswith("dense"))
    assert all(KEY_PADDING_CAUSAL_REASON in why for name, why in skipped.items() if name.startswith("key_padding"))


def test_fa2_gradients_flow_through_unpad_and_padding_and_match_math(on_fake):
    skipped = _served("fa2", on_fake, [(torch.bfloat16, 2)], grad=True)
    assert set(skipped) == NOT_SERVED_BY["fa2"]


@pytest.mark.parametrize("kind", ["fa3", "fa4", "torch"])
def test_other_implementations_take_the_same_lowering(on_fake, kind):
    skipped = _served(kind, on_fake, [(torch.bfloat16, 2)])
    assert set(skipped) == NOT_SERVED_BY[kind]


def test_key_padding_causal_is_refused_in_why_not_with_the_sentence(on_fake):
    on_fake("fa2")
    backend = get_backend("flash")
    valid = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)   # left and right padding
    q = torch.randn(2, 4, 2, 16, dtype=torch.bfloat16)
    k = torch.randn(2, 6, 2, 16, dtype=torch.bfloat16)
    for mask in (KeyPadding(valid, causal=True), KeyPadding(valid, causal=True, window=2)):
        assert backend.why_not(validate_call(q, k, k, mask)) == [KEY_PADDING_CAUSAL_REASON]
        with pytest.raises(ValueError, match="cannot keep key positions"):
            backend.forward(validate_call(q, k, k, mask))


@pytest.mark.parametrize("window", [None, 3])
def test_key_padding_causal_decode_runs_on_the_keys_its_one_query_sees(on_fake, window):
    calls = on_fake("fa2")
    valid = torch.tensor([[1, 1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    q = torch.randn(3, 1, 4, 16, dtype=torch.bfloat16)
    k = torch.randn(3, 7, 2, 16, dtype=torch.bfloat16)
    mask = KeyPadding(valid, causal=True, window=window)
    out, lse = attnlib.attention(q, k, k, mask, backend="flash", return_lse=True)
    span = valid if window is None else valid[:, 7 - window:]
    assert calls[-1]["cu_k"].diff().tolist() == span.sum(1).tolist() and calls[-1]["max_k"] == span.shape[1]
    ref, ref_lse = attnlib.attention(q, k, k, mask, backend="math", return_lse=True)
    assert torch.allclose(out.float(), ref.float(), atol=2e-2)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert torch.count_nonzero(out[1]) == 0


@pytest.mark.parametrize("q_range,k_range,window", [((0, 4), (0, 8), 5), ((4, 8), (2, 8), 5), ((0, 2), (4, 8), None),
                                                    ((7, 8), (0, 6), None)])
def test_a_restricted_causal_plan_runs_and_matches_math_on_its_materialized_mask(on_fake, q_range, k_range, window):
    on_fake("fa2")
    plan = plan_for(Causal(window=window), 8, 8).restrict(q_range, k_range)
    q = torch.randn(2, 8, 2, 16, dtype=torch.bfloat16)[:, slice(*q_range)]
    k = torch.randn(2, 8, 2, 16, dtype=torch.bfloat16)[:, slice(*k_range)]
    call = validate_call(q, k, k, Causal(window=window), None, True).replace(plan=plan)
    assert get_backend("flash").why_not(call) == []
    out, lse = call.restore(*execute(get_backend("flash"), call))
    ref, ref_lse = attnlib.attention(q, k, k, DenseMask(plan.materialize()), backend="math", return_lse=True)
    assert torch.allclose(out.float(), ref.float(), atol=2e-2)
    assert torch.allclose(lse, ref_lse, atol=2e-2) or torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


def test_block_diagonal_passes_the_masks_cached_cu_seqlens_and_python_int_max_lengths(on_fake):
    calls = on_fake("fa2")
    mask = BlockDiagonal([3, 1, 5], [10, 1, 20], causal=True, window=4)
    q = torch.randn(9, 4, 16, dtype=torch.bfloat16)
    k = torch.randn(31, 2, 16, dtype=torch.bfloat16)
    attnlib.attention(q, k, k, mask, backend="flash")
    attnlib.attention(q, k, k, mask, backend="flash")
    first, call = calls[-2], calls[-1]
    assert torch.equal(call["cu_q"], mask.cu_seqlens_q) and torch.equal(call["cu_k"], mask.cu_seqlens_k)
    assert call["cu_q"] is first["cu_q"] and call["cu_k"] is first["cu_k"]     # built once, reused
    assert (call["max_q"], call["max_k"]) == (5, 20)
    assert call["causal"] is True and call["window"] == (3, 0)


def test_key_padding_with_holes_unpads_keys_only_and_empty_rows_give_zero_and_minus_inf(on_fake):
    calls = on_fake("fa2")
    valid = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    q = torch.randn(3, 4, 2, 16, dtype=torch.bfloat16)
    k = torch.randn(3, 6, 2, 16, dtype=torch.bfloat16)
    out, lse = attnlib.attention(q, k, k, KeyPadding(valid), backend="flash", return_lse=True)
    call = calls[-1]
    assert call["cu_k"].tolist() == [0, 3, 3, 8] and call["cu_q"].tolist() == [0, 4, 8, 12]
    assert torch.count_nonzero(out[1]) == 0 and torch.isneginf(lse[1]).all()
    ref = attnlib.attention(q, k, k, KeyPadding(valid), backend="math")
    assert torch.allclose(out.float(), ref.float(), atol=2e-2)


def test_top_left_causal_runs_on_the_first_sq_keys_with_the_bottom_right_kernel(on_fake):
    calls = on_fake("fa2")
    q = torch.randn(1, 6, 2, 16, dtype=torch.bfloat16)
    k = torch.randn(1, 29, 2, 16, dtype=torch.bfloat16)
    attnlib.attention(q, k, k, Causal(align="top_left"), backend="flash")
    assert calls[-1]["k"] == (1, 6, 2, 16) and calls[-1]["causal"] is True


def test_limits_are_sentences_in_why_not_not_kernel_errors(on_fake):
    on_fake("fa2")
    backend = get_backend("flash")
    q = torch.randn(1, 12, 2, 16, dtype=torch.bfloat16)
    k = torch.randn(1, 7, 2, 16, dtype=torch.bfloat16)
    why = backend.why_not(validate_call(q, k, k, Causal(align="top_left", window=2)))
    assert len(why) == 1 and "diagonal offset 0 (12 queries x 7 keys)" in why[0]
    why = backend.why_not(validate_call(q, k, k, Causal(align="top_left"), alibi_slopes=torch.ones(2)))
    assert len(why) == 1 and "ALiBi with a diagonal left" in why[0]
    why = backend.why_not(validate_call(q, q, q, DenseMask(torch.ones(12, 12, dtype=torch.bool))))
    assert any("DenseMask" in w for w in why)
    why = backend.why_not(validate_call(q.float(), q.float(), q.float()))
    assert any("dtype=fp32" in w for w in why)
    big = torch.randn(1, 4, 1, 264, dtype=torch.bfloat16)
    assert any("head_dim=264" in w for w in backend.why_not(validate_call(big, big, big)))


def test_torch_builtin_dense_full_attention_uses_sdpa_flash_kernel_and_varlen_otherwise(on_fake, monkeypatch):
    seen = []
    real = flash._torch_sdpa_flash
    monkeypatch.setattr(flash, "_torch_sdpa_flash", lambda q, k, v, scale, causal: seen.append(causal) or
                        real(q, k, v, scale, causal))
    calls = on_fake("torch")
    q = torch.randn(2, 9, 4, 16, dtype=torch.bfloat16)
    k = torch.randn(2, 9, 2, 16, dtype=torch.bfloat16)
    out = attnlib.attention(q, k, k, Causal(), backend="flash")
    assert seen == [True] and not calls          # square causal: SDPA restricted to FLASH_ATTENTION (runs on CPU too)
    ref = attnlib.attention(q, k, k, Causal(), backend="math")
    assert torch.allclose(out.float(), ref.float(), atol=2e-2)
    attnlib.attention(q, k[:, :5], k[:, :5], Causal(), backend="flash")   # bottom-right with Sq != Sk: varlen
    assert seen == [True] and calls[-1]["window"] == (-1, 0)
    assert calls[-1]["cu_q"].tolist() == [0, 9, 18] and calls[-1]["cu_k"].tolist() == [0, 5, 10]


def test_detection_prefers_fa3_over_fa2_and_info_names_the_one_in_use(on_fake, monkeypatch):
    install_modules(monkeypatch, {"flash_attn": make_fake_fa2(), "flash_attn_interface": make_fake_fa3()})
    monkeypatch.delenv(flash.ENV_IMPL, raising=False)
    flash._detect.cache_clear()
    row = {r["name"]: r for r in attnlib.list_backends()}["flash"]
    assert row["available"] and "FA3" in row["implementation"]
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)          # FA3 absent: FA2
    flash._detect.cache_clear()
    assert get_backend("flash").implementation == "flash-attn 2.8.3 (FA2)"


def test_a_broken_flash_attn_install_is_reported_not_raised(monkeypatch):
    broken = types.ModuleType("flash_attn")
    broken.__version__ = "2.8.3"                      # no flash_attn_func: the CUDA extension failed to load
    monkeypatch.setitem(sys.modules, "flash_attn", broken)
    monkeypatch.setattr(flash, "_cuda_available", lambda: False)
    monkeypatch.delenv(flash.ENV_IMPL, raising=False)
    flash._detect.cache_clear()
    try:
        reason = get_backend("flash").unavailable_reason()
        assert "fa2 failed to import: AttributeError" in reason and "no CUDA device" in reason
    finally:
        flash._detect.cache_clear()


# ---------------------------------------------------------------------------------------------
# properties of the pure lowering
# ---------------------------------------------------------------------------------------------
from hypothesis import given, strategies as st  # noqa: E402


@given(causal_plans())
def test_flash_lowering_reproduces_every_causal_plan_it_accepts(drawn):
    mask, plan, cut = drawn
    top_left = mask.align == "top_left"
    sq, sk = plan.seqlen_q, plan.seqlen_k
    low = lower(plan)
    block = plan.single
    if isinstance(low, Refused):
        assert block.offset > block.k_len - block.q_len and not block.full
        assert (cut is not None) or (top_left and sq > sk)
        return
    got = torch.zeros(sq, sk, dtype=torch.bool)
    if isinstance(low, FlashSplit):       # a bottom-right prefix of rows, then rows that see every key
        if low.key_stop > 0:
            got[:low.rows, :low.key_stop] = _fa_visible(low.rows, low.key_stop, True, (-1, -1))
        got[low.rows:] = True
        assert torch.equal(got, plan.materialize())
        return
    stop = sk if low.key_stop is None else low.key_stop
    if stop:
        got[:, :stop] = _fa_visible(sq, stop, low.causal, low.window_size)
    assert torch.equal(got, plan.materialize())


@given(key_padding_plans(restrict=False))
def test_key_padding_lowering_reproduces_the_plan_or_refuses_with_the_sentence(drawn):
    mask, plan, _ = drawn
    valid, sq = mask.valid, plan.seqlen_q
    low = lower(plan)
    if isinstance(low, Refused):
        assert mask.causal and low.reason == KEY_PADDING_CAUSAL_REASON
        spans = {plan.single.key_span(i) for i in range(sq)}
        assert len(spans) > 1                      # refused only when the rows see different key positions
        return
    got = torch.zeros(valid.shape[0], 1, sq, 6, dtype=torch.bool)
    got[..., low.key_start:low.key_stop] = valid[:, None, None, low.key_start:low.key_stop]
    assert torch.equal(got, plan.materialize().expand_as(got))


@given(st.lists(st.lists(st.booleans(), min_size=5, max_size=5), min_size=1, max_size=4), st.integers(1, 4))
def test_key_padding_lowering_round_trips_any_pattern(rows, sq):
    valid = torch.tensor(rows, dtype=torch.bool)
    low = lower_key_padding(valid, sq)
    assert torch.equal(low.cu_seqlens_k.diff(), valid.sum(1, dtype=torch.int32))
    assert low.cu_seqlens_q.tolist() == [b * sq for b in range(valid.shape[0] + 1)]
    k = torch.randn(*valid.shape, 1, 2)
    back = pad_keys(unpad_keys(k, low.key_index), low.key_index, *valid.shape)
    assert torch.equal(back, k * valid[..., None, None])


@pytest.mark.parametrize("kind", ["fa2", "fa3"])
def test_library_kernels_are_one_custom_op_node_under_compile(on_fake, kind):
    """Without gradients the installed flash-attn runs as torch.ops.attnlib.flash_attention: one opaque node
    (shapes from its fake implementation), the same numbers as eager, dense and varlen, with the LSE."""
    install = on_fake
    install(kind)
    g = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16
    cases = [(torch.randn(2, 9, 4, 16, generator=g).to(bf16), torch.randn(2, 13, 2, 16, generator=g).to(bf16), Causal()),
             (torch.randn(8, 4, 16, generator=g).to(bf16), torch.randn(10, 2, 16, generator=g).to(bf16),
              BlockDiagonal([3, 5], [4, 6], causal=True))]
    for q, k, mask in cases:
        assert_one_node_and_eager_numbers("flash", torch.ops.attnlib.flash_attention.default, q, k, mask)
