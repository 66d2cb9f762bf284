"""attnlib.rope against the reference implementations (pytest-benchmark; not run by CI).

    ATTNLIB_BENCH_THREADS=1 python -m pytest bench/bench_rope.py --benchmark-json=/tmp/rope.json
    python bench/report.py /tmp/rope.json    # the table of bench/results/rope_cpu.md

Groups (baseline first, measured in the same run):

* ``mrope_position_ids``: Qwen2.5-VL position ids for a batch of 8 prompts of ~5.5k tokens holding 32
  images (4 per prompt) and 8 videos; transformers ``Qwen2_5_VLModel.get_rope_index`` (a Python loop
  over tokens) vs ``attnlib.rope.mrope_position_ids`` (vectorized). Target: >= 10x on every
  ``mrope_position_ids*`` group.
* ``mrope_position_ids_omni``: the same prompts as Qwen3-Omni (its reference loops over items with
  ``list.index`` on the token list).
* ``mrope_position_ids_images``: images-heavy Qwen2.5-VL prompts: 8 rows of 5.1-5.6k tokens, each
  holding 32 images of 100-225 tokens (256 images in the batch), left padded.
* ``mrope_position_ids_images_omni``: the images-heavy prompts as Qwen3-Omni.
* ``mrope_position_ids_omni_audio``: Qwen3-Omni with audio: 8 rows of 4.6-5.9k tokens, each holding
  8 images, 2 four-step videos whose audio is interleaved with them (``use_audio_in_video``) and 2
  standalone audio clips; left padded.
* ``rotary_apply_*``: q ``[1, 4096, 16, 128]`` and k ``[1, 4096, 4, 128]`` rotated by a ``[4096, 64]``
  table; transformers' eager ``apply_rotary_pos_emb`` (``rotate_half``, in x's dtype) vs
  ``attnlib.rope.apply_rotary_qk`` (float32 math; the torch path on CPU).
* ``mrope_table``: Qwen2.5-VL mRoPE cos/sin for ``[3, 8, 5.5k]`` positions: transformers'
  ``Qwen2_5_VLRotaryEmbedding`` vs ``MRotaryEmbedding.cos_sin``.
"""
from __future__ import annotations

import os
import random
import types

import pytest
import torch

pytest.importorskip("pytest_benchmark")
transformers = pytest.importorskip("transformers")

from attnlib.rope import MRopeConfig, MRotaryEmbedding, apply_rotary_qk, mrope_position_ids  # noqa: E402

