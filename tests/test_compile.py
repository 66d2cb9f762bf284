"""attnlib inside compiled code: ``torch.compile(fullgraph=True)`` with inductor, the default backend, and
``torch.export``; results equal to eager and to the independent float64 reference.

Selection, validation, planning and every backend's lowering run at trace time from Python values: a graph
break, a host read of a tensor, or a write to an object from outside the traced function fails here.

Compiling is what these tests cost (inductor builds C++ kernels on CPU, and flex's CPU kernel is a large
template), so each test compiles one function that runs all of its cases, and the cases share few shapes:
every dense case is ``[2, 10 or 12, 4, 16]`` against ``[2, 12 or 10, 2, 16]`` and every packed one ``11`` query
tokens against ``26`` key tokens, which flex's CPU shape guard pads to the same buckets, so equal kernels are
built once per process.
"""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib import Attention, BlockDiagonal, BlockSparse, Causal, DenseMask, KeyPadding
from attnlib.testing import compare
from tests.graphs import GraphRecorder, InductorRecorder
from tests.hostreads import HostReadError, no_host_reads
from tests.reference64 import attention64, paged_keys

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, HQ, HKV, D = 2, 4, 2, 16
SQ, SK = 10, 12                      # dense calls: bottom-right causal sits at a cache offset of 2
Q_LENS, KV_LENS = (1, 10), (12, 14)  # packed calls: a decode row and a chunked prefill against their caches
BACKENDS = ["math", "sdpa", "flex"]

G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G).to(DEVICE)


def _tensors() -> dict:
    """The tensors tensor masks are built from (on the host; moved to the device with the inputs)."""
    valid = torch.rand(B, SK, generator=G) > 0.3
    valid[1, :4] = False                                   # with causal=True: batch 1's first row sees nothing
    dense_bias = torch.randn(1, HQ, SQ, SK, generator=G).masked_fill(torch.rand(1, HQ, SQ, SK, generator=G) > 0.7,
                                                                     float("-inf"))
    dense_bias[0, 1, 3] = float("-inf")                    # a row with no visible key
    layout = torch.rand(HQ, 3, 3, generator=G) > 0.5       # 4x4 blocks over 10 x 12
    layout[:, 0, 0] = True
    return {"valid": valid, "dense_bool": torch.rand(B, 1, SQ, SK, generator=G) > 0.4, "dense_bias": dense_bias,
            "layout": layout}


TENSORS = {n: t.to(DEVICE) for n, t in _tensors().items()}


def masks_from(t: dict) -> dict:
    """Every mask kind, by name (``t``: the tensors tensor masks hold). Called inside compiled functions too."""
    return {
        "none": None,
        "causal": Causal(),
        "top_left": Causal(align="top_left"),
        "window": Causal(window=4),
        "chunk": Causal(chunk=5),
        "sink_window": Causal(window=3, sink=2),                 # two key runs per row
        "chunk_window_sink": Causal(chunk=4, window=2, sink=3),
        "q_longer": Causal(),                                    # 12 queries, 10 keys: rows with no key
        "key_padding": KeyPadding(t["valid"]),
        "key_padding_causal": KeyPadding(t["valid"], causal=True, window=6),
        "dense_bool": DenseMask(t["dense_bool"]),
        "dense_additive": DenseMask(t["dense_bias"]),
        "block_sparse": BlockSparse(t["layout"], 4),
        "block_sparse_causal": BlockSparse(t["layout"][0], 4, causal=True),
        "block_diagonal": BlockDiagonal(Q_LENS, KV_LENS, causal=True),
        "cfg_branches": BlockDiagonal((5, 6), (13, 13)),
        "block_diagonal_window_sink": BlockDiagonal(Q_LENS, KV_LENS, causal=True, window=3, sink=2),
    }


def _layout_of(name: str) -> str:
    if name == "q_longer":
        return "q_longer"
    return "packed" if name.startswith(("block_diagonal", "cfg")) else "dense"


