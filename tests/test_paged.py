"""Paged KV caches: ``attention(q, k_pages, v_pages, BlockDiagonal(...), block_table=...)`` equals the same call
on contiguous keys (out and LSE) on every backend, key lengths on the device (one mask for every decode step)
are exact, the cache's fork / copy-on-write keeps every sequence's keys, and a decode step reads nothing on
the host, compiles with ``fullgraph=True`` and (on a GPU) replays from a captured CUDA graph.

Page pools hold NaN wherever no key was written and tables hold out-of-range ids past each request's pages:
neither may reach a result.
"""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib import BlockDiagonal
from attnlib.kvcache import PagedKVCache
from tests.hostreads import no_host_reads
from tests.reference64 import attention64

H, HKV, D = 4, 2, 8
#: mixed prefill + decode: a decode against 9 keys, a fresh 6-token prefill, a decode against 40 keys, a
#: 3-token prefill chunk against 14 cached keys
Q_LENS, KV_LENS = (1, 6, 1, 3), (9, 6, 40, 17)
FAR = 10 ** 6           # a page id past any pool: table entries no request uses


def _rand(*shape, g):
    return torch.randn(*shape, generator=g)


def _requests(q_lens=Q_LENS, kv_lens=KV_LENS, seed=0, hkv=HKV):
    g = torch.Generator().manual_seed(seed)
    q = _rand(sum(q_lens), H, D, g=g)
    keys = [_rand(n, hkv, D, g=g) for n in kv_lens]
    vals = [_rand(n, hkv, D, g=g) for n in kv_lens]
    return q, keys, vals


def _pages(keys, vals, page_size: int, *, seed=1, spare=3, width=None):
    """Shuffled page pools holding each request's keys/values (NaN elsewhere) and their int32 table."""
    need = [-(-k.shape[0] // page_size) for k in keys]
    total = sum(need) + spare
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    kp = torch.full((total, page_size, *keys[0].shape[1:]), float("nan"))
    vp = torch.full((total, page_size, *vals[0].shape[1:]), float("nan"))
    table = torch.full((len(keys), max(width or 0, max(need))), FAR, dtype=torch.int32)
    for r, (k, v) in enumerate(zip(keys, vals)):
        for c in range(need[r]):
            page = order.pop()
            table[r, c] = page
            rows = slice(c * page_size, min((c + 1) * page_size, k.shape[0]))
            kp[page, :rows.stop - rows.start], vp[page, :rows.stop - rows.start] = k[rows], v[rows]
    return kp, vp, table


def _close(got, want, atol=2e-6):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)


# ---------------------------------------------------------------------------------------------------
# paged == contiguous
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page_size", [1, 3, 16, 256])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_paged_equals_contiguous_and_the_oracle(backend, page_size):
    """Shuffled pages, partial last pages, decode + prefill + chunked prefill in one call, GQA."""
    q, keys, vals = _requests()
    kp, vp, table = _pages(keys, vals, page_size)
    mask = BlockDiagonal(Q_LENS, KV_LENS, causal=True)
    got = attnlib.attention(q, kp, vp, mask, block_table=table, backend=backend, return_lse=True)
    want = attnlib.attention(q, torch.cat(keys), torch.cat(vals), mask, backend=backend, return_lse=True)
    _close(got, want)
    oracle = attention64(q, kp, vp, mask, block_table=table)
    _close(got, [t.float() for t in oracle], atol=1e-5)


OPTIONS = {
    "window": (dict(window=5), {}),
    "sink+window": (dict(window=4, sink=2), {}),
    "chunk": (dict(chunk=4), {}),
    "alibi": ({}, dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]))),
    "softcap": ({}, dict(softcap=3.0)),
    "sinks": ({}, dict(sinks=torch.tensor([0.3, -1.0, 0.0, 2.0]))),
}


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_paged_mask_options_and_score_modifiers(backend, name):
    opts, mods = OPTIONS[name]
    mask = BlockDiagonal(Q_LENS, KV_LENS, causal=True, **opts)
    q, keys, vals = _requests(seed=2)
    kp, vp, table = _pages(keys, vals, 4)
    call = attnlib.inputs.validate_call(q, kp, vp, mask, None, True, block_table=table, **mods)
    if attnlib.get_backend(backend).why_not(call):
        pytest.skip(f"{backend} does not serve {name}")
    got = attnlib.attention(q, kp, vp, mask, block_table=table, backend=backend, return_lse=True, **mods)
    want = attnlib.attention(q, torch.cat(keys), torch.cat(vals), mask, backend=backend, return_lse=True, **mods)
    _close(got, want)
    _close(got, [t.float() for t in attention64(q, kp, vp, mask, block_table=table, **mods)], atol=1e-5)


