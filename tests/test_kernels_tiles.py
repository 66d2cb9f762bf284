"""The Triton kernels on tile tables: plans with several key runs per row, restricted (ring-step) plans, the
score modifiers, block-sparse layouts, paged keys and split-K decode, forward, LSE and gradients (dq, dk, dv,
dsinks) against the independent float64 oracle ``tests/reference64.py`` under the tolerance policy of
``attnlib.testing``. Shapes are tiny (the interpreter tiles 16 x 16) but cover several query and key tiles,
partial tiles and GQA.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import attnlib  # noqa: E402
from attnlib.inputs import call_for, validate_call  # noqa: E402
from attnlib.masks import BlockDiagonal, BlockSparse, Causal, KeyPadding  # noqa: E402
from attnlib.merge import merge_partials  # noqa: E402
from attnlib.reference import reference_attention  # noqa: E402
from attnlib.testing import compare, gradient_magnitudes  # noqa: E402
from attnlib_kernels import attention as kernels  # noqa: E402
from attnlib_kernels.attention import TileTable, attention_tiles  # noqa: E402
from reference64 import attention64, paged_keys  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HQ, HKV, D = 4, 2, 16


def rand(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def check(q, k, v, mask, *, grad=True, seed=0, **mods):
    """``attnlib.attention(..., backend="triton")`` vs the float64 oracle: out, LSE and, with ``grad``,
    dq/dk/dv (and dsinks); the naive same-dtype oracle sets the error budget."""
    call = validate_call(q, k, v, mask, None, True, **mods)
    assert attnlib.get_backend("triton").why_not(call) == []
    sinks = mods.pop("sinks", None)
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    if sinks is not None:
        leaves.append(sinks.detach().clone().requires_grad_(grad))
    extra = {} if sinks is None else {"sinks": leaves[3]}
    out, lse = attnlib.attention(*leaves[:3], mask, backend="triton", return_lse=True, **mods, **extra)

    def oracle(dtype, ins):
        m = dict(mods, **({} if sinks is None else {"sinks": ins[3]}))
        return attention64(*ins[:3], mask, call.scale, dtype=dtype, **m)

    ref_in = [t.detach().cpu().double().requires_grad_(grad) for t in leaves]
    naive_in = [t.detach().cpu().clone().requires_grad_(grad) for t in leaves]
    ref, naive = oracle(torch.float64, ref_in), oracle(q.dtype, naive_in)
    results = [compare(out.cpu(), ref[0], naive[0], q.dtype, "out"),
               compare(lse.cpu(), ref[1], naive[1].float(), q.dtype, "lse")]
    if grad:
        dout = rand(*out.shape, seed=seed + 7, dtype=out.dtype)
        got = torch.autograd.grad(out, leaves, dout)
        want = torch.autograd.grad(ref[0], ref_in, dout.cpu().double())
        base = torch.autograd.grad(naive[0], naive_in, dout.cpu())
        mags = gradient_magnitudes(ref_in[0], ref_in[1], ref_in[2], dout.cpu().double(), call.scale)
        mags["dsinks"] = float(dout.double().abs().sum())
        results += [compare(g.cpu(), w, n, q.dtype, name, mags[name])
                    for g, w, n, name in zip(got, want, base, ("dq", "dk", "dv", "dsinks"))]
    bad = [c for c in results if not c.passed]
    assert not bad, "; ".join(f"{c.what}: error {c.error:.3g} > tolerance {c.tol:.3g}" for c in bad)
    return out, lse


def mods_of(names, batch=2):
    """The score modifiers ``names`` (a subset of softcap / alibi / alibi_b / sinks) with fixed values."""
    out = {}
    if "softcap" in names:
        out["softcap"] = 2.5
    if "alibi" in names:
        out["alibi_slopes"] = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=DEVICE)
    if "alibi_b" in names:
        out["alibi_slopes"] = rand(batch, HQ, seed=3).abs()
    if "sinks" in names:
        out["sinks"] = torch.tensor([0.5, -1.0, 2.0, 0.0], device=DEVICE)
    return out


# ---------------------------------------------------------------------------------------------
# several key runs per row, score modifiers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,mask,mods", [
    (1, Causal(chunk=8, window=2, sink=4), ("softcap", "sinks")),   # a chunk sees its window and the sink chunk
    (2, Causal(window=9, sink=3), ("softcap", "alibi_b", "sinks")),  # sink + window: two runs per row
], ids=["chunk_window_sink", "window_sink"])
def test_multi_run_plans_and_modifiers_match_float64(batch, mask, mods):
    q, k, v = rand(batch, 30, HQ, D, seed=1), rand(batch, 33, HKV, D, seed=2), rand(batch, 33, HKV, 24, seed=3)
    check(q, k, v, mask, **mods_of(mods, batch))


def test_packed_sequences_with_chunks_and_modifiers_in_bf16():
    mask = BlockDiagonal([7, 3, 12], [10, 6, 14], causal=True, chunk=4, window=2, sink=2)
    q, k, v = (rand(22, HQ, D, seed=4, dtype=torch.bfloat16), rand(30, HKV, D, seed=5, dtype=torch.bfloat16),
               rand(30, HKV, D, seed=6, dtype=torch.bfloat16))
    check(q, k, v, mask, **mods_of(("softcap", "alibi", "sinks")))


def test_key_padding_with_sinks_and_garbage_in_the_padding():
    valid = torch.rand(2, 33, generator=torch.Generator().manual_seed(7)) > 0.3
    valid[1] = False                                                       # a row of the batch sees nothing
    q, k, v = rand(2, 21, HQ, D, seed=8), rand(2, 33, HKV, D, seed=9), rand(2, 33, HKV, D, seed=10)
    out, lse = check(q, k, v, KeyPadding(valid.to(DEVICE), causal=True, window=11), **mods_of(("sinks",)))
    assert (out[1] == 0).all() and torch.equal(lse[1], mods_of(("sinks",))["sinks"][:, None].expand(HQ, 21))


# ---------------------------------------------------------------------------------------------
# restricted plans (ring steps): arbitrary offsets, merged by the LSE rule
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [Causal(window=13), Causal(chunk=6, sink=3, window=2)], ids=["window", "chunk"])
def test_restricted_plans_run_directly_and_merge_to_the_whole(mask):
    q, k, v = rand(1, 40, HQ, D, seed=11), rand(1, 40, HKV, D, seed=12), rand(1, 40, HKV, D, seed=13)
    mods = mods_of(("alibi", "softcap"))
    whole = validate_call(q, k, v, mask, None, True, **mods).plan
    rows, parts = (8, 31), []
    for k0, k1 in ((0, 17), (17, 40)):                                  # two ring steps for one query shard
        p = whole.restrict(rows, (k0, k1))
        call = call_for(q[:, rows[0]:rows[1]], k[:, k0:k1], v[:, k0:k1], p, None, True)
        out, lse = attnlib.dispatch.run(call, "triton")
        ref = reference_attention(*(t.double() for t in (call.q, call.k, call.v)), p, call.scale)
        assert (out.double() - ref[0]).abs().max() < 1e-5
        fin = torch.isfinite(ref[1])
        assert torch.equal(fin, torch.isfinite(lse)) and (lse[fin].double() - ref[1][fin]).abs().max() < 1e-5
        parts.append((out, lse))
    out, lse = merge_partials(parts)
    ref = attention64(q.double(), k.double(), v.double(), mask, **mods)
    assert (out.double() - ref[0][:, rows[0]:rows[1]]).abs().max() < 1e-5
    assert (lse.double() - ref[1][..., rows[0]:rows[1]]).abs().max() < 1e-5


def test_fused_backward_from_a_merged_output_gives_each_parts_gradient():
    # what ring attention asks of a backend: the gradient through one part's keys from the final out/LSE
    q, k, v = rand(1, 24, HQ, D, seed=14), rand(1, 30, HKV, D, seed=15), rand(1, 30, HKV, D, seed=16)
    whole = validate_call(q, k, v, Causal(), None, True).plan
    p = whole.restrict((0, 24), (11, 30))
    call = call_for(q, k[:, 11:], v[:, 11:], p, None, True)
    ref = attention64(q.double(), k.double(), v.double(), Causal())
    out, lse = ref[0].float(), ref[1].float()
    dout = rand(*out.shape, seed=17)
    dq, dk, dv = attnlib.get_backend("triton").backward(call, out, lse, dout, None)
    want = attnlib.reference.attention_backward(call.q.double(), call.k.double(), call.v.double(), out.double(),
                                                lse.double(), dout.double(), None, p, call.scale)
    for got, w in zip((dq, dk, dv), want):
        assert (got.double() - w).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# block-sparse layouts: only listed kernel tiles are visited
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,layout_shape,block,causal,mods", [
    (1, (3, 3), 16, False, ("alibi",)),                   # layout blocks = kernel tiles: no per-element test
    (1, (HQ, 5, 2), (8, 24), True, ()),                   # per head, blocks finer / coarser than the tiles
    (2, (2, HQ, 3, 3), 16, False, ("softcap", "sinks")),  # per batch row and head
], ids=["shared_16", "per_head_8x24_causal", "per_batch_16"])
def test_block_sparse_layouts_match_float64(batch, layout_shape, block, causal, mods):
    layout = torch.rand(*layout_shape, generator=torch.Generator().manual_seed(18)) > 0.45
    q, k, v = rand(batch, 37, HQ, D, seed=19), rand(batch, 37, HKV, D, seed=20), rand(batch, 37, HKV, D, seed=21)
    check(q, k, v, BlockSparse(layout.to(DEVICE), block, causal=causal), **mods_of(mods))


def test_block_sparse_device_topk_layout_never_reads_unlisted_tiles():
    # a top-k selection made on the device, used without a host read; keys of unlisted tiles hold NaN
    q, k, v = rand(1, 48, HQ, D, seed=22), rand(1, 48, HKV, D, seed=23), rand(1, 48, HKV, D, seed=24)
    scores = rand(HQ, 3, 3, seed=25)
    layout = torch.zeros(HQ, 3, 3, dtype=torch.bool, device=DEVICE).scatter_(-1, scores.topk(1, -1).indices, True)
    kp, vp = k.clone(), v.clone()
    for kt in range(3):
        if not layout[:, :, kt].any():
            kp[:, kt * 16:kt * 16 + 16] = float("nan")
            vp[:, kt * 16:kt * 16 + 16] = float("nan")
    table = TileTable.dense(48, 48)
    got = attention_tiles(q, kp, vp, table, scale=0.25, block_layout=(layout, 16, 16, 0, 0))
    assert torch.isfinite(got).all()
    ref = attention64(q.double(), k.double(), v.double(), BlockSparse(layout.cpu(), 16), 0.25)[0]
    assert (got.double().cpu() - ref).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# paged keys
# ---------------------------------------------------------------------------------------------
def paged(kv_lens, page, seed, dv=D):
    """Shuffled page pools holding the logical keys (NaN in unused slots, page ids past the end anywhere)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // page) for n in kv_lens]
    n_pages = sum(need) + 2
    order = torch.randperm(n_pages, generator=g)
    table = torch.randint(n_pages, (len(kv_lens), max(need) + 1), generator=g, dtype=torch.int32)
    kpool = torch.full((n_pages, page, HKV, D), float("nan"))
    vpool = torch.full((n_pages, page, HKV, dv), float("nan"))
    k, v = torch.randn(sum(kv_lens), HKV, D, generator=g), torch.randn(sum(kv_lens), HKV, dv, generator=g)
    used = pos = 0
    for r, n in enumerate(kv_lens):
        for j in range(need[r]):
            pid = int(order[used])
            used += 1
            table[r, j] = pid
            take = min(page, n - j * page)
            kpool[pid, :take] = k[pos + j * page:pos + j * page + take]
            vpool[pid, :take] = v[pos + j * page:pos + j * page + take]
        pos += n
    return kpool.to(DEVICE), vpool.to(DEVICE), table.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


