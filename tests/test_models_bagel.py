"""Bagel's PackedAttentionMoT on attnlib: the invariants, on every backend.

Bagel's code (flash-attn varlen on CUDA) is not installable here, so the block is checked against an
independent dense implementation of Bagel's inference semantics written below (per-sequence loops,
explicit masks, float64), and against itself: decode == full causal forward, batched CFG == each
branch alone, every backend == ``math`` under the ``attnlib.testing`` tolerance policy.
"""
import copy
import functools
import math

import pytest
import torch

import attnlib
from models_ref.bagel import BagelKVCache, BagelPositions, PackedAttentionMoT
from models_ref.parity import (BAGEL_CONFIG, assert_within_tolerance, bagel_case, bagel_cfg_scene, no_fallback,
                               reference, seeded_block)

BACKENDS = [r["name"] for r in attnlib.list_backends() if r["available"]]
#: the parity references run where the GPU is, if there is one (the block-level invariants run on the CPU)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HID = BAGEL_CONFIG["hidden_size"]


@pytest.fixture(autouse=True)
def _no_silent_fallback():
    with no_fallback():
        yield


def _attn(dtype=torch.float32, seed=3):
    return seeded_block(PackedAttentionMoT, BAGEL_CONFIG, seed, std=0.25).to(dtype)


# ---------------------------------------------------------------------------------------------------
# an independent dense reference of Bagel's forward_inference (float64, loops, explicit masks)
# ---------------------------------------------------------------------------------------------------
def _rope64(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


def _norm64(x, w, eps=1e-6):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _dense_bagel(m, x, seqlens, positions, past, causal, gen=None):
    """``(out, new_past)``; ``past`` is a list of per-sequence ``(k, v)`` float64 or None."""
    m = copy.deepcopy(m).double()
    x = x.double()
    hd, hq, hkv = m.head_dim, m.num_heads, m.num_kv_heads
    gen = torch.zeros(x.shape[0], dtype=torch.bool) if gen is None else gen
    q = torch.empty(x.shape[0], hq, hd, dtype=torch.float64)
    k = torch.empty(x.shape[0], hkv, hd, dtype=torch.float64)
    v = torch.empty_like(k)
    for sel, sfx in ((~gen, ""), (gen, "_moe_gen")):
        lin = lambda name: getattr(m, name + sfx)  # noqa: E731
        q[sel] = _norm64(lin("q_proj")(x[sel]).view(-1, hq, hd), lin("q_norm").weight)
        k[sel] = _norm64(lin("k_proj")(x[sel]).view(-1, hkv, hd), lin("k_norm").weight)
        v[sel] = lin("v_proj")(x[sel]).view(-1, hkv, hd)
    theta = m.rotary.theta
    q, k = _rope64(q, positions, theta), _rope64(k, positions, theta)
    outs, new_past, start = [], [], 0
    for b, n in enumerate(seqlens):
        qb, kb, vb = q[start:start + n], k[start:start + n], v[start:start + n]
        if past[b] is not None:
            kb, vb = torch.cat([past[b][0], kb]), torch.cat([past[b][1], vb])
        new_past.append((kb, vb))
        L = kb.shape[0]
        rep = hq // hkv
        kr, vr = kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1)
        s = torch.einsum("qhd,khd->hqk", qb, kr) / math.sqrt(hd)
        if causal:   # flash-attn varlen causal: bottom-right per sequence
            allowed = torch.arange(L)[None, :] <= torch.arange(n)[:, None] + (L - n)
            s = s.masked_fill(~allowed, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vr).reshape(n, -1))
        start += n
    o = torch.cat(outs)
    out = torch.empty(x.shape[0], m.o_proj.out_features, dtype=torch.float64)
    out[~gen] = m.o_proj(o[~gen])
    out[gen] = m.o_proj_moe_gen(o[gen])
    return out, new_past


# ---------------------------------------------------------------------------------------------------
def test_position_rule_text_advances_image_shares_one_id_noised_target_does_not_advance():
    p = BagelPositions()
    assert p.text(3).tolist() == [0, 1, 2]
    assert p.image(4).tolist() == [3, 3, 3, 3]          # start marker, 2 tokens, end marker: one id
    assert p.text(2).tolist() == [4, 5]                 # the image advanced the cursor by exactly one
    assert p.noised_image(5).tolist() == [6] * 5
    assert p.noised_image(5).tolist() == [6] * 5        # every denoising step: same id, cursor unmoved
    assert p.text(1).tolist() == [6]