def _serves(backend):
    row = next(r for r in attnlib.list_backends() if r["name"] == backend)
    if not row["available"]:
        pytest.skip(f"{backend}: {row['reason']}")


@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_paged_on_compiled_and_interpreted_backends(backend):
    """One small mixed call each (flex compiles, triton runs interpreted on the CPU)."""
    _serves(backend)
    q_lens, kv_lens = (1, 3), (7, 5)
    q, keys, vals = _requests(q_lens, kv_lens, seed=3)
    kp, vp, table = _pages(keys, vals, 2)
    mask = BlockDiagonal(q_lens, kv_lens, causal=True)
    got = attnlib.attention(q, kp, vp, mask, block_table=table, backend=backend, return_lse=True)
    want = attnlib.attention(q, torch.cat(keys), torch.cat(vals), mask, backend="math", return_lse=True)
    _close(got, want, atol=1e-5)


def test_strict_guard_on_a_kernel_that_reads_pages(monkeypatch):
    """``ATTNLIB_NONFINITE_GUARD=strict`` on a backend that reads the pool through the table: non-finite keys
    are found per logical key (the pool's slots mapped through the table), so exactly the rows that see one
    are NaN and the unused NaN pages reach nothing."""
    _serves("triton")
    monkeypatch.setenv("ATTNLIB_NONFINITE_GUARD", "strict")
    q_lens, kv_lens = (1, 3), (7, 5)
    q, keys, vals = _requests(q_lens, kv_lens, seed=4)
    keys[1][2, 0, 0] = float("inf")          # request 1's key 2, kv head 0: every one of its query rows sees it
    kp, vp, table = _pages(keys, vals, 2)
    mask = BlockDiagonal(q_lens, kv_lens, causal=True)
    out = attnlib.attention(q, kp, vp, mask, block_table=table, backend="triton")
    assert torch.isnan(out[1:, :H // HKV]).all()                     # the query heads of kv head 0
    want = attnlib.attention(q, torch.cat(keys), torch.cat(vals), mask, backend="math")
    assert torch.isfinite(out[:1]).all() and torch.isfinite(out[1:, H // HKV:]).all()
    _close([out[:1], out[1:, H // HKV:]], [want[:1], want[1:, H // HKV:]], atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# key lengths on the device
# ---------------------------------------------------------------------------------------------------
DEVICE_CASES = {
    "decode": ((1, 1, 1), (5, 12, 1), dict(causal=True), {}),
    "two new tokens": ((2, 2, 2), (5, 12, 2), dict(causal=True), {}),
    "window": ((2, 2, 2), (5, 12, 3), dict(causal=True, window=3), {}),
    "alibi + sinks": ((1, 1, 1), (5, 12, 2), dict(causal=True),
                      dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]),
                           sinks=torch.tensor([0.1, 1.0, 0.0, -1.0]))),
    "not causal, ragged": ((1, 3, 2), (5, 12, 2), dict(causal=False), {}),
}


@pytest.mark.parametrize("name", list(DEVICE_CASES))
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_device_lengths_equal_host_lengths(backend, name):
    """``BlockDiagonal.from_device_lengths`` over the same pages (a table as wide as the bound) equals the
    call with host lengths."""
    q_lens, kv_lens, opts, mods = DEVICE_CASES[name]
    bound = 13
    q, keys, vals = _requests(q_lens, kv_lens, seed=4)
    kp, vp, table = _pages(keys, vals, 4, width=-(-bound // 4))
    host = BlockDiagonal(q_lens, kv_lens, **opts)
    dev = BlockDiagonal.from_device_lengths(q_lens, torch.tensor(kv_lens, dtype=torch.int32), bound, **opts)
    got = attnlib.attention(q, kp, vp, dev, block_table=table, backend=backend, return_lse=True, **mods)
    want = attnlib.attention(q, kp, vp, host, block_table=table, backend="math", return_lse=True, **mods)
    _close(got, want, atol=1e-5)


def test_device_lengths_on_contiguous_left_padded_windows():
    """Without a table the keys are the requests' windows packed, each right-aligned (left-padded)."""
    q_lens, kv_lens, bound = (2, 1), (4, 7), 8
    q, keys, vals = _requests(q_lens, kv_lens, seed=5)
    def pad(xs):
        return torch.cat([torch.cat([x.new_full((bound - x.shape[0], *x.shape[1:]), float("nan")), x]) for x in xs])
    dev = BlockDiagonal.from_device_lengths(q_lens, torch.tensor(kv_lens), bound, causal=True)
    want = attnlib.attention(q, torch.cat(keys), torch.cat(vals), BlockDiagonal(q_lens, kv_lens, causal=True),
                             backend="math", return_lse=True)
    for backend in ("math", "sdpa"):
        _close(attnlib.attention(q, pad(keys), pad(vals), dev, backend=backend, return_lse=True), want, atol=1e-5)
    # the mask says the same: the empty slots of each window are hidden
    grid = dev.materialize()
    assert grid.shape == (3, 16) and grid[:, :4].sum() == 0 and grid[2, 8:9].sum() == 0 and grid[2, 9:].all()


@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_device_lengths_decode_on_compiled_and_interpreted_backends(backend):
    _serves(backend)
    q, keys, vals = _requests((1, 1), (3, 6), seed=6)
    kp, vp, table = _pages(keys, vals, 2, width=4)
    dev = BlockDiagonal.from_device_lengths((1, 1), torch.tensor([3, 6], dtype=torch.int32), 8, causal=True)
    got = attnlib.attention(q, kp, vp, dev, block_table=table, backend=backend, return_lse=True)
    want = attnlib.attention(q, torch.cat(keys), torch.cat(vals), BlockDiagonal((1, 1), (3, 6), causal=True),
                             backend="math", return_lse=True)
    _close(got, want, atol=1e-5)


def test_device_length_masks_keep_their_lengths_and_compare_by_tensor():
    used = torch.tensor([3, 4], dtype=torch.int32)
    m = BlockDiagonal.from_device_lengths((1, 1), used, 8)
    assert m.kv_seqlens == (8, 8) and m.kv_seqused is used and "key_padding" in m.features()
    assert m.causal_version().kv_seqused is used and m.causal_version().causal
    assert m == BlockDiagonal.from_device_lengths((1, 1), used, 8)
    assert m != BlockDiagonal.from_device_lengths((1, 1), used.clone(), 8)
    assert m != BlockDiagonal((1, 1), (8, 8))
    assert "from_device_lengths" in repr(m)


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------
def _paged_call():
    q, keys, vals = _requests()
    kp, vp, table = _pages(keys, vals, 4)
    return q, kp, vp, table, BlockDiagonal(Q_LENS, KV_LENS, causal=True)


@pytest.mark.parametrize("case,err,match", [
    ("narrow table", ValueError, r"block_table has 9 page columns but request 2 has 40 keys, which need 10 pages"),
    ("float table", TypeError, r"block_table must be an int32 tensor \[R, max_pages\].*float32"),
    ("1-D table", TypeError, r"block_table must be an int32 tensor \[R, max_pages\].*\(40,\)"),
    ("table rows", ValueError, r"block_table has 3 rows but the BlockDiagonal mask has 4 requests"),
    ("3-D pool", ValueError, r"with block_table, k and v must be page pools \[num_pages, page_size, Hkv, D\]"),
    ("BSHD q", ValueError, r"with block_table, q must be packed THD"),
    ("no BlockDiagonal", ValueError, r"block_table needs a BlockDiagonal mask"),
    ("table not a tensor", TypeError, r"block_table must be an int32 tensor"),
    ("device table too narrow", ValueError, r"block_table has 10 page columns but request 0 has up to "
                                            r"max_seqlen_k=41 keys"),
])
def test_paged_errors_name_block_table(case, err, match):
    q, kp, vp, table, mask = _paged_call()
    args = [q, kp, vp, mask]
    if case == "narrow table":
        table = table[:, :9]
    elif case == "float table":
        table = table.float()
    elif case == "1-D table":
        table = table.reshape(-1)
    elif case == "table rows":
        table = table[:3]
    elif case == "3-D pool":
        args[1] = kp.flatten(0, 1)
    elif case == "BSHD q":
        args[0] = q[None]
    elif case == "no BlockDiagonal":
        args[3] = attnlib.Causal()
    elif case == "table not a tensor":
        table = table.tolist()
    elif case == "device table too narrow":
        args[3] = BlockDiagonal.from_device_lengths(Q_LENS, torch.tensor(KV_LENS), 41, causal=True)
    with pytest.raises(err, match=match):
        attnlib.attention(*args, block_table=table)


def test_debug_checks_catch_page_ids_outside_the_pool(monkeypatch):
    q, kp, vp, table, mask = _paged_call()
    bad = table.clone()
    bad[2, 3] = kp.shape[0]            # one past the pool, in a column request 2 reads
    attnlib.attention(q, kp, vp, mask, block_table=table)          # the FAR padding is never read: fine
    monkeypatch.setenv("ATTNLIB_DEBUG_CHECKS", "1")
    attnlib.attention(q, kp, vp, mask, block_table=table)
    with pytest.raises(RuntimeError, match="block_table holds a page id outside the pool's 23 pages"):
        attnlib.attention(q, kp, vp, mask, block_table=bad)
    dev = BlockDiagonal.from_device_lengths(Q_LENS, torch.tensor(KV_LENS), 40, causal=True)
    with pytest.raises(RuntimeError, match="block_table holds a page id outside"):
        attnlib.attention(q, kp, vp, dev, block_table=bad)
    over = BlockDiagonal.from_device_lengths(Q_LENS, torch.tensor([9, 6, 41, 17]), 40, causal=True)
    with pytest.raises(RuntimeError, match=r"kv_seqused outside \[q_seqlens, max_seqlen_k=40\]"):
        attnlib.attention(q, kp, vp, over, block_table=table)


def test_device_length_mask_errors():
    used = torch.tensor([3, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match=r"kv_seqused must be an int32 tensor \[R\]"):
        BlockDiagonal.from_device_lengths((1, 1), used.float(), 8)
    with pytest.raises(TypeError, match="kv_seqused must be an int32 tensor"):
        BlockDiagonal.from_device_lengths((1, 1), [3, 4], 8)
    with pytest.raises(ValueError, match="kv_seqused has 2 entries but q_seqlens has 3"):
        BlockDiagonal.from_device_lengths((1, 1, 1), used, 8)
    with pytest.raises(ValueError, match="max_seqlen_k=2 is smaller than a request's 3 new tokens"):
        BlockDiagonal.from_device_lengths((3, 1), used, 2)
    with pytest.raises(TypeError, match="max_seqlen_k must be a positive int"):
        BlockDiagonal.from_device_lengths((1, 1), used, 8.0)


# ---------------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------------
class Shadow:
    """The same sequences kept contiguously (per layer), to compare each paged step with."""

    def __init__(self, layers):
        self.kv = {}
        self.layers = layers

    def fork(self, parent, child):
        for layer in range(self.layers):
            self.kv[child, layer] = self.kv[parent, layer]

    def step(self, layer, seqs, q_lens, k, v):
        ks, vs, off = [], [], 0
        for s, n in zip(seqs, q_lens):
            old = self.kv.get((s, layer), (k[:0], v[:0]))
            self.kv[s, layer] = (torch.cat([old[0], k[off:off + n]]), torch.cat([old[1], v[off:off + n]]))
            ks.append(self.kv[s, layer][0])
            vs.append(self.kv[s, layer][1])
            off += n
        return torch.cat(ks), torch.cat(vs)


def _run_step(cache, shadow, step, g, backend="sdpa"):
    """One step through every layer, paged vs contiguous (same backend): returns the largest difference."""
    worst = 0.0
    for layer in range(len(cache.k)):
        t = step.num_tokens
        q, k, v = _rand(t, H, D, g=g), _rand(t, HKV, D, g=g), _rand(t, HKV, D, g=g)
        got = step.attention(layer, q, k, v, backend=backend)
        ks, vs = shadow.step(layer, step.seqs, step.q_seqlens, k, v)
        want = attnlib.attention(q, ks, vs, BlockDiagonal(step.q_seqlens, step.kv_seqlens, causal=True),
                                 backend=backend)
        worst = max(worst, (got - want).abs().max().item())
    return worst


def test_cache_mixed_steps_fork_copy_on_write_and_free():
    g = torch.Generator().manual_seed(7)
    cache, shadow = PagedKVCache(2, 32, 4, HKV, D), Shadow(2)
    a, b = cache.new_sequence(), cache.new_sequence()
    assert _run_step(cache, shadow, cache.step({a: 6, b: 3}), g) < 1e-6               # two prefills
    assert _run_step(cache, shadow, cache.step({a: 1, b: 1}), g) < 1e-6               # decode
    assert cache.length(a) == 7 and cache.pages(a) == [0, 1]
    c = cache.fork(a)                                   # CFG branch / beam: shares a's 2 pages
    shadow.fork(a, c)
    assert (cache.pages_in_use, cache.pages_referenced) == (3, 5)
    page_a = cache.pages(a)
    # a writes first into its shared, partly filled last page: a gets a copy, c keeps the original
    assert _run_step(cache, shadow, cache.step({a: 1, c: 2, b: 5}), g) < 1e-6
    assert cache.pages(a)[0] == page_a[0] and cache.pages(a)[1] != page_a[1] and cache.pages(c)[:2] == page_a
    for items in ({c: 1}, [(c, 1), (a, 3)], {b: 1, a: 1, c: 1}):
        assert _run_step(cache, shadow, cache.step(items), g) < 1e-6
    cache.free(a)
    assert cache.sequences == [b, c] and cache.pages_in_use == cache.pages_referenced
    assert _run_step(cache, shadow, cache.step({c: 1, b: 1}), g) < 1e-6


def test_page_sharing_saves_pages_for_cfg_branches_and_beams():
    cache = PagedKVCache(1, 64, 16, HKV, D)
    prompt = cache.new_sequence()
    cache.step({prompt: 100})                           # 7 pages, the last one partly filled
    beams = [cache.fork(prompt) for _ in range(3)]
    assert cache.pages_in_use == 7 and cache.pages_referenced == 28
    cache.step({s: 1 for s in [prompt] + beams})        # each writes into the shared last page: 3 copies
    assert cache.pages_in_use == 10 and cache.pages_referenced == 28
    cache.free(beams[0])
    assert cache.pages_in_use == 9


def test_a_full_cache_still_serves_a_step_that_fits_exactly():
    """Three sequences share a half-filled page: the first two writers copy it, the last writes in place,
    so the step needs exactly the two free pages."""
    cache = PagedKVCache(1, 4, 4, HKV, D)
    a = cache.new_sequence()
    cache.step({a: 6})                                  # 2 pages, the last half full
    b, c = cache.fork(a), cache.fork(a)
    cache.step({a: 1, b: 1, c: 1})
    assert cache.free_pages == 0 and len({cache.pages(s)[1] for s in (a, b, c)}) == 3
    assert cache.pages(c)[1] == cache.pages(a)[0] + 1      # the original page stayed with the last writer


def test_cache_errors():
    cache = PagedKVCache(1, 4, 4, HKV, D)
    a = cache.new_sequence()
    with pytest.raises(RuntimeError, match="out of pages: this step needs 5 new pages, 4 are free"):
        cache.step({a: 17})
    assert cache.length(a) == 0 and cache.free_pages == 4            # nothing changed
    with pytest.raises(ValueError, match="new tokens per sequence must be ints >= 1"):
        cache.step({a: 0})
    with pytest.raises(ValueError, match="appears twice"):
        cache.step([(a, 1), (a, 2)])
    with pytest.raises(KeyError, match="sequence 9 is not in this cache"):
        cache.step({9: 1})
    step = cache.step({a: 2})
    with pytest.raises(ValueError, match=r"new keys/values must be \[T, Hkv, D\] = \[T, 2, 8\]"):
        step.update(0, torch.zeros(2, 3, D), torch.zeros(2, 3, D))
    with pytest.raises(ValueError, match="this step writes 2 new tokens"):
        step.update(0, torch.zeros(3, HKV, D), torch.zeros(3, HKV, D))
    static = cache.static_step([a], 3)
    static.advance()
    with pytest.raises(ValueError, match="would hold 4 keys, past this static step's max_seqlen_k=3"):
        static.advance()


# ---------------------------------------------------------------------------------------------------
# decode steps: no host reads, one compiled graph, one CUDA graph
# ---------------------------------------------------------------------------------------------------
def _prefilled(layers=2, device="cpu", dtype=torch.float32, seed=8, lens=(5, 9, 2)):
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(layers, 24, 4, HKV, D, dtype=dtype, device=device)
    seqs = [cache.new_sequence() for _ in lens]
    step = cache.step(dict(zip(seqs, lens)))
    for layer in range(layers):
        k, v = (_rand(sum(lens), HKV, D, g=g).to(device, dtype) for _ in range(2))
        step.update(layer, k, v)
    return cache, seqs


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_a_decode_step_reads_nothing_on_the_host(backend):
    cache, seqs = _prefilled()
    static = cache.static_step(seqs, 16)
    g = torch.Generator().manual_seed(9)
    inputs = [[_rand(3, n, D, g=g) for n in (H, HKV, HKV)] for _ in range(4)]
    with no_host_reads():
        for q, k, v in inputs[:2]:              # static buffers: device lengths
            static.advance()
            for layer in range(2):
                static.attention(layer, q, k, v, backend=backend, return_lse=True)
        for q, k, v in inputs[2:]:              # a fresh step each time: host lengths
            step = cache.step({s: 1 for s in seqs})
            for layer in range(2):
                step.attention(layer, q, k, v, backend=backend, return_lse=True)


def _decode_fn(static, backend):
    def fn(q, k, v):
        return [static.attention(layer, q, k, v, backend=backend) for layer in range(len(static.cache.k))]
    return fn


def test_a_static_decode_step_compiles_once_with_inductor_and_equals_eager():
    """``torch.compile(fullgraph=True)`` (inductor) of a two-layer decode step on sdpa: three steps, one
    compilation, equal to the same steps run eagerly on a twin cache."""
    torch._dynamo.reset()
    caches = [_prefilled() for _ in range(2)]
    statics = [c.static_step(s, 16) for c, s in caches]
    compiled = torch.compile(_decode_fn(statics[0], "sdpa"), fullgraph=True)
    eager = _decode_fn(statics[1], "sdpa")
    g = torch.Generator().manual_seed(10)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            q, k, v = _rand(3, H, D, g=g), _rand(3, HKV, D, g=g), _rand(3, HKV, D, g=g)
            for st in statics:
                st.advance()
            _close(compiled(q, k, v), eager(q, k, v), atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_cuda_graph_replays_every_decode_step(backend):
    """One graph captured over a decode step (cache writes + attention of two layers) replays later steps
    equal to eager steps on a twin cache."""
    dev, dt = "cuda", torch.bfloat16 if backend == "sdpa" else torch.float32
    caches = [_prefilled(device=dev, dtype=dt) for _ in range(2)]
    statics = [c.static_step(s, 16) for c, s in caches]
    q, k, v = (torch.zeros(3, n, D, device=dev, dtype=dt) for n in (H, HKV, HKV))
    fn = _decode_fn(statics[0], backend)
    statics[0].advance()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(q, k, v)                                     # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn(q, k, v)
    statics[1].advance()                              # the twin catches up with the warm-up step
    eager = _decode_fn(statics[1], backend)
    eager(q, k, v)
    g = torch.Generator().manual_seed(11)
    for _ in range(4):
        new = [_rand(3, n, D, g=g).to(dev, dt) for n in (H, HKV, HKV)]
        for buf, x in zip((q, k, v), new):
            buf.copy_(x)
        for st in statics:
            st.advance()
        graph.replay()
        want = eager(*new)
        torch.cuda.synchronize()
        _close(outs, want, atol=2e-2 if dt == torch.bfloat16 else 1e-5)


def test_the_docs_examples_run_as_written(capsys):
    """docs/paged.md: the cache walk-through (its printed page counts) and the static decode step."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "paged.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    namespace = {}
    exec(compile(blocks[1], "paged-md-cache", "exec"), namespace)
    assert capsys.readouterr().out.split() == ["4", "6"] and "# 4 pages held, 6 without sharing" in blocks[1]
    exec(compile(blocks[2], "paged-md-static", "exec"), namespace)
    assert namespace["out"].shape == (2, 8, 64) and namespace["static"].kv_seqlens == (43, 43)
