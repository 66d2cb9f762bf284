"""mRoPE position ids: parity with transformers' get_rope_index (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-Omni),
the original-semantics differences from transformers 5.x, and properties on random layouts."""
import random
import types

import pytest
import torch

from attnlib.rope import MRopeConfig, mrope_position_ids

# token ids of the tiny layouts built here
VS, VE, IMG, VID, AUD, AS, AE = 1, 2, 3, 4, 5, 6, 7
MERGE = 2


def cfg(variant, tps=1.0):
    return MRopeConfig(variant=variant, image_token_id=IMG, video_token_id=VID, spatial_merge_size=MERGE,
                       tokens_per_second=tps, audio_token_id=AUD if variant == "qwen3_omni" else None)


# -- layout builder ---------------------------------------------------------------------------------
def build_row(rng, n_images, n_videos, *, max_t=3, max_hw=3, qwen3_frames=False, audio=0, audio_in_video=False,
              video_t=None):
    """One prompt: text, then each item wrapped in <vision_start> ... <vision_end>, in random order.

    Returns (ids, image_grids, video_grids, second_per_grid, audio_lengths, video_audio_lengths).
    """
    items = ["image"] * n_images + ["video"] * n_videos + ["audio"] * audio
    rng.shuffle(items)
    ids = [rng.randrange(10, 100) for _ in range(rng.randrange(1, 4))]
    images, videos, spg, auds, avs = [], [], [], [], []
    for kind in items:
        if kind == "audio":
            n = rng.randrange(1, 6)
            auds.append(n)
            ids += [AS] + [AUD] * n + [AE]
        else:
            t = 1 if kind == "image" else (video_t or rng.randrange(1, max_t + 1))
            h, w = MERGE * rng.randrange(1, max_hw + 1), MERGE * rng.randrange(1, max_hw + 1)
            n = h * w // MERGE ** 2
            if kind == "image":
                images.append([t, h, w])
                ids += [VS] + [IMG] * (t * n) + [VE]
            elif qwen3_frames:  # Qwen3-VL: <timestamp> <vs> frame <ve> per frame
                videos.append([t, h, w])
                for _ in range(t):
                    ids += [rng.randrange(10, 100), VS] + [VID] * n + [VE]
            elif audio_in_video:
                videos.append([t, h, w])
                s = rng.choice([0.5, 1.0, 2.0])
                spg.append(s)
                n_audio = rng.randrange(1, 3 * t + 4)
                avs.append(n_audio)
                vt = [ti * s * 2 for ti in range(t) for _ in range(n)]  # tps=2 in audio-in-video tests
                seq, a = [], 0
                for i, tv in enumerate(vt):  # processor order: by temporal position, video first on ties
                    while a < n_audio and a < tv:
                        seq.append(AUD); a += 1
                    seq.append(VID)
                seq += [AUD] * (n_audio - a)
                ids += [VS, AS] + seq + [AE, VE]
            else:
                videos.append([t, h, w])
                spg.append(rng.choice([0.5, 1.0, 1.5, 2.0]))
                ids += [VS] + [VID] * (t * n) + [VE]
        ids += [rng.randrange(10, 100) for _ in range(rng.randrange(0, 4))]
    return ids, images, videos, spg, auds, avs


def batch(rows, pad_side="right"):
    S = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(0, len(r)) if pad_side == "right" else slice(S - len(r), S)
        ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
    return ids, mask


def loop_reference(ids, mask, image_grid, video_grid, spg, variant, tps):
    """Original semantics, one token at a time (the spec, independent of the vectorized code)."""
    B, S = ids.shape
    pos = torch.zeros(3, B, S, dtype=torch.float64)
    deltas = []
    grids = {"image": iter([list(map(int, g)) for g in image_grid]),
             "video": iter([(list(map(int, g)), float(s)) for g, s in zip(video_grid, spg)])}
    for b in range(B):
        idx = [i for i in range(S) if mask[b, i]]
        cur, i, top = 0, 0, -1
        while i < len(idx):
            tok = int(ids[b, idx[i]])
            if tok in (IMG, VID):
                if tok == IMG:
                    (t, h, w), s = next(grids["image"]), 1.0
                else:
                    (t, h, w), s = next(grids["video"])
                h, w = h // MERGE, w // MERGE
                frames = [(0, 1)] if (variant == "qwen3_vl" and tok == VID) else [(ti, 1) for ti in range(t)]
                if variant == "qwen3_vl" and tok == VID:
                    t = 1  # caller lays out one block per frame; grids are per frame here
                block_max = cur
                for ti in range(t):
                    if variant == "qwen2_5_vl" and tok == VID:
                        toff = float(int(torch.tensor(ti, dtype=torch.float32) * torch.tensor(s) * tps))
                    else:
                        toff = float(ti)
                    for hi in range(h):
                        for wi in range(w):
                            pos[:, b, idx[i]] = torch.tensor([cur + toff, cur + hi, cur + wi], dtype=torch.float64)
                            block_max = max(block_max, cur + toff, cur + hi, cur + wi)
                            i += 1
                cur = block_max + 1
                top = max(top, block_max)
            else:
                pos[:, b, idx[i]] = cur
                top = max(top, cur)
                cur += 1
                i += 1
        deltas.append(top + 1 - len(idx))
    return pos.long(), torch.tensor(deltas, dtype=torch.long).unsqueeze(1)