@pytest.mark.parametrize("page,q_lens,kv_lens,mods", [
    (1, [5, 1], [12, 9], ("softcap",)),
    (3, [1, 2, 1], [70, 5, 33], ("alibi", "sinks")),
    (16, [1, 7, 3], [40, 20, 33], ()),
], ids=["page1_prefill", "page3_decode_mixed", "page16_mixed"])
def test_paged_keys_equal_contiguous_and_float64(page, q_lens, kv_lens, mods):
    kpool, vpool, table, k, v = paged(kv_lens, page, seed=26)
    q = rand(sum(q_lens), HQ, D, seed=27)
    mask = BlockDiagonal(q_lens, kv_lens, causal=True)
    m = mods_of(mods)
    out, lse = check(q, kpool, vpool, mask, grad=False, block_table=table, **dict(m))
    want = attnlib.attention(q, k, v, mask, backend="triton", return_lse=True, **m)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])


def test_paged_gradients_land_in_the_pages_shared_pages_add_up():
    kpool, vpool, table, k, v = paged([20, 9], 4, seed=28)
    table[1, :2] = table[0, :2]                       # request 1 shares request 0's first two pages (a fork)
    k = paged_keys(kpool.cpu(), table.cpu(), [20, 9]).to(DEVICE)
    v = paged_keys(vpool.cpu(), table.cpu(), [20, 9]).to(DEVICE)
    mask = BlockDiagonal([6, 3], [20, 9], causal=True)
    q = rand(9, HQ, D, seed=29)
    dout = rand(9, HQ, D, seed=30)
    leaves = [t.clone().requires_grad_(True) for t in (q, kpool, vpool)]
    out = attnlib.attention(*leaves, mask, backend="triton", block_table=table)
    dq, dkp, dvp = torch.autograd.grad(out, leaves, dout)
    flat = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad(attnlib.attention(*flat, mask, backend="triton"), flat, dout)
    slots = attnlib.plan.PagedKv(table, 4, (20, 9)).slot_index()
    dk_pages = torch.zeros(kpool.numel() // (HKV * D), HKV, D, device=DEVICE).index_add_(0, slots, want[1])
    dv_pages = torch.zeros(vpool.numel() // (HKV * D), HKV, D, device=DEVICE).index_add_(0, slots, want[2])
    assert (dq - want[0]).abs().max() < 1e-6
    assert (dkp.reshape(-1, HKV, D) - dk_pages).abs().max() < 1e-5
    assert (dvp.reshape(-1, HKV, D) - dv_pages).abs().max() < 1e-5


def test_split_k_decode_matches_one_pass_and_float64():
    # few queries per request, long keys: split-K (unless deterministic) merged by the LSE rule
    kv_lens = [100, 5, 70]
    kpool, vpool, table, _, _ = paged(kv_lens, 8, seed=31)
    q = rand(4, HQ, D, seed=32)
    mask = BlockDiagonal([1, 1, 2], kv_lens, causal=True, window=60)
    m = mods_of(("alibi", "sinks", "softcap"))
    t = attnlib.backends.triton.tile_table(validate_call(q, kpool, vpool, mask, None, True, block_table=table).plan)
    assert kernels._tiles_for(t, q[None], kpool, vpool, False, None).split is not None
    assert kernels._tiles_for(t, q[None], kpool, vpool, True, None).split is None
    split, _ = check(q, kpool, vpool, mask, grad=False, block_table=table, **dict(m))
    torch.use_deterministic_algorithms(True)
    try:
        one_pass = attnlib.attention(q, kpool, vpool, mask, backend="triton", block_table=table, **m)
    finally:
        torch.use_deterministic_algorithms(False)
    assert (split - one_pass).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# the table, batch invariance, compile
# ---------------------------------------------------------------------------------------------
def test_table_work_lists_cover_every_row_and_key_once():
    plan = Causal(chunk=8, window=2, sink=3).plan(40, 40)
    t = attnlib.backends.triton.tile_table(plan)
    assert t is attnlib.backends.triton.tile_table(plan.with_call(attnlib.plan.Modifiers(softcap=1.0)))   # cached
    assert t.runs == 2 and sum(n for _, n, _ in t.groups) == 40
    items, contrib = t._key_work(16)
    keys = sorted((items[i], items[i + 1]) for i in range(0, len(items), 6))
    covered = sorted(k for k0, end in keys for k in range(k0, min(k0 + 16, end)))
    assert covered == list(range(40))                            # every key once, tiles inside one segment
    for i in range(0, len(items), 6):                            # a key tile is seen by the runs that cover it
        k0, c0, c1 = items[i], items[i + 2], items[i + 3]
        for c in range(c0, c1):
            g, r = contrib[2 * c], contrib[2 * c + 1]
            k_start, k_len = t.groups[g][2][r][:2]
            assert k_start <= k0 < k_start + k_len
    work = t._query_work(16, 16)
    assert sorted((work[i], work[i + 1]) for i in range(0, len(work), 2)) == sorted(
        (g, q0) for g, (_, n, _) in enumerate(t.groups) for q0 in range(0, n, 16))
    with pytest.raises(ValueError, match="disjoint and ascending"):
        TileTable(8, 8, [(4, 4, []), (0, 2, [])])
    with pytest.raises(ValueError, match="outside"):
        TileTable(8, 8, [(0, 8, [(4, 6, 0, False, None)])])


def test_chunked_sequence_is_bitwise_identical_alone_and_packed():
    q, k, v = rand(23, HQ, D, seed=33), rand(23, HKV, D, seed=34), rand(23, HKV, D, seed=35)
    other = rand(9, HQ, D, seed=36), rand(9, HKV, D, seed=37), rand(9, HKV, D, seed=38)
    m = mods_of(("alibi", "sinks"))
    torch.use_deterministic_algorithms(True)
    try:
        alone = attnlib.attention(q, k, v, BlockDiagonal([23], [23], causal=True, chunk=5, sink=2, window=2),
                                  backend="triton", return_lse=True, **m)
        both = attnlib.attention(torch.cat([other[0], q]), torch.cat([other[1], k]), torch.cat([other[2], v]),
                                 BlockDiagonal([9, 23], [9, 23], causal=True, chunk=5, sink=2, window=2),
                                 backend="triton", return_lse=True, **m)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(both[0][9:], alone[0]) and torch.equal(both[1][:, 9:], alone[1])


def test_compiled_call_is_one_op_node_under_inductor_and_opcheck_is_clean():
    from graphs import GraphRecorder

    q, k, v = rand(2, 20, HQ, D, seed=39), rand(2, 20, HKV, D, seed=40), rand(2, 20, HKV, D, seed=41)
    mask = Causal(chunk=8, sink=3, window=1)
    m = mods_of(("softcap", "alibi", "sinks"))

    def fn(q, k, v):
        return attnlib.attention(q, k, v, mask, backend="triton", return_lse=True, **m)

    torch._dynamo.reset()
    graphs = GraphRecorder()
    torch.compile(fn, fullgraph=True, backend=graphs)(q, k, v)
    assert graphs.ops(0).count(torch.ops.attnlib.triton_attention_fwd.default) == 1
    torch._dynamo.reset()
    out, lse = torch.compile(fn, fullgraph=True)(q, k, v)          # inductor
    want = fn(q, k, v)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    table = TileTable(20, 20, [(0, 20, [(0, 20, 0, True, 7), (0, 0, 0, False, None)])])
    args = kernels._prepare(q.requires_grad_(True), k, v, table, 0.25, None, 2.0, m["alibi_slopes"],
                            m["sinks"].clone().requires_grad_(True), None, None, True)
    torch.library.opcheck(kernels._fwd_op, args, test_utils=("test_schema", "test_autograd_registration",
                                                              "test_faketensor"))