INPUTS = {
    "dense": (rand(B, SQ, HQ, D), rand(B, SK, HKV, D), rand(B, SK, HKV, D)),
    "q_longer": (rand(B, SK, HQ, D), rand(B, SQ, HKV, D), rand(B, SQ, HKV, D)),
    "packed": (rand(sum(Q_LENS), HQ, D), rand(sum(KV_LENS), HKV, D), rand(sum(KV_LENS), HKV, D)),
}
MODIFIERS = {
    "softcap": {"softcap": 2.0},
    "alibi": {"alibi_slopes": torch.rand(HQ, generator=G).to(DEVICE)},
    "sinks": {"sinks": rand(HQ)},
}
MODIFIERS["all"] = {**MODIFIERS["softcap"], **MODIFIERS["alibi"], **MODIFIERS["sinks"]}
#: (mask, modifiers) cases. flex compiles one kernel per score_mod (softcap and ALiBi are score_mods; sinks go
#: through the LSE), so it runs the combination (and the paged test a packed call with sinks and ALiBi), the others
#: each modifier alone too
MODIFIER_CASES = [("causal", mods) for mods in ("softcap", "alibi", "sinks", "all")] + [("block_diagonal", "alibi"),
                                                                                     ("block_diagonal", "all")]
FLEX_MODIFIER_CASES = [("causal", "all")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _served(backend: str, cases, grad: bool = False) -> list:
    """The ``(mask, modifiers)`` cases ``backend`` serves here (asked on masks of their own, so that the masks
    a test compiles are first used inside the compiled function)."""
    masks = masks_from(TENSORS)
    out = []
    for name, mods in cases:
        q, k, v = INPUTS[_layout_of(name)]
        extra = MODIFIERS[mods] if mods else {}
        call = attnlib.inputs.validate_call(q.detach().requires_grad_(grad), k, v, masks[name], None, True, **extra)
        if not attnlib.get_backend(backend).why_not(call):
            out.append((name, mods))
    return out


def _attend(backend, inputs, masks, cases, modifiers):
    """``{case: (out, lse)}`` for every case (``inputs[case]`` or, without a case entry, its layout's tensors)."""
    got = {}
    for name, mods in cases:
        q, k, v = inputs[(name, mods)] if (name, mods) in inputs else inputs[_layout_of(name)]
        got[(name, mods)] = attnlib.attention(q, k, v, masks[name], backend=backend, return_lse=True,
                                              **(modifiers[mods] if mods else {}))
    return got


def _assert_equal_and_exact(got, want, cases, masks, inputs=INPUTS, atol=2e-6):
    """Compiled == eager (fp32 rounding apart), and both within the tolerance policy of the float64 reference."""
    for case in cases:
        name, mods = case
        (out, lse), (out_e, lse_e) = got[case], want[case]
        torch.testing.assert_close(out, out_e, atol=atol, rtol=1e-5, msg=lambda m: f"{case} out: {m}")
        torch.testing.assert_close(lse, lse_e, atol=atol, rtol=1e-5, msg=lambda m: f"{case} lse: {m}")
        q, k, v = inputs[_layout_of(name)]
        extra = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in (MODIFIERS[mods] if mods else {}).items()}
        ref = attention64(q, k, v, masks[name], **extra)
        naive = attention64(q, k, v, masks[name], dtype=q.dtype, **extra)
        for what, x, r, n in (("out", out, ref[0], naive[0]), ("lse", lse, ref[1], naive[1])):
            c = compare(x.cpu(), r, n, q.dtype, what)
            assert c.passed, f"{case} {what}: error {c.error:.3g} > tolerance {c.tol:.3g}"