# -- transformers references (tiny configs, the real get_rope_index on a stand-in `self`) -------------
def hf_vl(variant):
    """A stand-in ``self`` carrying a real tiny transformers config, and its model class."""
    tr = pytest.importorskip("transformers")
    if variant == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel as M
        config = tr.Qwen2VLConfig(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS,
                                  vision_config={"spatial_merge_size": MERGE})
    elif variant == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel as M
        config = tr.Qwen2_5_VLConfig(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS,
                                     vision_config={"spatial_merge_size": MERGE, "tokens_per_second": 2})
    else:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel as M
        config = tr.Qwen3VLConfig(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS,
                                  vision_config={"spatial_merge_size": MERGE})
    me = types.SimpleNamespace(config=config)
    me.get_vision_position_ids = types.MethodType(M.get_vision_position_ids, me)
    return me, M, config


def hf_rope_index(variant, ids, mask, image_grid, video_grid, spg):
    me, M, _ = hf_vl(variant)
    tt = torch.zeros_like(ids, dtype=torch.int32)
    tt[ids == IMG] = 1
    tt[ids == VID] = 2
    kw = {"second_per_grid_ts": torch.tensor(spg)} if variant == "qwen2_5_vl" and video_grid is not None else {}
    return M.get_rope_index(me, ids, tt, image_grid_thw=image_grid, video_grid_thw=video_grid,
                            attention_mask=mask, **kw)


def grids_of(rows_out, k):
    g = [x for r in rows_out for x in r[k]]
    return torch.tensor(g, dtype=torch.long) if g else None


def spgs(rows_out):
    return [x for r in rows_out for x in r[3]]


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_position_ids_match_transformers_get_rope_index(variant, pad_side):
    rng = random.Random(hash((variant, pad_side)) % 1000)
    # videos short enough that transformers 5.x agrees with the original semantics (see the next tests)
    rows = [build_row(rng, rng.randrange(0, 3), rng.randrange(0, 2), max_t=1, qwen3_frames=variant == "qwen3_vl")
            for _ in range(4)]
    rows.append(build_row(rng, 2, 1, max_t=1, qwen3_frames=variant == "qwen3_vl"))
    ids, mask = batch([r[0] for r in rows], pad_side)
    ig, vg, spg = grids_of(rows, 1), grids_of(rows, 2), spgs(rows)
    tps = 2.0 if variant == "qwen2_5_vl" else 1.0
    ours, deltas = mrope_position_ids(ids, cfg(variant, tps), image_grid_thw=ig, video_grid_thw=vg,
                                      second_per_grid_ts=spg or None, attention_mask=mask)
    ref, ref_deltas = hf_rope_index(variant, ids, mask, ig, vg, spg)
    assert ours.dtype == torch.int64 and ours.shape == (3, *ids.shape)
    assert torch.equal(ours, ref)  # padded slots are 0 in both
    assert torch.equal(deltas, ref_deltas)


def test_qwen2_5_vl_fractional_video_interval_is_scaled_before_the_integer_cast():
    # t * second_per_grid * tokens_per_second = 0, 0.75, 1.5, 2.25 -> 0, 0, 1, 2 (not t * int(0.375) = 0)
    ids = torch.tensor([[50, VS] + [VID] * 4 + [VE, 51]])
    pos, _ = mrope_position_ids(ids, cfg("qwen2_5_vl", tps=2.0), video_grid_thw=torch.tensor([[4, 2, 2]]),
                                second_per_grid_ts=torch.tensor([0.375]))
    assert pos[0, 0, 2:6].tolist() == [2, 2, 3, 4]
    assert pos[1, 0, 2:6].tolist() == [2, 2, 2, 2]


