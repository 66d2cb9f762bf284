"""The ``xformers`` backend on a CPU machine: attn_bias choice, bias layout, and the whole backend on a fake.

The fake follows xformers' documented behaviour (``ops/fmha/__init__.py``, ``attn_bias.py``, ``cutlass.py``):
bias types are checked by *exact* type; ``BlockDiagonalCausalFromBottomRightMask`` raises when a block has
fewer keys than queries; a tensor bias must have shape ``[B, H, Mq, Mk]`` (``[B, G, H, Mq, Mk]`` for BMGHK)
and every stride but the last a multiple of 16 bytes; block-diagonal biases need batch 1 and their
seqstart on the query's device; BMGHK has no backward; a row whose scores are all ``-inf`` is NaN
(undefined in xformers); the cutlass LSE is ``[B, H, M]`` padded to a multiple of 32 (varlen: one padded
row per block), the flash operator's varlen LSE is packed ``[1, H, Tq]``. The only liberty: CPU tensors.
"""
import gc
import weakref
import types
from dataclasses import dataclass

import pytest
import torch

import attnlib
from attnlib import BlockDiagonal, Causal, DenseMask, KeyPadding
from attnlib.backends import xformers as xf_backend
from attnlib.backends.xformers import (BiasKind, additive_bias, bias_alignment, kept_query_index, round_up,
                                       xformers_bias_spec, xformers_varlen_lse)
from attnlib.conformance import CASES, run_case
from attnlib.inputs import validate_call
from attnlib.dispatch import execute
from attnlib.plan import plan_for
from attnlib.registry import get_backend
from tests.graphs import assert_one_node_and_eager_numbers
from fakes import causal_plans, install_modules, key_padding_plans, pretend_cuda, ranges, sweep_conformance

K = BiasKind


def spec_of(mask, sq, sk):
    return xformers_bias_spec(plan_for(mask, sq, sk))

# ---------------------------------------------------------------------------------------------
# pure lowering: which attn_bias, how the call is cut
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask,sq,sk,kind,q_start,key_stop", [
    (None, 5, 9, K.NONE, 0, None),
    (Causal(), 9, 9, K.LOWER_TRIANGULAR, 0, None),
    (Causal(), 6, 29, K.LOWER_TRIANGULAR_BOTTOM_RIGHT, 0, None),
    (Causal(), 12, 7, K.LOWER_TRIANGULAR, 5, None),                 # 5 leading rows see nothing
    (Causal(), 1, 9, K.NONE, 0, None),                              # decode: the one query sees every key
    (Causal(window=7), 5, 30, K.LOWER_TRIANGULAR_BOTTOM_RIGHT_LOCAL, 0, None),
    (Causal(align="top_left"), 6, 29, K.LOWER_TRIANGULAR, 0, 6),    # later keys are never visible
    (Causal(align="top_left"), 12, 7, K.LOWER_TRIANGULAR, 0, None),  # xformers' own causal is top-left
    (Causal(align="top_left", window=3), 12, 7, K.TENSOR, 0, None),
    (DenseMask(torch.ones(2, 2, dtype=torch.bool)), 2, 2, K.TENSOR, 0, None),
    (KeyPadding(torch.ones(1, 4, dtype=torch.bool)), 3, 4, K.TENSOR, 0, None),
    (KeyPadding(torch.ones(1, 4, dtype=torch.bool), causal=True), 3, 4, K.TENSOR, 0, None),
    (Causal(), 4, 0, K.EMPTY, 0, None),
])
def test_bias_type_per_mask(mask, sq, sk, kind, q_start, key_stop):
    spec = spec_of(mask, sq, sk)
    assert (spec.kind, spec.q_start, spec.key_stop) == (kind, q_start, key_stop)


def test_causal_window_bias_carries_the_same_window_count():
    assert spec_of(Causal(window=7), 5, 30).window == 7


def test_each_bias_kind_builds_its_exact_class_and_knows_if_it_is_varlen():
    ab = make_fake_xformers().ops.fmha.attn_bias
    for kind in BiasKind:
        if kind in (K.TENSOR, K.EMPTY, K.TILES):
            with pytest.raises(ValueError):
                kind.build(ab, None, torch.device("cpu"))
            continue
        spec = xf_backend.XformersBiasSpec(kind, q_seqlens=(2, 3), kv_seqlens=(4, 3), window=2)
        obj = kind.build(ab, spec, torch.device("cpu"))
        assert obj is None if kind is K.NONE else type(obj) is getattr(ab, kind.value)
        assert kind.varlen == kind.name.startswith("BLOCK_DIAGONAL")


