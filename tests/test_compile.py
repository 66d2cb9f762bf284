"""attnlib inside compiled code: torch.compile(fullgraph=True) and torch.export, results equal to eager.

Selection, validation and mask lowering run at trace time from Python values; a graph break or a host
read in any of them fails these tests. Most cases compile with dynamo's ``aot_eager`` backend (it traces
forward and backward exactly as inductor would receive them, without generating code); a few run
inductor itself.
"""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib import Attention, BlockDiagonal, Causal, DenseMask, KeyPadding
from attnlib.testing import assert_close_to_reference, reference_and_naive
from tests.graphs import GraphRecorder

G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G)


VALID = torch.rand(2, 12, generator=G) > 0.3
VALID[1, :4] = False
MASKS = {
    "none": (None, 12, 12),
    "causal": (Causal(), 12, 12),
    "causal_cache": (Causal(), 5, 12),
    "decode": (Causal(), 1, 12),
    "causal_q_longer": (Causal(), 12, 5),
    "top_left": (Causal(align="top_left"), 5, 12),
    "window": (Causal(window=4), 12, 12),
    "key_padding": (KeyPadding(VALID), 7, 12),
    "key_padding_causal": (KeyPadding(VALID, causal=True), 12, 12),
    "dense_bool": (DenseMask(torch.rand(2, 1, 12, 12, generator=G) > 0.4), 12, 12),
    "dense_additive": (DenseMask(torch.randn(1, 4, 12, 12, generator=G).masked_fill(
        torch.rand(1, 4, 12, 12, generator=G) > 0.7, float("-inf"))), 12, 12),
    "block_diagonal": (BlockDiagonal([3, 5, 4], [4, 5, 6], causal=True), None, None),
    "cfg_branches": (BlockDiagonal([4, 4], [6, 6]), None, None),
}
BACKENDS = ["math", "sdpa", "flex"]


def _inputs(mask, sq, sk, hq=4, hkv=2, d=16):
    if isinstance(mask, BlockDiagonal):
        return rand(mask.total_q, hq, d), rand(mask.total_k, hkv, d), rand(mask.total_k, hkv, d)
    return rand(2, sq, hq, d), rand(2, sk, hkv, d), rand(2, sk, hkv, d)


def _serves(backend, q, k, v, mask, grad=False):
    call = attnlib.inputs.validate_call(q.requires_grad_(grad), k, v, mask, None, True)
    return not attnlib.get_backend(backend).why_not(call)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_forward_and_lse_equal_eager(backend, name):
    mask, sq, sk = MASKS[name]
    q, k, v = _inputs(mask, sq, sk)
    if not _serves(backend, q, k, v, mask):
        pytest.skip(f"{backend} does not serve {name}")

    def fn(q, k, v):
        return attnlib.attention(q, k, v, mask, backend=backend, return_lse=True)

    compiled = torch.compile(fn, fullgraph=True, backend="eager" if backend == "flex" else "aot_eager")
    out, lse = compiled(q, k, v)
    ref_out, ref_lse = fn(q, k, v)
    torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("name", ["none", "causal_cache", "key_padding_causal", "dense_additive", "block_diagonal",
                                  "causal_q_longer"])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_fullgraph_gradients_equal_eager(backend, name):
    mask, sq, sk = MASKS[name]
    q, k, v = _inputs(mask, sq, sk)

    def loss(fn, q, k, v):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = fn(*leaves)
        (out.square().sum() + lse.clamp(min=-50).sum()).backward()
        return [out.detach(), lse.detach()] + [t.grad for t in leaves]

    def fn(q, k, v):
        return attnlib.attention(q, k, v, mask, backend=backend, return_lse=True)

    got = loss(torch.compile(fn, fullgraph=True, backend="aot_eager"), q, k, v)
    want = loss(fn, q, k, v)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_inductor_fullgraph_matches_the_float64_reference(backend):
    mask, sq, sk = MASKS["key_padding_causal"]
    q, k, v = _inputs(mask, sq, sk)
    compiled = torch.compile(lambda q, k, v: attnlib.attention(q, k, v, mask, backend=backend, return_lse=True),
                             fullgraph=True)
    out, lse = compiled(q, k, v)
    (ref, ref_lse), (naive, naive_lse) = reference_and_naive(q, k, v, mask, q.shape[-1] ** -0.5, packed=False)
    assert_close_to_reference(out, ref, naive, torch.float32, "out")
    assert_close_to_reference(lse, ref_lse, naive_lse, torch.float32, "lse")


