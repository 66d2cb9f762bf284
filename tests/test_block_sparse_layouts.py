"""Random BlockSparse layouts vs the float64 oracle (tests/reference64.py) on math and sdpa: shared,
per-head and per-batch layouts, rows and whole query blocks that see nothing, partial last blocks, unequal
query/key block sizes, causal intersection, GQA, Dv != D; out and LSE always, gradients on a subset.

sdpa's host-layout path groups query blocks by their number of visible key blocks and gathers those keys;
the seeds below are drawn so each example has several such groups, empty ones and partial blocks."""
import pytest
import torch

import attnlib
from attnlib import BlockSparse
from attnlib.dispatch import execute
from attnlib.inputs import call_for
from attnlib.masks import DenseMask
from attnlib.registry import get_backend
from attnlib.testing import compare, gradient_magnitudes
from reference64 import attention64

BACKENDS = ["math", "sdpa"]
N_EXAMPLES = 12


def _example(seed: int):
    g = torch.Generator().manual_seed(seed)

    def pick(*xs):
        return xs[int(torch.randint(len(xs), (1,), generator=g))]

    b, hkv, ratio = pick(1, 2), pick(1, 2), pick(1, 2)
    hq = hkv * ratio
    sq, sk = int(torch.randint(5, 70, (1,), generator=g)), int(torch.randint(5, 70, (1,), generator=g))
    bq, bk = pick(4, 8, 16), pick(4, 8, 16)
    nq, nk = -(-sq // bq), -(-sk // bk)
    lead = pick((), (hq,), (b, hq), (b, 1), (1, hq))
    density = pick(0.15, 0.4, 0.8)
    layout = torch.rand(*lead, nq, nk, generator=g) < density
    layout[..., 0, :] = False                       # a query block that sees nothing
    d, dv = pick(8, 16), pick(8, 16)
    dtype = pick(torch.float32, torch.float64)
    q = torch.randn(b, sq, hq, d, generator=g).to(dtype)
    k = torch.randn(b, sk, hkv, d, generator=g).to(dtype)
    v = torch.randn(b, sk, hkv, dv, generator=g).to(dtype)
    mask = BlockSparse(layout, (bq, bk), causal=pick(False, True))
    return q, k, v, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(N_EXAMPLES))
def test_random_layout_matches_float64(backend, seed):
    q, k, v, mask = _example(seed)
    grad = seed % 3 == 0
    if grad:     # the LSE-path backward reads the float32 LSE: float64 gradients are float32-accurate there
        q, k, v = q.float(), k.float(), v.float()
    leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    out, lse = attnlib.attention(q, k, v, mask, backend=backend, return_lse=True)
    if grad:     # gradients through the backend's own forward (no LSE asked: no merged-result backward)
        out = attnlib.attention(*leaves, mask, backend=backend)
    ref64 = [t.detach().double().requires_grad_(grad) for t in (q, k, v)]
    naive_in = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    ref_out, ref_lse = attention64(*ref64, mask)
    naive_out, naive_lse = attention64(*naive_in, mask, dtype=q.dtype)
    assert torch.isinf(ref_lse).any(), "each example must have rows that see no key"
    results = [compare(out, ref_out, naive_out, q.dtype, "out"),
               compare(lse, ref_lse, naive_lse.float(), q.dtype, "lse")]
    if grad:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
        got = torch.autograd.grad(out, leaves, dout)
        ref = torch.autograd.grad(ref_out, ref64, dout.double())
        naive = torch.autograd.grad(naive_out, naive_in, dout)
        mags = gradient_magnitudes(*ref64, dout.double(), q.shape[-1] ** -0.5)
        results += [compare(a, r, n, q.dtype, name, mags[name])
                    for a, r, n, name in zip(got, ref, naive, ("dq", "dk", "dv"))]
    bad = [c for c in results if not c.passed]
    assert not bad, f"{mask}: " + "; ".join(f"{c.what}: error {c.error:.3g} > tol {c.tol:.3g}" for c in bad)
    empty = torch.isinf(ref_lse).transpose(1, 2)                      # [B, Sq, Hq]
    assert (out[empty] == 0).all(), "rows that see no key must return exactly 0"


