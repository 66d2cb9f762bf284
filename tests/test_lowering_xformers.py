"""The ``xformers`` backend on a CPU machine: attn_bias choice, bias layout, and the whole backend on a fake.

The fake follows xformers' documented behaviour (``ops/fmha/__init__.py``, ``attn_bias.py``, ``cutlass.py``):
bias types are checked by *exact* type; ``BlockDiagonalCausalFromBottomRightMask`` raises when a block has
fewer keys than queries; a tensor bias must have shape ``[B, H, Mq, Mk]`` (``[B, G, H, Mq, Mk]`` for BMGHK)
and every stride but the last a multiple of 16 bytes; block-diagonal biases need batch 1 and their
seqstart on the query's device; BMGHK has no backward; a row whose scores are all ``-inf`` is NaN
(undefined in xformers); the cutlass LSE is ``[B, H, M]`` padded to a multiple of 32 (varlen: one padded
row per block), the flash operator's varlen LSE is packed ``[1, H, Tq]``. The only liberty: CPU tensors.
"""
import dataclasses
import sys
import types
from dataclasses import dataclass

import pytest
import torch

import attnlib
from attnlib import BlockDiagonal, Causal, DenseMask, KeyPadding
from attnlib.backends import xformers as xf_backend
from attnlib.backends.lowering import (additive_bias, bias_alignment, kept_query_index, round_up, xformers_bias_spec,
                                       xformers_varlen_lse)
from attnlib.conformance import CASES, run_case
from attnlib.inputs import validate_call
from attnlib.registry import get_backend

# ---------------------------------------------------------------------------------------------
# pure lowering: which attn_bias, how the call is cut
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask,sq,sk,kind,q_start,key_stop", [
    (None, 5, 9, "none", 0, None),
    (Causal(), 9, 9, "LowerTriangularMask", 0, None),
    (Causal(), 6, 29, "LowerTriangularFromBottomRightMask", 0, None),
    (Causal(), 12, 7, "LowerTriangularMask", 5, None),                 # 5 leading rows see nothing
    (Causal(window=7), 5, 30, "LowerTriangularFromBottomRightLocalAttentionMask", 0, None),
    (Causal(align="top_left"), 6, 29, "LowerTriangularMask", 0, 6),    # later keys are never visible
    (Causal(align="top_left"), 12, 7, "LowerTriangularMask", 0, None),  # xformers' own causal is top-left
    (Causal(align="top_left", window=3), 12, 7, "tensor", 0, None),
    (DenseMask(torch.ones(2, 2, dtype=torch.bool)), 2, 2, "tensor", 0, None),
    (KeyPadding(torch.ones(1, 4, dtype=torch.bool)), 3, 4, "tensor", 0, None),
    (Causal(), 4, 0, "empty", 0, None),
])
def test_bias_type_per_mask(mask, sq, sk, kind, q_start, key_stop):
    spec = xformers_bias_spec(mask, sq, sk)
    assert (spec.kind, spec.q_start, spec.key_stop) == (kind, q_start, key_stop)


def test_causal_window_bias_carries_the_same_window_count():
    assert xformers_bias_spec(Causal(window=7), 5, 30).window == 7