def test_attention_module_compiles_with_auto_selection_and_causal_default():
    layer = Attention(num_heads=4, head_size=16, num_kv_heads=2, causal=True)
    q, k, v = _inputs(None, 5, 12)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), layer(q, k, v))


def test_masks_built_inside_the_compiled_region():
    q, k, v = _inputs(None, 12, 12)
    valid = VALID

    def fn(q, k, v, valid):
        return attnlib.attention(q, k, v, KeyPadding(valid, causal=True), backend="sdpa") + \
            attnlib.attention(q, k, v, Causal(window=3), backend="sdpa")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, valid), fn(q, k, v, valid))


def test_use_backend_and_fallback_inside_compiled_code():
    """use_backend is honoured (the graph is guarded on it) and a fallback warns once, at trace time."""
    q, k, v = _inputs(None, 12, 12)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    seen = []

    class Probe(attnlib.backends.Backend):
        name = "probe_compile"
        capabilities = attnlib.backends.Capabilities(dtypes=frozenset({torch.float32}))

        def forward(self, call):
            seen.append(call.seqlen_q)
            return attnlib.get_backend("math").forward(call)

    attnlib.register_backend(Probe(), replace=True)
    compiled = torch.compile(lambda q, k, v: attnlib.attention(q, k, v, Causal()), fullgraph=True,
                             backend="aot_eager")
    compiled(q, k, v)
    assert seen == []                                   # auto: sdpa
    with attnlib.use_backend("probe_compile"):
        compiled(q, k, v)
    assert seen == [12]                                 # recompiled for the override
    compiled(q, k, v)
    assert seen == [12]                                 # and back
    with attnlib.use_backend("probe_compile"), pytest.warns(RuntimeWarning, match="probe_compile.*dtype=fp64"):
        out = compiled(q64, k64, v64)
    torch.testing.assert_close(out, attnlib.attention(q64, k64, v64, Causal(), backend="math"))


def test_a_backend_first_asked_inside_a_compiled_region_is_probed_at_trace_time_not_traced(isolated_registry):
    """Probes run lazily; when the first call that asks a backend is being compiled, its probes run as plain
    Python while dynamo traces, once: traced instead, this probe's graph break would fail the fullgraph
    compile (and its side effect would replay on every call)."""
    seen = []

    class Probed(attnlib.backends.Backend):
        name = "probe_trace_time"
        capabilities = attnlib.backends.Capabilities(dtypes=frozenset({torch.float32}))

        def run_probes(self):
            seen.append("probed")
            torch._dynamo.graph_break()          # a no-op unless dynamo traces it

        def forward(self, call):
            return attnlib.get_backend("math").forward(call)

    attnlib.register_backend(Probed())
    q, k, v = _inputs(None, 12, 12)
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compiled = torch.compile(lambda q, k, v: attnlib.attention(q, k, v, Causal(), backend="probe_trace_time"),
                             fullgraph=True, backend=counter)
    out = compiled(q, k, v)
    compiled(q, k, v)
    assert seen == ["probed"] and counter.frame_count == 1
    torch.testing.assert_close(out, attnlib.attention(q, k, v, Causal(), backend="math"))


def test_torch_export_of_a_model_with_attention():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(num_heads=4, head_size=16, num_kv_heads=2, causal=True, backend="sdpa")

        def forward(self, q, k, v, valid):
            return self.attn(q, k, v) + attnlib.attention(q, k, v, KeyPadding(valid, causal=True), backend="sdpa")

    q, k, v = _inputs(None, 12, 12)
    model = Block()
    exported = torch.export.export(model, (q, k, v, VALID))
    torch.testing.assert_close(exported.module()(q, k, v, VALID), model(q, k, v, VALID))