VS, VE, IMG, VID, AUD, AS, AE = 1, 2, 3, 4, 5, 6, 7
DEVICE = "cpu"
HF_ROUNDS = 15  # rounds of each transformers reference (10-150 ms a call)
# On a small shared CI box, torch's intra-op threads spin-wait on each other (a 44k-element op can take
# 10 ms instead of 0.05 ms). ATTNLIB_BENCH_THREADS=1 pins one thread for every variant alike.
if os.environ.get("ATTNLIB_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["ATTNLIB_BENCH_THREADS"]))


def _info(benchmark, variant, baseline=False):
    benchmark.extra_info.update({"variant": variant, "torch": torch.__version__, "device": DEVICE,
                                 "threads": torch.get_num_threads()})
    if baseline:
        benchmark.extra_info["baseline"] = True


def _prompts(B=8, images_per_row=4, target=5500, seed=0):
    rng = random.Random(seed)
    rows, images, videos = [], [], []
    for _ in range(B):
        ids = []
        grids = [[1, 2 * rng.randrange(20, 30), 2 * rng.randrange(20, 30)] for _ in range(images_per_row)]
        video = [4, 2 * rng.randrange(8, 12), 2 * rng.randrange(8, 12)]
        n_vision = sum(t * h * w // 4 for t, h, w in grids) + video[0] * video[1] * video[2] // 4
        text = max(target - n_vision - 2 * (images_per_row + 1), images_per_row + 2)
        chunks = [text // (images_per_row + 2)] * (images_per_row + 2)
        for i, g in enumerate(grids + [video]):
            ids += [rng.randrange(10, 1000) for _ in range(chunks[i])]
            tok = IMG if i < images_per_row else VID
            ids += [VS] + [tok] * (g[0] * g[1] * g[2] // 4) + [VE]
        ids += [rng.randrange(10, 1000) for _ in range(chunks[-1])]
        rows.append(ids)
        images += grids
        videos.append(video)
    S = max(len(r) for r in rows)
    input_ids = torch.zeros(B, S, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, S - len(r):] = torch.tensor(r)  # left padding
        mask[b, S - len(r):] = 1
    return input_ids, mask, torch.tensor(images), torch.tensor(videos), torch.full((B,), 0.5)


def _left_pad(rows):
    S = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, S - len(r):] = torch.tensor(r)
        mask[b, S - len(r):] = 1
    return input_ids, mask


def _prompts_images(B=8, images_per_row=32, seed=1):
    """Images-heavy: 32 images of 20..30 patches a side (100..225 tokens) per row, short text between."""
    rng = random.Random(seed)
    rows, images = [], []
    for _ in range(B):
        ids = [rng.randrange(10, 1000) for _ in range(rng.randrange(20, 60))]
        for _ in range(images_per_row):
            g = [1, 2 * rng.randrange(10, 16), 2 * rng.randrange(10, 16)]
            images.append(g)
            ids += [VS] + [IMG] * (g[1] * g[2] // 4) + [VE] + [rng.randrange(10, 1000) for _ in range(rng.randrange(4, 12))]
        rows.append(ids)
    return (*_left_pad(rows), torch.tensor(images), None, None)


def _audio_tokens(feature_len):
    """Audio tokens of a clip of ``feature_len`` features, as the Qwen3-Omni reference counts them."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as mo

    n_window = _hf_omni()[2].audio_config.n_window
    return int(mo._get_feat_extract_output_lengths(torch.tensor(feature_len), n_window))


def _prompts_omni_audio(B=8, seed=2, pps=13):
    """Qwen3-Omni with audio: per row 8 images, 2 videos with their audio interleaved, 2 audio clips.

    Returns (input_ids, mask, image grids, video grids, seconds per grid, audio feature lengths in
    token order) -- the last is what the reference needs to count each clip's tokens.
    """
    rng = random.Random(seed)
    rows, images, videos, spg, feats = [], [], [], [], []
    for _ in range(B):
        items = ["image"] * 8 + ["video"] * 2 + ["audio"] * 2
        rng.shuffle(items)
        ids = [rng.randrange(10, 1000) for _ in range(rng.randrange(100, 300))]
        for kind in items:
            if kind == "image":
                g = [1, 2 * rng.randrange(12, 20), 2 * rng.randrange(12, 20)]
                images.append(g)
                ids += [VS] + [IMG] * (g[1] * g[2] // 4) + [VE]
            elif kind == "audio":
                feats.append(rng.randrange(200, 600))
                ids += [AS] + [AUD] * _audio_tokens(feats[-1]) + [AE]
            else:  # video frames and audio merged by time, video first on ties (as the processor does)
                g, s = [4, 2 * rng.randrange(8, 12), 2 * rng.randrange(8, 12)], 0.5
                videos.append(g)
                spg.append(s)
                feats.append(rng.randrange(150, 250))
                n_audio, per_frame = _audio_tokens(feats[-1]), g[1] * g[2] // 4
                times = [k * s * pps for k in range(g[0]) for _ in range(per_frame)]
                run, a = [], 0
                for tv in times:
                    while a < n_audio and a < tv:
                        run.append(AUD)
                        a += 1
                    run.append(VID)
                ids += [VS, AS] + run + [AUD] * (n_audio - a) + [AE, VE]
            ids += [rng.randrange(10, 1000) for _ in range(rng.randrange(50, 300))]
        rows.append(ids)
    return (*_left_pad(rows), torch.tensor(images), torch.tensor(videos), torch.tensor(spg), torch.tensor(feats))


@pytest.fixture(scope="module")
def prompts():
    return _prompts()


@pytest.fixture(scope="module")
def prompts_images():
    return _prompts_images()


@pytest.fixture(scope="module")
def prompts_omni_audio():
    return _prompts_omni_audio()


def _hf_qwen2_5_vl():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    config = transformers.Qwen2_5_VLConfig(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS,
                                           vision_config={"spatial_merge_size": 2, "tokens_per_second": 2})
    me = types.SimpleNamespace(config=config)
    me.get_vision_position_ids = types.MethodType(Qwen2_5_VLModel.get_vision_position_ids, me)
    return me, Qwen2_5_VLModel.get_rope_index, config


@pytest.mark.benchmark(group="mrope_position_ids")
def test_mrope_ids_transformers(benchmark, prompts):
    ids, mask, ig, vg, spg = prompts
    me, get_rope_index, _ = _hf_qwen2_5_vl()
    tt = (ids == IMG).int() + 2 * (ids == VID).int()
    _info(benchmark, "transformers Qwen2_5_VLModel.get_rope_index", baseline=True)
    benchmark.pedantic(get_rope_index, args=(me, ids, tt), kwargs=dict(image_grid_thw=ig, video_grid_thw=vg,
                       second_per_grid_ts=spg, attention_mask=mask), rounds=HF_ROUNDS, iterations=1)


@pytest.mark.benchmark(group="mrope_position_ids")
def test_mrope_ids_attnlib(benchmark, prompts):
    ids, mask, ig, vg, spg = prompts
    config = MRopeConfig.from_hf_config(_hf_qwen2_5_vl()[2])
    _info(benchmark, "attnlib mrope_position_ids")
    benchmark(mrope_position_ids, ids, config, image_grid_thw=ig, video_grid_thw=vg, second_per_grid_ts=spg,
              attention_mask=mask)


def _hf_omni():
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as mo
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig

    config = Qwen3OmniMoeThinkerConfig(image_token_id=IMG, video_token_id=VID, audio_token_id=AUD, audio_start_token_id=AS,
                                       position_id_per_seconds=13, vision_config={"spatial_merge_size": 2})
    config.vision_start_token_id = VS
    cls = mo.Qwen3OmniMoePreTrainedModelForConditionalGeneration
    me = types.SimpleNamespace(config=config, spatial_merge_size=2)
    me.get_llm_pos_ids_for_vision = types.MethodType(cls.get_llm_pos_ids_for_vision, me)
    return me, cls.get_rope_index, config


@pytest.mark.benchmark(group="mrope_position_ids_omni")
def test_mrope_ids_omni_transformers(benchmark, prompts):
    ids, mask, ig, vg, spg = prompts
    me, get_rope_index, _ = _hf_omni()
    _info(benchmark, "transformers Qwen3-Omni get_rope_index", baseline=True)
    benchmark.pedantic(get_rope_index, args=(me, ids, ig, vg, mask), kwargs=dict(second_per_grids=spg),
                       rounds=HF_ROUNDS, iterations=1)


@pytest.mark.benchmark(group="mrope_position_ids_omni")
def test_mrope_ids_omni_attnlib(benchmark, prompts):
    ids, mask, ig, vg, spg = prompts
    config = MRopeConfig.from_hf_config(_hf_omni()[2])
    _info(benchmark, "attnlib mrope_position_ids (qwen3_omni)")
    benchmark(mrope_position_ids, ids, config, image_grid_thw=ig, video_grid_thw=vg, second_per_grid_ts=spg,
              attention_mask=mask)


@pytest.mark.benchmark(group="mrope_position_ids_images")
def test_mrope_ids_images_transformers(benchmark, prompts_images):
    ids, mask, ig, _, _ = prompts_images
    me, get_rope_index, _ = _hf_qwen2_5_vl()
    tt = (ids == IMG).int()
    _info(benchmark, "transformers Qwen2_5_VLModel.get_rope_index", baseline=True)
    benchmark.pedantic(get_rope_index, args=(me, ids, tt), kwargs=dict(image_grid_thw=ig, attention_mask=mask),
                       rounds=HF_ROUNDS, iterations=1)


@pytest.mark.benchmark(group="mrope_position_ids_images")
def test_mrope_ids_images_attnlib(benchmark, prompts_images):
    ids, mask, ig, _, _ = prompts_images
    config = MRopeConfig.from_hf_config(_hf_qwen2_5_vl()[2])
    _info(benchmark, "attnlib mrope_position_ids")
    benchmark(mrope_position_ids, ids, config, image_grid_thw=ig, attention_mask=mask)


@pytest.mark.benchmark(group="mrope_position_ids_images_omni")
def test_mrope_ids_images_omni_transformers(benchmark, prompts_images):
    ids, mask, ig, _, _ = prompts_images
    me, get_rope_index, _ = _hf_omni()
    _info(benchmark, "transformers Qwen3-Omni get_rope_index", baseline=True)
    benchmark.pedantic(get_rope_index, args=(me, ids, ig, None, mask), rounds=HF_ROUNDS, iterations=1)


@pytest.mark.benchmark(group="mrope_position_ids_images_omni")
def test_mrope_ids_images_omni_attnlib(benchmark, prompts_images):
    ids, mask, ig, _, _ = prompts_images
    config = MRopeConfig.from_hf_config(_hf_omni()[2])
    _info(benchmark, "attnlib mrope_position_ids (qwen3_omni)")
    benchmark(mrope_position_ids, ids, config, image_grid_thw=ig, attention_mask=mask)


@pytest.mark.benchmark(group="mrope_position_ids_omni_audio")
def test_mrope_ids_omni_audio_transformers(benchmark, prompts_omni_audio):
    ids, mask, ig, vg, spg, feats = prompts_omni_audio
    me, get_rope_index, _ = _hf_omni()
    _info(benchmark, "transformers Qwen3-Omni get_rope_index (use_audio_in_video)", baseline=True)
    benchmark.pedantic(get_rope_index, args=(me, ids, ig, vg, mask), kwargs=dict(
        use_audio_in_video=True, audio_seqlens=feats, second_per_grids=spg), rounds=HF_ROUNDS, iterations=1)


@pytest.mark.benchmark(group="mrope_position_ids_omni_audio")
def test_mrope_ids_omni_audio_attnlib(benchmark, prompts_omni_audio):
    ids, mask, ig, vg, spg, _ = prompts_omni_audio
    config = MRopeConfig.from_hf_config(_hf_omni()[2])
    _info(benchmark, "attnlib mrope_position_ids (qwen3_omni)")
    benchmark(mrope_position_ids, ids, config, image_grid_thw=ig, video_grid_thw=vg, second_per_grid_ts=spg,
              attention_mask=mask)


S_ROT, HQ, HKV, D = 4096, 16, 4, 128


def _rot_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, S_ROT, HQ, D, generator=g).to(dtype)
    k = torch.randn(1, S_ROT, HKV, D, generator=g).to(dtype)
    ang = torch.arange(S_ROT, dtype=torch.float32)[:, None] * (10000.0 ** (-torch.arange(0, D, 2) / D))
    return q, k, ang.cos(), ang.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rotary_transformers_eager(benchmark, dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, cos, sin = _rot_inputs(dtype)
    # transformers' layout: [B, H, S, D] and a full-width table in x's dtype
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    cos_full, sin_full = torch.cat((cos, cos), -1)[None].to(dtype), torch.cat((sin, sin), -1)[None].to(dtype)
    benchmark.group = f"rotary_apply_{str(dtype)[6:]}"
    _info(benchmark, "transformers apply_rotary_pos_emb (eager)", baseline=True)
    benchmark(apply_rotary_pos_emb, qt, kt, cos_full, sin_full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rotary_attnlib(benchmark, dtype):
    q, k, cos, sin = _rot_inputs(dtype)
    benchmark.group = f"rotary_apply_{str(dtype)[6:]}"
    _info(benchmark, "attnlib apply_rotary_qk (torch path)")
    benchmark(apply_rotary_qk, q, k, cos, sin)


@pytest.mark.benchmark(group="mrope_table")
def test_mrope_table_transformers(benchmark, prompts):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    config = transformers.Qwen2_5_VLConfig(text_config=dict(
        hidden_size=2048, num_attention_heads=16, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                   "mrope_section": [16, 24, 24]})).text_config
    emb = Qwen2_5_VLRotaryEmbedding(config)
    pos = torch.randint(0, 5000, (3, *prompts[0].shape))
    _info(benchmark, "transformers Qwen2_5_VLRotaryEmbedding", baseline=True)
    benchmark(emb, torch.zeros(1), pos)


@pytest.mark.benchmark(group="mrope_table")
def test_mrope_table_attnlib(benchmark, prompts):
    rope = MRotaryEmbedding(128, 1e6, [16, 24, 24])
    pos = torch.randint(0, 5000, (3, *prompts[0].shape))
    _info(benchmark, "attnlib MRotaryEmbedding.cos_sin (half-width table)")
    benchmark(rope.cos_sin, pos)