def test_block_diagonal_bias_types_and_queries_that_see_no_key_are_dropped():
    assert spec_of(BlockDiagonal([7, 1, 19]), 27, 27).kind is K.BLOCK_DIAGONAL
    spec = spec_of(BlockDiagonal([3, 1, 5], [10, 1, 20], causal=True), 9, 31)
    assert (spec.kind, spec.kept_queries) == (K.BLOCK_DIAGONAL_CAUSAL_BOTTOM_RIGHT, None)
    win = spec_of(BlockDiagonal([11, 16], causal=True, window=4), 27, 27)
    assert (win.kind, win.window) == (K.BLOCK_DIAGONAL_CAUSAL_LOCAL_BOTTOM_RIGHT, 4)
    # block 0 has 5 queries but 2 keys: its first 3 rows see nothing; block 2 has no keys at all
    short = spec_of(BlockDiagonal([5, 2, 3], [2, 4, 0], causal=True), 10, 6)
    assert short.q_seqlens == (2, 2) and short.kv_seqlens == (2, 4)          # block 2's rows: dropped
    assert short.kept_queries == ((3, 4),)
    assert kept_query_index(short.kept_queries, "cpu").tolist() == [3, 4, 5, 6]
    nokeys = spec_of(BlockDiagonal([2, 3], [0, 4]), 5, 4)
    assert nokeys.q_seqlens == (3,) and nokeys.kept_queries == ((2, 3),)      # block 0 sees no key: dropped
    assert spec_of(BlockDiagonal([2], [0]), 2, 0).kind is K.EMPTY


def test_restricted_plans_drop_rows_cut_keys_and_give_unseen_keys_blocks_of_no_query():
    whole = plan_for(Causal(), 8, 8)
    spec = xformers_bias_spec(whole.restrict((0, 4), (0, 8)))     # offset 0 < 4: the first 4 keys
    assert (spec.kind, spec.key_stop) == (K.LOWER_TRIANGULAR, 4)
    spec = xformers_bias_spec(whole.restrict((0, 8), (2, 6)))     # rows 0, 1 see nothing; 2.. top-left
    assert (spec.kind, spec.q_start, spec.key_stop) == (K.LOWER_TRIANGULAR, 2, None)
    assert xformers_bias_spec(whole.restrict((4, 8), (0, 6))).kind is K.TENSOR   # diagonal 4 > 6 - 4
    # rows 0, 1 of block 0 see keys 0..1 (key 2 is cut: a block of no query), block 1's keys: no query
    spec = xformers_bias_spec(plan_for(BlockDiagonal([3, 3], causal=True), 6, 6).restrict((0, 2), (0, 6)))
    assert (spec.kind, spec.q_seqlens, spec.kv_seqlens) == (K.BLOCK_DIAGONAL_CAUSAL_BOTTOM_RIGHT, (2, 0, 0), (2, 1, 3))
    spec = xformers_bias_spec(plan_for(BlockDiagonal([2, 2], [3, 3]), 4, 6).restrict((2, 4), (0, 6)))
    assert (spec.kind, spec.q_seqlens, spec.kv_seqlens) == (K.BLOCK_DIAGONAL, (0, 2), (3, 3))
    # block 1 keeps 3 rows over 2 keys with its diagonal at 0: no bottom-right form, one call per tile
    bd = plan_for(BlockDiagonal([3, 3], causal=True), 6, 6).restrict((1, 6), (1, 5))
    assert xformers_bias_spec(bd).kind is K.TILES


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_key_padding_bias_is_aligned_broadcast_and_unmasks_rows_with_no_key(dtype):
    valid = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    bias, empty = additive_bias(plan_for(KeyPadding(valid), 3, 5), 2, 4, dtype, "cpu")
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
    bias, empty = additive_bias(plan_for(DenseMask(m), 3, 6), 2, 2, torch.float16, "cpu")
    assert bias.shape == (2, 2, 3, 6) and bias.stride(0) == 0
    assert all(s % 8 == 0 for s in bias.stride()[:-1])
    assert torch.allclose(bias[1, 0].float(), m[0, 0].half().float())
    assert empty.shape == (1, 2, 3) and empty.nonzero().tolist() == [[0, 1, 2]]
    assert torch.count_nonzero(bias[0, 1, 2]) == 0