@pytest.mark.parametrize("name", ["none", "causal_cache", "top_left", "window", "key_padding_causal", "block_diagonal"])
def test_triton_kernels_are_one_custom_op_node_with_gradients(name):
    if attnlib.get_backend("triton").unavailable_reason():
        pytest.skip("triton cannot run here")
    mask, sq, sk = MASKS[name]
    q, k, v = _inputs(mask, sq, sk)
    graphs = GraphRecorder()

    def fn(q, k, v):
        return attnlib.attention(q, k, v, mask, backend="triton", return_lse=True)

    out, lse = torch.compile(fn, fullgraph=True, backend=graphs)(q, k, v)
    ops = graphs.ops(0)
    assert ops.count(torch.ops.attnlib.triton_attention_fwd.default) == 1
    ref_out, ref_lse = fn(q, k, v)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)

    def loss(f):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        o, l_ = f(*leaves)
        (o.square().sum() + l_.clamp(min=-50).sum()).backward()
        return [t.grad for t in leaves]

    for g, w in zip(loss(torch.compile(fn, fullgraph=True, backend="aot_eager")), loss(fn)):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_triton_custom_op_passes_torch_library_opcheck():
    if attnlib.get_backend("triton").unavailable_reason():
        pytest.skip("triton cannot run here")
    from attnlib_kernels import attention as kernels

    q, k, v = (t.requires_grad_(True) for t in _inputs(None, 5, 9))
    args = kernels.op_args(q, k, v, scale=0.25, causal=True)
    torch.library.opcheck(kernels._fwd_op, args, test_utils=("test_schema", "test_autograd_registration",
                                                              "test_faketensor", "test_aot_dispatch_dynamic"))


def test_models_ref_blocks_compile_fullgraph_and_match_eager():
    from models_ref import parity
    from models_ref.qwen3_omni import ThinkerAttention

    for make in (parity.qwen_image_case, parity.code_predictor_case):
        ours, _ = make().build(torch.float32, "cpu")
        torch._dynamo.reset()
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(ours, fullgraph=True, backend="aot_eager")(), ours())
    # the thinker on a padded batch (KeyPadding(causal=True): no host read of the lengths)
    thinker = parity.seeded_block(ThinkerAttention, parity.THINKER_KWARGS, 7, std=0.2)
    h, pos, valid = parity.thinker_inputs(torch.float32)
    tables = thinker.rope_tables(pos)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(thinker, fullgraph=True, backend="aot_eager")(h, tables, valid),
                                   thinker(h, tables, valid))
    # Bagel's CFG scene (packed BlockDiagonal calls against per-branch caches), one compiled layer
    from models_ref.bagel import PackedAttentionMoT

    attn = parity.seeded_block(PackedAttentionMoT, parity.BAGEL_CONFIG, 3, std=0.25)
    with torch.no_grad():
        want = parity.bagel_cfg_scene(attn, torch.float32)
        got = parity.bagel_cfg_scene(torch.compile(attn, fullgraph=True, backend="aot_eager"), torch.float32)
    torch.testing.assert_close(got, want)


DYNAMIC_MASKS = {
    "none": lambda s: None,
    "causal": lambda s: Causal(),
    "causal_cache": lambda s: Causal(),
    "window": lambda s: Causal(window=5),
    "key_padding_causal": lambda s: KeyPadding(torch.rand(2, s, generator=G) > 0.3, causal=True),
    "block_diagonal": lambda s: BlockDiagonal([s, 3], [s + 2, 3], causal=True),
}
LENGTHS = (9, 17, 33, 40, 65)


def _dynamic_inputs(name, mask, s):
    if isinstance(mask, BlockDiagonal):
        return rand(mask.total_q, 4, 16), rand(mask.total_k, 2, 16), rand(mask.total_k, 2, 16)
    sq = 3 if name == "causal_cache" else s
    return rand(2, sq, 4, 16), rand(2, s, 2, 16), rand(2, s, 2, 16)