def test_parameter_names_are_bagels():
    names = set(_attn().state_dict())
    for sfx in ("", "_moe_gen"):
        assert {f"q_proj{sfx}.bias", f"k_proj{sfx}.bias", f"v_proj{sfx}.bias", f"o_proj{sfx}.weight",
                f"q_norm{sfx}.weight", f"k_norm{sfx}.weight"} <= names
        assert f"o_proj{sfx}.bias" not in names


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_step_by_step_decode_equals_full_causal_forward(backend):
    """Prefill 4 tokens, prefill 3 more against the cache, then decode one token at a time (two
    sequences of different lengths packed): equal to one causal forward over all tokens."""
    m = _attn()
    g = torch.Generator().manual_seed(0)
    lens = (10, 8)
    xs = [torch.randn(n, HID, generator=g) for n in lens]
    full_in = torch.cat(xs)
    full_pos = torch.cat([torch.arange(n) for n in lens])
    with attnlib.use_backend("math"):
        naive = m(full_in, lens, full_pos, causal=True)
    ref64, _ = _dense_bagel(m, full_in, lens, full_pos, [None, None], causal=True)

    cache, pos = BagelKVCache.empty(2), [BagelPositions(), BagelPositions()]
    pieces = [[] for _ in lens]
    chunks = [(4, 4), (3, 2)] + [(1, 1)] * 2 + [(1, 0)]   # per step: new tokens per sequence
    done = [0, 0]
    with attnlib.use_backend(backend):
        for step in chunks:
            active = [b for b in range(2) if step[b]]
            x = torch.cat([xs[b][done[b]:done[b] + step[b]] for b in active])
            out = m(x, [step[b] for b in active], torch.cat([pos[b].text(step[b]) for b in active]),
                    cache.select(active), causal=True)
            for b, o in zip(active, torch.split(out, [step[b] for b in active])):
                pieces[b].append(o)
                done[b] += step[b]
    assert done == list(lens) and cache.lengths == list(lens)
    stepwise = torch.cat([torch.cat(p) for p in pieces])
    assert_within_tolerance(stepwise, ref64, naive, what=f"{backend} decode")


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_vit_image_prefill_is_non_causal_over_cache_and_image(backend):
    m = _attn()
    g = torch.Generator().manual_seed(1)
    text, image = torch.randn(5, HID, generator=g), torch.randn(6, HID, generator=g)
    p = BagelPositions()
    tp, ip = p.text(5), p.image(6)
    ref_past = _dense_bagel(m, text, [5], tp, [None], causal=True)[1]
    ref64, _ = _dense_bagel(m, image, [6], ip, ref_past, causal=False)
    cache = BagelKVCache.empty(1)
    naive_cache = BagelKVCache.empty(1)
    with attnlib.use_backend("math"):
        m(text, [5], tp, naive_cache, causal=True)
        naive = m(image, [6], ip, naive_cache, causal=False)
    with attnlib.use_backend(backend):
        m(text, [5], tp, cache, causal=True)
        out = m(image, [6], ip, cache, causal=False)
    assert_within_tolerance(out, ref64, naive, what=f"{backend} vit prefill")