# ---------------------------------------------------------------------------------------------
# every mask kind and score modifier, forward and LSE
# ---------------------------------------------------------------------------------------------
#: flex's CPU kernel is a C++ template that inductor compiles once per call site (it names the kernel's buffers
#: with graph-wide counters: two call sites almost never share a kernel, ~10 s of g++ each here), so flex runs
#: one case per mask_mod family and layout (the other structured options change only the runs table's values:
#: their plans are the same code for every backend, compiled on math and sdpa below), one graph per case
FLEX_CASES = ("causal", "sink_window", "key_padding_causal", "dense_bool", "dense_additive", "block_sparse_causal",
              "block_diagonal")
#: masks built inside the compiled function: tensor masks (structured masks hold no tensor, nothing differs)
TENSOR_MASKS = ("key_padding_causal", "dense_additive", "block_sparse")
FLEX_TENSOR_MASKS = ("key_padding_causal", "block_sparse_causal")


def _compile_cases(backend, fn, cases, *args):
    """``fn(cases, *args)`` compiled fullgraph with inductor and run: one graph for all cases, one per case on
    flex; each compile checked to hand inductor one graph. Returns the merged results."""
    got = {}
    for group in ([[c] for c in cases] if backend == "flex" else [cases]):
        torch._dynamo.reset()
        graphs = InductorRecorder()
        got.update(torch.compile(lambda *a: fn(group, *a), fullgraph=True, backend=graphs)(*args))
        assert graphs.nonempty == 1, f"{graphs.nonempty} graphs for {group}"
    return got


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_mask_kind_built_outside_and_inside_equals_eager(backend):
    """Every mask kind, dense and packed, with its LSE: masks built outside the compiled function and first
    used inside it, and masks built inside it from its tensor arguments (a BlockSparse layout built there is a
    device layout: no host index, the path of a top-k selection on the GPU). Eager's numbers, the float64
    answer."""
    names = FLEX_CASES if backend == "flex" else list(masks_from(TENSORS))
    cases = _served(backend, [(n, None) for n in names])
    assert len(cases) == len(names), f"{backend} refuses {set(names) - {n for n, _ in cases}}"
    inside = [c for c in cases if c[0] in (FLEX_TENSOR_MASKS if backend == "flex" else TENSOR_MASKS)]
    outside = masks_from(TENSORS)

    def run(group, x, masks, t):
        """``{(where, mask, mods): (out, lse)}``: the masks handed in, or built here from ``t``."""
        built = masks_from(t) if any(w == "inside" for w, _, _ in group) else None
        return {(w, n, m): _attend(backend, x, masks if w == "outside" else built, [(n, m)], MODIFIERS)[(n, m)]
                for w, n, m in group}

    tagged = [("outside",) + c for c in cases] + [("inside",) + c for c in inside]
    got = _compile_cases(backend, run, tagged, INPUTS, outside, TENSORS)
    want = run(tagged, INPUTS, outside, TENSORS)
    for where, names in (("outside", cases), ("inside", inside)):
        _assert_equal_and_exact({c: got[(where,) + c] for c in names}, {c: want[(where,) + c] for c in names},
                                names, outside)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_modifiers_equal_eager(backend):
    cases = _served(backend, FLEX_MODIFIER_CASES if backend == "flex" else MODIFIER_CASES)
    assert ("causal", "alibi") in cases or ("causal", "all") in cases
    masks = masks_from(TENSORS)

    def fn(group, x, m, mods):
        return _attend(backend, x, m, group, mods)

    got = _compile_cases(backend, fn, cases, INPUTS, masks, MODIFIERS)
    _assert_equal_and_exact(got, fn(cases, INPUTS, masks, MODIFIERS), cases, masks)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
