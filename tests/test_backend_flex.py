"""flex-specific behaviour: plan/compile caching, stale-cache safety, the lowering (mask_mod parts and the
block mask built from the plan), the CPU LSE pass, limits in why_not. Numerics against ``math`` for every mask
kind live in the shared conformance test; flex under a caller's inductor compile in tests/test_compile.py.

Compiles are slow on CPU: every compiled call here reuses the conformance shapes (fp32, Hq=Hkv=4, D=32:
dense B=2 S=33, packed [7, 1, 19, 12]) so a session compiles each kernel once.
"""
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

import attnlib
from attnlib.backends import flex as flexmod
from attnlib.backends.flex import FlexBackend
from attnlib.errors import BackendUnavailableError
from attnlib.inputs import validate_call
from attnlib.masks import BlockDiagonal, BlockSparse, Causal, DenseMask, KeyPadding
from attnlib.plan import plan_for
from attnlib.testing import assert_close_to_reference, reference_and_naive
from tests import reference64

BACKEND = FlexBackend()
needs_flex = pytest.mark.skipif(BACKEND.unavailable_reason() is not None or
                                bool(flexmod._cpu_reason()),
                                reason=f"flex cannot run here: {BACKEND.unavailable_reason() or flexmod._cpu_reason()}")
VARLEN = [7, 1, 19, 12]


