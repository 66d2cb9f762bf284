"""Sequence parallelism at the model level, in spawned gloo processes (attnlib.parallel.conformance.spawn).

(The attention-level matrix, ``SequenceParallel.joint_attention`` included, is tests/test_parallel.py.)

* ``qwen_image`` / ``bagel``: the reference model blocks under SP equal one process: the SP run's
  error against the float64 one-process model is within the policy of the one-process run's error in
  the same dtype (forward, and the input gradients for QwenImage).
* ``vllm``: the vLLM-Omni layer with ``ulysses_degree`` / ``ring_degree`` equals the local layer.
* ``group_hybrid``: the hybrid over a process group other than the default one.
* ``lengths``: with the whole lengths known (mask or ``with_seqlens``) no lengths are exchanged; a
  wrong ``with_seqlens`` raises on the ranks it does not fit.
"""
from __future__ import annotations

import copy

import pytest
import torch

from reference64 import attention64

TARGET = "test_parallel_models:run"
SP = {"ulysses": {}, "ring": {"ring": None}, "hybrid": {"ulysses": 2, "ring": None}}

CASES: dict[int, dict[str, dict]] = {2: {}, 4: {}}
for _world in (2, 4):
    _strategies = ("ulysses", "ring") + (("hybrid",) if _world == 4 else ())
    for _st in _strategies:
        if _st != "ulysses" or _world == 2:      # the tiny QwenImage has 2 heads: no Ulysses over 4 ranks
            CASES[_world][f"qwen_image_{_st}_cfg_padded"] = dict(kind="qwen_image", sp=_st)
            CASES[_world][f"qwen_image_{_st}_zero_cond_t"] = dict(kind="qwen_image", sp=_st, zero_cond_t=True)
        CASES[_world][f"bagel_{_st}_packed_causal"] = dict(kind="bagel", sp=_st, cache=False)
        CASES[_world][f"bagel_{_st}_cfg_with_caches"] = dict(kind="bagel", sp=_st, cache=True)
        CASES[_world][f"vllm_{_st}_joint_front"] = dict(kind="vllm", sp=_st, meta="joint_front")
        CASES[_world][f"vllm_{_st}_joint_rear_causal"] = dict(kind="vllm", sp=_st, meta="joint_rear", causal=True)
        CASES[_world][f"vllm_{_st}_attn_mask"] = dict(kind="vllm", sp=_st, meta="attn_mask")
        CASES[_world][f"vllm_{_st}_cu_seqlens"] = dict(kind="vllm", sp=_st, meta="cu_seqlens", causal=True)
    CASES[_world]["lengths_known_no_exchange"] = dict(kind="lengths")
    CASES[_world]["readme_example"] = dict(kind="readme")
    for _st in _strategies:
        CASES[_world][f"lse_in_the_loss_{_st}"] = dict(kind="lse_loss", sp=_st)
CASES[4]["group_hybrid_non_default"] = dict(kind="group_hybrid")


# -- helpers (run in every spawned process) -------------------------------------------------------------------
def _sp(name: str, world: int, **kw):
    from attnlib.parallel import SequenceParallel

    args = {k: (world if v is None else v) for k, v in SP[name].items()}
    if name == "hybrid":
        args["ring"] = world // 2
    return SequenceParallel(**args, **kw)


def _check(actual, ref64, naive, what, dtype, magnitude=0.0):
    from attnlib.testing import compare

    c = compare(actual, ref64, naive, dtype, what, magnitude)
    assert c.passed, f"{what}: max error {c.error:.3g} > tolerance {c.tol:.3g} (one-process {dtype} error {c.naive:.3g})"
    return c.error / c.tol if c.tol else 0.0


def _one_process_and_sp(fn, ctx, dtype=torch.float32):
    """``fn(dtype, parallel)`` -> dict of tensors; checks SP(dtype) against one process in float64 under the
    policy (the one-process run in ``dtype`` is the naive error)."""
    ref = fn(torch.float64, None)
    naive = fn(dtype, None)
    got = fn(dtype, "sp")
    worst = []
    for name in ref:
        assert got[name].shape == ref[name].shape, (name, got[name].shape, ref[name].shape)
        worst.append(_check(got[name], ref[name], naive[name], name, dtype))
    return {"worst": max(worst)}