#: one case per backward path: fused from the final out/LSE (one tile), merged layers with sinks (the composite
#: autograd.Function), each tensor restriction (a block layout gathered on sdpa), packed tiles; ALiBi, softcap
GRAD_CASES = [("causal", None), ("sink_window", "sinks"), ("key_padding_causal", "alibi"), ("dense_additive", None),
              ("block_sparse", None), ("block_diagonal", "all")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_equal_eager(backend):
    """dq, dk, dv (and d sinks) through out and LSE, every mask kind and the modifiers, where the backend
    trains here: merged multi-tile results and sinks run through the dispatch's composite autograd.Function."""
    cases = _served(backend, GRAD_CASES, grad=True)
    if not cases:
        pytest.skip(f"{backend} has no backward on {DEVICE.type}")
    masks = masks_from(TENSORS)

    def leaves():
        x = {c: tuple(t.detach().clone().requires_grad_(True) for t in INPUTS[_layout_of(c[0])]) for c in cases}
        mods = {n: {a: (t.detach().clone().requires_grad_(a == "sinks") if isinstance(t, torch.Tensor) else t)
                    for a, t in m.items()} for n, m in MODIFIERS.items()}
        return x, mods

    def run(fn):
        x, mods = leaves()
        got = fn(x, masks, mods)
        loss = sum(o.square().sum() + l.clamp(min=-50).sum() for o, l in got.values())
        loss.backward()
        sinks = [m["sinks"].grad for m in mods.values() if "sinks" in m and m["sinks"].grad is not None]
        return got, {c: [t.grad for t in x[c]] for c in cases}, sinks

    def fn(x, m, mods):
        return _attend(backend, x, m, cases, mods)

    graphs = InductorRecorder()
    got, grads, dsinks = run(torch.compile(fn, fullgraph=True, backend=graphs))
    want, grads_e, dsinks_e = run(fn)
    assert len(graphs) == 1
    for c in cases:
        for what, g, w in zip(("dq", "dk", "dv"), grads[c], grads_e[c]):
            torch.testing.assert_close(g, w, atol=1e-5 * max(1.0, float(w.abs().max())), rtol=1e-4,
                                       msg=lambda m: f"{c} {what}: {m}")
    assert len(dsinks) == len(dsinks_e) > 0
    for g, w in zip(dsinks, dsinks_e):
        torch.testing.assert_close(g, w, atol=1e-5 * max(1.0, float(w.abs().max())), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# paged KV, dynamic shapes, recompiles
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_decode_step_equals_eager_and_the_contiguous_call(backend):
    """A decode row and a chunked prefill reading shuffled pages through ``block_table`` (a graph input), with
    ALiBi and sinks."""
    page = 4
    table = torch.tensor([[3, 0, 7, 1], [5, 2, 8, 6]], dtype=torch.int32, device=DEVICE)
    pool_k, pool_v = rand(9, page, HKV, D), rand(9, page, HKV, D)
    mask = BlockDiagonal(Q_LENS, KV_LENS, causal=True)
    q = INPUTS["packed"][0]
    mods = {**MODIFIERS["alibi"], **MODIFIERS["sinks"]}

    def fn(q, pk, pv, table):
        return attnlib.attention(q, pk, pv, mask, block_table=table, backend=backend, return_lse=True, **mods)

    graphs = InductorRecorder()
    out, lse = torch.compile(fn, fullgraph=True, backend=graphs)(q, pool_k, pool_v, table)
    assert len(graphs) == 1
    out_e, lse_e = fn(q, pool_k, pool_v, table)
    torch.testing.assert_close(out, out_e, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, lse_e, atol=2e-6, rtol=1e-5)
    k, v = (paged_keys(p, table.cpu(), KV_LENS).to(DEVICE) for p in (pool_k, pool_v))
    out_c, lse_c = attnlib.attention(q, k, v, mask, backend=backend, return_lse=True, **mods)
    torch.testing.assert_close(out, out_c, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, lse_c, atol=2e-6, rtol=1e-5)


LENGTHS = (9, 17, 40)


def _dynamic_masks(valid) -> dict:
    return {"sink_window": Causal(window=4, sink=2), "key_padding_causal": KeyPadding(valid, causal=True)}


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_dynamic_shapes_compile_once_for_three_lengths(backend):
    """``dynamic=True``: one graph serves every length, dense (a cache of 2 more keys; masks built inside from
    the tensors) and packed (a BlockDiagonal handed in, new lengths each call)."""
    graphs = InductorRecorder()

    def fn(q, k, v, valid, qp, kp, vp, packed):
        outs = {n: attnlib.attention(q, k, v, m, backend=backend, return_lse=True)
                for n, m in _dynamic_masks(valid).items()}
        outs["block_diagonal"] = attnlib.attention(qp, kp, vp, packed, backend=backend, return_lse=True)
        return outs

    compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend=graphs)
    for s in LENGTHS:
        packed = BlockDiagonal([s, 3], [s + 2, 3], causal=True)
        args = (rand(B, s, HQ, D), rand(B, s + 2, HKV, D), rand(B, s + 2, HKV, D),
                (torch.rand(B, s + 2, generator=G) > 0.3).to(DEVICE),
                rand(s + 3, HQ, D), rand(s + 5, HKV, D), rand(s + 5, HKV, D), packed)
        got, want = compiled(*args), fn(*args)
        for name in want:
            for g, w in zip(got[name], want[name]):
                torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-5, msg=lambda m: f"{name} at {s}: {m}")
    assert graphs.nonempty == 1, f"{graphs.nonempty} graphs for {len(LENGTHS)} lengths"