def test_qwen2_5_vl_time_is_t_times_seconds_then_times_tokens_per_second_in_float32():
    # float32 (t * 0.7) * 25 = 104.99999 -> 104 (the original order, also Qwen3-Omni's reference);
    # transformers 5.x computes t * (25 * 0.7) = 105.0 -> 105. Only such rounding edges differ.
    ids = torch.tensor([[VID] * 7])
    pos, _ = mrope_position_ids(ids, cfg("qwen2_5_vl", tps=25.0), video_grid_thw=torch.tensor([[7, 2, 2]]),
                                second_per_grid_ts=[0.7])
    assert pos[0, 0, 6].item() == 104
    me, M, _ = hf_vl("qwen2_5_vl")
    me.config.vision_config.tokens_per_second = 25
    ref, _ = M.get_rope_index(me, ids, torch.full_like(ids, 2, dtype=torch.int32), video_grid_thw=torch.tensor([[7, 2, 2]]),
                              second_per_grid_ts=torch.tensor([0.7]))
    assert ref[0, 0, 6].item() == 105
    assert torch.equal(pos[:, :, :6], ref[:, :, :6])


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_text_after_a_long_video_starts_after_its_largest_temporal_position_unlike_transformers5(variant):
    # A 6-frame 2x2 video: temporal offsets reach 5 (qwen2_vl) or 5 * 2 * 1.0 = 10 (qwen2_5_vl, tps=2);
    # the original code starts the next text at max + 1; transformers 5.x at start + max(h, w) = start + 1,
    # which overlaps the video's temporal positions.
    ids = torch.tensor([[50, VS] + [VID] * 6 + [VE, 51]])
    vg = torch.tensor([[6, 2, 2]])
    tps = 2.0 if variant == "qwen2_5_vl" else 1.0
    ours, deltas = mrope_position_ids(ids, cfg(variant, tps), video_grid_thw=vg, second_per_grid_ts=[1.0])
    t_last = 5 * (2 if variant == "qwen2_5_vl" else 1)
    assert ours[0, 0, 7].item() == 2 + t_last  # last video token's temporal position
    assert ours[:, 0, 8].tolist() == [2 + t_last + 1] * 3  # <vision_end> right after it
    ref, ref_deltas = hf_rope_index(variant, ids, None, None, vg, [1.0])
    assert torch.equal(ours[:, :, :8], ref[:, :, :8])  # the video itself agrees
    assert ref[:, 0, 8].tolist() == [3, 3, 3]  # transformers 5.x: 2 + max(h, w)
    # deltas: ours max = the last text token 2 + t_last + 2; transformers' max is the video's 2 + t_last
    assert deltas.item() == (2 + t_last + 2) + 1 - 10
    assert ref_deltas.item() == (2 + t_last) + 1 - 10


def test_padding_does_not_change_positions_or_deltas():
    rng = random.Random(3)
    row = build_row(rng, 2, 1, max_t=3)
    ig, vg, spg = torch.tensor(row[1]), torch.tensor(row[2]), row[3]
    c = cfg("qwen2_5_vl", 2.0)
    alone, d0 = mrope_position_ids(torch.tensor([row[0]]), c, image_grid_thw=ig, video_grid_thw=vg, second_per_grid_ts=spg)
    ids = torch.tensor([[0] * 3 + row[0][:4] + [0] * 2 + row[0][4:] + [0]])  # left pad, a hole, right pad
    mask = torch.ones(ids.shape[1], dtype=torch.bool)
    mask[[0, 1, 2, 7, 8, -1]] = False
    padded, d1 = mrope_position_ids(ids, c, image_grid_thw=ig, video_grid_thw=vg, second_per_grid_ts=spg,
                                    attention_mask=mask[None])
    assert torch.equal(padded[:, 0, mask], alone[:, 0])
    assert (padded[:, 0, ~mask] == 0).all()  # padded slots: 0 (transformers 4.x used 1; never attended)
    assert torch.equal(d0, d1)


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_random_layouts_match_the_token_by_token_original_semantics(variant):
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.given(st.integers(0, 10_000), st.sampled_from(["left", "right"]))
    def check(seed, pad_side):
        rng = random.Random(seed)
        rows = [build_row(rng, rng.randrange(0, 3), rng.randrange(0, 3), max_t=4, qwen3_frames=variant == "qwen3_vl")
                for _ in range(rng.randrange(1, 4))]
        ids, mask = batch([r[0] for r in rows], pad_side)
        ig, vg, spg = grids_of(rows, 1), grids_of(rows, 2), spgs(rows)
        tps = 2.0 if variant == "qwen2_5_vl" else 1.0
        ours, deltas = mrope_position_ids(ids, cfg(variant, tps), image_grid_thw=ig, video_grid_thw=vg,
                                          second_per_grid_ts=spg or None, attention_mask=mask)
        if variant == "qwen3_vl" and vg is not None:  # the reference walks one block per frame
            vg = torch.repeat_interleave(vg, vg[:, 0], dim=0)
            spg = [1.0] * vg.shape[0]
        ref, ref_deltas = loop_reference(ids, mask, ig if ig is not None else [], vg if vg is not None else [],
                                         spg, variant, tps)
        assert torch.equal(ours, ref)
        assert torch.equal(deltas, ref_deltas)

    check()


