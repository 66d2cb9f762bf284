"""Sequence parallelism (attnlib.parallel) on CPU gloo: bytes moved vs the analytic minimum, step time vs
one process (pytest-benchmark; not run by CI).

    python -m pytest bench/bench_parallel.py -s --benchmark-json=/tmp/parallel.json
    python bench/bench_parallel.py /tmp/parallel.json          # the step-time tables (ratios, breakdown)

Two parts:

* ``test_bytes_moved[world2|world4]`` (a plain test, no timing): spawns ``world`` gloo processes
  (multiprocessing "spawn", a free TCP port, a timeout, one thread each) that wrap the collectives
  attnlib.parallel calls (``dist.all_to_all_single``, ``dist.isend`` -- through ``batch_isend_irecv`` --,
  ``dist.all_gather``, and any other collective, counted as "other") and count the bytes each rank sends to
  *other* ranks during one attention call and its backward. The attention payload and the size exchange
  (the all-gather of the local lengths: int64 tensors of <= 2 elements) are kept apart. Each case is
  compared with the analytic minimum of docs/parallel.md ("The strategies"): the mean over ranks against
  the formula, and every rank against its exact per-rank minimum for the uneven split. It writes the
  table to ``$PARALLEL_BYTES_MD`` (default ``/tmp/attnlib_parallel_bytes.md``) and prints it, and fails
  when any rank sends other than its minimum, or anything through another collective.
* ``test_step[...]`` (benchmarks): one attention step (forward under no_grad, or forward + backward) on
  the whole sequence in this process (the baseline: 1 intra-op thread; also 2 threads) vs the same call
  under Ulysses / ring on 2 gloo ranks with one thread each. The ranks are a pool of 2 persistent
  processes (started once per module by a fixture); the timed function sends "step" to both over pipes
  and waits for both to finish, so each round is one synchronized step of both ranks (plus ~0.1 ms of pipe
  round trip). Inside the ranks every collective is timed (all-to-all, P2P post, P2P wait, all-gather);
  after the timed rounds one extra step runs under torch.profiler to split the rest into attention
  kernels, other aten ops, and what is left (Python, autograd engine, dispatch). The CPU time other
  processes used meanwhile (the machine may be shared) is recorded too. These land in ``extra_info``;
  ``python bench/bench_parallel.py JSON`` prints them. ``test_all_to_all``: gloo's loopback all-to-all of
  one Ulysses shard vs a local copy of the same bytes, for scale.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
import traceback
from collections import defaultdict
from datetime import timedelta

import pytest
import torch

SPAWN_TIMEOUT_S = 300
STEP_TIMEOUT_S = 120
H, D = 8, 64                     # Hq, head dim (Dv = D)
ESIZE = 4                        # fp32


# =================================================================================================
# metering: installed in a worker by monkeypatching torch.distributed (attnlib calls ``dist.<name>``)
# =================================================================================================
class Meter:
    """Bytes this rank sends to other ranks (by kind) and seconds spent inside collectives (by op)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sent = defaultdict(int)          # "payload" | "sizes" | "other:<op>" -> bytes to other ranks
        self.calls = defaultdict(int)         # op -> calls
        self.seconds = defaultdict(float)     # op -> seconds inside the call (P2P: posting and waiting apart)

    def snapshot(self):
        return dict(sent=dict(self.sent), calls=dict(self.calls), seconds=dict(self.seconds))


class _TimedWork:
    """A ``Work`` whose ``wait`` is timed (the P2P time that compute did not hide)."""

    def __init__(self, work, meter, name):
        self._work, self._meter, self._name = work, meter, name

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._meter.seconds[self._name] += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._work, name)