def _qkv(*shape_q, sk=None, gen_seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(gen_seed)
    shape_k = list(shape_q)
    if sk is not None:
        shape_k[-3] = sk
    q = torch.randn(*shape_q, generator=g).to(dtype)
    k = torch.randn(*shape_k, generator=g).to(dtype)
    v = torch.randn(*shape_k, generator=g).to(dtype)
    return q, k, v


def _check_vs_reference(q, k, v, mask, out, lse):
    call = validate_call(q, k, v, mask)
    (ref_out, ref_lse), (naive_out, naive_lse) = reference_and_naive(q, k, v, mask, call.scale, packed=call.packed)
    assert_close_to_reference(out, ref_out, naive_out, q.dtype, "out")
    assert_close_to_reference(lse, ref_lse, naive_lse, q.dtype, "lse")


# ---------------------------------------------------------------------------------------------
# caching
# ---------------------------------------------------------------------------------------------
@needs_flex
def test_repeated_layers_build_no_new_block_mask_and_compile_nothing():
    q, k, v = _qkv(sum(VARLEN), 4, 32)
    mask = BlockDiagonal(VARLEN, causal=True)
    attnlib.attention(q, k, v, mask, backend="flex")          # first layer: may build and compile
    before = FlexBackend.cache_info()
    for _ in range(3):                                         # later layers, and an equal mask rebuilt per step
        out, lse = attnlib.attention(q, k, v, BlockDiagonal(VARLEN, causal=True), backend="flex", return_lse=True)
    after = FlexBackend.cache_info()
    assert after["block_masks"] == before["block_masks"]
    assert after["compiled_functions"] == before["compiled_functions"]
    assert after["graph_compiles"] == before["graph_compiles"]
    _check_vs_reference(q, k, v, mask, out, lse)


@needs_flex
def test_a_new_varlen_layout_of_the_same_size_reuses_the_compiled_kernel():
    """Lookup tensors are kernel inputs: new seqlens build a block mask but compile nothing."""
    q, k, v = _qkv(sum(VARLEN), 4, 32)
    attnlib.attention(q, k, v, BlockDiagonal(VARLEN), backend="flex")
    before = FlexBackend.cache_info()
    mask = BlockDiagonal([20, 4, 15], causal=True, window=5)   # same 39 tokens, other blocks, causal + window
    out, lse = attnlib.attention(q, k, v, mask, backend="flex", return_lse=True)
    after = FlexBackend.cache_info()
    assert after["block_masks"] == before["block_masks"] + 1
    assert after["graph_compiles"] == before["graph_compiles"]
    _check_vs_reference(q, k, v, mask, out, lse)


@needs_flex
def test_an_explicit_scale_reaches_the_kernel_and_the_lse():
    q, k, v = _qkv(2, 33, 4, 32)
    out, lse = attnlib.attention(q, k, v, Causal(), backend="flex", scale=0.3, return_lse=True)
    (ref_out, ref_lse), (naive_out, naive_lse) = reference_and_naive(q, k, v, Causal(), 0.3, packed=False)
    assert_close_to_reference(out, ref_out, naive_out, torch.float32, "out")
    assert_close_to_reference(lse, ref_lse, naive_lse, torch.float32, "lse")


@needs_flex
def test_a_key_past_dynamos_recompile_limit_starts_over_instead_of_failing(caplog):
    """``attnlib check`` runs many shapes per key; fullgraph=True would turn the limit into a hard error. On
    CPU (static kernels) the padded shape is part of the key, so a new shape never recompiles a key: no
    recompile-limit warning either."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if "recompile_limit" in cfg._config else "cache_size_limit"
    with cfg.patch(**{name: 1}):
        q, k, v = _qkv(2, 33, 4, 32)
        attnlib.attention(q, k, v, Causal(), backend="flex", scale=0.37)      # its own key (scale): 1 entry
        before = FlexBackend.cache_info()
        q, k, v = _qkv(sum(VARLEN), 4, 32)
        out, lse = attnlib.attention(q, k, v, BlockDiagonal(VARLEN), backend="flex", scale=0.37, return_lse=True)
        assert FlexBackend.cache_info()["compiled_functions"] == before["compiled_functions"] + 1
    if flexmod.cpu_guard_enabled():
        assert "recompile_limit" not in caplog.text
    (ref_out, ref_lse), (naive_out, naive_lse) = reference_and_naive(q, k, v, BlockDiagonal(VARLEN), 0.37,
                                                                     packed=True)
    assert_close_to_reference(out, ref_out, naive_out, torch.float32, "out")
    assert_close_to_reference(lse, ref_lse, naive_lse, torch.float32, "lse")


@needs_flex
def test_key_padding_plan_follows_the_tensor_not_the_wrapper_and_sees_in_place_edits():
    q, k, v = _qkv(2, 33, 4, 32)
    valid = torch.ones(2, 33, dtype=torch.bool)
    valid[0, 20:] = False
    attnlib.attention(q, k, v, KeyPadding(valid), backend="flex")
    before = FlexBackend.cache_info()
    attnlib.attention(q, k, v, KeyPadding(valid), backend="flex")     # a new wrapper, same tensor: cache hit
    assert FlexBackend.cache_info()["block_masks"] == before["block_masks"]

    valid[1, :10] = False                                               # in place: the version counter moves
    out, lse = attnlib.attention(q, k, v, KeyPadding(valid), backend="flex", return_lse=True)
    assert FlexBackend.cache_info()["block_masks"] == before["block_masks"] + 1
    _check_vs_reference(q, k, v, KeyPadding(valid), out, lse)


@needs_flex
def test_a_cached_plan_is_never_returned_for_a_different_tensor_under_the_same_key(monkeypatch):
    """Simulates a freed tensor's id being reused: the key matches, the anchor identity check does not."""
    q, k, v = _qkv(2, 33, 4, 32)
    monkeypatch.setattr(flexmod, "_lowering_key", lambda *a: ("forced-collision",))
    first = torch.ones(2, 33, dtype=torch.bool)
    first[:, 30:] = False
    attnlib.attention(q, k, v, KeyPadding(first), backend="flex")
    second = torch.ones(2, 33, dtype=torch.bool)
    second[:, :25] = False                                              # a very different pattern
    out, lse = attnlib.attention(q, k, v, KeyPadding(second), backend="flex", return_lse=True)
    _check_vs_reference(q, k, v, KeyPadding(second), out, lse)
    FlexBackend.clear_cache(compiled=False)


@needs_flex
def test_dense_bool_mask_in_place_edit_is_seen():
    q, k, v = _qkv(2, 33, 4, 32)
    m = torch.ones(2, 1, 33, 33, dtype=torch.bool)
    attnlib.attention(q, k, v, DenseMask(m), backend="flex")
    m[:, :, :, ::2] = False
    out, lse = attnlib.attention(q, k, v, DenseMask(m), backend="flex", return_lse=True)
    _check_vs_reference(q, k, v, DenseMask(m), out, lse)


def test_plan_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(flexmod, "PLAN_CACHE_SIZE", 3)
    FlexBackend.clear_cache(compiled=False)
    for n in range(6):   # block masks are built eagerly (no compile): cheap
        mask = BlockDiagonal([n + 1, 5])
        flexmod._lowered(plan_for(mask, n + 6, n + 6), 1, 4, torch.device("cpu"), (n + 6, n + 6))
    assert FlexBackend.cache_info()["plans"] == 3
    FlexBackend.clear_cache(compiled=False)


# ---------------------------------------------------------------------------------------------
# rows with no visible key
# ---------------------------------------------------------------------------------------------
@needs_flex
def test_block_with_no_keys_gives_zero_output_and_lse_minus_inf():
    mask = BlockDiagonal([7, 1, 19, 12], [7, 0, 19, 12])     # the 1-query request has an empty cache
    q, k, v = _qkv(sum(VARLEN), 4, 32, sk=38)
    out, lse = attnlib.attention(q, k, v, mask, backend="flex", return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[7], torch.zeros_like(out[7]))
    assert torch.isneginf(lse[:, 7]).all()
    _check_vs_reference(q, k, v, mask, out, lse)


# ---------------------------------------------------------------------------------------------
# lowering (pure tensor code, no compile)
# ---------------------------------------------------------------------------------------------
def _lowered_grid(mask, batch, sq, sk):
    """What the lowered mask_mod says, evaluated on index grids (the LSE pass evaluates it the same way)."""
    low = flexmod._build(plan_for(mask, sq, sk), batch, 1, torch.device("cpu"))
    b = torch.arange(batch).view(batch, 1, 1, 1)
    i, j = torch.arange(sq).view(1, 1, sq, 1), torch.arange(sk).view(1, 1, 1, sk)
    return low.mask_mod(b, torch.zeros(1, 1, 1, 1, dtype=torch.long), i, j).expand(batch, 1, sq, sk)


@given(lens=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=5),
       causal=st.booleans(), window=st.one_of(st.none(), st.integers(1, 6)))
