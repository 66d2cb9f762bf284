"""Sequence parallelism (attnlib.parallel) against the single-process float64 reference.

Each world size runs ONE set of gloo processes (spawned here, bounded by a timeout, terminated on
failure) that loops over every case; each rank writes its per-case verdicts to a file, and one pytest
test per case reads them, so a failure names its case and rank.
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch

from reference64 import attention64

JOIN_TIMEOUT_S = 150        # the whole spawn (start-up ~5-10 s per process on 2 cores, all cases)

# name: (kind, options). kind "attn": compare out/lse/grads; "roundtrip": shard/gather; "raises": an error
CASES = {
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
        "roundtrip": dict(kind="roundtrip"),
        "err_heads_not_divisible": dict(kind="raises", what="heads"),
        "err_bad_degree": dict(kind="raises", what="degree"),
        "err_hybrid_degree": dict(kind="raises", what="hybrid_degree"),
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
        "roundtrip": dict(kind="roundtrip"),
        "err_heads_not_divisible": dict(kind="raises", what="heads6"),
    },
}


# every attention case also runs under ring attention (SequenceParallel(ring=world))
for _cases in CASES.values():
    for _name, _opt in list(_cases.items()):
        if _opt.get("kind", "attn") == "attn":
            _cases["ring_" + _name] = dict(_opt, ring=True)
for _name, _opt in list(CASES[4].items()):      # and, on 4 ranks, under the hybrid ulysses=2 x ring=2
    if _opt.get("kind", "attn") == "attn" and not _opt.get("ring"):
        CASES[4]["hybrid_" + _name] = dict(_opt, hybrid=True)


# -- the worker (runs in each spawned process) -------------------------------------------------------------
def _inputs(opt, gen):
    from attnlib import BlockDiagonal, Causal, DenseMask, KeyPadding

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
        mask = Causal(align="top_left") if opt.get("sk", sq) != sq else Causal()
    elif m == "window":
        mask = Causal(window=3)
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
        raise AssertionError(m)
    return q, k, v, mask, packed and not opt.get("bshd_batch1")


def _compare(actual, ref, naive, what, magnitude=0.0, dtype=torch.float32):
    from attnlib.testing import compare

    c = compare(actual, ref, naive, dtype, what, magnitude)
    assert c.passed, f"{what}: max error {c.error:.3g} > tolerance {c.tol:.3g} (naive {dtype} error {c.naive:.3g})"


def _run_attn(sp_cls, opt, rank, world):
    import attnlib
    from attnlib.testing import gradient_magnitudes

    gen = torch.Generator().manual_seed(1234)
    q, k, v, mask, thd = _inputs(opt, gen)
    seq_dim = 0 if thd else 1
    want_lse = opt.get("lse", False)
    kw = {"ring": world} if opt.get("ring") else {"ulysses": 2, "ring": world // 2} if opt.get("hybrid") else {}
    sp = sp_cls(layout=opt.get("layout", "contiguous"), **kw)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    local = [sp.shard(t, seq_dim).detach().requires_grad_() for t in leaves]
    if opt.get("module"):
        layer = attnlib.Attention(num_heads=opt["hq"], head_size=q.shape[-1], num_kv_heads=opt["hkv"], causal=True,
                                  backend=opt["backend"])
        got = layer(*local, parallel=sp, return_lse=want_lse)
    else:
        got = attnlib.attention(*local, mask, backend=opt["backend"], parallel=sp, return_lse=want_lse)
    out_local, lse_local = got if want_lse else (got, None)
    out = sp.gather(out_local, seq_dim)
    g = torch.randn(out.shape, generator=gen).to(q.dtype)
    (out * g).sum().backward()
    # a rank whose shard is empty may have no gradient path to it (PyTorch leaves .grad None)
    grads = [sp.gather(t.grad if t.grad is not None else torch.zeros_like(t), seq_dim) for t in local]
    lse = sp.gather(lse_local, -1) if want_lse else None

    packed = q.dim() == 3
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention64(*ref_in, mask, packed=packed)
    (ref_out * g.double()).sum().backward()
    nv_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    nv_out, nv_lse = attention64(*nv_in, mask, packed=packed, dtype=q.dtype)
    (nv_out * g).sum().backward()
    assert out.dtype == q.dtype and (lse is None or lse.dtype == torch.float32)
    _compare(out, ref_out, nv_out, "out", dtype=q.dtype)
    if want_lse:
        _compare(lse, ref_lse, nv_lse, "lse", dtype=q.dtype)
    mags = gradient_magnitudes(q, k, v, g, q.shape[-1] ** -0.5)
    for name, got_g, r, n in zip(("dq", "dk", "dv"), grads, ref_in, nv_in):
        _compare(got_g, r.grad, n.grad, name, mags[name], dtype=q.dtype)
    assert out_local.shape[seq_dim] == len(sum((list(range(a, b)) for a, b in sp.ranges(out.shape[seq_dim])), []))


def _run_roundtrip(sp_cls, rank, world):
    for layout in ("contiguous", "zigzag"):
        sp = sp_cls(layout=layout)
        for s in (1, 3, 5, 8, 13):
            for dim, shape in ((1, (2, s, 3)), (0, (s, 2))):
                x = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
                xl = sp.shard(x, dim).requires_grad_()
                assert xl.shape[dim] == sum(b - a for a, b in sp.ranges(s)), (layout, s)
                full = sp.gather(xl, dim)
                assert torch.equal(full, x), (layout, s, dim)
                g = torch.randn(shape, generator=torch.Generator().manual_seed(s))
                (full * g).sum().backward()
                assert torch.equal(xl.grad, sp.shard(g, dim)), (layout, s, dim)
        # every token is held by exactly one rank
        for s in (1, 7, 16):
            held = sorted(t for r in range(world) for a, b in sp.ranges(s, r) for t in range(a, b))
            assert held == list(range(s)), (layout, s)


def _run_raises(sp_cls, what, world):
    import attnlib

    if what == "hybrid_degree":
        with pytest.raises(ValueError, match="ulysses \\* ring"):
            sp_cls(ulysses=2, ring=2)
    elif what == "degree":
        with pytest.raises(ValueError, match="ulysses"):
            sp_cls(ulysses=3)
    elif what in ("heads", "heads6"):
        hq = 3 if what == "heads" else 6
        sp = sp_cls()
        q = torch.randn(1, 2, hq, 8)
        with pytest.raises(ValueError, match="does not divide"):
            attnlib.attention(q, q, q, parallel=sp)
    else:
        raise AssertionError(what)


def _worker(rank, world, port, result_dir):
    torch.set_num_threads(1)
    import torch.distributed as dist

    results = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        from attnlib.parallel import SequenceParallel

        for name, opt in CASES[world].items():
            t0 = time.perf_counter()
            try:
                kind = opt.get("kind", "attn")
                if kind == "attn":
                    _run_attn(SequenceParallel, opt, rank, world)
                elif kind == "roundtrip":
                    _run_roundtrip(SequenceParallel, rank, world)
                else:
                    _run_raises(SequenceParallel, opt["what"], world)
                results[name] = {"ok": True, "s": time.perf_counter() - t0}
            except BaseException as e:  # noqa: BLE001 - reported to the parent per case
                results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001
        results["__setup__"] = {"ok": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    with open(os.path.join(result_dir, f"rank{rank}.json.tmp"), "w") as f:
        json.dump(results, f)
    os.replace(os.path.join(result_dir, f"rank{rank}.json.tmp"), os.path.join(result_dir, f"rank{rank}.json"))


# -- the parent ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, result_dir: str) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, result_dir), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
    out = {}
    for r in range(world):
        path = os.path.join(result_dir, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                out[r] = json.load(f)
        else:
            out[r] = {"__setup__": {"ok": False, "error": "timed out (terminated)" if r in hung else
                                    f"exited with code {procs[r].exitcode} without results"}}
    return out


_RESULTS: dict = {}


def _results(world: int, tmp_path_factory) -> dict:
    if world not in _RESULTS:
        _RESULTS[world] = _spawn(world, str(tmp_path_factory.mktemp(f"sp{world}")))
    return _RESULTS[world]


@pytest.mark.parametrize("world,case", [(w, c) for w, cases in CASES.items() for c in cases],
                         ids=[f"world{w}-{c}" for w, cases in CASES.items() for c in cases])
def test_sequence_parallel(world, case, tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    results = _results(world, tmp_path_factory)
    errors = []
    for rank, res in sorted(results.items()):
        got = res.get(case) or res.get("__setup__") or {"ok": False, "error": "no result"}
        if not got["ok"]:
            errors.append(f"rank {rank}: {got['error']}")
    assert not errors, "\n".join(errors)


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
