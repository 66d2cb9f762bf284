"""Sequence parallelism (attnlib.parallel) against the single-process float64 reference.

The matrix, the case runner and the spawn harness are library code (``attnlib.parallel.conformance``,
shared with ``attnlib check --parallel N``); this file passes the tests' independent float64 reference
(``reference64.attention64``). Each world size runs ONE set of gloo processes (bounded by a timeout,
terminated on failure) that loops over every case; one pytest test per case reads the verdicts, so a
failure names its case and rank.
"""
from __future__ import annotations

import pytest
import torch

from attnlib.parallel import conformance

REFERENCE = "reference64:attention64"       # independent of attnlib's own reference formula
JOIN_TIMEOUT_S = 150        # the whole spawn (start-up ~5-10 s per process on 2 cores, all cases)
CASES = {world: conformance.cases(world) for world in (2, 4)}

_RESULTS: dict = {}


def _results(world: int) -> dict:
    if world not in _RESULTS:
        _RESULTS[world] = conformance.spawn(world, conformance.CASE_TARGET, CASES[world],
                                            shared={"reference": REFERENCE}, timeout_s=JOIN_TIMEOUT_S)
    return _RESULTS[world]


@pytest.mark.parametrize("world,case", [(w, c) for w, cases in CASES.items() for c in cases],
                         ids=[f"world{w}-{c}" for w, cases in CASES.items() for c in cases])
def test_sequence_parallel(world, case):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    results = _results(world)
    errors = [f"rank {rank}: {res[case]['error']}" for rank, res in sorted(results.items()) if not res[case]["ok"]]
    assert not errors, "\n".join(errors)
    skipped = {res[case].get("skipped") for res in results.values()} - {None}
    assert not skipped, f"the case's own backend cannot serve it: {skipped}"


def test_needs_initialized_group():
    from attnlib.parallel import SequenceParallel

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        SequenceParallel()


def test_layout_sizes():
    from attnlib.parallel import rank_ranges, rank_sizes, split_sizes

    assert split_sizes(7, 2) == [4, 3]
    assert split_sizes(3, 4) == [1, 1, 1, 0]
    assert rank_ranges("contiguous", 7, 2) == (((0, 4),), ((4, 7),))
    assert rank_ranges("zigzag", 8, 2) == (((0, 2), (6, 8)), ((2, 4), (4, 6)))
    assert rank_sizes("zigzag", 11, 2) == [5, 6]     # chunks 3,3,3,2: rank 0 holds chunks 0 and 3


@pytest.mark.parametrize("world", [3, 5, 6, 8])
def test_generated_matrix_fits_the_world_size(world):
    matrix = conformance.cases(world)
    assert set(conformance.cases(2)) - {n for n in conformance.cases(2) if n.startswith("ring_")} <= set(matrix) | {
        "blockdiag_batch1_bshd_math_lse"}
    hybrid = conformance._hybrid_degree(world)
    assert any(n.startswith("hybrid_") for n in matrix) == (hybrid is not None)
    uneven = False
    for name, opt in matrix.items():
        if opt.get("kind", "attn") != "attn":
            continue
        degree = 1 if opt.get("ring") else opt.get("hybrid") or world      # the Ulysses degree
        assert opt["hq"] % degree == 0 and opt["hq"] % opt["hkv"] == 0, name
        total = sum(opt["lens"]) if "lens" in opt else opt["s"]
        uneven |= total % world != 0
    assert uneven
    assert matrix["seq_shorter_than_world_math"]["s"] < world
    assert world % matrix["err_heads_not_divisible"]["hq"] != 0 and matrix["err_heads_not_divisible"]["hq"] % world


def test_matrix_needs_two_ranks():
    with pytest.raises(ValueError, match="world must be an int >= 2"):
        conformance.cases(1)


def _harness_target(name, payload, ctx):
    """A spawn target defined in a tests module (the children import it by name)."""
    import os

    import torch.distributed as dist

    if name == "value":
        return {"rank": ctx.rank, "world": ctx.world, "shared": ctx.shared["tag"]}
    if name == "fails":
        raise conformance.CaseFailure("numbers off", ratio=2.5)
    if name == "dies":
        if ctx.rank == 1:
            os._exit(3)
    dist.barrier()              # "dies": never completes (rank 1 is gone); "after": fails or is stopped
    return None


def test_spawn_reports_per_case_and_survives_a_dying_rank():
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with pytest.raises(ValueError, match="module:function"):
        conformance.spawn(2, "no_colon", {})
    got = conformance.spawn(2, f"{__name__}:_harness_target", {"value": None, "fails": None, "dies": None,
                                                                "after": None},
                            shared={"tag": "x"}, timeout_s=60, grace_s=2)
    assert set(got) == {0, 1}
    for rank, res in got.items():
        assert res["value"]["ok"] and res["value"]["rank"] == rank and res["value"]["shared"] == "x"
        assert not res["fails"]["ok"] and res["fails"]["ratio"] == 2.5 and "numbers off" in res["fails"]["error"]
        assert not res["dies"]["ok"] and not res["after"]["ok"]
    assert "rank 1 died (exit code 3) while running this case" in got[1]["dies"]["error"]
    assert "not run" in got[1]["after"]["error"]


def test_a_rank_that_reports_every_case_but_exits_badly_fails_them():
    """An abort at exit (SIGABRT from gloo threads left running into the interpreter's shutdown) or gloo
    threads still running after destroy_process_group() fail the rank's cases, with the reason."""
    items = [("a", None), ("b", None)]
    state = {"done": {"a": {"ok": True, "error": "", "s": 0.1}, "b": {"ok": False, "error": "off", "s": 0.1}},
             "running": None, "setup_error": None, "finished": True}
    clean = conformance._rank_results(0, state, items, 0, False, False, 60, None)
    assert clean["a"]["ok"] and not clean["b"]["ok"] and clean["b"]["error"] == "off"
    aborted = conformance._rank_results(0, state, items, -6, False, False, 60, None)
    assert not aborted["a"]["ok"] and "died while exiting (SIGABRT)" in aborted["a"]["error"]
    assert aborted["b"]["error"].endswith("; off")
    left = dict(state, left_running="gloo threads still running after destroy_process_group(): pt_gloo_runloop")
    kept = conformance._rank_results(1, left, items, 0, False, False, 60, None)
    assert not kept["a"]["ok"] and "rank 1 reported this case, but gloo threads" in kept["a"]["error"]
