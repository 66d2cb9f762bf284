"""Sequence-parallel conformance: a spawn harness, the case matrix and its case runner.

Shared by ``attnlib check --parallel N`` and ``tests/test_parallel.py``, so the CLI and CI check the same
thing. Importable without pytest (and without an initialized process group).

* :func:`spawn` starts ``world`` local processes (spawn context), initializes a process group in each
  (gloo on CPU; NCCL, one GPU per rank, on CUDA), runs a ``"module:function"`` target on every case and
  returns per-rank, per-case verdicts as plain dicts. A hang is bounded by a timeout (the processes are
  terminated); a rank that dies is reported, and the others are stopped. Every process destroys its
  process group at the end; one that then still runs gloo threads, or dies while exiting, fails its cases
  (a script doing the same would abort at exit).
* :func:`cases` is the matrix for a world size: fixed cases for 2 and 4 ranks, a generated one (head
  counts and lengths adapted to ``N``) for any other ``N >= 2``.
* :func:`run_case` builds one case's inputs (seeded, on the CPU, then moved to the device: every rank
  builds the same tensors), runs it with ``SequenceParallel``, gathers out / LSE / dq / dk / dv and
  compares them with a float64 reference under :mod:`attnlib.testing`'s tolerance policy. It returns
  the worst ``max|error| / tolerance``.
"""
from __future__ import annotations

import gc
import importlib
import json
import math
import os
import re
import signal
import socket
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Mapping

import torch

__all__ = ["spawn", "cases", "run_case", "run_matrix", "reference64", "RankContext", "CaseFailure",
           "DEFAULT_REFERENCE", "CASE_TARGET"]

#: the float64 reference used when none is given: attnlib's own formula (``attnlib.reference``)
DEFAULT_REFERENCE = "attnlib.parallel.conformance:reference64"
#: the spawn target that runs one case of the matrix
CASE_TARGET = "attnlib.parallel.conformance:run_case"
#: default bound on one whole spawn (start-up ~5-10 s per process on 2 cores, plus every case)
DEFAULT_TIMEOUT_S = 300.0


# =========================================================================================================
# the spawn harness
# =========================================================================================================
@dataclass
class RankContext:
    """What a target gets besides its case: this process's place in the group, device and shared options."""

    rank: int
    world: int
    device: str
    shared: dict = field(default_factory=dict)


class CaseFailure(AssertionError):
    """A failed case that still reports numbers: ``details`` (JSON-able) go into the case's result."""

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.details = details


def resolve_target(target: str):
    """The function named by ``"module:function"`` (``ValueError`` when the string has another form)."""
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise ValueError(f"target must be a 'module:function' string naming a module-level function, got {target!r}")
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"target {target!r}: module {module!r} has no function {name!r}")
    return fn


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: str, state: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(state, f, default=repr)        # a target's non-JSON value arrives as its repr
    os.replace(path + ".tmp", path)


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}\n{traceback.format_exc()}"


def _child(rank, world, port, target, case_items, shared, dist_backend, device, path, collective_timeout_s):
    """One spawned process: init the group, run ``target`` on every case, write the verdicts after each."""
    state = {"done": {}, "running": None, "setup_error": None, "finished": False}
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        import torch.distributed as dist

        fn = resolve_target(target)
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=collective_timeout_s))
        ctx = RankContext(rank, world, device, dict(shared or {}))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        state["setup_error"] = _error_text(e)
        _write(path, state)
        sys.exit(1)             # a non-zero exit: the parent stops the ranks still waiting for this one
    for name, payload in case_items:
        state["running"] = name
        _write(path, state)
        t0 = time.perf_counter()
        entry = {"ok": True, "error": ""}
        try:
            got = fn(name, payload, ctx)
            if isinstance(got, dict):
                entry.update(got)
            elif got is not None:
                entry["value"] = got
        except BaseException as e:  # noqa: BLE001 - reported to the parent per case
            entry = {"ok": False, "error": _error_text(e)}
            entry.update(getattr(e, "details", None) or {})
        entry["s"] = time.perf_counter() - t0
        state["done"][name] = entry
    state["running"] = None
    state["finished"] = True
    _write(path, state)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the verdicts are written; tear-down problems do not change them
        pass
    gc.collect()                # process groups the cases dropped in reference cycles
    left = gloo_threads()
    if left:                    # they would run into the interpreter's shutdown, where gloo can abort it
        state["left_running"] = f"gloo threads still running after destroy_process_group(): {', '.join(left)}"
        _write(path, state)


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads still running (Linux: ``/proc``; elsewhere always empty).

    A live gloo process group has them; ``dist.destroy_process_group()`` joins them unless something still
    refers to one of its groups."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:         # the thread ended meanwhile
            continue
        if "gloo" in name:
            names.append(name)
    return sorted(names)