def test_flex_on_cpu_specializes_each_length_on_purpose():
    """flex on CPU compiles static shapes only (its C++ kernel is wrong under dynamic shapes, see
    attnlib.known_defects): inside a dynamic=True region each new length is its own graph, and right. (The
    lengths share one padded bucket: one kernel.)"""
    if DEVICE.type != "cpu":
        pytest.skip("the CPU shape guard")
    graphs = InductorRecorder()
    compiled = torch.compile(lambda q, k, v: attnlib.attention(q, k, v, Causal(), backend="flex"), dynamic=True,
                             fullgraph=True, backend=graphs)
    for s in (9, 10, 12):
        q, k, v = rand(B, s, HQ, D), rand(B, s + 2, HKV, D), rand(B, s + 2, HKV, D)
        torch.testing.assert_close(compiled(q, k, v), attnlib.attention(q, k, v, Causal(), backend="math"),
                                   atol=2e-6, rtol=2e-6)
    assert graphs.nonempty == 3


def test_default_compile_recompiles_once_for_new_lengths_and_never_for_new_mask_tensors():
    graphs = InductorRecorder()
    compiled = torch.compile(lambda q, k, v, m: attnlib.attention(q, k, v, m, backend="sdpa"), fullgraph=True,
                             backend=graphs)
    for s in LENGTHS:
        q, k, v = rand(B, s, HQ, D), rand(B, s, HKV, D), rand(B, s, HKV, D)
        for _ in range(2):      # a new KeyPadding (and tensor) each call, first used inside the compiled function
            mask = KeyPadding((torch.rand(B, s, generator=G) > 0.3).to(DEVICE), causal=True)
            got = compiled(q, k, v, mask)
            torch.testing.assert_close(got, attnlib.attention(q, k, v, mask, backend="sdpa"), atol=2e-6, rtol=2e-6)
    assert len(graphs) == 2       # the first length, then one dynamic graph for the rest


# ---------------------------------------------------------------------------------------------
# the module, selection inside compiled code, models
# ---------------------------------------------------------------------------------------------
def test_attention_module_compiles_with_auto_selection_and_causal_default():
    layer = Attention(num_heads=HQ, head_size=D, num_kv_heads=HKV, causal=True, sinks=True).to(DEVICE)
    q, k, v = INPUTS["dense"]
    graphs = InductorRecorder()
    torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend=graphs)(q, k, v), layer(q, k, v),
                               atol=2e-6, rtol=1e-5)
    assert len(graphs) == 1