@pytest.mark.parametrize("sq,sk,window", [(4, 9, None), (9, 4, None), (6, 6, 2), (1, 9, 3)])
def test_key_padding_causal_bias_is_the_materialized_plan_with_empty_rows_unmasked(sq, sk, window):
    valid = torch.rand(3, sk, generator=torch.Generator().manual_seed(sq * sk)) > 0.3
    valid[1] = False
    valid[2, : sk // 2] = False                                       # left padding
    plan = plan_for(KeyPadding(valid, causal=True, window=window), sq, sk)
    bias, empty = additive_bias(plan, 3, 2, torch.bfloat16, "cpu")
    want = plan.materialize().expand(3, 2, sq, sk)
    assert bias.shape == (3, 2, sq, sk) and bias.stride(1) == 0 and all(s % 8 == 0 for s in bias.stride()[:-1])
    assert torch.equal(empty.expand(3, 2, sq), ~want.any(-1))
    assert torch.equal(torch.isfinite(bias), want | empty.expand(3, 2, sq)[..., None])
    assert torch.count_nonzero(bias[torch.isfinite(bias)]) == 0


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
    pretend_cuda(monkeypatch, xf_backend, xf_backend.XformersBackend)

    def install(lse_packed=False):
        root = make_fake_xformers(lse_packed)
        install_modules(monkeypatch, {mod.__name__: mod for mod in (root, root.ops, root.ops.fmha,
                                                                    root.ops.fmha.attn_bias, root.ops.fmha.dispatch)})
        xf_backend._detect.cache_clear()
        assert xf_backend._detect()[0] is not None
        return root.calls

    yield install
    xf_backend._detect.cache_clear()


#: xformers has no score hook: softcap is refused (ALiBi rides on the additive bias)
NOT_SERVED = {"softcap", "softcap_alibi_sinks"}


def test_every_conformance_case_matches_math_through_the_fake(fake_xformers):
    fake_xformers()
    assert set(sweep_conformance("xformers", [(torch.bfloat16, 2), (torch.float32, 4)])) == NOT_SERVED


def test_gradients_match_math_with_lse_through_the_backward_api(fake_xformers):
    fake_xformers()
    assert set(sweep_conformance("xformers", [(torch.float16, 2)], grad=True)) == NOT_SERVED


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
    kp = KeyPadding(torch.ones(1, 4, dtype=torch.bool), causal=True)          # a tensor bias: its stand-in too
    why = get_backend("xformers").why_not(validate_call(q, q, q, kp))
    assert len(why) == 1 and "query.shape[-1] % 8 != 0" in why[0]


def test_why_not_builds_no_bias_tensor_copies_nothing_and_keeps_no_call_state(fake_xformers, monkeypatch):
    fake_xformers()
    backend = get_backend("xformers")

    def forbidden(*a, **k):
        raise AssertionError("why_not must not build tensors")

    monkeypatch.setattr(xf_backend, "additive_bias", forbidden)
    monkeypatch.setattr(xf_backend, "kept_query_index", forbidden)
    for name in ("index_select", "repeat_interleave", "masked_fill", "masked_fill_", "contiguous", "clone"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    valid = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    calls = []
    q = torch.randn(2, 4, 4, 16, dtype=torch.bfloat16)
    k = torch.randn(2, 6, 2, 16, dtype=torch.bfloat16)
    calls.append(validate_call(q, k, k, KeyPadding(valid, causal=True)))                        # tensor bias
    calls.append(validate_call(q.requires_grad_(), k, k, DenseMask(torch.ones(4, 6, dtype=torch.bool))))
    pq, pk = torch.randn(10, 4, 16, dtype=torch.bfloat16), torch.randn(6, 2, 16, dtype=torch.bfloat16)
    calls.append(validate_call(pq, pk, pk, BlockDiagonal([5, 2, 3], [2, 4, 0], causal=True)))  # rows dropped
    for call in calls:
        assert backend.why_not(call) == []
    monkeypatch.undo()
    assert not vars(backend)                                  # no per-call (or per-thread) state on the backend
    ref = weakref.ref(calls[0])
    del calls, call
    gc.collect()
    assert ref() is None                                      # nothing keeps the call alive


def test_a_restricted_plan_runs_and_matches_math_on_its_materialized_mask(fake_xformers):
    calls = fake_xformers()
    cases = [(Causal(), 8, 8, (4, 8), (0, 6)), (Causal(), 8, 8, (0, 8), (2, 6)),
             (Causal(window=3), 8, 8, (0, 4), (0, 8)),
             (BlockDiagonal([3, 3], [4, 4], causal=True), 6, 8, (1, 6), (1, 7)),
             (BlockDiagonal([3, 3], [4, 4], causal=True), 6, 8, (3, 6), (0, 8))]
    for mask, sq, sk, qr, kr in cases:
        plan = plan_for(mask, sq, sk).restrict(qr, kr)
        packed = isinstance(mask, BlockDiagonal)
        shape_q, shape_k = ((sq, 4, 16), (sk, 2, 16)) if packed else ((2, sq, 4, 16), (2, sk, 2, 16))
        q = torch.randn(*shape_q, dtype=torch.bfloat16).narrow(int(not packed), qr[0], qr[1] - qr[0])
        k = torch.randn(*shape_k, dtype=torch.bfloat16).narrow(int(not packed), kr[0], kr[1] - kr[0])
        call = validate_call(q, k, k, None, None, True).replace(plan=plan)
        assert get_backend("xformers").why_not(call) == []
        calls.clear()
        out, lse = call.restore(*execute(get_backend("xformers"), call))
        dense = plan.materialize()
        ref, ref_lse = (attnlib.attention(q[None], k[None], k[None], DenseMask(dense), backend="math", return_lse=True)
                        if packed else attnlib.attention(q, k, k, DenseMask(dense), backend="math", return_lse=True))
        if packed:
            ref, ref_lse = ref[0], ref_lse[0]
        assert torch.allclose(out.float(), ref.float(), atol=2e-2), (mask, qr, kr)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), (mask, qr, kr)
        assert torch.allclose(lse[~torch.isneginf(lse)], ref_lse[~torch.isneginf(ref_lse)], atol=2e-2)


from hypothesis import given, strategies as st  # noqa: E402


def _xformers_visible(kind, sq, sk, window):
    """Visibility of xformers' dense causal biases, as their ``materialize`` documents it."""
    if kind is K.NONE:
        return torch.ones(sq, sk, dtype=torch.bool)
    if kind is K.LOWER_TRIANGULAR:
        return _causal_grid(sq, sk, 0)
    if kind is K.LOWER_TRIANGULAR_BOTTOM_RIGHT:
        return _causal_grid(sq, sk, sk - sq)
    assert kind is K.LOWER_TRIANGULAR_BOTTOM_RIGHT_LOCAL
    return _causal_grid(sq, sk, sk - sq, window)


def _block_visible(kind, lq, lk, window):
    if kind is K.BLOCK_DIAGONAL:
        return torch.ones(lq, lk, dtype=torch.bool)
    return _causal_grid(lq, lk, lk - lq, window if kind is K.BLOCK_DIAGONAL_CAUSAL_LOCAL_BOTTOM_RIGHT else None)


def _spec_visible(spec, plan):
    """What the kernel sees under ``spec`` (xformers' documented bias semantics), as a bool [Sq, Sk];
    a tensor spec: the finite entries of the additive bias, less the rows reported empty."""
    sq, sk = plan.seqlen_q, plan.seqlen_k
    got = torch.zeros(sq, sk, dtype=torch.bool)
    if spec.kind is K.EMPTY:
        return got
    if spec.kind is K.TILES:                      # one call per run of tiles: each run's own causal class
        return plan.materialize()
    if spec.kind is K.TENSOR:
        bias, empty = additive_bias(plan, 1, 1, torch.float32, "cpu")
        rows = torch.zeros(sq, dtype=torch.bool) if empty is None else empty.expand(1, 1, sq)[0, 0]
        return torch.isfinite(bias[0, 0]) & ~rows[:, None]
    if spec.kind.varlen:
        assert all(k >= q for q, k in zip(spec.q_seqlens, spec.kv_seqlens)) or spec.kind is K.BLOCK_DIAGONAL
        grid = torch.zeros(sum(spec.q_seqlens), sum(spec.kv_seqlens), dtype=torch.bool)
        q0 = k0 = 0
        for lq, lk in zip(spec.q_seqlens, spec.kv_seqlens):
            grid[q0:q0 + lq, k0:k0 + lk] = _block_visible(spec.kind, lq, lk, spec.window)
            q0, k0 = q0 + lq, k0 + lk
        assert k0 == sk
        rows = kept_query_index(spec.kept_queries, "cpu") if spec.kept_queries else torch.arange(sq)
        got[rows] = grid
        assert grid.any(1).all()                   # every row sent to the kernel sees a key: no NaN
        return got
    stop = sk if spec.key_stop is None else spec.key_stop
    q1 = sq if spec.q_stop is None else spec.q_stop
    got[spec.q_start:q1, :stop] = _xformers_visible(spec.kind, q1 - spec.q_start, stop, spec.window)
    assert got[spec.q_start:q1].any(1).all()       # every row sent to the kernel sees a key: no NaN
    return got


@given(causal_plans())
def test_causal_bias_spec_reproduces_every_causal_plan(drawn):
    mask, plan, cut = drawn
    spec = xformers_bias_spec(plan)
    assert torch.equal(_spec_visible(spec, plan), plan.materialize())
    if cut is None and spec.kind is K.TENSOR:      # the whole call: the plan's lengths are the call's
        assert mask.align == "top_left" and mask.window is not None and plan.seqlen_q > plan.seqlen_k


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=4), st.booleans(),
       st.one_of(st.none(), st.integers(1, 4)), st.data())