def install_meter(meter: Meter) -> None:
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    def nbytes(t):
        return t.numel() * t.element_size()

    def kind(t):
        return "sizes" if t.dtype == torch.int64 and t.numel() <= 2 else "payload"

    def timed(name, fn, *args, **kwargs):
        meter.calls[name] += 1
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            meter.seconds[name] += time.perf_counter() - t0

    def group_of(args, kwargs, pos):
        return kwargs.get("group", args[pos] if len(args) > pos else None)

    orig = {name: getattr(dist, name) for name in (
        "all_to_all_single", "all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter",
        "reduce_scatter_tensor", "all_to_all", "send", "isend", "batch_isend_irecv", "gather", "scatter", "reduce")}

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        n, me = dist.get_world_size(group), dist.get_rank(group)
        rows = input.shape[0] if input.dim() else 1
        per_row = nbytes(input) // rows if rows else 0
        splits = list(input_split_sizes) if input_split_sizes else [rows // n] * n
        meter.sent[kind(input)] += sum(s for j, s in enumerate(splits) if j != me) * per_row
        return timed("all_to_all_single", orig["all_to_all_single"], output, input, output_split_sizes,
                     input_split_sizes, group=group, async_op=async_op)

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        meter.sent[kind(tensor)] += (dist.get_world_size(group) - 1) * nbytes(tensor)
        return timed("all_gather", orig["all_gather"], tensor_list, tensor, group=group, async_op=async_op)

    def all_gather_into_tensor(output, input, group=None, async_op=False):
        meter.sent[kind(input)] += (dist.get_world_size(group) - 1) * nbytes(input)
        return timed("all_gather_into_tensor", orig["all_gather_into_tensor"], output, input, group=group,
                     async_op=async_op)

    def isend(tensor, *args, **kwargs):
        meter.sent["payload"] += nbytes(tensor)
        return timed("isend", orig["isend"], tensor, *args, **kwargs)

    def send(tensor, *args, **kwargs):
        meter.sent["payload"] += nbytes(tensor)
        return timed("send", orig["send"], tensor, *args, **kwargs)

    def batch_isend_irecv(p2p_op_list):
        works = timed("p2p post", orig["batch_isend_irecv"], p2p_op_list)
        return [_TimedWork(w, meter, "p2p wait") for w in works]

    def other(name, tensor_pos, group_pos):
        def wrapped(*args, **kwargs):
            t = args[tensor_pos] if len(args) > tensor_pos else None
            size = sum(nbytes(x) for x in t) if isinstance(t, (list, tuple)) else nbytes(t) if t is not None else 0
            n = dist.get_world_size(group_of(args, kwargs, group_pos))
            meter.sent[f"other:{name}"] += size * (n - 1) // max(n, 1)
            return timed(name, orig[name], *args, **kwargs)
        return wrapped

    patched = dict(all_to_all_single=all_to_all_single, all_gather=all_gather,
                   all_gather_into_tensor=all_gather_into_tensor, isend=isend, send=send,
                   batch_isend_irecv=batch_isend_irecv,
                   all_reduce=other("all_reduce", 0, 2), broadcast=other("broadcast", 0, 2),
                   reduce=other("reduce", 0, 3), reduce_scatter=other("reduce_scatter", 1, 3),
                   reduce_scatter_tensor=other("reduce_scatter_tensor", 1, 3), all_to_all=other("all_to_all", 1, 2),
                   gather=other("gather", 0, 3), scatter=other("scatter", 1, 3))
    for name, fn in patched.items():
        setattr(dist, name, fn)
        # P2POp validation and batch_isend_irecv look isend up in distributed_c10d: patch it there too, so
        # dist.P2POp(dist.isend, ...) passes the check and its sends are counted
        if name in ("isend", "send"):
            setattr(c10d, name, fn)


# =================================================================================================
# the analytic minimum (docs/parallel.md, "The strategies")
# =================================================================================================
def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def kv_heads_for(hkv: int, u: int) -> int:
    """Ulysses replicates kv heads to lcm(Hkv, u) when u does not divide Hkv."""
    return hkv if hkv % u == 0 else hkv * u // math.gcd(hkv, u)


def exact_minimum(S, n, u, ring, hq, hkv, d=D, b=1, esize=ESIZE):
    """Per rank: (forward bytes, backward bytes) this rank must send to others, for the contiguous split.

    Ulysses of degree u inside groups of u consecutive ranks (u = n: plain Ulysses; u = 1: plain ring),
    ring across the ``ring`` groups. Rank r with s_r tokens in a group of G tokens: forward q, k, v in
    ((u-1)/u of each, per head slice) and out back ((G - s_r) tokens of its heads); ring: the K/V blocks
    of every group but the next (forward, and again in backward), and in backward the float32 K/V-gradient
    accumulators of every group but its own (each travels from its second visitor back to its owner).
    """
    s = split(S, n)
    hkv_e = kv_heads_for(hkv, u)
    groups = [sum(s[i * u:(i + 1) * u]) for i in range(ring)]
    out = []
    for r in range(n):
        i = r // u
        G = groups[i]
        fwd = bwd = grad32 = 0
        if u > 1:
            fwd += s[r] * (u - 1) * (hq // u) * d + 2 * s[r] * (u - 1) * (hkv_e // u) * d     # q, k, v in
            fwd += (G - s[r]) * (hq // u) * d                                                   # out back
            bwd += s[r] * (u - 1) * (hq // u) * d                                               # dout in
            bwd += (G - s[r]) * (hq // u) * d + 2 * (G - s[r]) * (hkv_e // u) * d               # dq, dk, dv back
        if ring > 1:
            heads = hkv_e // u
            kv_blocks = sum(groups[m] for m in range(ring) if m != (i + 1) % ring) * heads * 2 * d
            fwd += kv_blocks
            bwd += kv_blocks
            grad32 += sum(groups[m] for m in range(ring) if m != i) * heads * 2 * d
        out.append((fwd * b * esize, bwd * b * esize + grad32 * b * 4))
    return out


def doc_formula(S, n, u, ring, hq, hkv, d=D, b=1, esize=ESIZE):
    """The formulas of docs/parallel.md (mean over ranks): ``(forward bytes, backward bytes)``."""
    hkv_e = kv_heads_for(hkv, u)
    ulysses = (u - 1) / u * b * (S / n) * (hq * d + 2 * hkv_e * d + hq * d) if u > 1 else 0.0
    ring_t = (ring - 1) * b * (S / ring) * (hkv_e / u) * 2 * d if ring > 1 else 0.0
    return (ulysses + ring_t) * esize, (ulysses + ring_t) * esize + ring_t * 4


# =================================================================================================
# part 1: bytes moved (one spawn per world size, all cases)
# =================================================================================================
STRATEGIES = {2: {"ulysses": (2, 1), "ring": (1, 2)}, 4: {"ulysses": (4, 1), "ring": (1, 4), "hybrid 2x2": (2, 2)}}
BYTES_CASES = [dict(S=S, hkv=hkv, mask=mask) for S in (2048, 3001) for hkv in (8, 2) for mask in ("none", "causal")]


def _mask(name):
    from attnlib import Causal

    return None if name == "none" else Causal()


def _sp(u, ring, layout="contiguous"):
    from attnlib.parallel import SequenceParallel

    return SequenceParallel(ulysses=u, ring=ring, layout=layout)


def _bytes_worker(rank, world, port, queue):
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        import attnlib

        meter = Meter()
        install_meter(meter)
        results = []
        for strategy, (u, ring) in STRATEGIES[world].items():
            sp = _sp(u, ring)                  # the hybrid's subgroups are created here, outside the counts
            for case in BYTES_CASES:
                gen = torch.Generator().manual_seed(0)
                q = torch.randn(1, case["S"], H, D, generator=gen)
                k = torch.randn(1, case["S"], case["hkv"], D, generator=gen)
                v = torch.randn(1, case["S"], case["hkv"], D, generator=gen)
                ql, kl, vl = (sp.shard(t, 1).detach().requires_grad_() for t in (q, k, v))
                dist.barrier()
                meter.reset()
                t0 = time.perf_counter()
                out = attnlib.attention(ql, kl, vl, _mask(case["mask"]), backend="sdpa", parallel=sp)
                fwd = meter.snapshot()
                meter.reset()
                torch.autograd.grad(out, (ql, kl, vl), torch.ones_like(out))
                bwd = meter.snapshot()
                results.append(dict(case, strategy=strategy, u=u, ring=ring, fwd=fwd, bwd=bwd,
                                    seconds=time.perf_counter() - t0))
        dist.destroy_process_group()
        queue.put((rank, results, None))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put((rank, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_bytes(world):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_bytes_worker, args=(r, world, port, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got, errors = {}, []
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while len(got) + len(errors) < world:
            rank, res, err = queue.get(timeout=max(1.0, deadline - time.monotonic()))
            if err:
                errors.append(f"rank {rank}: {err}")
            else:
                got[rank] = res
    finally:
        for p in procs:
            p.join(max(0.0, min(10.0, deadline - time.monotonic())))
            if p.is_alive():
                p.terminate()
                p.join(5)
    assert not errors, "\n".join(errors)
    return got


def _bytes_rows(world, got):
    rows = []
    for idx, case in enumerate(got[0]):
        u, ring, S, hkv = case["u"], case["ring"], case["S"], case["hkv"]
        exact = exact_minimum(S, world, u, ring, H, hkv)
        per_rank = [got[r][idx] for r in range(world)]
        row = dict(strategy=case["strategy"], n=world, S=S, hkv=hkv, mask=case["mask"])
        for phase, p in (("fwd", 0), ("bwd", 1)):
            payload = [pr[phase]["sent"].get("payload", 0) for pr in per_rank]
            sizes = [pr[phase]["sent"].get("sizes", 0) for pr in per_rank]
            other = [sum(v for k2, v in pr[phase]["sent"].items() if k2.startswith("other")) for pr in per_rank]
            excess = [payload[r] - exact[r][p] for r in range(world)]
            row[phase] = dict(payload=statistics.mean(payload), sizes=statistics.mean(sizes),
                              other=statistics.mean(other), doc=doc_formula(S, world, u, ring, H, hkv)[p],
                              exact=statistics.mean(e[p] for e in exact), excess=excess,
                              ok=all(e == 0 for e in excess) and not any(other),
                              calls={op: statistics.mean(pr[phase]["calls"].get(op, 0) for pr in per_rank)
                                     for op in sorted({op for pr in per_rank for op in pr[phase]["calls"]})})
        rows.append(row)
    return rows


def _fmt_bytes(x):
    return f"{x / 2**20:.3f} MiB" if x >= 2**20 else f"{x:.0f} B"


def bytes_table(rows) -> str:
    """One line per (strategy, n, S, Hkv); the masks share a line when their counts are identical."""
    merged = {}
    for row in rows:
        key = (row["strategy"], row["n"], row["S"], row["hkv"])
        sig = tuple((row[ph]["payload"], row[ph]["sizes"], tuple(row[ph]["excess"])) for ph in ("fwd", "bwd"))
        for have in merged.setdefault(key, []):
            if have[0] == sig:
                have[1]["mask"] += " = " + row["mask"]
                break
        else:
            merged[key].append((sig, dict(row)))
    lines = ["| strategy | n | S | Hkv (sent as) | mask | fwd: measured / rank | fwd: analytic | fwd: ratio | "
             "bwd: measured / rank | bwd: analytic | bwd: ratio | size exchange / rank / call | "
             "fwd (payload + sizes) / analytic | bytes over each rank's exact minimum (fwd) | calls / rank: fwd; bwd |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for entries in merged.values():
        for _, row in entries:
            u = STRATEGIES[row["n"]][row["strategy"]][0]
            sent_as = kv_heads_for(row["hkv"], u) if u > 1 else row["hkv"]
            hk = f"{row['hkv']}" + (f" ({sent_as})" if sent_as != row["hkv"] else "")
            f, b = row["fwd"], row["bwd"]
            over = []
            for ph in (f, b):
                over.append("0" if not any(ph["excess"]) else
                            ("+" + _fmt_bytes(ph["excess"][0]) + " each") if len(set(ph["excess"])) == 1 else
                            " / ".join(f"{e:+d}" for e in ph["excess"]))
            calls = "; ".join(", ".join(f"{op} {c:g}" for op, c in ph["calls"].items() if op != "p2p post")
                              for ph in (f, b))
            lines.append(
                f"| {row['strategy']} | {row['n']} | {row['S']} | {hk} | {row['mask']} | "
                f"{_fmt_bytes(f['payload'])} | {_fmt_bytes(f['doc'])} | {f['payload'] / f['doc']:.4f} | "
                f"{_fmt_bytes(b['payload'])} | {_fmt_bytes(b['doc'])} | {b['payload'] / b['doc']:.4f} | "
                f"{_fmt_bytes(f['sizes'] + b['sizes'])} | {(f['payload'] + f['sizes']) / f['doc']:.6f} | "
                f"{over[0]}" + ("" if over[1] == "0" else f" (bwd {over[1]})") + f" | {calls} |")
    return "\n".join(lines)


@pytest.mark.parametrize("world", [2, 4], ids=["world2", "world4"])
def test_bytes_moved(world):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    t0 = time.perf_counter()
    rows = _bytes_rows(world, _spawn_bytes(world))
    table = bytes_table(rows)
    path = os.environ.get("PARALLEL_BYTES_MD", "/tmp/attnlib_parallel_bytes.md")
    with open(path, "a" if world != 2 else "w") as f:
        f.write(f"\n<!-- world {world}: {time.perf_counter() - t0:.1f} s -->\n{table}\n")
    print(f"\n{table}\n(world {world}: {time.perf_counter() - t0:.1f} s; written to {path})")
    bad = [f"{row['strategy']} n={row['n']} S={row['S']} hkv={row['hkv']} {row['mask']} {phase}: bytes over the exact "
           f"minimum per rank {row[phase]['excess']}, other collectives {row[phase]['other']} B"
           for row in rows for phase in ("fwd", "bwd") if not row[phase]["ok"]]
    assert not bad, "\n".join(bad)


# =================================================================================================
# part 2: step time, 2 gloo ranks (persistent pool) vs one process
# =================================================================================================
WORLD = 2
STEP_SHAPES = (2048, 8192)
ROUNDS = {2048: (10, 2), 8192: (3, 0)}      # (timed rounds, warm-up rounds); 8192: an untimed prepare + median of 3
PARALLEL_VARIANTS = {                       # name: (ulysses, ring, layout)
    "Ulysses, 2 ranks x 1 thread": (2, 1, "contiguous"),
    "ring, 2 ranks x 1 thread": (1, 2, "contiguous"),
    "ring zigzag, 2 ranks x 1 thread": (1, 2, "zigzag"),
}
A2A_BYTES = 8 * 2**20                       # one Ulysses q shard at S=8192 (4096 x 8 x 64 fp32): half goes off-rank


def _inputs(S, hkv=H):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, S, H, D, generator=gen)
    k = torch.randn(1, S, hkv, D, generator=gen)
    v = torch.randn(1, S, hkv, D, generator=gen)
    g = torch.randn(1, S, H, D, generator=gen)
    return q, k, v, g


def _step(q, k, v, g, mask, backward, sp=None):
    import attnlib

    if not backward:
        with torch.no_grad():
            return attnlib.attention(q, k, v, mask, backend="sdpa", parallel=sp)
    out = attnlib.attention(q, k, v, mask, backend="sdpa", parallel=sp)
    return torch.autograd.grad(out, (q, k, v), g)


def _is_comm_event(key: str) -> bool:
    key = key.lower()
    return any(s in key for s in ("gloo", "c10d", "record_param_comms", "all_to_all", "allgather", "all_gather",
                                  "send", "recv", "barrier"))


def profile_breakdown(fn) -> dict:
    """One call of ``fn`` under torch.profiler: seconds (self CPU time) in attention kernels (and how many
    kernel calls), in other aten ops (collective ops excluded), and the wall time of the profiled call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    kern = aten = 0.0
    calls = 0
    for e in prof.key_averages():
        if _is_comm_event(e.key):
            continue
        t = e.self_cpu_time_total / 1e6
        if e.key.startswith("aten::_scaled_dot_product") or "flash_attention" in e.key:
            kern += t
            calls += e.count if "backward" not in e.key else 0
        elif "scaled_dot_product" in e.key:
            kern += t                       # the dispatching wrapper (aten::scaled_dot_product_attention)
        elif e.key.startswith("aten::"):
            aten += t
    return dict(wall=wall, kernels=kern, kernel_calls=calls, other_aten=aten)


# -- CPU used by other processes while a benchmark runs (the machine is shared) -----------------------------
def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:9]]
    return sum(vals) - vals[3] - vals[4]          # all but idle and iowait


def _proc_jiffies(pids) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])     # utime + stime (all threads)
        except OSError:
            pass
    return total


def _pool_worker(rank, world, port, conn):
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=STEP_TIMEOUT_S))
        meter = Meter()
        install_meter(meter)
        sps, current = {}, None
        conn.send(("ready", None))
        while True:
            cmd, key = conn.recv()
            try:
                if cmd == "quit":
                    break
                if current is None or current[0] != key:
                    current = None                     # free the previous case's tensors first
                    if key[0] == "a2a":
                        x = torch.randn(key[1] // 4)
                        current = (key, x, torch.empty_like(x))
                    else:
                        _, variant, S, mask_name, backward = key
                        u, ring, layout = PARALLEL_VARIANTS[variant]
                        if (u, ring, layout) not in sps:
                            sps[(u, ring, layout)] = _sp(u, ring, layout)
                        sp = sps[(u, ring, layout)]
                        q, k, v, g = _inputs(S)
                        shards = [sp.shard(t, 1).detach().contiguous().requires_grad_(backward) for t in (q, k, v)]
                        current = (key, sp, shards, sp.shard(g, 1).contiguous(), _mask(mask_name), backward)
                if key[0] == "a2a":
                    _, x, y = current
                    run_once = lambda: dist.all_to_all_single(y, x)            # noqa: E731
                else:
                    _, sp, (ql, kl, vl), gl, mask, backward = current
                    run_once = lambda: _step(ql, kl, vl, gl, mask, backward, sp)  # noqa: E731
                dist.barrier()                             # both ranks start the step together
                meter.reset()
                if cmd == "prepare":
                    conn.send(("ok", None))
                elif cmd == "step":
                    t0 = time.perf_counter()
                    run_once()
                    conn.send(("ok", dict(wall=time.perf_counter() - t0, seconds=dict(meter.seconds))))
                elif cmd == "profile":
                    got = profile_breakdown(run_once)
                    conn.send(("ok", dict(got, comm=sum(meter.seconds.values()))))
                else:
                    raise ValueError(cmd)
            except BaseException as e:  # noqa: BLE001
                conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001
        try:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        except Exception:  # noqa: BLE001
            pass


class Pool:
    """WORLD persistent gloo ranks; ``ask`` sends one command to every rank and returns their replies."""

    def __init__(self, world=WORLD):
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.conns, self.procs = [], []
        for r in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_pool_worker, args=(r, world, port, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        self._collect(SPAWN_TIMEOUT_S)

    def _collect(self, timeout):
        deadline = time.monotonic() + timeout
        replies, errors = [], []
        for r, c in enumerate(self.conns):
            if not c.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"rank {r} did not answer within {timeout} s")
            try:
                status, val = c.recv()
            except EOFError:
                raise RuntimeError(f"rank {r} exited (code {self.procs[r].exitcode}) without answering") from None
            (errors if status == "error" else replies).append(f"rank {r}: {val}" if status == "error" else val)
        if errors:
            raise RuntimeError("\n".join(errors))
        return replies

    def ask(self, cmd, arg=None, timeout=STEP_TIMEOUT_S):
        for c in self.conns:
            c.send((cmd, arg))
        return self._collect(timeout)

    def close(self):
        for c in self.conns:
            try:
                c.send(("quit", None))
            except Exception:  # noqa: BLE001
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)


@pytest.fixture(scope="module")
def pool():
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    p = Pool()
    yield p
    p.close()


@pytest.fixture
def foreign_cpu(pool, benchmark):
    """Records the CPU seconds that processes other than this benchmark's used while it ran."""
    pids = [os.getpid()] + [p.pid for p in pool.procs]
    hz = os.sysconf("SC_CLK_TCK")
    busy0, own0, t0 = _busy_jiffies(), _proc_jiffies(pids), time.monotonic()
    load0 = os.getloadavg()[0]
    yield
    busy, own = _busy_jiffies() - busy0, _proc_jiffies(pids) - own0
    benchmark.extra_info.update(wall_s=time.monotonic() - t0, own_cpu_s=own / hz, foreign_cpu_s=max(0, busy - own) / hz,
                                load_before=load0, load_after=os.getloadavg()[0])


STEP_VARIANTS = ["1 process, 1 thread", "1 process, 2 threads"] + list(PARALLEL_VARIANTS)
STEP_CASES = [(backward, mask, S, variant) for backward in (False, True) for mask in ("none", "causal")
              for S in STEP_SHAPES for variant in STEP_VARIANTS
              if not (variant.startswith("ring zigzag") and mask == "none")]    # zigzag only matters for causal


def _group(backward, mask, S):
    return f"{'fwd+bwd' if backward else 'fwd'} {mask} S={S} (B1 H8 D64 fp32, sdpa)"


def _per_rank(steps):
    out = []
    for r in range(WORLD):
        ops = defaultdict(list)
        for st in steps:
            for op, sec in st[r]["seconds"].items():
                ops[op].append(sec)
        out.append(dict(wall=statistics.median(st[r]["wall"] for st in steps),
                        comm=statistics.median(sum(st[r]["seconds"].values()) for st in steps),
                        ops={op: statistics.median(v) for op, v in ops.items()}))
    return out


def _in_one_process(benchmark, threads, fn, rounds, warmup, group, variant):
    from harness import run

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run(benchmark, group, variant, fn, baseline=threads == 1, rounds=rounds, warmup_rounds=warmup)
        prof = profile_breakdown(fn)
    finally:
        torch.set_num_threads(before)
    benchmark.extra_info.update(threads=threads, profile=[dict(prof, comm=0.0)])


def _on_the_ranks(benchmark, pool, key, rounds, warmup, group, variant):
    from harness import run

    pool.ask("prepare", key)
    steps = []
    run(benchmark, group, variant, lambda: steps.append(pool.ask("step", key)), rounds=rounds, warmup_rounds=warmup)
    benchmark.extra_info.update(ranks=_per_rank(steps[warmup:]), profile=pool.ask("profile", key))


@pytest.mark.parametrize("backward,mask,S,variant", STEP_CASES,
                         ids=[f"{'fb' if b else 'f'}-{m}-{s}-{v.split(',')[0].replace(' ', '_')}"
                              + ("-2t" if v.endswith("2 threads") else "") for b, m, s, v in STEP_CASES])
def test_step(benchmark, pool, foreign_cpu, backward, mask, S, variant):
    rounds, warmup = ROUNDS[S]
    group = _group(backward, mask, S)
    if variant.startswith("1 process"):
        q, k, v, g = _inputs(S)
        q, k, v = (t.requires_grad_(backward) for t in (q, k, v))
        m = _mask(mask)
        _in_one_process(benchmark, 1 if "1 thread" in variant else 2, lambda: _step(q, k, v, g, m, backward),
                        rounds, warmup, group, variant)
    else:
        _on_the_ranks(benchmark, pool, ("attn", variant, S, mask, backward), rounds, warmup, group, variant)


A2A_GROUP = f"gloo loopback: all_to_all_single of {A2A_BYTES // 2**20} MiB per rank (half off-rank)"


@pytest.mark.parametrize("variant", ["1 process, 1 thread: copy_ of the same bytes", "gloo all_to_all_single, 2 ranks"])
def test_all_to_all(benchmark, pool, foreign_cpu, variant):
    if variant.startswith("1 process"):
        x = torch.randn(A2A_BYTES // 4)
        y = torch.empty_like(x)
        _in_one_process(benchmark, 1, lambda: y.copy_(x), 20, 3, A2A_GROUP, variant)
    else:
        _on_the_ranks(benchmark, pool, ("a2a", A2A_BYTES), 20, 3, A2A_GROUP, variant)


# =================================================================================================
# the step-time report (python bench/bench_parallel.py JSON)
# =================================================================================================
def step_report(path) -> str:
    import json

    data = json.load(open(path))
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        if b.get("group"):
            groups[b["group"]].append(b)
    lines = ["| group | variant | median (ms) | vs 1 process 1 thread | vs 1 process 2 threads | "
             "step inside the ranks, rank 0 / 1 (ms) | in collectives, rank 0 / 1 (ms) | of which P2P wait (ms) | "
             "profiled step: attention kernels (ms, calls) | other aten ops (ms) | "
             "rest: Python, autograd, dispatch (ms) | other processes' CPU (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for group, rows in groups.items():
        by = {r["extra_info"]["variant"]: r for r in rows}
        one = next((r for r in rows if r["extra_info"].get("baseline")), None)
        two = by.get("1 process, 2 threads")
        for r in sorted(rows, key=lambda r: (not r["extra_info"].get("baseline"), r["name"] != (two or {}).get("name"),
                                             r["name"])):
            med = r["stats"]["median"]
            ex = r["extra_info"]
            ratio1 = "baseline" if r is one else f"{med / one['stats']['median']:.2f}x" if one else ""
            ratio2 = "—" if r is two else f"{med / two['stats']['median']:.2f}x" if two else "—"
            if "ranks" in ex:
                inside = " / ".join(f"{rk['wall'] * 1e3:.1f}" for rk in ex["ranks"])
                comm = " / ".join(f"{rk['comm'] * 1e3:.1f}" for rk in ex["ranks"])
                wait = " / ".join(f"{rk['ops'].get('p2p wait', 0.0) * 1e3:.1f}" for rk in ex["ranks"])
            else:
                inside = comm = wait = "—"
            prof = ex.get("profile") or []
            p = max(prof, key=lambda x: x["wall"]) if prof else None          # the slowest rank's profiled step
            if p:
                rest = p["wall"] - p["kernels"] - p["other_aten"] - p["comm"]
                kern = f"{p['kernels'] * 1e3:.1f} ({p['kernel_calls']})"
                aten, rest = f"{p['other_aten'] * 1e3:.1f}", f"{rest * 1e3:.1f}"
            else:
                kern = aten = rest = ""
            foreign = f"{ex['foreign_cpu_s']:.1f} of {ex['wall_s']:.0f} s" if "foreign_cpu_s" in ex else ""
            lines.append(f"| {group} | {ex['variant']} | {med * 1e3:.1f} | {ratio1} | {ratio2} | {inside} | {comm} | "
                         f"{wait} | {kern} | {aten} | {rest} | {foreign} |")
    loads = [b["extra_info"][k] for b in data["benchmarks"] for k in ("load_before", "load_after")
             if k in b["extra_info"]]
    if loads:
        lines += ["", f"1-minute load average at the start/end of each benchmark: {min(loads):.2f} .. {max(loads):.2f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(step_report(sys.argv[1]))