# -- Qwen3-Omni ---------------------------------------------------------------------------------------
_FEATURE_LENGTHS: dict = {}  # n_window -> {audio tokens: the shortest feature length giving them}


def omni_reference(ids, mask, ig, vg, spg, audio_lengths, use_audio_in_video, pps=2):
    tr = pytest.importorskip("transformers")
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as mo
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig
    config = Qwen3OmniMoeThinkerConfig(image_token_id=IMG, video_token_id=VID, audio_token_id=AUD,
                                       audio_start_token_id=AS, position_id_per_seconds=pps,
                                       vision_config={"spatial_merge_size": MERGE})
    config.vision_start_token_id = VS
    cls = mo.Qwen3OmniMoePreTrainedModelForConditionalGeneration
    me = types.SimpleNamespace(config=config, spatial_merge_size=MERGE)
    me.get_llm_pos_ids_for_vision = types.MethodType(cls.get_llm_pos_ids_for_vision, me)

    # the reference derives audio token counts from feature lengths; invert it for our token counts
    n_window = config.audio_config.n_window
    if n_window not in _FEATURE_LENGTHS:
        tokens = mo._get_feat_extract_output_lengths(torch.arange(1, 4000), n_window).tolist()
        _FEATURE_LENGTHS[n_window] = {n: L for L, n in reversed(list(enumerate(tokens, start=1)))}
    inverse = _FEATURE_LENGTHS[n_window]
    seqlens = torch.tensor([inverse[n] for n in audio_lengths], dtype=torch.long) if audio_lengths else None
    return cls.get_rope_index(me, ids, ig, vg, mask, use_audio_in_video=use_audio_in_video, audio_seqlens=seqlens,
                              second_per_grids=torch.tensor(spg) if spg else None), config


def omni_audio_order(rows):
    """Audio items in token order across the batch (standalone audio and audio-in-video interleaved)."""
    out = []
    for r in rows:
        ids = r[0]
        auds, avs = iter(r[4]), iter(r[5])
        i = 0
        while i < len(ids):
            if ids[i] == VS and i + 1 < len(ids) and ids[i + 1] == AS:
                out.append(next(avs)); i += 2
                while ids[i] != AE:
                    i += 1
            elif ids[i] == AS:
                out.append(next(auds))
                while ids[i] != AE:
                    i += 1
            i += 1
    return out


@pytest.mark.parametrize("use_audio_in_video", [False, True])
def test_qwen3_omni_matches_its_reference_with_images_videos_and_audio(use_audio_in_video):
    rng = random.Random(11 + use_audio_in_video)
    rows = [build_row(rng, rng.randrange(0, 2), rng.randrange(1, 3), max_t=3, audio=rng.randrange(0, 2),
                      audio_in_video=use_audio_in_video) for _ in range(3)]
    ids, mask = batch([r[0] for r in rows], "left")
    ig, vg, spg = grids_of(rows, 1), grids_of(rows, 2), spgs(rows)
    (ref, ref_deltas), hf_config = omni_reference(ids, mask, ig, vg, spg, omni_audio_order(rows), use_audio_in_video)
    c = MRopeConfig.from_hf_config(hf_config)
    assert (c.variant, c.tokens_per_second, c.audio_token_id) == ("qwen3_omni", 2.0, AUD)
    ours, deltas = mrope_position_ids(ids, c, image_grid_thw=ig, video_grid_thw=vg, second_per_grid_ts=spg,
                                      attention_mask=mask)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, ref)
    assert torch.allclose(deltas, ref_deltas.float())