def test_use_backend_and_fallback_inside_compiled_code(isolated_registry):
    """use_backend is honoured (the graph is guarded on it) and a fallback warns once, at trace time."""
    q, k, v = INPUTS["dense"]
    q64, k64, v64 = (t.double() for t in (q, k, v))
    seen = []

    class Probe(attnlib.backends.Backend):
        name = "probe_compile"
        capabilities = attnlib.backends.Capabilities(dtypes=frozenset({torch.float32}),
                                                     devices=frozenset({DEVICE.type}))

        def forward(self, call):
            seen.append(call.seqlen_q)
            return attnlib.get_backend("math").forward(call)

    attnlib.register_backend(Probe(), replace=True)
    compiled = torch.compile(lambda q, k, v: attnlib.attention(q, k, v, Causal()), fullgraph=True)
    compiled(q, k, v)
    assert seen == []                                   # auto: not the probe
    with attnlib.use_backend("probe_compile"):
        torch.testing.assert_close(compiled(q, k, v), attnlib.attention(q, k, v, Causal(), backend="math"),
                                   atol=2e-6, rtol=1e-5)
    assert seen == [SQ]                                 # recompiled for the override (traced once)
    compiled(q, k, v)
    assert seen == [SQ]                                 # and back
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
    q, k, v = INPUTS["dense"]
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compiled = torch.compile(lambda q, k, v: attnlib.attention(q, k, v, Causal(), backend="probe_trace_time"),
                             fullgraph=True, backend=counter)
    out = compiled(q, k, v)
    compiled(q, k, v)
    assert seen == ["probed"] and counter.frame_count == 1
    torch.testing.assert_close(out, attnlib.attention(q, k, v, Causal(), backend="math"))


def test_a_models_ref_block_compiles_fullgraph_and_matches_eager():
    from models_ref import parity
    from models_ref.qwen3_omni import ThinkerAttention

    def check(model, *args):
        graphs = InductorRecorder()
        torch._dynamo.reset()
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(model, fullgraph=True, backend=graphs)(*args), model(*args),
                                       atol=1e-5, rtol=1e-4)
        assert len(graphs) == 1

    # the thinker on a padded batch (KeyPadding(causal=True): no host read of the lengths)
    thinker = parity.seeded_block(ThinkerAttention, parity.THINKER_KWARGS, 7, std=0.2)
    h, pos, valid = parity.thinker_inputs(torch.float32)
    check(thinker, h, thinker.rope_tables(pos), valid)


# ---------------------------------------------------------------------------------------------
# host reads, export, the triton custom ops
# ---------------------------------------------------------------------------------------------
HOST_READ_MASKS = masks_from(TENSORS)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_no_backend_reads_a_tensor_on_the_host(backend):
    """Eager calls, every mask kind and modifier, planned and cached (the second call is the hot path); masks
    built before the trap (a BlockSparse host layout is read once, when the mask is built). flex's eager path
    is covered by the compiled tests above: inside a compiled region nothing can read the host."""
    masks = HOST_READ_MASKS
    cases = [(n, None) for n in masks] + [(n, m) for n in ("causal", "block_diagonal") for m in MODIFIERS]
    for name, mods in cases:
        q, k, v = INPUTS[_layout_of(name)]
        extra = MODIFIERS[mods] if mods else {}
        call = attnlib.inputs.validate_call(q, k, v, masks[name], None, True, **extra)
        if attnlib.get_backend(backend).why_not(call):
            continue
        with no_host_reads():
            for _ in range(2):
                attnlib.attention(q, k, v, masks[name], backend=backend, return_lse=True, **extra)


def test_the_host_read_trap_trips():
    t = torch.ones(2)
    reads = (lambda: bool(t[0]), lambda: t.tolist(), lambda: t[0].item(), lambda: int(t[0]), lambda: float(t[0]),
             lambda: range(t[0].long()), lambda: t.numpy())
    for read in reads:
        with no_host_reads(), pytest.raises(HostReadError, match="hot path called"):
            read()


