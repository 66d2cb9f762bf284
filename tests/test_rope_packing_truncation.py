"""Packed mRoPE positions equal per-sample positions; truncation keeps exactly the fully surviving images."""
import random

import pytest
import torch

import attnlib
from attnlib.masks import BlockDiagonal, Causal
from attnlib.rope import (MRopeConfig, apply_mrope, mrope_position_ids, packed_mrope_position_ids,
                          reconcile_image_tokens)

VS, VE, IMG, VID = 1, 2, 3, 4


def cfg(variant="qwen2_5_vl"):
    return MRopeConfig(variant=variant, image_token_id=IMG, video_token_id=VID, spatial_merge_size=2, tokens_per_second=2.0)


def sample(rng, n_images, n_videos, max_t=3):
    ids, images, videos, spg = [rng.randrange(10, 50)], [], [], []
    items = ["i"] * n_images + ["v"] * n_videos
    rng.shuffle(items)
    for kind in items:
        t = 1 if kind == "i" else rng.randrange(1, max_t + 1)
        h, w = 2 * rng.randrange(1, 3), 2 * rng.randrange(1, 3)
        (images if kind == "i" else videos).append([t, h, w])
        if kind == "v":
            spg.append(rng.choice([0.5, 1.0, 2.0]))
        ids += [VS] + [IMG if kind == "i" else VID] * (t * h * w // 4) + [VE] + [rng.randrange(10, 50)] * rng.randrange(0, 3)
    return torch.tensor(ids), images, videos, spg


def grid(x):
    return torch.tensor(x, dtype=torch.long).reshape(-1, 3) if x else None


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_packed_positions_equal_each_sample_alone(variant):
    rng = random.Random(5)
    # Qwen3-VL lays out one block per frame (timestamps between): single-frame videos keep this layout valid
    max_t = 1 if variant == "qwen3_vl" else 3
    samples = [sample(rng, rng.randrange(0, 3), rng.randrange(0, 2), max_t) for _ in range(4)]
    images = [g for s in samples for g in s[1]]
    videos = [g for s in samples for g in s[2]]
    spg = [x for s in samples for x in s[3]]
    pos, deltas, mask = packed_mrope_position_ids([s[0] for s in samples], cfg(variant), image_grid_thw=grid(images),
                                                  video_grid_thw=grid(videos), second_per_grid_ts=spg or None)
    lens = [s[0].numel() for s in samples]
    assert pos.shape == (3, sum(lens)) and isinstance(mask, BlockDiagonal)
    assert mask.q_seqlens == tuple(lens) and mask.causal
    for i, (ids, im, vi, sp) in enumerate(samples):
        alone, d = mrope_position_ids(ids[None], cfg(variant), image_grid_thw=grid(im), video_grid_thw=grid(vi),
                                      second_per_grid_ts=sp or None)
        assert torch.equal(mask.split(pos.T)[i].T, alone[:, 0])
        assert deltas[i].item() == d.item()


def test_packed_1d_input_with_seqlens_equals_the_list_form():
    rng = random.Random(8)
    samples = [sample(rng, 1, 1) for _ in range(3)]
    kw = dict(image_grid_thw=grid([g for s in samples for g in s[1]]), video_grid_thw=grid([g for s in samples for g in s[2]]),
              second_per_grid_ts=[x for s in samples for x in s[3]])
    a = packed_mrope_position_ids([s[0] for s in samples], cfg(), **kw)
    b = packed_mrope_position_ids(torch.cat([s[0] for s in samples]), cfg(), seqlens=[s[0].numel() for s in samples], **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_packed_forward_equals_per_sample_forwards():
    torch.manual_seed(0)
    rng = random.Random(9)
    samples = [sample(rng, 1, 1) for _ in range(3)]
    images = grid([g for s in samples for g in s[1]])
    videos = grid([g for s in samples for g in s[2]])
    spg = [x for s in samples for x in s[3]]
    pos, _, mask = packed_mrope_position_ids([s[0] for s in samples], cfg(), image_grid_thw=images, video_grid_thw=videos,
                                             second_per_grid_ts=spg)
    T, H, Hkv, D = pos.shape[1], 4, 2, 16
    q, k, v = torch.randn(T, H, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    qr, kr = apply_mrope(q, k, pos, [2, 3, 3], theta=10000.0)
    packed = attnlib.attention(qr, kr, v, mask, backend="math")
    outs = []
    for i, (ids, im, vi, sp) in enumerate(samples):
        p, _ = mrope_position_ids(ids[None], cfg(), image_grid_thw=grid(im), video_grid_thw=grid(vi), second_per_grid_ts=sp)
        sl = slice(mask.cu_seqlens_q[i], mask.cu_seqlens_q[i + 1])
        qi, ki = apply_mrope(q[sl][None], k[sl][None], p, [2, 3, 3], theta=10000.0)
        outs.append(attnlib.attention(qi, ki, v[sl][None], Causal(), backend="math")[0])
    torch.testing.assert_close(packed, torch.cat(outs), rtol=1e-5, atol=1e-5)


def test_packing_rejects_seqlens_that_do_not_cover_the_tokens():
    with pytest.raises(ValueError, match="seqlens"):
        packed_mrope_position_ids(torch.arange(10, 20), cfg(), seqlens=[3, 4])
    with pytest.raises(ValueError, match="seqlens"):
        packed_mrope_position_ids(torch.arange(10, 20), cfg())


def test_image_spanning_two_packed_samples_raises():
    ids = [torch.tensor([10, VS, IMG]), torch.tensor([IMG, VE])]
    with pytest.raises(ValueError, match="contiguous run inside one sequence"):
        packed_mrope_position_ids(ids, cfg(), image_grid_thw=[[1, 2, 4]])


# -- truncation ------------------------------------------------------------------------------------------
def prompt(sizes, rng):
    """Tokens with images of the given token counts, text (and vision start/end) between them."""
    ids = [rng.randrange(10, 50) for _ in range(rng.randrange(0, 3))]
    for n in sizes:
        ids += [VS] + [IMG] * n + [VE] + [rng.randrange(10, 50) for _ in range(rng.randrange(0, 3))]
    return torch.tensor(ids, dtype=torch.long)


def test_left_cut_drops_the_first_images_and_the_orphaned_head():
    # images of 2, 4 and 2 tokens; the left cut removed image 0 and 1 token of image 1
    ids = torch.tensor([IMG, IMG, IMG, VE, 20, VS, IMG, IMG, VE, 21])
    token_keep, image_keep = reconcile_image_tokens(ids, [[1, 2, 4], [1, 4, 4], [1, 2, 4]], image_token_id=IMG,
                                                    truncated_side="left")
    assert image_keep.tolist() == [False, False, True]
    assert token_keep.tolist() == [False, False, False] + [True] * 7


def test_right_cut_drops_the_last_images_and_the_orphaned_tail():
    ids = torch.tensor([20, VS, IMG, IMG, VE, 21, VS, IMG, IMG, IMG])
    token_keep, image_keep = reconcile_image_tokens(ids, [[1, 2, 4], [1, 4, 4], [1, 2, 4]], image_token_id=IMG,
                                                    truncated_side="right")
    assert image_keep.tolist() == [True, False, False]
    assert token_keep.tolist() == [True] * 7 + [False] * 3


@pytest.mark.parametrize("side", ["left", "right"])
def test_random_cuts_keep_exactly_the_fully_surviving_images(side):
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.given(st.integers(0, 10_000), st.floats(0.0, 1.0))
    def check(seed, frac):
        rng = random.Random(seed)
        grids = [[1, 2 * rng.randrange(1, 3), 2 * rng.randrange(1, 3)] for _ in range(rng.randrange(0, 5))]
        sizes = [t * h * w // 4 for t, h, w in grids]
        full = prompt(sizes, rng)
        cut = int(frac * full.numel())
        ids = full[cut:] if side == "left" else full[: full.numel() - cut]
        token_keep, image_keep = reconcile_image_tokens(ids, grids, image_token_id=IMG, truncated_side=side)
        # ground truth: image i survives iff all its tokens are inside the kept window
        where = torch.nonzero(full == IMG).squeeze(1).tolist()
        lo, hi = (cut, full.numel()) if side == "left" else (0, full.numel() - cut)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        expect = [all(lo <= where[s + j] < hi for j in range(n)) for s, n in zip(starts, sizes)]
        assert image_keep.tolist() == expect
        kept_ids = ids[token_keep]
        kept_grids = torch.tensor(grids).reshape(-1, 3)[image_keep]
        assert int((kept_ids == IMG).sum()) == int((kept_grids.prod(1) // 4).sum())
        # and the reconciled prompt is accepted by the position-id builder
        mrope_position_ids(kept_ids[None], cfg("qwen2_vl"), image_grid_thw=kept_grids if len(kept_grids) else None)

    check()


def test_placeholders_that_truncation_cannot_explain_raise():
    grids = [[1, 2, 4], [1, 2, 4]]
    with pytest.raises(ValueError, match="only 4"):
        reconcile_image_tokens(torch.tensor([IMG] * 5), grids, image_token_id=IMG)
    with pytest.raises(ValueError, match="left edge"):  # a partial image in the middle of the prompt
        reconcile_image_tokens(torch.tensor([20, IMG, 21, VS, IMG, IMG, VE]), grids, image_token_id=IMG, truncated_side="left")
    with pytest.raises(ValueError, match="split by other tokens"):
        reconcile_image_tokens(torch.tensor([VS, IMG, 20, IMG, VE, VS, IMG, IMG]), grids, image_token_id=IMG,
                               truncated_side="left")
    with pytest.raises(ValueError, match="truncated_side"):
        reconcile_image_tokens(torch.tensor([IMG]), grids, image_token_id=IMG, truncated_side="middle")