def test_block_diagonal_lowers_to_exactly_its_materialized_mask(lens, causal, window):
    q_lens, k_lens = [a for a, _ in lens], [b for _, b in lens]
    if sum(q_lens) == 0 or sum(k_lens) == 0 or not causal and window is not None:
        return
    mask = BlockDiagonal(q_lens, k_lens, causal=causal, window=window)
    assert torch.equal(_lowered_grid(mask, 1, mask.total_q, mask.total_k)[0, 0], mask.materialize())


@given(sq=st.integers(1, 12), sk=st.integers(1, 12), causal=st.booleans(), window=st.one_of(st.none(), st.integers(1, 6)),
       seed=st.integers(0, 99))
def test_key_padding_lowers_to_exactly_its_materialized_mask(sq, sk, causal, window, seed):
    valid = torch.rand(2, sk, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask = KeyPadding(valid, causal=causal, window=window if causal else None)
    assert torch.equal(_lowered_grid(mask, 2, sq, sk), mask.materialize(sq, sk).expand(2, 1, sq, sk))


def _lowering_cases():
    """``name -> (mask, Sq, Sk)``: every mask_mod part, several key runs per row, broadcast dense masks and
    block layouts whose blocks straddle the kernel's tiles."""
    g = torch.Generator().manual_seed(5)
    valid = torch.rand(2, 21, generator=g) > 0.3
    valid[1, :6] = False
    bias = torch.randn(1, 3, 13, 21, generator=g).masked_fill(torch.rand(1, 3, 13, 21, generator=g) > 0.6, float("-inf"))
    return {
        "full": (None, 13, 21),
        "causal": (Causal(), 13, 21),
        "top_left_window": (Causal(align="top_left", window=4), 13, 21),
        "q_longer": (Causal(), 21, 13),
        "chunk": (Causal(chunk=6), 13, 21),
        "sink_window": (Causal(window=3, sink=2), 13, 21),
        "chunk_window_sink": (Causal(chunk=5, window=2, sink=3), 13, 21),
        "block_diagonal": (BlockDiagonal([3, 0, 6, 4], [5, 4, 0, 12], causal=True, window=3, sink=1), 13, 21),
        "key_padding": (KeyPadding(valid), 13, 21),
        "key_padding_causal": (KeyPadding(valid, causal=True, window=7), 13, 21),
        "dense_bool": (DenseMask(torch.rand(2, 1, 13, 21, generator=g) > 0.5), 13, 21),
        "dense_bool_keys_broadcast": (DenseMask(torch.rand(2, 1, 13, 1, generator=g) > 0.5), 13, 21),
        "dense_additive": (DenseMask(bias), 13, 21),
        "dense_additive_rows_broadcast": (DenseMask(bias[:, :, :1]), 13, 21),
        "block_sparse": (BlockSparse(torch.rand(3, 3, 4, generator=g) > 0.5, (5, 6)), 13, 21),
        "block_sparse_causal": (BlockSparse(torch.rand(2, 3, 3, 4, generator=g) > 0.4, (5, 6), causal=True), 13, 21),
    }


#: restricted plans (a ring step's slice of the call): ``name -> (case, q_range, k_range)``
RESTRICTED = {"block_sparse_slice": ("block_sparse", (2, 11), (3, 19)),
              "block_sparse_causal_slice": ("block_sparse_causal", (4, 13), (0, 17)),
              "chunk_window_sink_slice": ("chunk_window_sink", (3, 12), (5, 21)),
              "dense_additive_slice": ("dense_additive", (1, 9), (2, 20))}


LOWERING_CASES = _lowering_cases()


def _visible(mask, sq, sk) -> torch.Tensor:
    keep, bias = reference64.visibility(mask, 2, sq, sk)
    return keep.expand(2, 3, sq, sk)


def _tiles(num, idx, nk) -> torch.Tensor:
    """A BlockMask's (num_blocks, indices) as a dense bool tile matrix."""
    listed = torch.arange(nk) < num[..., None].long()
    return torch.zeros(listed.shape, dtype=torch.bool).scatter(-1, idx.long(), listed)


@pytest.mark.parametrize("name", list(LOWERING_CASES) + list(RESTRICTED))
def test_lowering_matches_the_float64_visibility_and_hides_the_padding(monkeypatch, name):
    """The mask_mod, on index grids, is the independent oracle's visibility, padded keys hidden; the block mask
    (built from the plan, 4x4 tiles here) lists every tile with a visible pair and calls whole only whole
    tiles; with one key run per row and no tensor it lists exactly the tiles that see something."""
    monkeypatch.setitem(flexmod.BLOCK_SIZE, "cpu", 4)
    case, (q0, q1), (k0, k1) = RESTRICTED.get(name, (name, (None, None), (None, None)))
    mask, sq, sk = LOWERING_CASES[case]
    plan = plan_for(mask, sq, sk)
    want = _visible(mask, sq, sk)[:, :, q0:q1, k0:k1]
    if q0 is not None:
        plan = plan.restrict((q0, q1), (k0, k1))
        sq, sk = q1 - q0, k1 - k0
    psq, psk = sq + 3, sk + 5                              # what the CPU shape guard does: longer, hidden
    low = flexmod._build(plan, 2, 3, torch.device("cpu"), psq, psk)
    b, h = torch.arange(2).view(2, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1)
    i, j = torch.arange(psq).view(1, 1, psq, 1), torch.arange(psk).view(1, 1, 1, psk)
    got = low.mask_mod(b, h, i, j).expand(2, 3, psq, psk)
    assert torch.equal(got[:, :, :sq, :sk], want)
    assert not got[:, :, :, sk:].any(), "a padded key is visible"
    if "runs" in low.family:
        assert not got[:, :, sq:].any(), "a padded row sees a key"
    # tiles: pairs the kernel may see (rows past sq may see anything when the structure does not hide them)
    truth = torch.zeros(2, 3, psq, psk, dtype=torch.bool)
    truth[:, :, :sq, :sk] = want
    if "runs" not in low.family:
        truth[:, :, sq:] = got[:, :, sq:]
    pad = torch.nn.functional.pad
    nq, nk = -(-psq // 4), -(-psk // 4)
    grid = pad(truth, (0, nk * 4 - psk, 0, nq * 4 - psq)).view(2, 3, nq, 4, nk, 4)
    whole = pad(torch.ones(psq, psk, dtype=torch.bool), (0, nk * 4 - psk, 0, nq * 4 - psq)).view(nq, 4, nk, 4)
    meets = grid.any(5).any(3)
    is_whole = grid.all(5).all(3) & whole.all(3).all(1)
    bm = low.block_mask
    partial = _tiles(bm.kv_num_blocks, bm.kv_indices, nk)
    full = _tiles(bm.full_kv_num_blocks, bm.full_kv_indices, nk)
    listed, full = (partial | full).expand(2, 3, nq, nk), full.expand(2, 3, nq, nk)
    assert not (partial & _tiles(bm.full_kv_num_blocks, bm.full_kv_indices, nk)).any()
    assert not (meets & ~listed).any(), "a tile with a visible pair is skipped"
    assert not (full & ~is_whole).any(), "a tile called whole has a hidden pair"
    if plan.structured and plan.max_runs <= 1:
        assert torch.equal(listed, meets), "a tile with nothing visible is listed"
        assert torch.equal(full, is_whole)


def test_block_mask_skips_the_tiles_no_row_sees():
    """Two 64-token sequences on CPU's 64x64 tiles: the kernel reads two tiles of four, both whole."""
    bm = flexmod._build(plan_for(BlockDiagonal([64, 64]), 128, 128), 1, 1, torch.device("cpu")).block_mask
    assert bm.kv_num_blocks.flatten().tolist() == [0, 0]
    assert bm.full_kv_num_blocks.flatten().tolist() == [1, 1]
    assert bm.full_kv_indices[0, 0, :, 0].tolist() == [0, 1]


@pytest.mark.parametrize("mask_kind", ["varlen_window", "key_padding", "dense_additive"])
def test_cpu_lse_pass_over_many_chunks_matches_reference(monkeypatch, mask_kind):
    """The chunked LSE (restricted key spans for intervals, score_mod/mask_mod on index grids) is exact."""
    monkeypatch.setattr(flexmod, "_LSE_CHUNK_ELEMS", 1)        # 16-row chunks
    g = torch.Generator().manual_seed(3)
    if mask_kind == "varlen_window":
        mask = BlockDiagonal([30, 3, 40], [35, 0, 40], causal=True, window=9)
        q, k = torch.randn(73, 4, 16, generator=g), torch.randn(75, 2, 16, generator=g)
        packed, qh, kh = True, q.transpose(0, 1)[None], k.transpose(0, 1)[None]
    else:
        q, k = torch.randn(2, 37, 4, 16, generator=g), torch.randn(2, 41, 2, 16, generator=g)
        if mask_kind == "key_padding":
            valid = torch.rand(2, 41, generator=g) > 0.5
            valid[1] = False
            mask = KeyPadding(valid)
        else:
            bias = torch.randn(1, 4, 37, 41, generator=g)
            bias[..., ::3] = float("-inf")
            mask = DenseMask(bias)
        packed, qh, kh = False, q.transpose(1, 2), k.transpose(1, 2)
    plan = plan_for(mask, qh.shape[2], kh.shape[2])
    lse = flexmod._lse_pass(qh, kh, flexmod._build(plan, qh.shape[0], 4, q.device), 0.25)
    empty = plan.empty_rows_on(q.device)
    if empty is not None:
        lse = lse.masked_fill(empty, float("-inf"))
    (_, ref), (_, naive) = reference_and_naive(q, k, k[..., :8], mask, 0.25, packed=packed)
    assert_close_to_reference(lse[0] if packed else lse, ref, naive, torch.float32, "lse")


# ---------------------------------------------------------------------------------------------
# limits and environment
# ---------------------------------------------------------------------------------------------
def test_why_not_names_fp64_and_cpu_autograd_as_sentences():
    q, k, v = _qkv(1, 8, 2, 16, dtype=torch.float64)
    assert any("dtype=fp64" in r for r in BACKEND.why_not(validate_call(q, k, v)))
    q, k, v = _qkv(1, 8, 2, 16)
    q.requires_grad_(True)
    reasons = BACKEND.why_not(validate_call(q, k, v))
    if BACKEND.unavailable_reason() is None:
        assert any("autograd" in r and "device=cpu" in r for r in reasons)
    with torch.no_grad():
        assert not any("autograd" in r for r in BACKEND.why_not(validate_call(q, k, v)))


def test_refused_call_raises_with_reason_when_fallback_is_an_error(monkeypatch):
    monkeypatch.setenv("ATTNLIB_FALLBACK", "error")
    q, k, v = _qkv(1, 8, 2, 16, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="fp64"):
        attnlib.attention(q, k, v, backend="flex")


def test_too_old_torch_is_reported_precisely(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.4.1")
    flexmod._flex_module.cache_clear()
    flexmod._environment_reason.cache_clear()
    try:
        reason = FlexBackend().unavailable_reason()
        assert reason == ("flex needs torch >= 2.5 (torch.nn.attention.flex_attention); this is torch 2.4.1")
    finally:
        monkeypatch.undo()
        flexmod._flex_module.cache_clear()
        flexmod._environment_reason.cache_clear()
    assert flexmod._torch_version() >= (2, 5)


def test_missing_cpp_compiler_is_reported_for_cpu(monkeypatch):
    monkeypatch.setattr(flexmod.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    flexmod._cpu_reason.cache_clear()
    try:
        assert "needs a C++ compiler" in flexmod._cpu_reason()
    finally:
        monkeypatch.undo()
        flexmod._cpu_reason.cache_clear()


@pytest.mark.parametrize("d,device,old,want", [
    (24, "cpu", False, 24), (8, "cuda", False, 16), (24, "cuda", False, 24), (24, "cuda", True, 32),
    (128, "cuda", True, 128),
])
def test_head_dim_padding_only_where_the_kernel_needs_it(monkeypatch, d, device, old, want):
    monkeypatch.setattr(flexmod, "_torch_version", lambda: (2, 5) if old else (2, 13))
    assert flexmod._padded_head_dim(d, torch.device(device)) == want


@needs_flex
def test_output_layout_and_dtype_follow_q():
    q, _, _ = _qkv(2, 33, 4, 32, dtype=torch.bfloat16)
    k, v, _ = _qkv(2, 33, 2, 32, dtype=torch.bfloat16, gen_seed=1)     # GQA 2, as in the conformance grid
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # no fallback to another backend
        out = attnlib.attention(q, k, v, Causal(), backend="flex")
    assert out.shape == (2, 33, 4, 32) and out.dtype == torch.bfloat16