def spawn(world: int, target: str, cases: Mapping[str, Any], *, shared: Mapping | None = None,
          backend: str | None = None, device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S,
          collective_timeout_s: float = 60.0, grace_s: float = 5.0) -> dict[int, dict[str, dict]]:
    """Run ``target`` on every case in ``world`` local processes; ``{rank: {case: result}}``.

    ``target``: ``"module:function"``, a module-level function ``fn(name, payload, ctx: RankContext)``
    (the children inherit ``sys.path``, so a function in a tests module works); called in every process
    for each ``(name, payload)`` of ``cases`` in order. Its return value: ``None``, a dict (merged into the
    result) or anything JSON-able (stored as ``"value"``); an exception fails the case on that rank (a
    :class:`CaseFailure`'s ``details`` are merged too). Payloads travel by pickle.

    ``backend``: the ``torch.distributed`` backend, default ``"gloo"`` on ``device="cpu"`` and ``"nccl"`` on
    ``"cuda"`` (rank ``r`` uses GPU ``r``: needs ``world`` GPUs). ``timeout_s`` bounds the whole run: then
    every process still alive is terminated. A rank that exits abnormally stops the others ``grace_s``
    later (their collectives cannot complete).

    Every result has ``"ok"`` (bool), ``"error"`` (text, empty when ok) and ``"s"`` (seconds); every rank
    has a result for every case (a case not run says why).
    """
    import multiprocessing as mp
    from multiprocessing.connection import wait

    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int (the number of processes), got {world!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    if device == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"device='cuda' with world={world} needs {world} GPUs (one per process), "
                         f"{torch.cuda.device_count()} visible: use fewer processes or device='cpu'")
    resolve_target(target)            # fail here, not in every child
    items = list(cases.items())
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="attnlib-sp-") as tmp:
        port = _free_port()
        paths = [os.path.join(tmp, f"rank{r}.json") for r in range(world)]
        procs = [ctx.Process(target=_child, args=(r, world, port, target, items, dict(shared or {}), backend, device,
                                                  paths[r], collective_timeout_s), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        stop_at = deadline
        first_death = None
        alive = set(range(world))
        while alive and time.monotonic() < stop_at:
            wait([procs[r].sentinel for r in alive], timeout=max(0.0, min(stop_at - time.monotonic(), 1.0)))
            for r in sorted(alive):
                if not procs[r].is_alive():
                    alive.discard(r)
                    if procs[r].exitcode != 0 and first_death is None:
                        first_death = r
                        stop_at = min(deadline, time.monotonic() + grace_s)
        timed_out = bool(alive) and first_death is None
        for r in sorted(alive):
            procs[r].terminate()
        for r in sorted(alive):
            procs[r].join(5)
            if procs[r].is_alive():
                procs[r].kill()
                procs[r].join(5)
        out = {}
        for r in range(world):
            state = None
            if os.path.exists(paths[r]):
                with open(paths[r]) as f:
                    state = json.load(f)
            out[r] = _rank_results(r, state, items, procs[r].exitcode, r in alive, timed_out, timeout_s, first_death)
    return out


def _rank_results(rank, state, items, exitcode, stopped, timed_out, timeout_s, first_death) -> dict:
    """Every case's result on one rank, saying for the cases that did not finish why not."""
    names = [n for n, _ in items]
    if stopped:
        why = (f"timed out: the whole run exceeded {timeout_s:.0f} s; rank {rank} was terminated" if timed_out else
               f"stopped: rank {first_death} died, so rank {rank} was terminated")
    elif exitcode != 0:
        why = f"rank {rank} died (exit code {exitcode})"
    else:
        why = f"rank {rank} exited without writing this result"
    if state is None:
        return {n: {"ok": False, "error": f"{why} before reporting anything", "s": 0.0} for n in names}
    if state.get("setup_error"):
        return {n: {"ok": False, "error": f"process group set-up failed: {state['setup_error']}", "s": 0.0}
                for n in names}
    done, running = dict(state.get("done", {})), state.get("running")
    exit_problem = state.get("left_running") if state.get("finished") and not stopped else None
    if state.get("finished") and exitcode not in (0, None) and not stopped:
        how = f"exit code {exitcode}"
        if exitcode < 0:
            try:
                how = signal.Signals(-exitcode).name
            except ValueError:
                how = f"signal {-exitcode}"
        exit_problem = f"its process then died while exiting ({how})" + (f"; {exit_problem}" if exit_problem else "")
    if exit_problem:            # every case reported, but a script doing the same would crash at exit
        done = {n: dict(e, ok=False, error=f"rank {rank} reported this case, but {exit_problem}"
                        + (f"; {e['error']}" if e["error"] else ""))
                for n, e in done.items()}
    if first_death is not None and first_death != rank:     # its failures are likely the dead rank's doing
        done = {n: e if e["ok"] else dict(e, error=f"[rank {first_death} died during this run] {e['error']}")
                for n, e in done.items()}
    for n in names:
        if n not in done:
            done[n] = {"ok": False, "s": 0.0,
                       "error": f"{why} while running this case" if n == running else
                                f"not run: {why} during case {running!r}" if running else f"not run: {why}"}
    return {n: done[n] for n in names}


# =========================================================================================================
# the float64 reference
# =========================================================================================================
def reference64(q, k, v, mask=None, scale: float | None = None, *, packed: bool | None = None,
                dtype: torch.dtype | None = None, **modifiers):
    """``(out, lse)`` of attnlib's reference formula (``attnlib.reference.reference_attention``) with the
    signature of ``tests/reference64.py``'s ``attention64``: ``dtype`` float64 (default) is the oracle, the
    inputs' dtype the naive same-dtype implementation. Differentiable; computed where the inputs are."""
    from ..reference import reference_for

    dtype = torch.float64 if dtype is None else dtype
    return reference_for(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale, compute_dtype=dtype, **modifiers)


# =========================================================================================================
# the case matrix
# =========================================================================================================
_FIXED = {
    2: {
        "none_even_math": dict(b=2, s=8, hq=4, hkv=4, mask="none", backend="math"),
        "none_uneven_sdpa": dict(b=1, s=7, hq=4, hkv=4, mask="none", backend="sdpa"),
        "causal_uneven_math_lse": dict(b=2, s=9, hq=4, hkv=2, mask="causal", backend="math", lse=True),
        "causal_uneven_sdpa_lse": dict(b=2, s=9, hq=4, hkv=2, mask="causal", backend="sdpa", lse=True),
        "causal_gqa_hkv1_sdpa": dict(b=1, s=8, hq=4, hkv=1, mask="causal", backend="sdpa", lse=True),
        "causal_window_math": dict(b=1, s=9, hq=2, hkv=2, mask="window", backend="math"),
        "causal_top_left_kv_longer_sdpa": dict(b=1, s=5, sk=9, hq=2, hkv=1, mask="causal", backend="sdpa", lse=True),
        "keypad_left_causal_sdpa_lse": dict(b=3, s=7, hq=4, hkv=2, mask="keypad_left_causal", backend="sdpa",
                                            lse=True),
        "keypad_holes_math_lse": dict(b=3, s=7, hq=2, hkv=1, mask="keypad_holes", backend="math", lse=True),
        "blockdiag_varlen_causal_math_lse": dict(lens=[3, 5, 2], hq=4, hkv=2, mask="blockdiag_causal",
                                                 backend="math", lse=True),
        "blockdiag_varlen_sdpa_uneven": dict(lens=[4, 1, 6], hq=2, hkv=2, mask="blockdiag", backend="sdpa"),
        "blockdiag_cfg_kv_sdpa_lse": dict(lens=[5, 5], kv_lens=[7, 5], hq=4, hkv=1, mask="blockdiag",
                                          backend="sdpa", lse=True),
        "blockdiag_batch1_bshd_math_lse": dict(lens=[2, 5], hq=2, hkv=2, mask="blockdiag_causal", backend="math",
                                               lse=True, bshd_batch1=True),
        "dense_per_head_math": dict(b=1, s=7, hq=4, hkv=2, mask="dense", backend="math"),
        "zigzag_causal_math_lse": dict(b=2, s=11, hq=4, hkv=2, mask="causal", backend="math", lse=True,
                                       layout="zigzag"),
        "zigzag_blockdiag_sdpa": dict(lens=[3, 4, 4], hq=2, hkv=1, mask="blockdiag_causal", backend="sdpa",
                                      layout="zigzag"),
        "causal_bf16_sdpa_lse": dict(b=1, s=9, hq=4, hkv=2, mask="causal", backend="sdpa", lse=True,
                                     dtype=torch.bfloat16),
        "module_causal_sdpa": dict(b=1, s=9, hq=4, hkv=2, mask="causal", backend="sdpa", module=True),
        "joint_front_keypad_sdpa_lse": dict(kind="joint", b=2, t=5, s=11, hq=4, hkv=2, strategy="front",
                                            mask="keypad", backend="sdpa", lse=True),
        "joint_rear_known_length_math": dict(kind="joint", b=1, t=3, s=8, hq=2, hkv=2, strategy="rear",
                                             mask="none", backend="math", known_length=True),
        "chunk_window_sink_sdpa_lse": dict(b=1, s=11, hq=4, hkv=2, mask="chunk_sink", backend="sdpa", lse=True),
        "block_sparse_causal_sdpa_lse": dict(b=2, s=10, hq=2, hkv=1, mask="block_sparse", backend="sdpa", lse=True),
        "alibi_softcap_causal_math_lse": dict(b=1, s=9, hq=4, hkv=2, mask="causal", backend="math", lse=True,
                                              mods=("alibi", "softcap")),
        "sinks_alibi_keypad_sdpa_lse": dict(b=3, s=7, hq=4, hkv=2, mask="keypad_holes", backend="sdpa", lse=True,
                                            mods=("sinks", "alibi")),
        "sinks_varlen_causal_sdpa": dict(lens=[3, 5, 2], hq=4, hkv=2, mask="blockdiag_causal", backend="sdpa",
                                         mods=("sinks",)),
        "roundtrip": dict(kind="roundtrip"),
        "err_heads_not_divisible": dict(kind="raises", what="heads", hq=3),
        "err_bad_degree": dict(kind="raises", what="degree", ulysses=3),
        "err_hybrid_degree": dict(kind="raises", what="hybrid_degree", ulysses=2, ring=2),
    },
    4: {
        "causal_uneven_sdpa_gqa_lse": dict(b=1, s=10, hq=4, hkv=2, mask="causal", backend="sdpa", lse=True),
        "causal_gqa_hkv1_math": dict(b=1, s=9, hq=4, hkv=1, mask="causal", backend="math"),
        "blockdiag_varlen_causal_math_lse": dict(lens=[3, 6, 2], hq=4, hkv=2, mask="blockdiag_causal",
                                                 backend="math", lse=True),
        "keypad_left_causal_sdpa": dict(b=2, s=6, hq=4, hkv=4, mask="keypad_left_causal", backend="sdpa"),
        "zigzag_causal_sdpa_lse": dict(b=1, s=13, hq=4, hkv=2, mask="causal", backend="sdpa", lse=True,
                                       layout="zigzag"),
        "seq_shorter_than_world_math": dict(b=1, s=3, hq=4, hkv=4, mask="causal", backend="math", lse=True),
        "blockdiag_cfg_kv_sdpa_lse": dict(lens=[5, 6], kv_lens=[7, 5], hq=4, hkv=1, mask="blockdiag",
                                          backend="sdpa", lse=True),
        "dense_per_head_math": dict(b=1, s=7, hq=4, hkv=2, mask="dense", backend="math"),
        "joint_front_keypad_sdpa_lse": dict(kind="joint", b=2, t=5, s=11, hq=4, hkv=1, strategy="front",
                                            mask="keypad", backend="sdpa", lse=True),
        "joint_rear_keypad_math_lse": dict(kind="joint", b=1, t=6, s=3, hq=4, hkv=2, strategy="rear",
                                           mask="keypad", backend="math", lse=True),
        "chunk_window_sink_sdpa_lse": dict(b=1, s=13, hq=4, hkv=2, mask="chunk_sink", backend="sdpa", lse=True),
        "sinks_alibi_softcap_math_lse": dict(b=1, s=10, hq=4, hkv=2, mask="causal", backend="math", lse=True,
                                             mods=("sinks", "alibi", "softcap")),
        "roundtrip": dict(kind="roundtrip"),
        "err_heads_not_divisible": dict(kind="raises", what="heads", hq=6),
    },
}


def _generated(n: int) -> dict[str, dict]:
    """The matrix for ``n`` ranks other than 2 and 4: the same situations, sized for ``n`` (query heads a
    multiple of ``n`` for Ulysses, lengths not divisible by ``n``, a sequence shorter than ``n``)."""
    bf16 = torch.bfloat16
    return {
        "none_even_math": dict(b=2, s=2 * n, hq=n, hkv=n, mask="none", backend="math"),
        "none_uneven_sdpa": dict(b=1, s=2 * n + 1, hq=n, hkv=n, mask="none", backend="sdpa"),
        "causal_uneven_math_lse": dict(b=2, s=2 * n + 1, hq=2 * n, hkv=2, mask="causal", backend="math", lse=True),
        "causal_uneven_sdpa_lse": dict(b=2, s=2 * n + 1, hq=2 * n, hkv=2, mask="causal", backend="sdpa", lse=True),
        "causal_gqa_hkv1_sdpa": dict(b=1, s=2 * n, hq=n, hkv=1, mask="causal", backend="sdpa", lse=True),
        "causal_window_math": dict(b=1, s=2 * n + 1, hq=n, hkv=n, mask="window", backend="math"),
        "causal_top_left_kv_longer_sdpa": dict(b=1, s=n + 1, sk=2 * n + 3, hq=n, hkv=1, mask="causal",
                                               backend="sdpa", lse=True),
        "keypad_left_causal_sdpa_lse": dict(b=3, s=n + 3, hq=n, hkv=1, mask="keypad_left_causal", backend="sdpa",
                                            lse=True),
        "keypad_holes_math_lse": dict(b=3, s=2 * n - 1, hq=n, hkv=1, mask="keypad_holes", backend="math", lse=True),
        "blockdiag_varlen_causal_math_lse": dict(lens=[n + 1, 2 * n - 1, 2], hq=n, hkv=1, mask="blockdiag_causal",
                                                 backend="math", lse=True),
        "blockdiag_varlen_sdpa_uneven": dict(lens=[n + 2, 1, 2 * n + 1], hq=n, hkv=n, mask="blockdiag",
                                             backend="sdpa"),
        "blockdiag_cfg_kv_sdpa_lse": dict(lens=[n + 1, n + 1], kv_lens=[n + 3, n + 1], hq=n, hkv=1,
                                          mask="blockdiag", backend="sdpa", lse=True),
        "dense_per_head_math": dict(b=1, s=n + 3, hq=n, hkv=1, mask="dense", backend="math"),
        "zigzag_causal_math_lse": dict(b=2, s=4 * n + 1, hq=n, hkv=1, mask="causal", backend="math", lse=True,
                                       layout="zigzag"),
        "zigzag_blockdiag_sdpa": dict(lens=[n + 1, 2 * n, max(1, n - 1)], hq=n, hkv=1, mask="blockdiag_causal",
                                      backend="sdpa", layout="zigzag"),
        "seq_shorter_than_world_math": dict(b=1, s=n - 1, hq=n, hkv=n, mask="causal", backend="math", lse=True),
        "chunk_window_sink_sdpa_lse": dict(b=1, s=3 * n + 2, hq=n, hkv=1, mask="chunk_sink", backend="sdpa", lse=True),
        "sinks_alibi_softcap_math_lse": dict(b=1, s=2 * n + 1, hq=n, hkv=1, mask="causal", backend="math", lse=True,
                                             mods=("sinks", "alibi", "softcap")),
        "block_sparse_causal_sdpa_lse": dict(b=2, s=3 * n + 1, hq=n, hkv=1, mask="block_sparse", backend="sdpa",
                                             lse=True),
        "alibi_softcap_causal_math_lse": dict(b=1, s=2 * n + 1, hq=2 * n, hkv=2, mask="causal", backend="math",
                                              lse=True, mods=("alibi", "softcap")),
        "sinks_alibi_keypad_sdpa_lse": dict(b=3, s=n + 3, hq=n, hkv=1, mask="keypad_holes", backend="sdpa", lse=True,
                                            mods=("sinks", "alibi")),
        "sinks_varlen_causal_sdpa": dict(lens=[n + 1, 2 * n - 1, 2], hq=n, hkv=1, mask="blockdiag_causal",
                                         backend="sdpa", mods=("sinks",)),
        "causal_bf16_sdpa_lse": dict(b=1, s=2 * n + 1, hq=n, hkv=1, mask="causal", backend="sdpa", lse=True,
                                     dtype=bf16),
        "module_causal_sdpa": dict(b=1, s=2 * n + 1, hq=n, hkv=1, mask="causal", backend="sdpa", module=True),
        "joint_front_keypad_sdpa_lse": dict(kind="joint", b=2, t=n + 1, s=3 * n + 1, hq=n, hkv=1, strategy="front",
                                            mask="keypad", backend="sdpa", lse=True),
        "joint_rear_known_length_math": dict(kind="joint", b=1, t=n - 1, s=2 * n + 1, hq=n, hkv=n, strategy="rear",
                                             mask="none", backend="math", known_length=True),
        "roundtrip": dict(kind="roundtrip"),
        "err_heads_not_divisible": dict(kind="raises", what="heads", hq=n + 1),
        "err_bad_degree": dict(kind="raises", what="degree", ulysses=n + 1),
        "err_hybrid_degree": dict(kind="raises", what="hybrid_degree", ulysses=n, ring=2),
    }


def _hybrid_degree(n: int) -> int | None:
    """The Ulysses degree of the hybrid checked on ``n`` ranks: the smallest factor > 1 (None when prime)."""
    for u in range(2, int(math.isqrt(n)) + 1):
        if n % u == 0:
            return u
    return None


#: the case kinds that compare attention against the reference (they run under every strategy)
ATTENTION_KINDS = ("attn", "joint")


def cases(world: int) -> dict[str, dict]:
    """The sequence-parallel matrix for ``world`` ranks, ``{name: options}`` (``world >= 2``).

    Fixed cases for 2 and 4 ranks, generated ones for any other count. Every attention case also runs
    under ring attention (``ring_<name>``) and, when ``world`` has a factor ``1 < u < world``, under the
    hybrid ``ulysses=u, ring=world/u`` (``hybrid_<name>``); on 2 ranks the hybrid degree is 1 (no hybrid).
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 2:
        raise ValueError(f"world must be an int >= 2 (sequence parallelism needs at least 2 ranks), got {world!r}")
    base = {k: dict(v) for k, v in _FIXED[world].items()} if world in _FIXED else _generated(world)
    out = dict(base)
    for name, opt in base.items():
        if opt.get("kind", "attn") in ATTENTION_KINDS:
            out["ring_" + name] = dict(opt, ring=True)
    u = _hybrid_degree(world)
    if u is not None:
        for name, opt in base.items():
            if opt.get("kind", "attn") in ATTENTION_KINDS:
                out["hybrid_" + name] = dict(opt, hybrid=u)
    return out


def strategy(opt: Mapping, world: int) -> str:
    """How a case splits the work, for a table: ``ulysses=N``, ``ring=N``, ``ulysses=u x ring=r``, ..."""
    kind = opt.get("kind", "attn")
    if kind not in ATTENTION_KINDS:
        return "shard/gather" if kind == "roundtrip" else "errors"
    layout = "" if opt.get("layout", "contiguous") == "contiguous" else f" {opt['layout']}"
    if opt.get("ring"):
        return f"ring={world}{layout}"
    if opt.get("hybrid"):
        return f"ulysses={opt['hybrid']} x ring={world // opt['hybrid']}{layout}"
    return f"ulysses={world}{layout}"


# =========================================================================================================
# the case runner (runs in every spawned process)
# =========================================================================================================
def _mask_on(mask, device):
    return None if mask is None else mask.to(device)


def build_inputs(opt: Mapping, gen: torch.Generator):
    """``(q, k, v, mask, thd, mods)`` of one attention case, on the CPU, drawn from ``gen``; ``thd``: packed
    ``[T, H, D]`` inputs (else BSHD); ``mods``: score modifiers (``softcap``, ``alibi_slopes``, ``sinks``)."""
    from ..masks import BlockDiagonal, BlockSparse, Causal, DenseMask, KeyPadding

    d = 8
    hq, hkv = opt["hq"], opt["hkv"]
    packed = "lens" in opt
    if packed:
        lens = opt["lens"]
        kv_lens = opt.get("kv_lens", lens)
        sq, sk = sum(lens), sum(kv_lens)
        shape_q, shape_k = (sq, hq, d), (sk, hkv, d)
        if opt.get("bshd_batch1"):
            shape_q, shape_k = (1,) + shape_q, (1,) + shape_k
    else:
        b, sq = opt["b"], opt["s"]
        sk = opt.get("sk", sq)
        shape_q, shape_k = (b, sq, hq, d), (b, sk, hkv, d)
    dtype = opt.get("dtype", torch.float32)
    q = torch.randn(shape_q, generator=gen).to(dtype)
    k = torch.randn(shape_k, generator=gen).to(dtype)
    v = torch.randn(shape_k, generator=gen).to(dtype)
    m = opt["mask"]
    if m == "none":
        mask = None
    elif m == "causal":
        mask = Causal(align="top_left") if sk != sq else Causal()
    elif m == "window":
        mask = Causal(window=3)
    elif m == "chunk_sink":
        mask = Causal(chunk=3, window=2, sink=2)           # rows see two key runs: a sink and a window
    elif m == "block_sparse":
        nq, nk = -(-sq // 3), -(-sk // 2)
        lay = torch.rand(nq, nk, generator=gen) > 0.5
        lay[:, 0] = True
        mask = BlockSparse(lay, (3, 2), causal=True)
    elif m.startswith("keypad"):
        if m == "keypad_left_causal":
            pads = torch.randint(0, sk - 1, (b,), generator=gen)
            valid = torch.arange(sk)[None, :] >= pads[:, None]
            mask = KeyPadding(valid, causal=True)
        else:
            valid = torch.rand(b, sk, generator=gen) > 0.4
            valid[-1] = False                          # a batch row with no valid key: output 0, LSE -inf
            mask = KeyPadding(valid)
    elif m.startswith("blockdiag"):
        mask = BlockDiagonal(lens, kv_seqlens=opt.get("kv_lens"), causal=m.endswith("causal"))
    elif m == "dense":
        dm = torch.rand(1, hq, sq, sk, generator=gen) > 0.3
        dm[..., 0] = True
        mask = DenseMask(dm)
    else:
        raise ValueError(f"case option mask={m!r}: unknown (none, causal, window, chunk_sink, block_sparse, "
                         "keypad_left_causal, keypad_holes, blockdiag, blockdiag_causal, dense)")
    mods = {}
    for name in opt.get("mods", ()):
        if name == "softcap":
            mods["softcap"] = 3.0
        elif name == "alibi":
            mods["alibi_slopes"] = torch.rand(hq, generator=gen) * 0.5
        elif name == "sinks":
            mods["sinks"] = torch.randn(hq, generator=gen)
        else:
            raise ValueError(f"case option mods: unknown modifier {name!r} (softcap, alibi, sinks)")
    return q, k, v, mask, packed and not opt.get("bshd_batch1"), mods


class _Fallbacks:
    """Records attnlib's 'backend cannot serve this call, using X' warnings of one case."""

    def __enter__(self):
        from .. import registry

        registry.reset_warnings()
        self._cm = warnings.catch_warnings(record=True)
        self.records = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)

    def messages(self) -> list[str]:
        seen = []
        for w in self.records:
            text = str(w.message)
            if "cannot serve this call" in text and text not in seen:
                seen.append(text)
        return seen


def _attn(name, opt, ctx: RankContext) -> dict:
    import attnlib
    from ..inputs import validate_call
    from ..registry import get_backend
    from ..testing import compare, gradient_magnitudes
    from . import SequenceParallel

    world, dev = ctx.world, torch.device(ctx.device)
    reference = resolve_target(ctx.shared.get("reference") or DEFAULT_REFERENCE)
    backend = opt["backend"]
    gen = torch.Generator().manual_seed(1234)
    q, k, v, mask, thd, mods = build_inputs(opt, gen)
    seq_dim = 0 if thd else 1
    want_lse = opt.get("lse", False)
    sp = SequenceParallel(layout=opt.get("layout", "contiguous"), **_strategy_kwargs(opt, world))
    dmask = _mask_on(mask, dev)

    leaves = [t.detach().to(dev).requires_grad_() for t in (q, k, v)]
    dmods = {n: (t.to(dev) if isinstance(t, torch.Tensor) else t) for n, t in mods.items()}
    if "sinks" in dmods:
        dmods["sinks"] = dmods["sinks"].detach().requires_grad_()
    call_mask = attnlib.Causal() if opt.get("module") else dmask
    why = get_backend(backend).why_not(validate_call(*leaves, call_mask, None, want_lse, **dmods))
    if why:        # the backend cannot serve this call even on one process: nothing to check
        return {"skipped": f"{backend} cannot serve this call: {'; '.join(why)}"}
    local = [sp.shard(t, seq_dim).detach().requires_grad_() for t in leaves]
    with _Fallbacks() as fb:
        if opt.get("module"):
            layer = attnlib.Attention(num_heads=opt["hq"], head_size=q.shape[-1], num_kv_heads=opt["hkv"],
                                      causal=True, backend=backend)
            got = layer(*local, parallel=sp, return_lse=want_lse)
        else:
            got = attnlib.attention(*local, dmask, backend=backend, parallel=sp, return_lse=want_lse, **dmods)
        out_local, lse_local = got if want_lse else (got, None)
        out = sp.gather(out_local, seq_dim)
        g = torch.randn(out.shape, generator=gen).to(q.dtype)
        (out * g.to(dev)).sum().backward()
    # a rank whose shard is empty may have no gradient path to it (PyTorch leaves .grad None)
    grads = [sp.gather(t.grad if t.grad is not None else torch.zeros_like(t), seq_dim).cpu() for t in local]
    lse = sp.gather(lse_local, -1).cpu() if want_lse else None
    if out.dtype != q.dtype or (lse is not None and lse.dtype != torch.float32):
        raise CaseFailure(f"dtypes: out {out.dtype} (want {q.dtype}), lse {None if lse is None else lse.dtype} "
                          "(want torch.float32)", ratio=math.inf, worst="dtype")
    out = out.detach().cpu()

    packed = q.dim() == 3
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_mods = dict(mods)
    if "sinks" in mods:
        ref_mods["sinks"] = mods["sinks"].double().requires_grad_()
    ref_out, ref_lse = reference(*ref_in, mask, packed=packed, **ref_mods)
    (ref_out * g.double()).sum().backward()
    nv_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    nv_mods = dict(mods)
    if "sinks" in mods:
        nv_mods["sinks"] = mods["sinks"].clone().requires_grad_()
    nv_out, nv_lse = reference(*nv_in, mask, packed=packed, dtype=q.dtype, **nv_mods)
    (nv_out * g).sum().backward()
    comps = [compare(out, ref_out, nv_out, q.dtype, "out")]
    if want_lse:
        comps.append(compare(lse, ref_lse, nv_lse, q.dtype, "lse"))
    mags = gradient_magnitudes(q, k, v, g, q.shape[-1] ** -0.5)
    for what, got_g, r, nv in zip(("dq", "dk", "dv"), grads, ref_in, nv_in):
        comps.append(compare(got_g, r.grad, nv.grad, q.dtype, what, mags[what]))
    if "sinks" in dmods:          # replicated: every rank holds the whole gradient
        got_s = dmods["sinks"].grad
        got_s = torch.zeros_like(mods["sinks"]) if got_s is None else got_s.cpu()
        comps.append(compare(got_s, ref_mods["sinks"].grad, nv_mods["sinks"].grad, q.dtype, "dsinks",
                             float(ref_mods["sinks"].grad.abs().max()) * 4))
    result = _verdict(comps, q.dtype, fb.messages())
    held = sum(b - a for a, b in sp.ranges(out.shape[seq_dim]))
    if out_local.shape[seq_dim] != held:
        raise CaseFailure(f"the local output holds {out_local.shape[seq_dim]} tokens, sp.ranges says {held}",
                          **result)
    return result


def _strategy_kwargs(opt, world) -> dict:
    if opt.get("ring"):
        return {"ring": world}
    if opt.get("hybrid"):
        u = int(opt["hybrid"])
        return {"ulysses": u, "ring": world // u}
    return {}


def _verdict(comps, dtype, fallbacks) -> dict:
    """The worst comparison as the case's result; :class:`CaseFailure` when any comparison fails."""
    ratios = [c.error / c.tol if c.tol else math.inf for c in comps]
    i = max(range(len(comps)), key=ratios.__getitem__)
    result = {"ratio": ratios[i], "worst": comps[i].what, "error_abs": comps[i].error, "tol": comps[i].tol}
    if fallbacks:
        result["fallbacks"] = fallbacks
    failed = [c for c in comps if not c.passed]
    if failed:
        raise CaseFailure("; ".join(f"{c.what}: max error {c.error:.3g} > tolerance {c.tol:.3g} (naive "
                                    f"{dtype} error {c.naive:.3g})" for c in failed), **result)
    return result


def _joint(name, opt, ctx: RankContext) -> dict:
    """``SequenceParallel.joint_attention``: a replicated text stream and a sharded image stream, against the
    reference on the whole joint sequence (out, LSE, and the gradients of text and image q, k, v)."""
    from ..masks import KeyPadding
    from ..testing import compare, gradient_magnitudes
    from . import SequenceParallel

    dev = torch.device(ctx.device)
    reference = resolve_target(ctx.shared.get("reference") or DEFAULT_REFERENCE)
    gen = torch.Generator().manual_seed(4321)
    b, t, s, hq, hkv, d = opt["b"], opt["t"], opt["s"], opt["hq"], opt["hkv"], 8
    dtype = opt.get("dtype", torch.float32)
    text = [torch.randn(b, t, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv)]
    image = [torch.randn(b, s, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv)]
    front = opt["strategy"] == "front"

    def joined(a, x, dim=1):
        return torch.cat([a, x] if front else [x, a], dim)

    mask = None
    if opt["mask"] == "keypad":
        text_valid = torch.rand(b, t, generator=gen) > 0.3
        text_valid[:, 0] = True
        mask = KeyPadding(joined(text_valid, torch.ones(b, s, dtype=torch.bool)))
    want_lse = opt.get("lse", False)
    sp = SequenceParallel(layout=opt.get("layout", "contiguous"), **_strategy_kwargs(opt, ctx.world))
    if opt.get("known_length"):
        sp = sp.with_seqlens(t + s)
    text_in = [x.detach().to(dev).requires_grad_() for x in text]
    image_in = [sp.shard(x.to(dev), 1).detach().requires_grad_() for x in image]
    with _Fallbacks() as fb:
        got = sp.joint_attention(*image_in, *text_in, _mask_on(mask, dev), joint_strategy=opt["strategy"],
                                 backend=opt["backend"], return_lse=want_lse)
        out, lse = got if want_lse else (got, None)
        mine = out.shape[1] - t
        cut = (t, mine) if front else (mine, t)
        o_text, o_image = out.split(cut, 1) if front else out.split(cut, 1)[::-1]
        out_all = joined(o_text, sp.gather(o_image, 1, total=s))
        g = torch.randn(out_all.shape, generator=gen).to(dtype)
        (out_all * g.to(dev)).sum().backward()
        lse_all = None
        if want_lse:
            l_text, l_image = lse.split(cut, -1) if front else lse.split(cut, -1)[::-1]
            lse_all = joined(l_text, sp.gather(l_image, -1, total=s), -1).cpu()
        # the text's gradient is whole on every rank; the image's is this rank's shard
        grads = [joined(a.grad, sp.gather(x.grad, 1, total=s)).cpu() for a, x in zip(text_in, image_in)]
    whole = [joined(a, x) for a, x in zip(text, image)]
    ref_in = [x.double().requires_grad_() for x in whole]
    ref_out, ref_lse = reference(*ref_in, mask, packed=False)
    (ref_out * g.double()).sum().backward()
    nv_in = [x.detach().clone().requires_grad_() for x in whole]
    nv_out, nv_lse = reference(*nv_in, mask, packed=False, dtype=dtype)
    (nv_out * g).sum().backward()
    comps = [compare(out_all.detach().cpu(), ref_out, nv_out, dtype, "out")]
    if want_lse:
        comps.append(compare(lse_all, ref_lse, nv_lse, dtype, "lse"))
    mags = gradient_magnitudes(*whole, g, d ** -0.5)
    for what, got_g, r, nv in zip(("dq", "dk", "dv"), grads, ref_in, nv_in):
        comps.append(compare(got_g, r.grad, nv.grad, dtype, what, mags[what]))
    return _verdict(comps, dtype, fb.messages())


def _roundtrip(ctx: RankContext) -> None:
    """shard/gather round trips and their gradients. Collective-safe: every rank runs every gather, and the
    mismatches are raised at the end (a rank failing early would leave the others waiting in a collective)."""
    from . import SequenceParallel

    dev = torch.device(ctx.device)
    wrong = []
    for layout in ("contiguous", "zigzag"):
        sp = SequenceParallel(layout=layout)
        for s in (1, 3, 5, 8, 13):
            for dim, shape in ((1, (2, s, 3)), (0, (s, 2))):
                x = torch.arange(float(torch.Size(shape).numel())).reshape(shape).to(dev)
                xl = sp.shard(x, dim).requires_grad_()
                if xl.shape[dim] != sum(b - a for a, b in sp.ranges(s)):
                    wrong.append(f"{layout} S={s} dim={dim}: shard holds {xl.shape[dim]} tokens, ranges say otherwise")
                full = sp.gather(xl, dim)
                if not torch.equal(full.detach(), x):
                    wrong.append(f"{layout} S={s} dim={dim}: gather(shard(x)) != x")
                g = torch.randn(shape, generator=torch.Generator().manual_seed(s)).to(dev)
                (full * g).sum().backward()
                if not torch.equal(xl.grad, sp.shard(g, dim)):
                    wrong.append(f"{layout} S={s} dim={dim}: the gradient of gather is not this rank's shard of it")
        # every token is held by exactly one rank
        for s in (1, 7, 16):
            held = sorted(t for r in range(ctx.world) for a, b in sp.ranges(s, r) for t in range(a, b))
            if held != list(range(s)):
                wrong.append(f"{layout} S={s}: the ranks' ranges do not hold every token exactly once")
    if wrong:
        raise AssertionError(f"{len(wrong)} shard/gather mismatch(es): " + "; ".join(wrong[:4])
                             + ("; ..." if len(wrong) > 4 else ""))


def _expect_raises(exc_type, pattern: str, fn) -> None:
    try:
        fn()
    except exc_type as e:
        if not re.search(pattern, str(e)):
            raise AssertionError(f"{exc_type.__name__} raised, but its message does not match {pattern!r}: {e}") from e
        return
    raise AssertionError(f"no {exc_type.__name__} raised (expected one matching {pattern!r})")


def _raises(opt, ctx: RankContext) -> None:
    import attnlib
    from . import SequenceParallel

    what = opt["what"]
    if what == "hybrid_degree":
        _expect_raises(ValueError, r"ulysses \* ring", lambda: SequenceParallel(ulysses=opt["ulysses"],
                                                                               ring=opt["ring"]))
    elif what == "degree":
        _expect_raises(ValueError, "ulysses", lambda: SequenceParallel(ulysses=opt["ulysses"]))
    elif what == "heads":
        sp = SequenceParallel()
        q = torch.randn(1, 2, opt["hq"], 8).to(ctx.device)
        _expect_raises(ValueError, "does not divide", lambda: attnlib.attention(q, q, q, parallel=sp))
    else:
        raise ValueError(f"case option what={what!r}: unknown (heads, degree, hybrid_degree)")


def run_case(name: str, opt: Mapping, ctx: RankContext):
    """Run one case of the matrix in a spawned process (the :func:`spawn` target :data:`CASE_TARGET`).

    Attention cases return ``{"ratio", "worst", "error_abs", "tol"}``: the worst ``max|error| / tolerance``
    over out, LSE and dq/dk/dv and which one it was (plus ``"skipped"`` when the backend cannot serve the
    call, ``"fallbacks"`` when a step fell back to another backend); a failure raises :class:`CaseFailure`
    with the same numbers. ``ctx.shared["reference"]``: the float64 reference as ``"module:function"``
    (default :data:`DEFAULT_REFERENCE`).
    """
    kind = opt.get("kind", "attn")
    if kind == "attn":
        return _attn(name, opt, ctx)
    if kind == "joint":
        return _joint(name, opt, ctx)
    if kind == "roundtrip":
        return _roundtrip(ctx)
    if kind == "raises":
        return _raises(opt, ctx)
    raise ValueError(f"case {name!r}: kind={kind!r} is unknown (attn, joint, roundtrip, raises)")


def run_matrix(world: int, *, names=None, backends=None, reference: str = DEFAULT_REFERENCE, device: str = "cpu",
               timeout_s: float = DEFAULT_TIMEOUT_S, dist_backend: str | None = None):
    """Run the matrix (or the cases ``names``) on ``world`` processes: ``(matrix, {rank: {case: result}})``.

    ``backends``: run every attention case on each of these attnlib backends instead of its own (the
    names become ``<case>[<backend>]`` when there are several). ``matrix`` is ``{name: options}`` as run.
    """
    matrix = cases(world)
    if names is not None:
        unknown = [n for n in names if n not in matrix]
        if unknown:
            raise ValueError(f"names: unknown case(s) {', '.join(unknown)} for world={world}; valid: "
                             f"{', '.join(matrix)}")
        matrix = {n: o for n, o in matrix.items() if n in names}
    if backends:
        run = {}
        for n, o in matrix.items():
            if o.get("kind", "attn") not in ATTENTION_KINDS:
                run[n] = o
                continue
            for b in backends:
                run[n if len(backends) == 1 else f"{n}[{b}]"] = dict(o, backend=b)
        matrix = run
    resolve_target(reference)
    results = spawn(world, CASE_TARGET, matrix, shared={"reference": reference}, backend=dist_backend, device=device,
                    timeout_s=timeout_s)
    return matrix, results