def _qwen_image(opt, ctx):
    from models_ref.parity import QWEN_IMAGE_CONFIG, qwen_image_inputs
    from models_ref.qwen_image import QwenImageTransformer2DModel

    torch.manual_seed(0)
    cfg = dict(QWEN_IMAGE_CONFIG, zero_cond_t=opt.get("zero_cond_t", False))
    base = QwenImageTransformer2DModel(**cfg).eval()
    torch.nn.init.normal_(base.proj_out.weight, std=0.2)
    sp = _sp(opt["sp"], ctx.world)
    grids = [(1, 2, 3), (1, 2, 2)] if opt.get("zero_cond_t") else [(1, 4, 5)]
    s_img = sum(f * h * w for f, h, w in grids)

    def fn(dtype, parallel):
        x, e, m, t, _ = qwen_image_inputs(dtype, batch_valid=(7, 3), width=7, grid=(1, 1, s_img), seed=1)
        x, e = x.requires_grad_(), e.requires_grad_()
        model = copy.deepcopy(base).to(dtype)
        out = model(x, e, m, t, [grids] * x.shape[0], parallel=sp if parallel else None)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
        (out * dout).sum().backward()
        dx = x.grad
        if parallel:                       # the image input's gradient: each rank holds its shard's part
            dx = dx.clone()
            torch.distributed.all_reduce(dx)
        return {"out": out.detach(), "d_hidden_states": dx, "d_encoder_hidden_states": e.grad}

    return _one_process_and_sp(fn, ctx)


def _bagel(opt, ctx):
    from models_ref.bagel import BagelKVCache, BagelPositions, PackedAttentionMoT
    from models_ref.parity import BAGEL_CONFIG, seeded_block

    base = seeded_block(PackedAttentionMoT, BAGEL_CONFIG, 3, std=0.25)
    sp = _sp(opt["sp"], ctx.world)
    hid = BAGEL_CONFIG["hidden_size"]

    def fn(dtype, parallel):
        g = torch.Generator().manual_seed(4)
        m = copy.deepcopy(base).to(dtype)
        par = sp if parallel else None
        if not opt["cache"]:
            seqlens = [3, 6, 4]
            x = torch.randn(sum(seqlens), hid, generator=g).to(dtype).requires_grad_()
            pos = torch.cat([torch.arange(n) for n in seqlens])
            out = m(x, seqlens, pos, None, causal=True, parallel=par)
            (out * torch.randn(out.shape, generator=g).to(dtype)).sum().backward()
            dx = x.grad.clone()
            if parallel:                   # each rank's gradient covers the tokens it projected
                torch.distributed.all_reduce(dx)
            return {"out": out.detach(), "dx": dx}
        caches, positions = [], []
        for n_ctx in (9, 3, 6):                  # CFG: full, text-dropped, image-dropped contexts
            c, p = BagelKVCache.empty(1), BagelPositions()
            m(torch.randn(n_ctx, hid, generator=g).to(dtype), [n_ctx], p.text(n_ctx), c, causal=True, parallel=par)
            caches.append(c)
            positions.append(p)
        n_t = 5
        target = torch.randn(n_t, hid, generator=g).to(dtype).requires_grad_()
        gen = torch.ones(n_t, dtype=torch.bool)
        gen[0] = gen[-1] = False
        out = m(torch.cat([target] * 3), [n_t] * 3, torch.cat([p.noised_image(n_t) for p in positions]),
                BagelKVCache.cat(caches), causal=False, gen=gen.repeat(3), update_cache=False, parallel=par)
        (out * torch.randn(out.shape, generator=g).to(dtype)).sum().backward()
        dt = target.grad.clone()
        if parallel:
            torch.distributed.all_reduce(dt)
        return {"out": out.detach(), "d_target": dt, "cache_keys": torch.cat([c.keys[0] for c in caches]).detach()}

    return _one_process_and_sp(fn, ctx)


