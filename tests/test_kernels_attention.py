"""attnlib_kernels.attention against a float64 reference written here (materialized masks are fine in
tests), with the shared tolerance policy of ``attnlib.testing``: error vs float64 <= 2x the error of a
naive implementation in the same dtype, plus a small floor.

On machines without CUDA the kernels run under the Triton interpreter: shapes stay tiny (the
interpreter config tiles 16 x 16) but cover several query and key tiles, partial tiles, D=24 and
other non-powers of two, Sq=1, Sq != Sk in both directions and empty rows.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from attnlib.testing import assert_close_to_reference  # noqa: E402
from attnlib_kernels.attention import attention, kernel_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------
def visible(sq, sk, *, causal=False, top_left=False, window=None):
    """bool [Sq, Sk] for one batch row / block, the rule of the kernel docstring."""
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    off = 0 if top_left else sk - sq
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        keep &= j <= i + off
        if window is not None:
            keep &= j > i + off - window
    return keep


def naive_dense(q, k, v, keep, scale, dtype):
    """Plain softmax attention computed in ``dtype``; keep: bool [B, Sq, Sk]. Returns (out, lse).

    Rows with no visible key give 0 and LSE -inf; written so that autograd never sees NaN."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    g = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(g, dim=2)
    v = v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    keep = keep.to(q.device)[:, None]                       # [B, 1, Sq, Sk]
    empty = ~keep.any(-1, keepdim=True)
    s = s.masked_fill(~keep, NEG_INF).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s.float() if dtype != torch.float64 else s, -1)
    lse = lse.masked_fill(empty[..., 0], NEG_INF)
    p = torch.softmax(s, -1).masked_fill(empty, 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def naive_packed(q, k, v, q_lens, k_lens, scale, dtype, **mask):
    outs, lses = [], []
    qi = ki = 0
    for lq, lk in zip(q_lens, k_lens):
        keep = visible(lq, lk, **mask)[None]
        o, lse = naive_dense(q[None, qi:qi + lq], k[None, ki:ki + lk], v[None, ki:ki + lk], keep, scale, dtype)
        outs.append(o[0])
        lses.append(lse[0])
        qi += lq
        ki += lk
    return torch.cat(outs, 0), torch.cat(lses, 1)


def rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def check_forward(out, lse, ref, naive, dtype):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close_to_reference(out, ref[0], naive[0], dtype, "out")
    assert_close_to_reference(lse, ref[1], naive[1], dtype, "lse")


MASKS = {
    "none": {},
    "causal": {"causal": True},
    "causal_top_left": {"causal": True, "top_left": True},
    "window": {"causal": True, "window": 7},
    "window_top_left": {"causal": True, "top_left": True, "window": 5},
}


# ---------------------------------------------------------------------------------------------
# forward: dense
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("gqa", [1, 2])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("sq,sk", [(33, 40), (40, 19)])
def test_dense_forward_and_lse_match_float64(mask, gqa, dtype, sq, sk):
    b, hkv, d = 2, 2, 24
    hq = hkv * gqa
    q = rand(b, sq, hq, d, dtype=dtype, seed=1)
    k = rand(b, sk, hkv, d, dtype=dtype, seed=2)
    v = rand(b, sk, hkv, d, dtype=dtype, seed=3)
    scale = d ** -0.5
    out, lse = attention(q, k, v, scale=scale, return_lse=True, **MASKS[mask])
    assert out.shape == (b, sq, hq, d) and out.dtype == dtype
    assert lse.shape == (b, hq, sq) and lse.dtype == torch.float32
    keep = visible(sq, sk, **MASKS[mask]).expand(b, sq, sk)
    check_forward(out, lse, naive_dense(q, k, v, keep, scale, torch.float64),
                  naive_dense(q, k, v, keep, scale, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("gqa", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_key_valid_hides_padding_and_holes(dtype, gqa, causal):
    b, sq, sk, hkv, d = 3, 21, 35, 1, 16
    valid = torch.ones(b, sk, dtype=torch.bool)
    valid[0, 30:] = False            # right padding
    valid[1, :9] = False             # left padding
    valid[2, 4:20] = False           # a hole spanning a whole key tile
    q = rand(b, sq, hkv * gqa, d, dtype=dtype, seed=4)
    k = rand(b, sk, hkv, d, dtype=dtype, seed=5)
    v = rand(b, sk, hkv, d, dtype=dtype, seed=6)
    out, lse = attention(q, k, v, scale=0.3, key_valid=valid.to(DEVICE), causal=causal, return_lse=True)
    keep = visible(sq, sk, causal=causal)[None] & valid[:, None, :]
    check_forward(out, lse, naive_dense(q, k, v, keep, 0.3, torch.float64), naive_dense(q, k, v, keep, 0.3, dtype),
                  dtype)


@pytest.mark.parametrize("d,dv", [(8, 8), (24, 40), (48, 16), (80, 80), (256, 256), (200, 72)])
def test_head_dims_up_to_256_including_non_powers_of_two(d, dv):
    q = rand(1, 17, 2, d, dtype=torch.float32, seed=7)
    k = rand(1, 20, 1, d, dtype=torch.float32, seed=8)
    v = rand(1, 20, 1, dv, dtype=torch.float32, seed=9)
    out, lse = attention(q, k, v, scale=d ** -0.5, causal=True, return_lse=True)
    assert out.shape == (1, 17, 2, dv)
    keep = visible(17, 20, causal=True)[None]
    check_forward(out, lse, naive_dense(q, k, v, keep, d ** -0.5, torch.float64),
                  naive_dense(q, k, v, keep, d ** -0.5, torch.float32), torch.float32)


@pytest.mark.parametrize("mask", ["none", "causal", "window"])
def test_single_query_decode_sees_the_right_cache_keys(mask):
    q = rand(2, 1, 4, 32, dtype=torch.bfloat16, seed=10)
    k = rand(2, 37, 2, 32, dtype=torch.bfloat16, seed=11)
    v = rand(2, 37, 2, 32, dtype=torch.bfloat16, seed=12)
    out, lse = attention(q, k, v, scale=0.2, return_lse=True, **MASKS[mask])
    keep = visible(1, 37, **MASKS[mask]).expand(2, 1, 37)
    if mask == "window":
        assert keep.sum() == 2 * 7      # the 7 newest keys of the cache
    check_forward(out, lse, naive_dense(q, k, v, keep, 0.2, torch.float64),
                  naive_dense(q, k, v, keep, 0.2, torch.bfloat16), torch.bfloat16)


def test_rows_without_visible_keys_return_zero_and_lse_minus_inf():
    # bottom-right causal with Sq > Sk: the first Sq - Sk rows see nothing; batch row 1 has no valid key
    q = rand(2, 30, 2, 16, dtype=torch.float16, seed=13)
    k = rand(2, 12, 2, 16, dtype=torch.float16, seed=14)
    v = rand(2, 12, 2, 16, dtype=torch.float16, seed=15)
    valid = torch.ones(2, 12, dtype=torch.bool, device=DEVICE)
    valid[1] = False
    out, lse = attention(q, k, v, scale=0.25, causal=True, key_valid=valid, return_lse=True)
    assert torch.isfinite(out).all()
    assert (out[0, :18] == 0).all() and (lse[0, :, :18] == NEG_INF).all()
    assert torch.isfinite(lse[0, :, 18:]).all()
    assert (out[1] == 0).all() and (lse[1] == NEG_INF).all()


# ---------------------------------------------------------------------------------------------
# forward: packed THD
# ---------------------------------------------------------------------------------------------
PACKED = [
    ([7, 1, 19, 12], [7, 1, 19, 12]),     # varlen self-attention, a 1-token block
    ([3, 1, 5, 0], [18, 1, 20, 4]),       # per-request KV caches, an empty query block
    ([9, 9, 9], [30, 21, 14]),            # CFG branches with different cache lengths
    ([12, 5], [4, 5]),                    # more queries than keys: empty rows under causal
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("gqa", [1, 2])
@pytest.mark.parametrize("mask", ["none", "causal", "window"])
@pytest.mark.parametrize("lens", range(len(PACKED)))
def test_packed_blocks_only_see_their_own_keys(lens, mask, gqa, dtype):
    q_lens, k_lens = PACKED[lens]
    hkv, d = 2, 24
    q = rand(sum(q_lens), hkv * gqa, d, dtype=dtype, seed=16)
    k = rand(sum(k_lens), hkv, d, dtype=dtype, seed=17)
    v = rand(sum(k_lens), hkv, d, dtype=dtype, seed=18)
    cu_q = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + list(torch.tensor(k_lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    out, lse = attention(q, k, v, scale=0.2, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(q_lens),
                         max_seqlen_k=max(k_lens), return_lse=True, **MASKS[mask])
    assert out.shape == q.shape and lse.shape == (hkv * gqa, sum(q_lens))
    check_forward(out, lse, naive_packed(q, k, v, q_lens, k_lens, 0.2, torch.float64, **MASKS[mask]),
                  naive_packed(q, k, v, q_lens, k_lens, 0.2, dtype, **MASKS[mask]), dtype)


# ---------------------------------------------------------------------------------------------
# tile skipping: keys in fully-masked tiles are never read (NaN there would poison a
# compute-and-discard kernel, since 0 * NaN = NaN)
# ---------------------------------------------------------------------------------------------
def test_causal_and_window_skip_key_tiles_no_query_can_see():
    q = rand(1, 16, 2, 16, dtype=torch.float32, seed=19)
    k = rand(1, 64, 2, 16, dtype=torch.float32, seed=20)
    v = rand(1, 64, 2, 16, dtype=torch.float32, seed=21)
    # top-left causal, 16 queries: keys 16.. are in tiles nobody sees
    kp, vp = k.clone(), v.clone()
    kp[:, 16:] = float("nan")
    vp[:, 16:] = float("nan")
    out = attention(q, kp, vp, scale=0.25, causal=True, top_left=True)
    ref = attention(q, k[:, :16], v[:, :16], scale=0.25, causal=True, top_left=True)
    assert torch.isfinite(out).all() and torch.equal(out, ref)
    # bottom-right window 8: query i sees keys (i + 40, i + 48], so tiles [0, 32) are skipped
    kp, vp = k.clone(), v.clone()
    kp[:, :32] = float("nan")
    vp[:, :32] = float("nan")
    out = attention(q, kp, vp, scale=0.25, causal=True, window=8)
    ref = attention(q, k, v, scale=0.25, causal=True, window=8)
    assert torch.isfinite(out).all() and torch.equal(out, ref)


def test_packed_blocks_never_read_other_blocks_and_padding_never_leaks():
    q = rand(20, 2, 16, dtype=torch.float32, seed=22)
    k = rand(30, 2, 16, dtype=torch.float32, seed=23)
    v = rand(30, 2, 16, dtype=torch.float32, seed=24)
    cu_q = torch.tensor([0, 10, 20], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 10, 30], dtype=torch.int32, device=DEVICE)
    kp, vp = k.clone(), v.clone()
    kp[:10] = float("nan")
    vp[:10] = float("nan")
    out = attention(q, kp, vp, scale=0.25, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=10, max_seqlen_k=20)
    assert torch.isnan(out[:10]).all() and torch.isfinite(out[10:]).all()
    # garbage (NaN) in padded keys hidden by key_valid does not reach the output
    kd, vd = k[None, :16].clone(), v[None, :16].clone()
    kd[:, 11:] = float("nan")
    vd[:, 11:] = float("nan")
    valid = torch.arange(16, device=DEVICE)[None] < 11
    out = attention(q[None, :5], kd, vd, scale=0.25, key_valid=valid)
    assert torch.equal(out, attention(q[None, :5], kd[:, :11], vd[:, :11], scale=0.25))


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
def grads_of(fn, q, k, v, dout, dlse=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*leaves)
    loss = (out.float() * dout.float()).sum()
    if dlse is not None:
        loss = loss + (lse.masked_fill(lse == NEG_INF, 0.0).float() * dlse).sum()
    return torch.autograd.grad(loss, leaves)


def check_grads(kernel_fn, ref_fn, q, k, v, dtype, with_lse=False, seed=30):
    out_shape = kernel_fn(q, k, v)[0].shape
    dout = rand(*out_shape, dtype=dtype, seed=seed)
    dlse = None
    if with_lse:
        lse_shape = kernel_fn(q, k, v)[1].shape
        dlse = rand(*lse_shape, dtype=torch.float32, seed=seed + 1)
    got = grads_of(kernel_fn, q, k, v, dout, dlse)
    ref = grads_of(lambda *t: ref_fn(*t, torch.float64), q.double(), k.double(), v.double(), dout.double(),
                   None if dlse is None else dlse.double())
    naive = grads_of(lambda *t: ref_fn(*t, dtype), q, k, v, dout, dlse)
    for g, r, n, name in zip(got, ref, naive, ("dq", "dk", "dv")):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert_close_to_reference(g, r, n, dtype, name)


@pytest.mark.parametrize("gqa", [1, 2])
@pytest.mark.parametrize("mask", ["none", "causal", "causal_top_left", "window", "key_valid"])
def test_dense_gradients_match_float64(mask, gqa):
    b, sq, sk, hkv, d, dv = 2, 29, 35, 2, 24, 40      # Dv != D, non-pow2 D
    valid = torch.ones(b, sk, dtype=torch.bool)
    valid[0, 20:] = False
    valid[1, :17] = False
    kw = dict(MASKS.get(mask, {}))
    if mask == "key_valid":
        kw = {"key_valid": valid.to(DEVICE), "causal": True}
    keep = visible(sq, sk, **{n: x for n, x in kw.items() if n != "key_valid"}).expand(b, sq, sk)
    if mask == "key_valid":
        keep = keep & valid[:, None, :]
    q = rand(b, sq, hkv * gqa, d, dtype=torch.float32, seed=25)
    k = rand(b, sk, hkv, d, dtype=torch.float32, seed=26)
    v = rand(b, sk, hkv, dv, dtype=torch.float32, seed=27)
    check_grads(lambda q, k, v: attention(q, k, v, scale=0.2, return_lse=True, **kw),
                lambda q, k, v, dt: naive_dense(q, k, v, keep, 0.2, dt), q, k, v, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_low_precision_gradients_match_float64(dtype):
    q = rand(1, 33, 4, 32, dtype=dtype, seed=28)
    k = rand(1, 33, 2, 32, dtype=dtype, seed=29)
    v = rand(1, 33, 2, 32, dtype=dtype, seed=30)
    keep = visible(33, 33, causal=True)[None]
    check_grads(lambda q, k, v: attention(q, k, v, scale=32 ** -0.5, causal=True, return_lse=True),
                lambda q, k, v, dt: naive_dense(q, k, v, keep, 32 ** -0.5, dt), q, k, v, dtype)


@pytest.mark.parametrize("mask", ["causal", "window"])
def test_packed_gradients_match_float64(mask):
    q_lens, k_lens = [5, 17, 1, 0], [21, 17, 1, 3]
    q = rand(sum(q_lens), 4, 16, dtype=torch.float32, seed=31)
    k = rand(sum(k_lens), 2, 16, dtype=torch.float32, seed=32)
    v = rand(sum(k_lens), 2, 16, dtype=torch.float32, seed=33)
    cu_q = torch.tensor([0, 5, 22, 23, 23], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 21, 38, 39, 42], dtype=torch.int32, device=DEVICE)
    check_grads(lambda q, k, v: attention(q, k, v, scale=0.25, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                          max_seqlen_q=17, max_seqlen_k=21, return_lse=True, **MASKS[mask]),
                lambda q, k, v, dt: naive_packed(q, k, v, q_lens, k_lens, 0.25, dt, **MASKS[mask]),
                q, k, v, torch.float32)


def test_gradient_flows_through_the_returned_lse():
    q = rand(1, 20, 2, 16, dtype=torch.float32, seed=34)
    k = rand(1, 27, 2, 16, dtype=torch.float32, seed=35)
    v = rand(1, 27, 2, 16, dtype=torch.float32, seed=36)
    keep = visible(20, 27, causal=True, window=9)[None]
    check_grads(lambda q, k, v: attention(q, k, v, scale=0.3, causal=True, window=9, return_lse=True),
                lambda q, k, v, dt: naive_dense(q, k, v, keep, 0.3, dt), q, k, v, torch.float32, with_lse=True)


def test_rows_without_visible_keys_get_zero_gradients():
    q = rand(1, 24, 2, 16, dtype=torch.float32, seed=37).requires_grad_(True)
    k = rand(1, 8, 2, 16, dtype=torch.float32, seed=38).requires_grad_(True)
    v = rand(1, 8, 2, 16, dtype=torch.float32, seed=39).requires_grad_(True)
    out, lse = attention(q, k, v, scale=0.25, causal=True, return_lse=True)   # rows 0..15 see nothing
    (out.sum() + lse[lse > NEG_INF].sum()).backward()
    assert (q.grad[0, :16] == 0).all() and torch.isfinite(q.grad).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


# ---------------------------------------------------------------------------------------------
# determinism, configuration, input checks
# ---------------------------------------------------------------------------------------------
def test_backward_is_bitwise_reproducible():
    q = rand(1, 40, 4, 16, dtype=torch.bfloat16, seed=40)
    k = rand(1, 40, 1, 16, dtype=torch.bfloat16, seed=41)
    v = rand(1, 40, 1, 16, dtype=torch.bfloat16, seed=42)
    dout = rand(1, 40, 4, 16, dtype=torch.bfloat16, seed=43)
    fn = lambda q, k, v: attention(q, k, v, scale=0.25, causal=True, return_lse=True, deterministic=True)  # noqa
    first = grads_of(fn, q, k, v, dout)
    second = grads_of(fn, q, k, v, dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_deterministic_config_does_not_depend_on_sequence_length():
    cuda = torch.device("cuda")
    for d in (64, 96, 128, 256):
        for dtype in DTYPES:
            fixed = {kernel_config("fwd", d, d, dtype, cuda, max_seqlen_q=n, deterministic=True) for n in (1, 64, 8192)}
            assert len(fixed) == 1
            cfg = fixed.pop()
            assert cfg.block_q % 16 == 0 and cfg.block_k % 16 == 0
    fast = kernel_config("fwd", 128, 128, torch.bfloat16, cuda, max_seqlen_q=1)
    assert fast.block_q <= kernel_config("fwd", 128, 128, torch.bfloat16, cuda, max_seqlen_q=4096).block_q


def _qkv(b=1, s=8, h=2, d=16, dtype=torch.float32):
    return (rand(b, s, h, d, dtype=dtype, seed=44), rand(b, s, h, d, dtype=dtype, seed=45),
            rand(b, s, h, d, dtype=dtype, seed=46))


def _cu(*offsets):
    return torch.tensor(offsets, dtype=torch.int32, device=DEVICE)


def _packed(call, **changes):
    """``call`` on the same tokens as one packed THD batch of two sequences (cu_seqlens [0, 3, 8] for
    queries and keys), then ``changes``."""
    call.update(q=call["q"][0], k=call["k"][0], v=call["v"][0], cu_seqlens_q=_cu(0, 3, 8), cu_seqlens_k=_cu(0, 3, 8))
    call.update(changes)


def _key_valid(sk, dtype=torch.bool):
    return torch.ones(1, sk, dtype=dtype, device=DEVICE)


#: case, error, message pattern, and how it spoils a valid call (dense [1, 8, 2, 16] float32, scale 0.25)
BAD_INPUTS = [
    ("gqa", ValueError, "multiple of Hkv", lambda c: c.update(q=rand(1, 8, 3, 16, dtype=torch.float32, seed=0))),
    ("head_dim", ValueError, "head dim", lambda c: c.update(k=rand(1, 8, 2, 8, dtype=torch.float32, seed=0))),
    ("too_big", ValueError, "1..256", lambda c: c.update(zip("qkv", _qkv(d=320)))),
    ("dtype", TypeError, "float16, bfloat16 or float32", lambda c: c.update({t: c[t].double() for t in "qkv"})),
    ("mixed_dtype", TypeError, "share one dtype", lambda c: c.update(v=c["v"].half())),
    ("scale", ValueError, "positive finite", lambda c: c.update(scale=-1.0)),
    ("window_no_causal", ValueError, "window needs causal=True", lambda c: c.update(window=4)),
    ("top_left_no_causal", ValueError, "top_left=True", lambda c: c.update(top_left=True)),
    ("one_cu", ValueError, "both cu_seqlens_q and cu_seqlens_k", lambda c: _packed(c, cu_seqlens_k=None)),
    ("cu_sum", ValueError, "sum to the token count", lambda c: _packed(c, cu_seqlens_q=_cu(0, 3, 7))),
    ("cu_order", ValueError, "non-decreasing", lambda c: _packed(c, cu_seqlens_k=_cu(0, 9, 8))),
    ("max_seqlen_tensor", TypeError, "Python int", lambda c: _packed(c, max_seqlen_q=torch.tensor(5))),
    ("max_seqlen_short", ValueError, "shorter than the longest block", lambda c: _packed(c, max_seqlen_q=3)),
    ("key_valid_shape", ValueError, r"\[B, Sk\]", lambda c: c.update(key_valid=_key_valid(9))),
    ("key_valid_dtype", TypeError, "bool tensor", lambda c: c.update(key_valid=_key_valid(8, torch.int32))),
    ("key_valid_packed", ValueError, "cu_seqlens instead", lambda c: _packed(c, key_valid=_key_valid(8))),
    ("rank", ValueError, "dense mode needs", lambda c: c.update(q=c["q"][0])),
]


@pytest.mark.parametrize("exc,match,spoil", [row[1:] for row in BAD_INPUTS],
                         ids=[f"{case}-{exc.__name__}-{match}" for case, exc, match, _ in BAD_INPUTS])
def test_bad_input_raises_a_clear_error_before_any_kernel(exc, match, spoil):
    q, k, v = _qkv()
    call = {"q": q, "k": k, "v": v, "scale": 0.25}
    spoil(call)
    q, k, v = call.pop("q"), call.pop("k"), call.pop("v")
    with pytest.raises(exc, match=match):
        attention(q, k, v, **call)


def test_output_keeps_q_layout_dtype_and_value_head_dim():
    q, k, v = _qkv(b=2, s=9, h=2, d=16, dtype=torch.bfloat16)
    v = rand(2, 9, 2, 8, dtype=torch.bfloat16, seed=47)
    out = attention(q, k, v, scale=0.25)
    assert out.shape == (2, 9, 2, 8) and out.dtype == torch.bfloat16 and out.is_contiguous()
    # non-contiguous inputs (a transposed BHSD view) give the same numbers
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(attention(qt, k, v, scale=0.25), out)
    assert math.isclose(float(attention(q, k, v, scale=0.25, causal=True)[0, 0, 0, 0]), float(v[0, 0, 0, 0]),
                        rel_tol=1e-2)


# ---------------------------------------------------------------------------------------------
# the triton backend's lowering: the plan's groups and key runs become the kernels' tile table
# ---------------------------------------------------------------------------------------------
def test_backend_builds_the_tile_table_from_the_plan_and_refuses_only_dense_masks():
    from attnlib.backends.triton import TritonBackend, tile_table
    from attnlib.inputs import validate_call
    from attnlib.masks import BlockDiagonal, BlockSparse, Causal, DenseMask, KeyPadding

    q, k = rand(1, 6, 2, 16, dtype=torch.float32, seed=1), rand(1, 8, 2, 16, dtype=torch.float32, seed=2)

    def table(mask, q=q, k=k, **mods):
        call = validate_call(q, k, k, mask, **mods)
        assert TritonBackend().why_not(call) == []
        return tile_table(call.plan)

    assert table(None).groups == ((0, 6, ((0, 8, 2, False, None),)),)       # ALiBi's offset: bottom-right
    assert table(Causal(align="top_left", window=3)).groups == ((0, 6, ((0, 8, 0, True, 3),)),)
    qp, kp = rand(8, 2, 16, dtype=torch.float32, seed=4), rand(10, 2, 16, dtype=torch.float32, seed=5)
    assert table(BlockDiagonal([3, 5], [4, 6], causal=True), qp, kp).groups == (
        (0, 3, ((0, 4, 1, True, None),)), (3, 5, ((4, 6, 1, True, None),)))
    sink = table(Causal(window=2, sink=1), softcap=3.0, sinks=torch.zeros(2, device=DEVICE))
    assert sink.runs == 2 and sink.groups[0][2] == ((0, 1, 2, True, None), (1, 7, 1, True, 2))
    valid = torch.ones(1, 8, dtype=torch.bool, device=DEVICE)
    assert table(KeyPadding(valid, causal=True)).groups == ((0, 6, ((0, 8, 2, True, None),)),)
    assert table(BlockSparse(torch.ones(1, 1, dtype=torch.bool), 8)).runs == 1
    dense = DenseMask(torch.ones(1, 1, 6, 8, dtype=torch.bool, device=DEVICE))
    reasons = TritonBackend().why_not(validate_call(q, k, k, dense))
    assert any("DenseMask" in r and "dense" in r for r in reasons)


# ---------------------------------------------------------------------------------------------
# property tests: tile bounds (lo/hi, interior split) for random lengths, offsets and windows
# ---------------------------------------------------------------------------------------------
try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test extra
    hypothesis = None

if hypothesis is not None:
    @hypothesis.settings(max_examples=25, deadline=None)
    @hypothesis.given(sq=st.integers(1, 40), sk=st.integers(1, 40), causal=st.booleans(), top_left=st.booleans(),
                      window=st.one_of(st.none(), st.integers(1, 41)), gqa=st.sampled_from([1, 2]),
                      seed=st.integers(0, 2 ** 16))
    def test_any_lengths_and_window_match_the_reference(sq, sk, causal, top_left, window, gqa, seed):
        kw = {"causal": causal, "top_left": top_left and causal, "window": window if causal else None}
        q = rand(1, sq, 2 * gqa, 16, dtype=torch.float32, seed=seed)
        k = rand(1, sk, 2, 16, dtype=torch.float32, seed=seed + 1)
        v = rand(1, sk, 2, 16, dtype=torch.float32, seed=seed + 2)
        out, lse = attention(q, k, v, scale=0.3, return_lse=True, **kw)
        keep = visible(sq, sk, **kw)[None]
        check_forward(out, lse, naive_dense(q, k, v, keep, 0.3, torch.float64),
                      naive_dense(q, k, v, keep, 0.3, torch.float32), torch.float32)


    @hypothesis.settings(max_examples=8, deadline=None)
    @hypothesis.given(lens=st.lists(st.tuples(st.integers(0, 24), st.integers(0, 24)), min_size=1, max_size=3),
                      window=st.one_of(st.none(), st.integers(1, 20)), seed=st.integers(0, 2 ** 16))
    def test_any_packed_lengths_give_reference_gradients(lens, window, seed):
        q_lens, k_lens = [a for a, _ in lens], [b for _, b in lens]
        hypothesis.assume(sum(q_lens) > 0 and sum(k_lens) > 0)
        q = rand(sum(q_lens), 2, 16, dtype=torch.float32, seed=seed)
        k = rand(sum(k_lens), 1, 16, dtype=torch.float32, seed=seed + 1)
        v = rand(sum(k_lens), 1, 16, dtype=torch.float32, seed=seed + 2)
        cu_q = torch.tensor([0] + [sum(q_lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device=DEVICE)
        cu_k = torch.tensor([0] + [sum(k_lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device=DEVICE)
        kw = {"causal": True, "window": window}
        check_grads(lambda q, k, v: attention(q, k, v, scale=0.25, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                              max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens),
                                              return_lse=True, **kw),
                    lambda q, k, v, dt: naive_packed(q, k, v, q_lens, k_lens, 0.25, dt, **kw), q, k, v, torch.float32)