def test_examples_cover_the_cases():
    """The seeds draw every layout rank, both causal settings, partial blocks on both axes and GQA."""
    seen = set()
    for seed in range(N_EXAMPLES):
        q, k, v, m = _example(seed)
        seen.add(("rank", m.layout.dim()))
        seen.add(("lead", tuple(x > 1 for x in m.layout.shape[:-2])))
        seen.add(("causal", m.causal))
        seen.add(("partial q", q.shape[1] % m.block_size[0] != 0))
        seen.add(("partial k", k.shape[1] % m.block_size[1] != 0))
        seen.add(("gqa", q.shape[2] != k.shape[2]))
    want = {("rank", 2), ("rank", 3), ("rank", 4), ("lead", (True, False)), ("causal", True), ("causal", False), ("partial q", True),
            ("partial k", True), ("gqa", True), ("gqa", False)}
    assert want <= seen, want - seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_with_no_visible_block(backend):
    q = torch.randn(1, 20, 2, 8)
    k = v = torch.randn(1, 12, 2, 8)
    out, lse = attnlib.attention(q, k, v, BlockSparse(torch.zeros(3, 2, dtype=torch.bool), 8), backend=backend,
                                 return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("seed", range(4))
def test_empty_rows_from_block_counts_equal_the_grid(seed):
    """``Plan.empty_rows_on`` for block layouts (prefix counts per row's key runs) equals ``~materialize().any()``,
    whole and restricted to a slice (ring steps)."""
    q, k, v, mask = _example(seed)
    plan = mask.plan(q.shape[1], k.shape[1])
    g = torch.Generator().manual_seed(seed)
    q0 = int(torch.randint(0, q.shape[1] // 2, (1,), generator=g))
    k0 = int(torch.randint(0, k.shape[1] // 2, (1,), generator=g))
    for p in (plan, plan.restrict((q0, q.shape[1]), (k0, k.shape[1] - 1))):
        grid = p.materialize()
        grid = grid.reshape((1,) * (4 - grid.dim()) + tuple(grid.shape))
        assert torch.equal(p.empty_rows_on("cpu"), ~grid.any(-1))


def test_empty_rows_are_skipped_only_when_none_can_exist():
    """A host layout with a block in every row and no causal cut has no empty rows (the dispatch then skips
    its empty-row pass); an empty layout row, causal attention or a device-side question keep it."""
    full_rows = torch.eye(4, dtype=torch.bool)
    assert not BlockSparse(full_rows, 8).plan(32, 32).may_have_empty_rows
    assert BlockSparse(full_rows, 8, causal=True).plan(32, 32).may_have_empty_rows
    holes = full_rows.clone()
    holes[2, 2] = False
    assert BlockSparse(holes, 8).plan(32, 32).may_have_empty_rows
    per_head = torch.stack([full_rows, holes])
    assert BlockSparse(per_head, 8).plan(32, 32).may_have_empty_rows
    assert BlockSparse(full_rows, 8).plan(32, 32).restrict((0, 32), (0, 16)).may_have_empty_rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_range, k_range", [((0, 32), (0, 16)), ((0, 16), (0, 32)), ((8, 29), (5, 27))])
def test_restricted_plans_match_float64(backend, q_range, k_range):
    """A slice of a block-sparse plan (a ring step, chunked prefill), also one starting at 0, runs the slice."""
    lay = torch.eye(4, dtype=torch.bool)
    lay[3, 0] = lay[1, 3] = True
    mask = BlockSparse(lay, 8)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 32, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    (q0, q1), (k0, k1) = q_range, k_range
    plan = mask.plan(32, 32).restrict(q_range, k_range)
    out, lse = execute(get_backend(backend), call_for(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], plan, 8 ** -0.5, True))
    keep = mask.materialize(32, 32)[..., q0:q1, k0:k1]
    ref_out, ref_lse = attention64(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], DenseMask(keep))
    assert (out - ref_out).abs().max() < 1e-6
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin) and (lse[fin] - ref_lse[fin]).abs().max() < 1e-6