@functools.lru_cache(maxsize=None)
def _scene_reference():
    return reference(bagel_case(), torch.float32, DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_cfg_scene_on_every_backend_matches_math_float64(backend):
    run, ref64, naive, _ = _scene_reference()
    with attnlib.use_backend(backend):
        out = run()
    assert_within_tolerance(out, ref64, naive, what=f"{backend} CFG scene")


@torch.no_grad()
def test_cfg_scene_matches_independent_dense_bagel_reference():
    """The packed, cached, BlockDiagonal path equals a per-sequence dense re-implementation."""
    m = _attn()
    with attnlib.use_backend("math"):
        ours = bagel_cfg_scene(m, torch.float32)
    # replay the scene on the dense reference
    g = torch.Generator().manual_seed(2)
    rand = lambda n: torch.randn(n, HID, generator=g)  # noqa: E731
    text, image, target, tok = rand(5), rand(6), rand(8), rand(1)
    pos = [BagelPositions() for _ in range(3)]
    past = [None, None, None]
    o1, (past[0], past[2]) = _dense_bagel(m, torch.cat([text, text]), [5, 5],
                                          torch.cat([pos[0].text(5), pos[2].text(5)]), [None, None], True)
    o2, (past[0], past[1]) = _dense_bagel(m, torch.cat([image, image]), [6, 6],
                                          torch.cat([pos[0].image(6), pos[1].image(6)]), [past[0], None], False)
    o3, (past[0],) = _dense_bagel(m, tok, [1], pos[0].text(1), [past[0]], True)
    gen = torch.ones(8, dtype=torch.bool)
    gen[0] = gen[-1] = False
    o4, _ = _dense_bagel(m, torch.cat([target] * 3), [8] * 3, torch.cat([p.noised_image(8) for p in pos]), past, False,
                         gen.repeat(3))
    ref64 = torch.cat([o1, o2, o3, o4])
    with attnlib.use_backend("math"):
        naive = bagel_cfg_scene(m, torch.float32)
    assert_within_tolerance(ours, ref64, naive, what="scene vs dense Bagel reference")


def _cfg_setup(dtype=torch.float32):
    """The block; three branches with caches of different lengths, and the batched denoising-step inputs."""
    m = _attn(dtype)
    g = torch.Generator().manual_seed(4)
    caches, positions = [], []
    for n_ctx in (9, 3, 6):                                   # full, text-dropped, image-dropped
        c, p = BagelKVCache.empty(1), BagelPositions()
        with attnlib.use_backend("math"):
            m(torch.randn(n_ctx, HID, generator=g).to(dtype), [n_ctx], p.text(n_ctx), c, causal=True)
        caches.append(c)
        positions.append(p)
    n_t = 7
    target = torch.randn(n_t, HID, generator=g).to(dtype)
    gen = torch.ones(n_t, dtype=torch.bool)
    gen[0] = gen[-1] = False
    return m, caches, positions, target, gen


def _cfg_step(m, caches, positions, target, gen):
    """One denoising step of the three branches in one call; the caches are left as they are."""
    n_t = target.shape[0]
    return m(torch.cat([target] * 3), [n_t] * 3, torch.cat([p.noised_image(n_t) for p in positions]),
             BagelKVCache.cat(caches), causal=False, gen=gen.repeat(3), update_cache=False)


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_batched_cfg_equals_each_branch_alone(backend):
    m, caches, positions, target, gen = _cfg_setup()
    n_t = target.shape[0]
    m64 = copy.deepcopy(m).double()
    c64 = [BagelKVCache([c.keys[0].double()], [c.values[0].double()]) for c in caches]
    with attnlib.use_backend(backend):
        batched = _cfg_step(m, caches, positions, target, gen)
    assert [c.lengths for c in caches] == [[9], [3], [6]]     # update_cache=False left every cache alone
    for b in range(3):
        args = ([n_t], positions[b].noised_image(n_t))
        with attnlib.use_backend("math"):
            alone64 = m64(target.double(), *args, c64[b], causal=False, gen=gen, update_cache=False)
            naive = m(target, *args, caches[b], causal=False, gen=gen, update_cache=False)
        assert_within_tolerance(batched[b * n_t:(b + 1) * n_t], alone64, naive, what=f"{backend} branch {b}")


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_cfg_branches_do_not_attend_to_each_other(backend):
    """Scrambling the text-dropped branch's cache leaves the other two branches' outputs bit-identical."""
    m, caches, positions, target, gen = _cfg_setup()
    n_t = target.shape[0]
    scrambled = [caches[0], BagelKVCache([100 * torch.randn_like(caches[1].keys[0])],
                                         [100 * torch.randn_like(caches[1].values[0])]), caches[2]]
    with attnlib.use_backend(backend):
        a, b = _cfg_step(m, caches, positions, target, gen), _cfg_step(m, scrambled, positions, target, gen)
    assert torch.equal(a[:n_t], b[:n_t]) and torch.equal(a[2 * n_t:], b[2 * n_t:])
    assert not torch.equal(a[n_t:2 * n_t], b[n_t:2 * n_t])


@torch.no_grad()
def test_generation_expert_serves_only_vae_tokens():
    """Changing the generation expert's output projection changes exactly the VAE-token rows."""
    m, caches, positions, target, gen = _cfg_setup()
    args = (target, [target.shape[0]], positions[0].noised_image(target.shape[0]), caches[0])
    before = m(*args, causal=False, gen=gen, update_cache=False)
    torch.nn.init.normal_(m.o_proj_moe_gen.weight)
    after = m(*args, causal=False, gen=gen, update_cache=False)
    changed = (before != after).any(-1)
    assert changed.tolist() == gen.tolist()


def test_bad_inputs_are_rejected_with_the_fix():
    m = _attn()
    x = torch.randn(5, HID)
    with pytest.raises(ValueError, match="sum\\(seqlens\\)"):
        m(x, [2, 2], torch.arange(5), causal=True)
    with pytest.raises(ValueError, match="cache holds 1"):
        m(x, [2, 3], torch.arange(5), BagelKVCache.empty(1), causal=True)
    with pytest.raises(ValueError, match="gen must be a bool"):
        m(x, [5], torch.arange(5), causal=False, gen=torch.ones(5))