@pytest.mark.parametrize("name", list(DYNAMIC_MASKS))
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_dynamic_shapes_compile_once_for_five_lengths(backend, name):
    graphs = GraphRecorder()

    compiled = torch.compile(lambda q, k, v, m: attnlib.attention(q, k, v, m, backend=backend, return_lse=True),
                             dynamic=True, fullgraph=True, backend=graphs)
    for s in LENGTHS:
        mask = DYNAMIC_MASKS[name](s)
        q, k, v = _dynamic_inputs(name, mask, s)
        out, lse = compiled(q, k, v, mask)
        ref_out, ref_lse = attnlib.attention(q, k, v, mask, backend=backend, return_lse=True)
        torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=2e-6)
    assert len(graphs) == 1, f"{len(graphs)} graphs for {len(LENGTHS)} lengths"


def test_flex_on_cpu_specializes_each_length_on_purpose():
    """flex on CPU compiles static shapes only (its C++ kernel is wrong under dynamic shapes, see
    attnlib.known_defects): inside a dynamic=True region each new length is its own graph, and right."""
    graphs = GraphRecorder()

    compiled = torch.compile(lambda q, k, v: attnlib.attention(q, k, v, Causal(), backend="flex"), dynamic=True,
                             fullgraph=True, backend=graphs)
    for s in (9, 17, 40):
        q, k, v = _dynamic_inputs("causal", None, s)
        torch.testing.assert_close(compiled(q, k, v), attnlib.attention(q, k, v, Causal(), backend="math"),
                                   atol=2e-6, rtol=2e-6)
    assert len(graphs) == 3


@pytest.fixture
def no_host_reads(monkeypatch):
    """Reading a tensor on the host (``.item()``, ``bool(t)``, ``.tolist()``, ``int(t)``...) raises."""
    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"hot path called Tensor.{name}")
        return method

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_backend_reads_a_tensor_on_the_host(backend, name, no_host_reads):
    mask, sq, sk = MASKS[name]
    q, k, v = _inputs(mask, sq, sk)
    # flex's CPU LSE pass reads CPU index tensors to bound its key spans (no device involved): LSE off there
    lse = backend != "flex"
    call = attnlib.inputs.validate_call(q, k, v, mask, None, lse)
    if attnlib.get_backend(backend).why_not(call):
        pytest.skip(f"{backend} does not serve {name}")
    attnlib.attention(q, k, v, mask, backend=backend, return_lse=lse)
    attnlib.attention(q, k, v, mask, backend=backend, return_lse=lse)      # and the cached (hot) path


def test_the_host_read_trap_trips(no_host_reads):
    t = torch.ones(2)
    for read in (lambda: bool(t[0]), lambda: t.tolist(), lambda: t[0].item(), lambda: int(t[0]), lambda: float(t[0])):
        with pytest.raises(AssertionError, match="hot path called"):
            read()


def test_default_compile_recompiles_once_for_new_lengths_and_never_for_new_mask_tensors():
    graphs = GraphRecorder()

    compiled = torch.compile(lambda q, k, v, m: attnlib.attention(q, k, v, m, backend="sdpa"), fullgraph=True,
                             backend=graphs)
    for s in LENGTHS:
        q, k, v = _dynamic_inputs("key_padding_causal", None, s)
        for _ in range(2):      # a new KeyPadding tensor each call
            mask = KeyPadding(torch.rand(2, s, generator=G) > 0.3, causal=True)
            torch.testing.assert_close(compiled(q, k, v, mask), attnlib.attention(q, k, v, mask, backend="sdpa"),
                                       atol=2e-6, rtol=2e-6)
    assert len(graphs) == 2       # the first length, then one dynamic graph for the rest


@pytest.mark.parametrize("kind", ["causal_cache", "key_padding_causal", "block_diagonal"])
@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_torch_export_on_every_backend(backend, kind):
    mask, sq, sk = MASKS[kind]
    q, k, v = _inputs(mask, sq, sk)
    if not _serves(backend, q, k, v, mask):
        pytest.skip(f"{backend} does not serve {kind} here")

    class Model(torch.nn.Module):
        def forward(self, q, k, v):
            return attnlib.attention(q, k, v, mask, backend=backend, return_lse=True)

    exported = torch.export.export(Model(), (q, k, v))
    for got, want in zip(exported.module()(q, k, v), Model()(q, k, v)):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