def test_block_diagonal_bias_types_and_queries_that_see_no_key_are_dropped():
    assert xformers_bias_spec(BlockDiagonal([7, 1, 19]), 27, 27).kind == "BlockDiagonalMask"
    spec = xformers_bias_spec(BlockDiagonal([3, 1, 5], [10, 1, 20], causal=True), 9, 31)
    assert (spec.kind, spec.kept_queries) == ("BlockDiagonalCausalFromBottomRightMask", None)
    win = xformers_bias_spec(BlockDiagonal([11, 16], causal=True, window=4), 27, 27)
    assert (win.kind, win.window) == ("BlockDiagonalCausalLocalAttentionFromBottomRightMask", 4)
    # block 0 has 5 queries but 2 keys: its first 3 rows see nothing; block 2 has no keys at all
    short = xformers_bias_spec(BlockDiagonal([5, 2, 3], [2, 4, 0], causal=True), 10, 6)
    assert short.q_seqlens == (2, 2, 0) and short.kv_seqlens == (2, 4, 0)
    assert short.kept_queries == ((3, 4),)
    assert kept_query_index(short.kept_queries, "cpu").tolist() == [3, 4, 5, 6]
    nokeys = xformers_bias_spec(BlockDiagonal([2, 3], [0, 4]), 5, 4)
    assert nokeys.q_seqlens == (0, 3) and nokeys.kept_queries == ((2, 3),)
    assert xformers_bias_spec(BlockDiagonal([2], [0]), 2, 0).kind == "empty"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_key_padding_bias_is_aligned_broadcast_and_unmasks_rows_with_no_key(dtype):
    valid = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    bias, empty = additive_bias(KeyPadding(valid), 2, 4, 3, 5, dtype, "cpu")
    assert bias.shape == (2, 4, 3, 5) and bias.dtype == dtype
    align = bias_alignment(dtype)
    assert align == (8 if dtype == torch.bfloat16 else 4)
    assert all(s % align == 0 for s in bias.stride()[:-1]) and bias.stride(-1) == 1
    assert bias.stride(1) == bias.stride(2) == 0                 # heads and queries broadcast, not copied
    assert bias.untyped_storage().nbytes() == 2 * round_up(5, align) * bias.element_size()
    assert torch.isneginf(bias[0, 0, 0]).tolist() == [False, False, True, False, True]
    assert torch.count_nonzero(bias[1]) == 0                      # row with no key: unmasked, reported
    assert empty.view(-1).tolist() == [False, True]


def test_dense_bias_keeps_additive_values_and_reports_rows_with_no_key():
    m = torch.randn(1, 2, 3, 6)
    m[0, 1, 2] = float("-inf")
    bias, empty = additive_bias(DenseMask(m), 2, 2, 3, 6, torch.float16, "cpu")
    assert bias.shape == (2, 2, 3, 6) and bias.stride(0) == 0
    assert all(s % 8 == 0 for s in bias.stride()[:-1])
    assert torch.allclose(bias[1, 0].float(), m[0, 0].half().float())
    assert empty.shape == (1, 2, 3) and empty.nonzero().tolist() == [[0, 1, 2]]
    assert torch.count_nonzero(bias[0, 1, 2]) == 0


def test_varlen_lse_reads_packed_and_padded_layouts_alike():
    lens = (2, 3)
    packed = torch.arange(2 * 5, dtype=torch.float32).view(1, 2, 5)          # [1, H, Tq]
    padded = torch.full((2, 2, 32), 99.0)                                     # [N, H, max_q padded]
    padded[0, :, :2] = packed[0, :, :2]
    padded[1, :, :3] = packed[0, :, 2:]
    assert torch.equal(xformers_varlen_lse(packed, lens, 2), packed[0])
    assert torch.equal(xformers_varlen_lse(padded, lens, 2), packed[0])
    bmghk = padded.view(2, 1, 2, 32)                                          # [N, G, H/G, M]
    assert torch.equal(xformers_varlen_lse(bmghk, lens, 2), packed[0])


def test_on_a_cpu_machine_without_xformers_the_reason_names_the_install_and_the_device():
    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    xf_backend._detect.cache_clear()
    row = {r["name"]: r for r in attnlib.list_backends()}["xformers"]
    assert not row["available"]
    assert row["reason"] == "xformers not installed (pip install xformers) and torch has no CUDA device"


# ---------------------------------------------------------------------------------------------
# an honest fake xformers
# ---------------------------------------------------------------------------------------------


def _causal_grid(sq, sk, shift, window=None):
    i = torch.arange(sq).unsqueeze(1)
    j = torch.arange(sk).unsqueeze(0)
    keep = j <= i + shift
    if window is not None:
        keep &= j >= i + shift - window + 1
    return keep