def test_qwen3_omni_keeps_fractional_video_times_like_its_reference():
    ids = torch.tensor([[50, VS] + [VID] * 3 + [VE, 51]])
    pos, deltas = mrope_position_ids(ids, cfg("qwen3_omni", tps=3.0), video_grid_thw=torch.tensor([[3, 2, 2]]),
                                     second_per_grid_ts=[0.5])
    assert pos[0, 0, 2:5].tolist() == [2.0, 3.5, 5.0]  # t * 0.5 * 3
    assert pos[:, 0, 5].tolist() == [6.0] * 3 and pos[:, 0, 6].tolist() == [7.0] * 3
    assert deltas.item() == 8 - 7


# -- config and errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_from_hf_config_reads_token_ids_merge_size_and_time_scale(variant):
    _, _, config = hf_vl(variant)
    c = MRopeConfig.from_hf_config(config)
    assert (c.variant, c.image_token_id, c.video_token_id, c.spatial_merge_size) == (variant, IMG, VID, MERGE)
    assert c.tokens_per_second == (2.0 if variant == "qwen2_5_vl" else 1.0)


def test_placeholder_count_mismatch_raises_and_points_to_reconcile():
    ids = torch.tensor([[50, VS] + [IMG] * 3 + [VE]])
    with pytest.raises(ValueError, match="reconcile_image_tokens"):
        mrope_position_ids(ids, cfg("qwen2_vl"), image_grid_thw=torch.tensor([[1, 4, 2]]))


def test_image_split_by_text_raises():
    ids = torch.tensor([[50, VS, IMG, 60, IMG, VE]])
    with pytest.raises(ValueError, match="contiguous"):
        mrope_position_ids(ids, cfg("qwen2_vl"), image_grid_thw=torch.tensor([[1, 2, 4]]))


def test_text_only_rows_count_up_from_zero():
    ids = torch.tensor([[11, 12, 13, 0], [0, 0, 21, 22]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    pos, deltas = mrope_position_ids(ids, cfg("qwen3_vl"), attention_mask=mask)
    assert pos[0].tolist() == [[0, 1, 2, 0], [0, 0, 0, 1]]
    assert torch.equal(pos[0], pos[2]) and deltas.tolist() == [[0], [0]]


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="variant"):
        MRopeConfig(variant="qwen9", image_token_id=1, video_token_id=2)
    with pytest.raises(ValueError, match="input_ids"):
        mrope_position_ids(torch.zeros(5, dtype=torch.long), cfg("qwen2_vl"))
    with pytest.raises(ValueError, match="attention_mask"):
        mrope_position_ids(torch.zeros(1, 5, dtype=torch.long), cfg("qwen2_vl"), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="second_per_grid_ts"):
        mrope_position_ids(torch.tensor([[VID]]), cfg("qwen2_5_vl"), video_grid_thw=[[1, 2, 2]], second_per_grid_ts=[1.0, 2.0])


def test_padding_hole_inside_an_image_run_is_skipped():
    ids = torch.tensor([[50, VS, IMG, IMG, 0, IMG, IMG, VE, 51]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 1, 1, 1, 1]])
    pos, deltas = mrope_position_ids(ids, cfg("qwen2_vl"), image_grid_thw=torch.tensor([[1, 4, 4]]), attention_mask=mask)
    alone, d0 = mrope_position_ids(ids[:, mask[0].bool()], cfg("qwen2_vl"), image_grid_thw=torch.tensor([[1, 4, 4]]))
    assert torch.equal(pos[:, :, mask[0].bool()], alone) and pos[:, 0, 4].tolist() == [0, 0, 0]
    assert torch.equal(deltas, d0)


def tiny_model(variant):
    """A real (random, ~30k parameter) transformers model; nothing is downloaded."""
    tr = pytest.importorskip("transformers")
    text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                vocab_size=128, bos_token_id=0, eos_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS)
    if variant == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
        vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                      spatial_merge_size=MERGE, tokens_per_second=2, fullatt_block_indexes=[0])
        return Qwen2_5_VLModel(tr.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids))
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                  spatial_merge_size=MERGE, deepstack_visual_indexes=[])
    return Qwen3VLModel(tr.Qwen3VLConfig(vision_config=vision, text_config=dict(text, head_dim=8), **ids))