def _vllm(opt, ctx):
    from attnlib.integrations.vllm_omni import Attention, AttentionMetadata

    H, Hkv, D, B, S, T = 4, 2, 8, 2, 10, 3
    g = torch.Generator().manual_seed(5)
    kind = opt["meta"]
    packed = kind == "cu_seqlens"
    shape_q, shape_k = ((1, S, H, D), (1, S, Hkv, D)) if packed else ((B, S, H, D), (B, S, Hkv, D))
    q, k, v = torch.randn(shape_q, generator=g), torch.randn(shape_k, generator=g), torch.randn(shape_k, generator=g)
    meta = AttentionMetadata()
    if kind.startswith("joint"):
        meta.joint_query = torch.randn(q.shape[0], T, H, D, generator=g)
        meta.joint_key = torch.randn(q.shape[0], T, Hkv, D, generator=g)
        meta.joint_value = torch.randn(q.shape[0], T, Hkv, D, generator=g)
        meta.joint_strategy = kind.split("_")[1]
        meta.joint_attn_mask = torch.rand(B, T, generator=g) > 0.3
    elif kind == "attn_mask":
        meta.attn_mask = torch.rand(B, S, generator=g) > 0.3
    else:
        meta.cu_seqlens_q = meta.cu_seqlens_k = torch.tensor([0, 4, 5, S], dtype=torch.int32)
    causal = opt.get("causal", False)
    local = Attention(H, D, causal, None, Hkv, backend="sdpa")
    want = local(q, k, v, meta)
    st = opt["sp"]
    degrees = dict(ulysses_degree=2 if st == "hybrid" else (ctx.world if st == "ulysses" else 1),
                   ring_degree=ctx.world // 2 if st == "hybrid" else (ctx.world if st == "ring" else 1))
    layer = Attention(H, D, causal, None, Hkv, backend="sdpa", **degrees)
    sp = layer.sequence_parallel
    got = layer(sp.shard(q, 1), sp.shard(k, 1), sp.shard(v, 1), meta)
    if kind.startswith("joint"):
        mine = got.shape[1] - T
        front = meta.joint_strategy == "front"
        o_t, o_i = (got[:, :T], got[:, T:]) if front else (got[:, mine:], got[:, :mine])
        full_i = sp.gather(o_i, 1)
        got = torch.cat([o_t, full_i] if front else [full_i, o_t], 1)
    else:
        got = sp.gather(got, 1)
    err = (got - want).abs().max().item()
    assert err < 1e-5, f"the sequence-parallel layer differs from the local one by {err:.3g}"
    return {"worst": err / 1e-5}


def _lengths(opt, ctx):
    import attnlib
    import attnlib.parallel.comm as comm
    from attnlib import BlockDiagonal, Causal

    sp = _sp("ulysses", ctx.world)
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 12, 4, 8, generator=g)
    packed = torch.randn(12, 4, 8, generator=g)
    want_causal = attnlib.attention(sp.shard(q), sp.shard(q), sp.shard(q), Causal(), parallel=sp)
    want_bd = attnlib.attention(*(sp.shard(packed, 0),) * 3, BlockDiagonal([5, 7], causal=True), parallel=sp)
    real = comm.all_gather_sizes

    def trap(*a, **kw):
        raise AssertionError("the local lengths were exchanged although the whole lengths were known")

    comm.all_gather_sizes = trap
    try:
        for ring in (False, True):
            s = _sp("ring", ctx.world) if ring else sp
            hinted = s.with_seqlens(12)
            got = attnlib.attention(*(s.shard(q),) * 3, Causal(), parallel=hinted)
            assert torch.allclose(got, want_causal, atol=1e-6), "with_seqlens changed the result"
            got = attnlib.attention(*(s.shard(packed, 0),) * 3, BlockDiagonal([5, 7], causal=True), parallel=s)
            assert torch.allclose(got, want_bd, atol=1e-6), "lengths from the mask changed the result"
            full = s.gather(got, 0, total=12)
            assert full.shape[0] == 12
    finally:
        comm.all_gather_sizes = real
    # a length that fits no rank's shard: every rank raises (12 tokens sharded, 12 + world claimed)
    with pytest.raises(ValueError, match="shard every tensor with SequenceParallel.shard"):
        attnlib.attention(*(sp.shard(q),) * 3, Causal(), parallel=sp.with_seqlens(12 + ctx.world))
    with pytest.raises(ValueError, match="seqlen_q"):
        sp.with_seqlens(-1)


def _group_hybrid(opt, ctx):
    import torch.distributed as dist

    import attnlib
    from attnlib import Causal
    from attnlib.parallel import SequenceParallel

    group = dist.new_group(list(range(ctx.world)))
    sp = SequenceParallel(ulysses=2, ring=ctx.world // 2, group=group, layout="zigzag")
    again = SequenceParallel(ulysses=2, ring=ctx.world // 2, group=group)       # subgroups are reused
    assert (again.ulysses_group, again.ring_group) == (sp.ulysses_group, sp.ring_group)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 11, 4, 8, generator=g) for _ in range(3))
    got = sp.gather(attnlib.attention(sp.shard(q), sp.shard(k), sp.shard(v), Causal(), parallel=sp, backend="sdpa"))
    ref, _ = attention64(q.double(), k.double(), v.double(), Causal())
    nv, _ = attention64(q, k, v, Causal(), dtype=torch.float32)
    return {"worst": _check(got, ref, nv, "out", torch.float32)}