def make_fake_xformers(lse_packed=False):
    root = types.ModuleType("xformers")
    root.__version__ = "0.0.35"
    ops = types.ModuleType("xformers.ops")
    fmha = types.ModuleType("xformers.ops.fmha")
    ab = types.ModuleType("xformers.ops.fmha.attn_bias")
    dispatch = types.ModuleType("xformers.ops.fmha.dispatch")
    root.ops, ops.fmha, fmha.attn_bias, fmha.dispatch = ops, fmha, ab, dispatch
    calls = []
    root.calls = calls

    class AttentionBias:
        pass

    class LowerTriangularMask(AttentionBias):
        def keep(self, sq, sk):
            return _causal_grid(sq, sk, 0)

    class LowerTriangularFromBottomRightMask(AttentionBias):
        def keep(self, sq, sk):
            return _causal_grid(sq, sk, sk - sq)

    @dataclass
    class LowerTriangularFromBottomRightLocalAttentionMask(LowerTriangularFromBottomRightMask):
        _window_size: int

        def keep(self, sq, sk):
            return _causal_grid(sq, sk, sk - sq, self._window_size)

    @dataclass
    class SeqInfo:
        seqstart: torch.Tensor
        seqstart_py: list

        @property
        def lens(self):
            return [b - a for a, b in zip(self.seqstart_py[:-1], self.seqstart_py[1:])]

    def _info(lens, device):
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        return SeqInfo(torch.tensor(starts, dtype=torch.int32, device=device), starts)

    @dataclass
    class BlockDiagonalMask(AttentionBias):
        q_seqinfo: SeqInfo
        k_seqinfo: SeqInfo

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen=None, *, device=None):
            device = device or torch.device("cpu")
            return cls(_info(q_seqlen, device), _info(kv_seqlen if kv_seqlen is not None else q_seqlen, device))

        def make_causal_from_bottomright(self):
            return BlockDiagonalCausalFromBottomRightMask(self.q_seqinfo, self.k_seqinfo)

        def make_local_attention_from_bottomright(self, window_size):
            return BlockDiagonalCausalLocalAttentionFromBottomRightMask(self.q_seqinfo, self.k_seqinfo, window_size)

        def block(self, lq, lk):
            return torch.ones(lq, lk, dtype=torch.bool)

        def keep(self, sq, sk):
            out = torch.zeros(sq, sk, dtype=torch.bool)
            for (q0, q1), (k0, k1) in zip(zip(self.q_seqinfo.seqstart_py, self.q_seqinfo.seqstart_py[1:]),
                                          zip(self.k_seqinfo.seqstart_py, self.k_seqinfo.seqstart_py[1:])):
                out[q0:q1, k0:k1] = self.block(q1 - q0, k1 - k0)
            return out

    @dataclass
    class BlockDiagonalCausalFromBottomRightMask(BlockDiagonalMask):
        def __post_init__(self):
            for i, (lq, lk) in enumerate(zip(self.q_seqinfo.lens, self.k_seqinfo.lens)):
                if lk < lq:
                    raise ValueError(f"Block #{i} has num_keys={lk} and num_queries={lq}. "
                                     "Expected `num_keys >= num_queries`")

        def block(self, lq, lk):
            return _causal_grid(lq, lk, lk - lq)

    @dataclass
    class BlockDiagonalCausalLocalAttentionFromBottomRightMask(BlockDiagonalCausalFromBottomRightMask):
        _window_size: int = 0

        def block(self, lq, lk):
            return _causal_grid(lq, lk, lk - lq, self._window_size)

    supported = (type(None), torch.Tensor, LowerTriangularMask, LowerTriangularFromBottomRightMask,
                 LowerTriangularFromBottomRightLocalAttentionMask, BlockDiagonalMask,
                 BlockDiagonalCausalFromBottomRightMask, BlockDiagonalCausalLocalAttentionFromBottomRightMask)
    for cls in supported[2:]:
        setattr(ab, cls.__name__, cls)

    @dataclass
    class Inputs:
        query: torch.Tensor
        key: torch.Tensor
        value: torch.Tensor
        attn_bias: object = None
        p: float = 0.0
        scale: float = None

    def not_supported_reasons(inp):
        reasons = []
        if type(inp.attn_bias) not in supported:                           # exact type
            reasons.append(f"attn_bias type is {type(inp.attn_bias)}")
        align = 128 // torch.finfo(inp.query.dtype).bits
        if inp.query.shape[-1] % align:
            reasons.append(f"query.shape[-1] % {align} != 0")
        if isinstance(inp.attn_bias, torch.Tensor):
            if any(s % align for s in inp.attn_bias.stride()[:-1]):
                reasons.append(f"attn_bias.stride(-2) % {align} != 0 (attn_bias.stride() = {inp.attn_bias.stride()})")
        return reasons

    def _dispatch_fw(inp, needs_gradient):
        reasons = not_supported_reasons(inp)
        if reasons:
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n"
                                      "`cutlassF-pt` is not supported because:\n    " + "\n    ".join(reasons))
        return "cutlassF-pt"

    fmha.Inputs = Inputs
    dispatch._dispatch_fw = _dispatch_fw

    def _compute(q, k, v, attn_bias, scale):
        """BMHK or BMGHK -> (out in q's layout, lse [B, (G,) H, Mq] unpadded, float32)."""
        inp = Inputs(q, k, v, attn_bias, 0.0, scale)
        reasons = not_supported_reasons(inp)
        if reasons:
            raise NotImplementedError("; ".join(reasons))
        if q.dim() not in (4, 5) or not (q.dim() == k.dim() == v.dim()):
            raise ValueError("Query/Key/Value should all have BMGHK, BMHK or BMK shape.")
        if q.dtype != k.dtype or k.dtype != v.dtype:
            raise ValueError("Query/Key/Value should either all have the same dtype")
        five = q.dim() == 5
        b, mq = q.shape[:2]
        mk = k.shape[1]
        if k.shape[2:-1] != q.shape[2:-1]:
            raise ValueError("Incompatible shapes for attention inputs: we don't support broadcasting, "
                             "please use `expand` yourself")
        if isinstance(attn_bias, BlockDiagonalMask):
            if b != 1:
                raise ValueError("Expected batch_size=1 when using block-diagonal bias")
            if attn_bias.q_seqinfo.seqstart.device != q.device:
                raise ValueError("Attention bias and Query/Key/Value should be on the same device")
        qf, kf, vf = (x.float().flatten(2, 3) if five else x.float() for x in (q, k, v))
        hs = qf.shape[2]
        s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if isinstance(attn_bias, torch.Tensor):
            want = (b, *q.shape[2:-1], mq, mk)
            if tuple(attn_bias.shape) != want:
                raise ValueError(f"Invalid shape for attention bias: {tuple(attn_bias.shape)} (expected {want})")
            if attn_bias.dtype != q.dtype:
                raise ValueError("attn_bias dtype must match the query dtype")
            s = s + (attn_bias.flatten(1, 2) if five else attn_bias).float()
        elif attn_bias is not None:
            s = s.masked_fill(~attn_bias.keep(mq, mk), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)                 # all -inf row: -inf
        p = torch.softmax(s, dim=-1)                     # all -inf row: NaN, as undefined in xformers
        out = torch.einsum("bhqk,bkhd->bqhd", p, vf).to(q.dtype)
        if five:
            out = out.unflatten(2, q.shape[2:4])
            lse = lse.unflatten(1, q.shape[2:4])
        calls.append({"bias": type(attn_bias).__name__, "q": q, "k": k, "bias_obj": attn_bias})
        return out, lse

    def _layout_lse(lse, attn_bias):
        """Return the LSE as the chosen operator lays it out."""
        lse = lse.detach()
        if isinstance(attn_bias, BlockDiagonalMask):
            if lse_packed:
                return lse                                               # [1, (G,) H, Tq]
            starts = attn_bias.q_seqinfo.seqstart_py
            lens = attn_bias.q_seqinfo.lens
            padded = torch.full((len(lens), *lse.shape[1:-1], round_up(max(lens), 32)), 1234.5)
            for i, (s0, n) in enumerate(zip(starts, lens)):
                padded[i, ..., :n] = lse[0, ..., s0:s0 + n]
            return padded
        if lse_packed:
            return lse
        return torch.cat([lse, torch.full((*lse.shape[:-1], round_up(lse.shape[-1], 32) - lse.shape[-1]), 1234.5)], -1)

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
                                   output_dtype=None):
        if query.dim() == 5 and (query.requires_grad or key.requires_grad or value.requires_grad):
            raise NotImplementedError("`cutlassB-pt` is not supported because: operator does not support BMGHK format")
        return _compute(query, key, value, attn_bias, scale)[0]

    def memory_efficient_attention_forward_requires_grad(query, key, value, attn_bias=None, p=0.0, scale=None, *,
                                                         op=None, output_dtype=None):
        with torch.no_grad():
            out, lse = _compute(query, key, value, attn_bias, scale)
        return out, _layout_lse(lse, attn_bias)

    def memory_efficient_attention_backward(grad, output, lse, query, key, value, attn_bias=None, p=0.0, scale=None,
                                            *, op=None):
        if query.dim() == 5:
            raise NotImplementedError("operator does not support BMGHK format")
        leaves = [x.detach().requires_grad_(True) for x in (query, key, value)]
        with torch.enable_grad():
            out, _ = _compute(*leaves, attn_bias, scale)
            return torch.autograd.grad(out, leaves, grad)

    ops.memory_efficient_attention = memory_efficient_attention
    ops.memory_efficient_attention_forward_requires_grad = memory_efficient_attention_forward_requires_grad
    ops.memory_efficient_attention_backward = memory_efficient_attention_backward
    return root


