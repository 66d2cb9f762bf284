"""Multimodal RoPE (mRoPE) for Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-Omni.

Every token gets three positions (temporal, height, width). Text tokens use the same value on all
three axes and count up by one. A vision block (the placeholder tokens of one image, one video, or
-- for Qwen3-VL -- one video frame) starting at position ``p`` gets ``p + (t, h, w)`` for its
merged-patch grid, tokens in ``(t, h, w)`` row-major order, and the text after it starts at
``max(position in the block) + 1`` over all three axes (the original model semantics; see
``docs/rope.md`` for where transformers 5.x differs).

Temporal offsets per variant (``t`` = merged temporal index of the token):

* ``qwen2_vl``: ``t``.
* ``qwen2_5_vl``: videos ``int((t * second_per_grid_t) * tokens_per_second)`` (float32 product,
  truncated); images ``t``.
* ``qwen3_vl``: videos are split into one block per frame (timestamps are text), so ``0``.
* ``qwen3_omni``: images ``t * position_id_per_seconds``, videos
  ``(t * second_per_grid_t) * position_id_per_seconds`` kept fractional -- the reference keeps
  float positions, so this variant returns float32 position ids. Audio tokens count like text;
  audio inside a video (``use_audio_in_video``: video and audio tokens in one run) is merged by
  temporal position (video first on ties) as the reference does, and the text after it starts at
  ``max(last merged run) + 1``.

Everything is vectorized over tokens; only Qwen3-Omni's audio-in-video merge loops over those blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .rotary import apply_rotary_qk, rotary_inv_freq

__all__ = ["MRopeConfig", "mrope_position_ids", "MRotaryEmbedding", "apply_mrope", "VARIANTS"]

VARIANTS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_omni")

_MODEL_TYPES = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl",
    "qwen3_omni_moe": "qwen3_omni",
    "qwen3_omni_moe_thinker": "qwen3_omni",
}


@dataclass(frozen=True)
class MRopeConfig:
    """What :func:`mrope_position_ids` needs to know about a model.

    Attributes:
        variant: one of ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``, ``qwen3_omni``.
        image_token_id, video_token_id: placeholder token ids (one token per merged patch).
        spatial_merge_size: patches merged per side into one LLM token (2 for every Qwen-VL).
        tokens_per_second: temporal positions per second of video: Qwen2.5-VL's
            ``vision_config.tokens_per_second``, Qwen3-Omni's ``position_id_per_seconds``; unused by
            ``qwen2_vl`` and ``qwen3_vl``.
        audio_token_id: Qwen3-Omni's audio placeholder (``None`` elsewhere).
    """

    variant: str
    image_token_id: int
    video_token_id: int
    spatial_merge_size: int = 2
    tokens_per_second: float = 1.0
    audio_token_id: Optional[int] = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not isinstance(self.spatial_merge_size, int) or self.spatial_merge_size < 1:
            raise ValueError(f"spatial_merge_size must be a positive int, got {self.spatial_merge_size!r}")
        if self.variant == "qwen3_omni" and self.audio_token_id is None:
            raise ValueError("variant 'qwen3_omni' needs audio_token_id")

    @classmethod
    def from_hf_config(cls, cfg) -> "MRopeConfig":
        """Read a transformers config (Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), Qwen3-Omni-MoE or its thinker)."""
        model_type = getattr(cfg, "model_type", None)
        if model_type == "qwen3_omni_moe" and hasattr(cfg, "thinker_config"):
            cfg = cfg.thinker_config
        variant = _MODEL_TYPES.get(model_type)
        if variant is None:
            raise ValueError(f"no mRoPE variant known for model_type={model_type!r}; supported: {sorted(_MODEL_TYPES)}")
        vision = cfg.vision_config
        if variant == "qwen2_5_vl":
            tps = float(vision.tokens_per_second)
        elif variant == "qwen3_omni":
            tps = float(cfg.position_id_per_seconds)
        else:
            tps = 1.0
        return cls(variant=variant, image_token_id=int(cfg.image_token_id), video_token_id=int(cfg.video_token_id),
                   spatial_merge_size=int(vision.spatial_merge_size), tokens_per_second=tps,
                   audio_token_id=getattr(cfg, "audio_token_id", None) if variant == "qwen3_omni" else None)


# ---------------------------------------------------------------------------------------------------
# position ids
# ---------------------------------------------------------------------------------------------------
def _check_grid(grid, name: str, device) -> torch.Tensor:
    if grid is None:
        return torch.zeros(0, 3, dtype=torch.long, device=device)
    grid = torch.as_tensor(grid)
    if grid.dim() != 2 or grid.shape[-1] != 3 or grid.is_floating_point():
        raise ValueError(f"{name} must be an int tensor [N, 3] of (t, h, w) patch counts, got {tuple(grid.shape)} {grid.dtype}")
    if (grid <= 0).any():
        raise ValueError(f"{name} entries must be positive, got {grid.tolist()}")
    return grid.to(device=device, dtype=torch.long)


def _blocks(is_tok, grid, merge: int, name: str):
    """Assign the flagged tokens (flat order) to consecutive grids.

    Returns (token flat indices [M], block of each [M], local index [M], llm grid [N, 3], sizes [N]).
    """
    if (grid[:, 1:] % merge).any():
        raise ValueError(f"{name} heights/widths must be divisible by spatial_merge_size={merge}, got {grid.tolist()}")
    llm = torch.stack((grid[:, 0], grid[:, 1] // merge, grid[:, 2] // merge), dim=1)
    sizes = llm.prod(dim=1)
    tok = torch.nonzero(is_tok).squeeze(1)
    total = int(sizes.sum())
    if tok.numel() != total:
        what = "image" if name.startswith("image") else "video"
        raise ValueError(
            f"{tok.numel()} {what} placeholder tokens in input_ids (outside padding) but {name} describes {total} "
            f"(= sum of t*h*w/{merge}**2 over {grid.shape[0]} grids). If the prompt was truncated, use "
            "attnlib.rope.reconcile_image_tokens to drop the orphaned tokens and grids first.")
    block = torch.repeat_interleave(torch.arange(grid.shape[0], device=grid.device), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    local = torch.arange(total, device=grid.device) - starts[block]
    return tok, block, local, llm, sizes


def _time_offsets(variant, kind, t_idx, block, spg, tps):
    """Temporal offsets of tokens with merged temporal index ``t_idx`` (see the module docstring)."""
    if variant == "qwen3_omni":
        if kind == "image":
            return (t_idx * int(tps) if float(tps).is_integer() else t_idx.float() * tps).double()
        return ((t_idx.float() * spg[block]) * float(tps)).double()
    if variant == "qwen2_5_vl" and kind == "video":
        return ((t_idx.float() * spg[block]) * float(tps)).long()
    return t_idx


def mrope_position_ids(input_ids: torch.Tensor, config: MRopeConfig, *, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None, attention_mask=None):
    """3-axis mRoPE position ids for a batch of token sequences.

    Args:
        input_ids: ``[B, S]`` token ids; each image / video is its run of placeholder tokens
            (``t * h * w / spatial_merge_size**2`` of them), in the order of the grids.
        config: :class:`MRopeConfig`.
        image_grid_thw, video_grid_thw: ``[N, 3]`` patch grids (before merging), in the order the
            placeholders appear across the batch (row-major).
        second_per_grid_ts: ``[num_videos]`` seconds per temporal grid step (Qwen2.5-VL /
            Qwen3-Omni videos; default 1.0).
        attention_mask: ``[B, S]``, nonzero = real token. Padding (anywhere: left, right, holes) is
            skipped: positions count real tokens only and padded slots get position 0.

    Returns ``(position_ids, deltas)``: ``[3, B, S]`` (int64; float32 for ``qwen3_omni``, whose
    reference keeps fractional video times) and ``[B, 1]`` with
    ``deltas[b] = max(position_ids[:, b]) + 1 - (number of real tokens in row b)``: the next generated
    token of row ``b`` gets position ``(real tokens so far) + deltas[b]`` on all three axes.

    Raises ValueError when placeholder counts do not match the grids, or a block is split by text
    or across rows.
    """
    if not isinstance(config, MRopeConfig):
        raise TypeError(f"config must be an MRopeConfig (MRopeConfig.from_hf_config(hf_config)), got {type(config).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an int tensor [B, S], got {getattr(input_ids, 'shape', input_ids)!r}")
    B, S = input_ids.shape
    if attention_mask is None:
        valid = torch.ones(B, S, dtype=torch.bool, device=input_ids.device)
    else:
        if tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"attention_mask must have input_ids' shape {(B, S)}, got {tuple(attention_mask.shape)}")
        valid = attention_mask.to(device=input_ids.device) != 0
    seg = torch.arange(B, device=input_ids.device).repeat_interleave(S)
    pos, deltas = _positions_flat(input_ids.reshape(-1), valid.reshape(-1), seg, B, config, image_grid_thw,
                                  video_grid_thw, second_per_grid_ts)
    return pos.view(3, B, S), deltas


def _positions_flat(ids, valid, seg, n_seg, config, image_grid_thw, video_grid_thw, second_per_grid_ts):
    """Core on a flat token stream: ``seg`` (non-decreasing) names the sequence of each token."""
    device = ids.device
    variant, merge, tps = config.variant, config.spatial_merge_size, config.tokens_per_second
    is_float = variant == "qwen3_omni"
    dtype = torch.float64 if is_float else torch.long
    N = ids.numel()

    image_grid = _check_grid(image_grid_thw, "image_grid_thw", device)
    video_grid = _check_grid(video_grid_thw, "video_grid_thw", device)
    n_videos = video_grid.shape[0]
    if second_per_grid_ts is None:
        spg = torch.ones(n_videos, dtype=torch.float32, device=device)
    else:
        spg = torch.as_tensor(second_per_grid_ts, device=device).to(torch.float32).reshape(-1)
        if spg.numel() != n_videos:
            raise ValueError(f"second_per_grid_ts has {spg.numel()} entries but video_grid_thw has {n_videos} videos")
    if variant == "qwen3_vl" and n_videos:
        # Qwen3-VL: one block per frame (frames are separated by timestamp text), temporal offset 0.
        video_grid = torch.repeat_interleave(video_grid, video_grid[:, 0], dim=0)
        video_grid[:, 0] = 1
        spg = torch.repeat_interleave(spg, torch.as_tensor(video_grid_thw, device=device)[:, 0].long())

    off = torch.zeros(3, N, dtype=dtype, device=device)
    in_block = torch.zeros(N, dtype=torch.bool, device=device)
    inc = torch.zeros(N, dtype=dtype, device=device)
    compressed = torch.cumsum(valid.long(), 0) - 1  # index among valid tokens
    vidx = torch.nonzero(valid).squeeze(1)  # flat index of the k-th valid token
    is_audio = (ids == config.audio_token_id) & valid if config.audio_token_id is not None else None

    for kind, grid, token_id in (("image", image_grid, config.image_token_id), ("video", video_grid, config.video_token_id)):
        if grid.shape[0] == 0 and not ((ids == token_id) & valid).any():
            continue
        name = f"{kind}_grid_thw"
        tok, block, local, llm, sizes = _blocks((ids == token_id) & valid, grid, merge, name)
        hw = llm[:, 1] * llm[:, 2]
        w = llm[block, 2]
        t_idx, h_idx, w_idx = local // hw[block], (local // w) % llm[block, 1], local % w
        t_off = _time_offsets(variant, kind, t_idx, block, spg, tps)
        off[0, tok] = t_off.to(dtype)
        off[1, tok] = h_idx.to(dtype)
        off[2, tok] = w_idx.to(dtype)
        in_block[tok] = True
        ends = torch.cumsum(sizes, 0)
        first, last = tok[ends - sizes], tok[ends - 1]
        split = (compressed[last] - compressed[first] + 1 != sizes) | (seg[first] != seg[last])
        last_t = _time_offsets(variant, kind, llm[:, 0] - 1, torch.arange(llm.shape[0], device=device), spg, tps)
        extent = torch.maximum(last_t.to(dtype), (torch.maximum(llm[:, 1], llm[:, 2]) - 1).to(dtype)) + 1
        if kind == "video" and is_audio is not None:
            split, extent, last = _audio_in_video(split, extent, first, last, sizes, off, in_block, is_audio,
                                                  compressed, vidx, seg, dtype)
        if split.any():
            b = int(torch.nonzero(split)[0, 0])
            raise ValueError(
                f"the placeholder tokens of {kind} {b} ({int(sizes[b])} tokens for grid {grid[b].tolist()}) are not one "
                "contiguous run inside one sequence: check that input_ids and the grids belong together "
                "(or use reconcile_image_tokens after truncation)")
        inc.index_add_(0, last, extent)

    inc = inc + (valid & ~in_block).to(dtype)
    csum = torch.cumsum(inc, 0)
    seg_total = torch.zeros(n_seg, dtype=dtype, device=device).index_add_(0, seg, inc)
    seg_base = torch.cumsum(seg_total, 0) - seg_total
    start = csum - inc - seg_base[seg]
    pos = torch.where(valid, start, torch.zeros((), dtype=dtype, device=device)).unsqueeze(0) + off
    pos = pos * valid

    n_valid = torch.zeros(n_seg, dtype=torch.long, device=device).index_add_(0, seg, valid.long())
    top = torch.full((n_seg,), -1, dtype=dtype, device=device)
    top = top.scatter_reduce(0, seg, torch.where(valid, pos.amax(0), torch.full_like(start, -1)), "amax")
    deltas = (top + 1 - n_valid.to(dtype)).unsqueeze(1)
    if is_float:
        return pos.float(), deltas.float()
    return pos, deltas


def _audio_in_video(split, extent, first, last, sizes, off, in_block, is_audio, compressed, vidx, seg, dtype):
    """Qwen3-Omni ``use_audio_in_video``: a video whose run also holds audio tokens.

    The run starts at the video's first token and extends over interleaved audio tokens and the audio
    tokens right after its last video token. As the reference does, video positions (offset
    ``(t, h, w)``) and audio positions (offset ``a`` on all axes) are merged by temporal offset, video
    first on ties, and given to the run's tokens in order; the next text starts one after the max of
    the merged sequence's last same-source stretch.
    """
    is_audio_c = is_audio[vidx]
    seg_c = seg[vidx]
    n_valid = vidx.numel()
    last = last.clone()
    split = split.clone()
    for b in range(first.numel()):
        c0, c1 = int(compressed[first[b]]), int(compressed[last[b]])
        run = torch.arange(c0, c1 + 1, device=vidx.device)
        n_video = int((~is_audio_c[run]).sum())
        tail = (is_audio_c[c1 + 1:] & (seg_c[c1 + 1:] == seg_c[c0])).long().cumprod(0).sum() if c1 + 1 < n_valid else 0
        n_audio = int(run.numel() - n_video + int(tail))
        if n_audio == 0:
            continue
        run_tok = vidx[c0: c1 + 1 + int(tail)]
        video_tok = run_tok[~is_audio[run_tok]]
        if video_tok.numel() != int(sizes[b]) or int(seg[run_tok[0]]) != int(seg[run_tok[-1]]):
            split[b] = True
            continue
        video_off = off[:, video_tok]
        audio_off = torch.arange(n_audio, device=vidx.device, dtype=dtype).expand(3, -1)
        merged = torch.cat((video_off, audio_off), dim=1)
        source = torch.cat((torch.zeros(n_video, dtype=torch.bool, device=vidx.device),
                            torch.ones(n_audio, dtype=torch.bool, device=vidx.device)))
        order = torch.sort(merged[0], stable=True).indices
        merged, source = merged[:, order], source[order]
        off[:, run_tok] = merged
        in_block[run_tok] = True
        # the last stretch of the merged sequence coming from one source
        changes = torch.nonzero(source != source[-1])
        tail_start = int(changes[-1, 0]) + 1 if changes.numel() else 0
        extent[b] = merged[:, tail_start:].max() + 1
        last[b] = run_tok[-1]
        split[b] = False
    return split, extent, last


# ---------------------------------------------------------------------------------------------------
# rotary tables for mRoPE
# ---------------------------------------------------------------------------------------------------
def _axis_of_frequency(R: int, mrope_section: Sequence[int], interleaved: bool) -> torch.Tensor:
    s = [int(v) for v in mrope_section]
    if len(s) != 3 or any(v < 0 for v in s) or sum(s) != R:
        raise ValueError(f"mrope_section must be three non-negative ints summing to head_dim // 2 = {R}, got {list(mrope_section)}")
    if not interleaved:
        return torch.repeat_interleave(torch.arange(3), torch.tensor(s))
    axis = torch.zeros(R, dtype=torch.long)
    f = torch.arange(R)
    axis[(f % 3 == 1) & (f < 3 * s[1])] = 1
    axis[(f % 3 == 2) & (f < 3 * s[2])] = 2
    if int((axis == 1).sum()) != s[1] or int((axis == 2).sum()) != s[2]:
        raise ValueError(f"interleaved mrope_section {s} does not fit {R} frequencies (needs 3 * section[1|2] <= {R + 2})")
    return axis


class MRotaryEmbedding:
    """cos/sin tables for mRoPE: frequency ``f`` takes its angle from one of the three position rows.

    Args:
        head_dim: rotary dims; ``R = head_dim // 2`` frequencies ``theta ** (-2f / head_dim)``.
        theta: frequency base (``rope_theta``).
        mrope_section: three counts summing to ``R``.
        interleaved: False -- sectioned (Qwen2-VL / Qwen2.5-VL, e.g. ``[16, 24, 24]``): the first
            ``section[0]`` frequencies use the temporal row, the next ``section[1]`` height, the rest
            width. True -- interleaved (Qwen3-VL / Qwen3-Omni, e.g. ``[24, 20, 20]``): frequency ``f``
            uses height if ``f % 3 == 1 and f < 3 * section[1]``, width if ``f % 3 == 2 and
            f < 3 * section[2]``, else temporal. (This is about which position drives a frequency;
            the dims are always paired rotate-half, ``apply_rotary(..., interleaved=False)``.)
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, mrope_section: Sequence[int] = (16, 24, 24),
                 interleaved: bool = False):
        self.head_dim = head_dim
        self.theta = float(theta)
        self.mrope_section = tuple(int(v) for v in mrope_section)
        self.interleaved = bool(interleaved)
        self._inv_freq = {torch.device("cpu"): rotary_inv_freq(head_dim, self.theta)}
        self._axis = {torch.device("cpu"): _axis_of_frequency(head_dim // 2, self.mrope_section, self.interleaved)}

    def __repr__(self) -> str:
        return (f"MRotaryEmbedding(head_dim={self.head_dim}, theta={self.theta}, mrope_section={list(self.mrope_section)}, "
                f"interleaved={self.interleaved})")

    def _on(self, cache: dict, device) -> torch.Tensor:
        hit = cache.get(device)
        if hit is None:
            hit = cache[device] = cache[torch.device("cpu")].to(device)
        return hit

    def cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` float32 ``[B, S, head_dim // 2]`` for ``position_ids [3, B, S]`` (or ``[T, R]`` for ``[3, T]``).

        ``angle[..., f] = float32(position_ids[axis(f), ...]) * inv_freq[f]``, the product transformers computes.
        """
        if not isinstance(position_ids, torch.Tensor) or position_ids.dim() not in (2, 3) or position_ids.shape[0] != 3:
            raise ValueError("position_ids must be [3, B, S] or packed [3, T] (temporal, height, width rows), got "
                             f"{tuple(getattr(position_ids, 'shape', ()))}")
        device = position_ids.device
        axis = self._on(self._axis, device)
        angles = position_ids.float()[axis].movedim(0, -1) * self._on(self._inv_freq, device)
        return angles.cos(), angles.sin()


_MROPE_CACHE: dict = {}


def apply_mrope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, mrope_section: Sequence[int], *,
                theta: float = 1_000_000.0, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimodal rotary on query and key: ``MRotaryEmbedding(2 * sum(mrope_section), ...)`` + rotate-half.

    Args:
        q, k: ``[B, S, H, D]`` or packed ``[T, H, D]`` (GQA head counts are fine); the first
            ``2 * sum(mrope_section)`` dims are rotated (the whole head for Qwen).
        position_ids: ``[3, B, S]`` / ``[3, T]`` from :func:`mrope_position_ids` or the packing helpers.
        mrope_section, interleaved, theta: as :class:`MRotaryEmbedding` (Qwen2/2.5-VL
            ``[16, 24, 24]`` sectioned; Qwen3-VL / Qwen3-Omni ``[24, 20, 20]`` interleaved).

    Returns ``(q_rot, k_rot)`` in q's / k's dtype, float32 math.
    """
    key = (tuple(int(v) for v in mrope_section), float(theta), bool(interleaved))
    rope = _MROPE_CACHE.get(key)
    if rope is None:
        rope = _MROPE_CACHE[key] = MRotaryEmbedding(2 * sum(key[0]), key[1], key[0], key[2])
    cos, sin = rope.cos_sin(position_ids)
    return apply_rotary_qk(q, k, cos, sin, interleaved=False)