@pytest.mark.parametrize("variant", ["qwen2_5_vl", "qwen3_vl"])
def test_a_real_tiny_model_get_rope_index_agrees(variant):
    model = tiny_model(variant)
    rng = random.Random(21)
    rows = [build_row(rng, 2, 1, max_t=1, qwen3_frames=variant == "qwen3_vl") for _ in range(2)]
    ids, mask = batch([r[0] for r in rows], "left")
    ig, vg, spg = grids_of(rows, 1), grids_of(rows, 2), spgs(rows)
    tt = (ids == IMG).int() + 2 * (ids == VID).int()
    kw = {"second_per_grid_ts": torch.tensor(spg)} if variant == "qwen2_5_vl" else {}
    ref, ref_deltas = model.get_rope_index(ids, tt, image_grid_thw=ig, video_grid_thw=vg, attention_mask=mask, **kw)
    ours, deltas = mrope_position_ids(ids, MRopeConfig.from_hf_config(model.config), image_grid_thw=ig,
                                      video_grid_thw=vg, second_per_grid_ts=spg, attention_mask=mask)
    assert torch.equal(ours, ref) and torch.equal(deltas, ref_deltas)


# -- random layouts against transformers, bit for bit ---------------------------------------------------
# Many random batches through the real transformers references: images, multi-frame videos, padding of
# every kind (left, right, both sides, holes -- inside blocks too), the same samples packed along the
# token axis, and prompts cut by truncation and reconciled; Qwen3-Omni with standalone audio, audio
# inside videos and fractional times.
TPS = {"qwen2_vl": 1.0, "qwen2_5_vl": 2.0, "qwen3_vl": 1.0}


def agreeing_video(rng, variant, tps):
    """A multi-frame video on which transformers 5.x agrees with the original semantics: its last
    temporal offset stays below its merged spatial size (see the long-video test above)."""
    t, s = rng.randrange(1, 4), rng.choice([0.5, 1.0, 1.5, 2.0])
    h, w = rng.randrange(1, 4), rng.randrange(1, 4)  # merged tokens per side
    t_last = {"qwen2_vl": t - 1, "qwen2_5_vl": int((t - 1) * s * tps), "qwen3_vl": 0}[variant]
    w = max(w, t_last + 1)
    return [t, MERGE * h, MERGE * w], s