def test_block_diagonal_spec_reproduces_the_plan_and_keeps_exactly_the_rows_that_see_a_key(blocks, causal, window,
                                                                                          data):
    window = window if causal else None
    mask = BlockDiagonal([b[0] for b in blocks], [b[1] for b in blocks], causal=causal, window=window)
    plan = plan_for(mask, mask.total_q, mask.total_k)
    cut = data.draw(ranges(mask.total_q, mask.total_k))
    if cut is not None:
        plan = plan.restrict(*cut)
    spec = xformers_bias_spec(plan)
    assert torch.equal(_spec_visible(spec, plan), plan.materialize())
    if cut is None:
        assert spec.kind is not K.TENSOR           # a BlockDiagonal's own plan always has its bias class
        sees = plan.materialize().any(1)
        if spec.kind is K.EMPTY:
            assert not sees.any()
            return
        kept = torch.zeros(mask.total_q, dtype=torch.bool)
        kept[kept_query_index(spec.kept_queries, "cpu") if spec.kept_queries else slice(None)] = True
        assert torch.equal(kept, sees)


@given(key_padding_plans())
def test_key_padding_bias_is_the_materialized_plan(drawn):
    mask, plan, _ = drawn
    valid = mask.valid
    spec = xformers_bias_spec(plan)
    want = plan.materialize().expand(valid.shape[0], 1, plan.seqlen_q, plan.seqlen_k)
    if spec.kind is K.EMPTY:
        assert not want.any()
        return
    assert spec.kind is K.TENSOR
    bias, empty = additive_bias(plan, valid.shape[0], 1, torch.float32, "cpu")
    rows_empty = empty.expand(valid.shape[0], 1, plan.seqlen_q)
    assert torch.equal(rows_empty, ~want.any(-1))
    assert torch.equal(torch.isfinite(bias) & ~rows_empty[..., None], want)


@pytest.mark.parametrize("lse_packed", [False, True])
def test_inference_calls_are_one_custom_op_node_under_compile(fake_xformers, lse_packed):
    """Without gradients xformers runs as torch.ops.attnlib.xformers_attention (the bias rebuilt inside the
    op from its typed description): one opaque node, the same numbers as eager, structured and tensor biases."""
    fake_xformers(lse_packed)
    g = torch.Generator().manual_seed(0)
    valid = torch.rand(2, 13, generator=g) > 0.3
    cases = [(torch.randn(2, 9, 4, 16, generator=g), torch.randn(2, 13, 2, 16, generator=g), Causal()),
             (torch.randn(2, 9, 4, 16, generator=g), torch.randn(2, 13, 2, 16, generator=g),
              KeyPadding(valid, causal=True)),
             (torch.randn(8, 4, 16, generator=g), torch.randn(10, 2, 16, generator=g),
              BlockDiagonal([3, 5], [4, 6], causal=True))]
    for q, k, mask in cases:
        assert_one_node_and_eager_numbers("xformers", torch.ops.attnlib.xformers_attention.default, q, k, mask)