@pytest.fixture
def fake_xformers(monkeypatch):
    monkeypatch.setattr(xf_backend, "_cuda_available", lambda: True)
    caps = dataclasses.replace(xf_backend.XformersBackend.capabilities, devices=frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(xf_backend.XformersBackend, "capabilities", caps)

    def install(lse_packed=False):
        root = make_fake_xformers(lse_packed)
        for name, mod in (("xformers", root), ("xformers.ops", root.ops), ("xformers.ops.fmha", root.ops.fmha),
                          ("xformers.ops.fmha.attn_bias", root.ops.fmha.attn_bias),
                          ("xformers.ops.fmha.dispatch", root.ops.fmha.dispatch)):
            monkeypatch.setitem(sys.modules, name, mod)
        xf_backend._detect.cache_clear()
        assert xf_backend._detect()[0] is not None
        return root.calls

    yield install
    xf_backend._detect.cache_clear()


def _sweep(grid, grad=False):
    skipped = {}
    for case in CASES:
        for dtype, gqa in grid:
            res = run_case("xformers", case, dtype, gqa, grad=grad)
            if res.skipped:
                skipped[case.name] = res.skipped
                continue
            bad = [c for c in res.comparisons if not c.passed]
            assert not bad, f"{case.name} {dtype} gqa{gqa}: " + "; ".join(
                f"{c.what} err {c.error:.3g} > tol {c.tol:.3g}" for c in bad)
    return skipped


def test_every_conformance_case_matches_math_through_the_fake(fake_xformers):
    fake_xformers()
    assert _sweep([(torch.bfloat16, 2), (torch.float32, 4)]) == {}


def test_gradients_match_math_with_lse_through_the_backward_api(fake_xformers):
    fake_xformers()
    assert _sweep([(torch.float16, 2)], grad=True) == {}


def test_packed_varlen_lse_of_flash_operators_reads_the_same(fake_xformers):
    fake_xformers(lse_packed=True)
    for name in ("varlen_cache", "cfg_branches", "causal_q_longer"):
        res = run_case("xformers", next(c for c in CASES if c.name == name), torch.bfloat16, 1)
        assert not res.skipped and res.passed, name


def _bias_used(calls, case_name, gqa=1):
    case = next(c for c in CASES if c.name == case_name)
    calls.clear()
    res = run_case("xformers", case, torch.bfloat16, gqa)
    assert res.passed
    return calls[-1]


def test_exact_bias_classes_reach_the_kernel(fake_xformers):
    calls = fake_xformers()
    expect = {"full": "NoneType", "causal": "LowerTriangularMask", "causal_cache": "LowerTriangularFromBottomRightMask",
              "causal_window_cache": "LowerTriangularFromBottomRightLocalAttentionMask",
              "varlen": "BlockDiagonalMask", "varlen_cache": "BlockDiagonalCausalFromBottomRightMask",
              "varlen_window": "BlockDiagonalCausalLocalAttentionFromBottomRightMask", "key_padding": "Tensor",
              "dense_additive": "Tensor"}
    for case, kind in expect.items():
        assert _bias_used(calls, case)["bias"] == kind, case


def test_rows_before_the_bottom_right_diagonal_never_reach_the_kernel(fake_xformers):
    calls = fake_xformers()
    used = _bias_used(calls, "causal_q_longer")            # Sq=12, Sk=7: 5 rows see nothing
    assert used["q"].shape[1] == 7 and used["bias"] == "LowerTriangularMask"


def test_causal_block_with_fewer_keys_than_queries_is_served_not_raised(fake_xformers):
    calls = fake_xformers()
    mask = BlockDiagonal([5, 2, 3], [2, 4, 3], causal=True)
    q = torch.randn(10, 2, 16, dtype=torch.bfloat16)
    k = torch.randn(9, 2, 16, dtype=torch.bfloat16)
    out, lse = attnlib.attention(q, k, k, mask, backend="xformers", return_lse=True)
    assert calls[-1]["bias_obj"].q_seqinfo.lens == [2, 2, 3]
    assert torch.count_nonzero(out[:3]) == 0 and torch.isneginf(lse[:, :3]).all()
    ref, ref_lse = attnlib.attention(q, k, k, mask, backend="math", return_lse=True)
    assert torch.allclose(out.float(), ref.float(), atol=2e-2) and torch.allclose(lse, ref_lse, atol=1e-2)


def test_gqa_uses_bmghk_with_stride_zero_kv_views_and_repeats_kv_only_for_gradients(fake_xformers):
    calls = fake_xformers()
    q = torch.randn(2, 5, 4, 16, dtype=torch.bfloat16)
    k = torch.randn(2, 7, 1, 16, dtype=torch.bfloat16)
    attnlib.attention(q, k, k, Causal(), backend="xformers")
    kq = calls[-1]["k"]
    assert calls[-1]["q"].shape == (2, 5, 1, 4, 16) and kq.shape == (2, 7, 1, 4, 16) and kq.stride(3) == 0
    qg, kg = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    attnlib.attention(qg, kg, kg, Causal(), backend="xformers").sum().backward()
    assert calls[-1]["k"].shape == (2, 7, 4, 16) and kg.grad is not None


def test_xformers_own_not_supported_reasons_appear_in_why_not(fake_xformers):
    fake_xformers()
    q = torch.randn(1, 4, 2, 12, dtype=torch.float16)             # head dim 12: not 16-byte aligned
    why = get_backend("xformers").why_not(validate_call(q, q, q, Causal()))
    assert len(why) == 1 and "cutlassF-pt" in why[0] and "query.shape[-1] % 8 != 0" in why[0]
    assert get_backend("xformers").why_not(validate_call(q.float(), q.float(), q.float())) == []


from hypothesis import given, strategies as st  # noqa: E402


def _xformers_visible(kind, sq, sk, window):
    """Visibility of xformers' dense causal biases, as their ``materialize`` documents it."""
    if kind == "none":
        return torch.ones(sq, sk, dtype=torch.bool)
    if kind == "LowerTriangularMask":
        return _causal_grid(sq, sk, 0)
    if kind == "LowerTriangularFromBottomRightMask":
        return _causal_grid(sq, sk, sk - sq)
    assert kind == "LowerTriangularFromBottomRightLocalAttentionMask"
    return _causal_grid(sq, sk, sk - sq, window)


@given(sq=st.integers(1, 12), sk=st.integers(1, 12), window=st.one_of(st.none(), st.integers(1, 14)),
       top_left=st.booleans())
def test_causal_bias_spec_reproduces_every_causal_mask(sq, sk, window, top_left):
    mask = Causal(align="top_left" if top_left else "bottom_right", window=window)
    spec = xformers_bias_spec(mask, sq, sk)
    want = mask.materialize(sq, sk)
    if spec.kind == "tensor":
        bias, empty = additive_bias(mask, 1, 1, sq, sk, torch.float32, "cpu")
        assert torch.equal(torch.isfinite(bias[0, 0]) & ~empty.view(sq, 1), want)
        return
    stop = sk if spec.key_stop is None else spec.key_stop
    got = torch.zeros(sq, sk, dtype=torch.bool)
    got[spec.q_start:, :stop] = _xformers_visible(spec.kind, sq - spec.q_start, stop, spec.window)
    assert torch.equal(got, want)
    assert got[spec.q_start:].any(1).all()         # every row sent to the kernel sees a key: no NaN


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=4), st.booleans(),
       st.one_of(st.none(), st.integers(1, 4)))
def test_block_diagonal_spec_keeps_exactly_the_rows_that_see_a_key(blocks, causal, window):
    window = window if causal else None
    mask = BlockDiagonal([b[0] for b in blocks], [b[1] for b in blocks], causal=causal, window=window)
    spec = xformers_bias_spec(mask, mask.total_q, mask.total_k)
    sees = mask.materialize().any(1)
    if spec.kind == "empty":
        assert not sees.any()
        return
    kept = torch.zeros(mask.total_q, dtype=torch.bool)
    kept[kept_query_index(spec.kept_queries, "cpu") if spec.kept_queries else slice(None)] = True
    assert torch.equal(kept, sees)
    assert all(k >= q for q, k in zip(spec.q_seqlens, spec.kv_seqlens)) or not causal