def random_vl_row(rng, variant, n_images, n_videos):
    """(ids, image grids, video grids, seconds per grid): items wrapped in <vs> .. <ve>, text between."""
    items = ["image"] * n_images + ["video"] * n_videos
    rng.shuffle(items)
    ids, images, videos, spg = [rng.randrange(10, 100) for _ in range(rng.randrange(1, 4))], [], [], []
    for kind in items:
        if kind == "image":
            g = [1, MERGE * rng.randrange(1, 5), MERGE * rng.randrange(1, 5)]
            images.append(g)
            ids += [VS] + [IMG] * (g[1] * g[2] // MERGE ** 2) + [VE]
        else:
            g, s = agreeing_video(rng, variant, TPS[variant])
            videos.append(g)
            spg.append(s)
            n = g[1] * g[2] // MERGE ** 2
            if variant == "qwen3_vl":  # <timestamp> <vs> frame <ve> per frame
                for _ in range(g[0]):
                    ids += [rng.randrange(10, 100), VS] + [VID] * n + [VE]
            else:
                ids += [VS] + [VID] * (g[0] * n) + [VE]
        ids += [rng.randrange(10, 100) for _ in range(rng.randrange(0, 4))]
    return ids, images, videos, spg


def pad_rows(rng, rows, mode):
    """[B, S] ids and mask: padding on the left, right, both sides, or holes anywhere (inside blocks too)."""
    padded = []
    for r in rows:
        if mode == "holes":
            r = list(r)
            for _ in range(rng.randrange(0, 4)):
                r.insert(rng.randrange(0, len(r) + 1), None)
        before = rng.randrange(0, 3) if mode == "both" else 0
        padded.append([None] * before + list(r))
    S = max(len(r) for r in padded) + (2 if mode in ("both", "holes") else 0)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for b, r in enumerate(padded):
        at = S - len(r) if mode == "left" else 0
        for i, tok in enumerate(r):
            if tok is not None:
                ids[b, at + i], mask[b, at + i] = tok, 1
    return ids, mask


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_random_layouts_padding_and_packing_match_transformers_bit_for_bit(variant):
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies
    from attnlib.rope import packed_mrope_position_ids

    @hyp.settings(max_examples=60)
    @hyp.given(st.integers(0, 2 ** 31), st.sampled_from(["none", "left", "right", "both", "holes"]))
    def check(seed, mode):
        rng = random.Random(seed)
        rows = [random_vl_row(rng, variant, rng.randrange(0, 4), rng.randrange(0, 3)) for _ in range(rng.randrange(1, 5))]
        ids, mask = pad_rows(rng, [r[0] for r in rows], mode)
        ig, vg, spg = grids_of(rows, 1), grids_of(rows, 2), spgs(rows)
        c = cfg(variant, TPS[variant])
        ours, deltas = mrope_position_ids(ids, c, image_grid_thw=ig, video_grid_thw=vg, second_per_grid_ts=spg or None,
                                          attention_mask=None if mode == "none" else mask)
        ref, ref_deltas = hf_rope_index(variant, ids, None if mode == "none" else mask, ig, vg, spg)
        assert torch.equal(ours, ref) and torch.equal(deltas, ref_deltas)
        # the same samples packed along the token axis: each sample's positions as in the batch
        pos, packed_deltas, _ = packed_mrope_position_ids([torch.tensor(r[0], dtype=torch.long) for r in rows], c,
                                                          image_grid_thw=ig, video_grid_thw=vg,
                                                          second_per_grid_ts=spg or None)
        real = mask.bool()
        assert torch.equal(pos, torch.cat([ref[:, b, real[b]] for b in range(len(rows))], dim=1))
        assert torch.equal(packed_deltas, ref_deltas)

    check()


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_random_truncated_prompts_reconciled_match_transformers_bit_for_bit(variant, side):
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies
    from attnlib.rope import reconcile_image_tokens

    @hyp.settings(max_examples=40)
    @hyp.given(st.integers(0, 2 ** 31), st.floats(0.0, 0.9))
    def check(seed, frac):
        rng = random.Random(seed)
        full, images, _, _ = random_vl_row(rng, variant, rng.randrange(1, 5), 0)
        cut = int(frac * len(full))
        ids = torch.tensor(full[cut:] if side == "left" else full[:len(full) - cut], dtype=torch.long)
        keep_tok, keep_img = reconcile_image_tokens(ids, images, image_token_id=IMG, spatial_merge_size=MERGE,
                                                    truncated_side=side)
        ids, grids = ids[keep_tok][None], torch.tensor(images).reshape(-1, 3)[keep_img]
        grids = grids if len(grids) else None
        ours, deltas = mrope_position_ids(ids, cfg(variant, TPS[variant]), image_grid_thw=grids)
        ref, ref_deltas = hf_rope_index(variant, ids, None, grids, None, [])
        assert torch.equal(ours, ref) and torch.equal(deltas, ref_deltas)

    check()


def random_omni_row(rng, audio_in_video, pps, spg_choices):
    """Qwen3-Omni prompt: images, videos (their audio interleaved by time with ``audio_in_video``) and
    standalone audio, in random order. Returns (ids, images, videos, spg, audio lengths, in-video audio
    lengths) like ``build_row``."""
    kinds = ["image"] * rng.randrange(0, 3) + ["video"] * rng.randrange(1 if audio_in_video else 0, 3) + \
        ["audio"] * rng.randrange(0, 3)
    rng.shuffle(kinds)
    ids, images, videos, spg, auds, avs = [rng.randrange(10, 100) for _ in range(rng.randrange(1, 4))], [], [], [], [], []
    for kind in kinds:
        if kind == "audio":
            auds.append(rng.randrange(1, 9))
            ids += [AS] + [AUD] * auds[-1] + [AE]
        elif kind == "image":
            g = [1, MERGE * rng.randrange(1, 4), MERGE * rng.randrange(1, 4)]
            images.append(g)
            ids += [VS] + [IMG] * (g[1] * g[2] // MERGE ** 2) + [VE]
        else:
            g, s = [rng.randrange(1, 5), MERGE * rng.randrange(1, 4), MERGE * rng.randrange(1, 4)], rng.choice(spg_choices)
            videos.append(g)
            spg.append(s)
            n = g[1] * g[2] // MERGE ** 2
            if not audio_in_video:
                ids += [VS] + [VID] * (g[0] * n) + [VE]
                continue
            avs.append(rng.randrange(1, 4 * g[0] + 6))
            run, a = [], 0
            for k in range(g[0]):  # as the processor orders them: by time, video first on ties
                while a < avs[-1] and a < k * s * pps:
                    run.append(AUD)
                    a += 1
                run += [VID] * n
            ids += [VS, AS] + run + [AUD] * (avs[-1] - a) + [AE, VE]
        ids += [rng.randrange(10, 100) for _ in range(rng.randrange(0, 4))]
    return ids, images, videos, spg, auds, avs


@pytest.mark.parametrize("use_audio_in_video", [False, True])
def test_qwen3_omni_random_layouts_match_its_reference_bit_for_bit(use_audio_in_video):
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.settings(max_examples=50)
    @hyp.given(st.integers(0, 2 ** 31), st.sampled_from(["left", "right", "both", "holes"]), st.sampled_from([1, 2, 13, 25]))
    def check(seed, mode, pps):
        rng = random.Random(seed)
        # times that are binary fractions: exact in float32, so any order of the additions gives the same bits
        rows = [random_omni_row(rng, use_audio_in_video, pps, [0.25, 0.5, 1.0, 1.5, 2.0, 4.0])
                for _ in range(rng.randrange(1, 4))]
        ids, mask = pad_rows(rng, [r[0] for r in rows], mode)
        ig, vg, spg = grids_of(rows, 1), grids_of(rows, 2), spgs(rows)
        if ig is None and vg is None:
            return  # text only: the reference takes another branch (padded slots 1)
        (ref, ref_deltas), hf_config = omni_reference(ids, mask, ig, vg, spg, omni_audio_order(rows), use_audio_in_video,
                                                      pps=pps)
        ours, deltas = mrope_position_ids(ids, MRopeConfig.from_hf_config(hf_config), image_grid_thw=ig,
                                          video_grid_thw=vg, second_per_grid_ts=spg or None, attention_mask=mask)
        assert ours.dtype == torch.float32 and torch.equal(ours, ref)
        assert torch.equal(deltas, ref_deltas.float())

    check()


def test_qwen3_omni_time_steps_that_are_not_binary_fractions_agree_within_float32_rounding():
    # e.g. 30 fps: 2/30 s per grid step. We add exactly and round once; the reference rounds after every
    # float32 addition along the prompt, so a position can differ in its last bit (never by more). Not
    # with audio inside videos: there the reference also orders audio and video by their rounded
    # positions, so at a tie that only its rounding makes (video time 5.0000005 vs audio 5 at 15 + ...)
    # the two orders differ.
    rng = random.Random(7)
    for _ in range(24):
        rows = [random_omni_row(rng, False, 25, [2 / 24, 2 / 30, 0.7, 1 / 3, 1e-5]) for _ in range(2)]
        ids, mask = pad_rows(rng, [r[0] for r in rows], "left")
        ig, vg, spg = grids_of(rows, 1), grids_of(rows, 2), spgs(rows)
        if vg is None:
            continue
        (ref, ref_deltas), hf_config = omni_reference(ids, mask, ig, vg, spg, omni_audio_order(rows), False, pps=25)
        ours, deltas = mrope_position_ids(ids, MRopeConfig.from_hf_config(hf_config), image_grid_thw=ig,
                                          video_grid_thw=vg, second_per_grid_ts=spg, attention_mask=mask)
        torch.testing.assert_close(ours, ref, rtol=2 ** -22, atol=0)
        torch.testing.assert_close(deltas, ref_deltas.float(), rtol=0, atol=ref.abs().max().item() * 2 ** -22)


def test_qwen2_5_vl_video_without_second_per_grid_ts_takes_one_second_per_step_like_transformers():
    # no second_per_grid_ts: 1 s per grid step, so frame k starts at k * tokens_per_second = 0, 2
    ids = torch.tensor([[50, VS] + [IMG] * 4 + [VE, 51, VS] + [VID] * 12 + [VE, 52]])
    ig, vg = torch.tensor([[1, 4, 4]]), torch.tensor([[2, 4, 6]])  # video: 2 frames of 2 x 3 tokens
    ours, deltas = mrope_position_ids(ids, cfg("qwen2_5_vl", 2.0), image_grid_thw=ig, video_grid_thw=vg)
    me, M, _ = hf_vl("qwen2_5_vl")
    ref, ref_deltas = M.get_rope_index(me, ids, (ids == IMG).int() + 2 * (ids == VID).int(), image_grid_thw=ig,
                                       video_grid_thw=vg)
    assert torch.equal(ours, ref) and torch.equal(deltas, ref_deltas)
    start = ours[0, 0, 9].item()  # the video's 12 tokens: 9 .. 20
    assert ours[0, 0, 9:21].tolist() == [start] * 6 + [start + 2] * 6