def test_torch_export_of_a_model_with_attention():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(num_heads=HQ, head_size=D, num_kv_heads=HKV, causal=True, backend="sdpa")

        def forward(self, q, k, v, valid):
            return self.attn(q, k, v) + attnlib.attention(q, k, v, KeyPadding(valid, causal=True), backend="sdpa")

    q, k, v = INPUTS["dense"]
    valid = TENSORS["valid"]
    model = Block()
    exported = torch.export.export(model, (q, k, v, valid))
    torch.testing.assert_close(exported.module()(q, k, v, valid), model(q, k, v, valid))


def _serves(backend, q, k, v, mask):
    return not attnlib.get_backend(backend).why_not(attnlib.inputs.validate_call(q, k, v, mask, None, True))


@pytest.mark.parametrize("kind", ["causal", "key_padding_causal", "block_diagonal"])
@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_torch_export_on_every_backend(backend, kind):
    mask = masks_from(TENSORS)[kind]
    q, k, v = INPUTS[_layout_of(kind)]
    if not _serves(backend, q, k, v, mask):
        pytest.skip(f"{backend} does not serve {kind} here")

    class Model(torch.nn.Module):
        def forward(self, q, k, v):
            return attnlib.attention(q, k, v, mask, backend=backend, return_lse=True)

    exported = torch.export.export(Model(), (q, k, v))
    for got, want in zip(exported.module()(q, k, v), Model()(q, k, v)):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


TRITON_CASES = ["none", "causal", "top_left", "window", "key_padding_causal", "block_diagonal"]


def test_triton_kernels_are_one_custom_op_node_each_and_compile_with_inductor():
    """Each call is one opaque custom-op node (forward and backward), so inductor compiles around it; tiny
    shapes (the interpreter runs the kernels on CPU)."""
    if attnlib.get_backend("triton").unavailable_reason():
        pytest.skip("triton cannot run here")
    masks = masks_from(TENSORS)
    cases = [(n, None) for n in TRITON_CASES]

    def fn(x):
        return _attend("triton", x, masks, cases, MODIFIERS)

    recorder = GraphRecorder()
    torch.compile(fn, fullgraph=True, backend=recorder)(INPUTS)
    assert recorder.ops(0).count(torch.ops.attnlib.triton_attention_fwd.default) == len(cases)
    torch._dynamo.reset()
    graphs = InductorRecorder()
    got = torch.compile(fn, fullgraph=True, backend=graphs)(INPUTS)
    assert len(graphs) == 1
    want = fn(INPUTS)
    for c in cases:
        for g, w in zip(got[c], want[c]):
            torch.testing.assert_close(g, w, atol=0, rtol=0)

    def grads(f):
        x = {k: tuple(t.detach().clone().requires_grad_(True) for t in ts) for k, ts in INPUTS.items()}
        out = f(x)
        sum(o.square().sum() + l.clamp(min=-50).sum() for o, l in out.values()).backward()
        return [t.grad for ts in x.values() for t in ts if t.grad is not None]

    torch._dynamo.reset()
    for g, w in zip(grads(torch.compile(fn, fullgraph=True)), grads(fn)):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_triton_custom_op_passes_torch_library_opcheck():
    if attnlib.get_backend("triton").unavailable_reason():
        pytest.skip("triton cannot run here")
    from attnlib_kernels import attention as kernels

    q, k, v = (t.detach().requires_grad_(True) for t in INPUTS["dense"])
    args = kernels.op_args(q, k, v, scale=0.25, causal=True)
    torch.library.opcheck(kernels._fwd_op, args, test_utils=("test_schema", "test_autograd_registration",
                                                              "test_faketensor", "test_aot_dispatch_dynamic"))