def _readme(opt, ctx):
    """The README's sequence-parallel script runs as written on this world size (its process-group set-up and
    tear-down lines left out: the harness owns the group; tests/test_readme.py runs the whole script, exits
    included) and equals the one-process call."""
    import pathlib

    import attnlib
    from attnlib import Causal

    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("```python\nimport torch, torch.distributed as dist, attnlib") + len("```python\n")
    lines = text[start:text.index("```", start)].splitlines()
    code = "\n".join(line for line in lines if not line.startswith(("dist.init_process_group(",
                                                                    "dist.destroy_process_group(")))
    assert len(lines) - code.count("\n") - 1 == 2, "the README script's group set-up / tear-down lines moved"
    namespace = {}
    exec(compile(code, "README-parallel", "exec"), namespace)
    q, k, v = namespace["q"], namespace["k"], namespace["v"]
    err = (namespace["out"] - attnlib.attention(q, k, v, Causal())).abs().max().item()
    assert err < 1e-5, f"the README's sequence-parallel example differs from one process by {err:.3g}"


def _lse_loss(opt, ctx):
    """A loss that uses the returned LSE too: its gradient flows back through every strategy."""
    import attnlib
    from attnlib import KeyPadding
    from attnlib.testing import gradient_magnitudes

    sp = _sp(opt["sp"], ctx.world)
    g = torch.Generator().manual_seed(21)
    q, k, v = torch.randn(2, 9, 4, 8, generator=g), torch.randn(2, 9, 2, 8, generator=g), torch.randn(2, 9, 2, 8, generator=g)
    valid = torch.rand(2, 9, generator=g) > 0.3
    valid[:, 0] = True
    mask = KeyPadding(valid, causal=True)
    dout, dl = torch.randn(2, 9, 4, 8, generator=g), torch.randn(2, 4, 9, generator=g)
    local = [sp.shard(t).requires_grad_() for t in (q, k, v)]
    out, lse = attnlib.attention(*local, mask, parallel=sp, return_lse=True, backend="sdpa")
    out, lse = sp.gather(out), sp.gather(lse, -1)
    ((out * dout).sum() + (lse * dl).sum()).backward()
    grads = [sp.gather(t.grad) for t in local]
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ro, rl = attention64(*ref, mask)
    ((ro * dout.double()).sum() + (rl * dl.double()).sum()).backward()
    nv = [t.clone().requires_grad_() for t in (q, k, v)]
    no, nl = attention64(*nv, mask, dtype=torch.float32)
    ((no * dout).sum() + (nl * dl).sum()).backward()
    mags = gradient_magnitudes(q, k, v, dout, 8 ** -0.5)
    worst = [_check(out, ro, no, "out", torch.float32), _check(lse, rl, nl, "lse", torch.float32)]
    for name, got, r, n in zip(("dq", "dk", "dv"), grads, ref, nv):
        worst.append(_check(got, r.grad, n.grad, name, torch.float32, mags[name]))
    return {"worst": max(worst)}


_KINDS = {"lse_loss": _lse_loss, "readme": _readme, "qwen_image": _qwen_image, "bagel": _bagel, "vllm": _vllm, "lengths": _lengths,
          "group_hybrid": _group_hybrid}


def run(name, opt, ctx):
    torch.manual_seed(0)
    return _KINDS[opt["kind"]](opt, ctx)


# -- the parent --------------------------------------------------------------------------------------------------
_RESULTS: dict = {}


def _results(world: int) -> dict:
    from attnlib.parallel.conformance import spawn

    if world not in _RESULTS:
        _RESULTS[world] = spawn(world, TARGET, CASES[world], timeout_s=240)
    return _RESULTS[world]


@pytest.mark.parametrize("world,case", [(w, c) for w, cases in CASES.items() for c in cases],
                         ids=[f"world{w}-{c}" for w, cases in CASES.items() for c in cases])
def test_model_level_sequence_parallel(world, case):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    errors = [f"rank {r}: {res[case]['error']}" for r, res in sorted(_results(world).items()) if not res[case]["ok"]]
    assert not errors, "\n".join(errors)
