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

import bisect
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .rotary import _kernel_for, apply_rotary_qk, rotary_inv_freq

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
def _check_grid(grid, name: str) -> list:
    """``[N, 3]`` int grids as a list of ``[t, h, w]`` (validated)."""
    if grid is None:
        return []
    grid = torch.as_tensor(grid)
    if grid.dim() != 2 or grid.shape[-1] != 3 or grid.is_floating_point():
        raise ValueError(f"{name} must be an int tensor [N, 3] of (t, h, w) patch counts, got {tuple(grid.shape)} {grid.dtype}")
    out = grid.tolist()
    if any(v <= 0 for row in out for v in row):
        raise ValueError(f"{name} entries must be positive, got {out}")
    return out


def _blocks(is_tok, grid: list, merge: int, name: str, device):
    """Assign the flagged tokens (flat order) to consecutive grids.

    Returns (token flat indices [M] tensor, local index in its block [M] tensor, merged grids
    ``[(t, h, w), ...]`` and token counts per block as Python lists). Per-token block parameters are
    expanded with ``repeat_interleave(param, sizes)`` (cheaper than gathering by block id); the
    per-block arithmetic is plain Python over the (few) grids.
    """
    if any(h % merge or w % merge for _, h, w in grid):
        raise ValueError(f"{name} heights/widths must be divisible by spatial_merge_size={merge}, got {grid}")
    llm = [(t, h // merge, w // merge) for t, h, w in grid]
    sizes = [t * h * w for t, h, w in llm]
    tok = torch.nonzero(is_tok).squeeze(1)
    total = sum(sizes)
    if tok.numel() != total:
        what = "image" if name.startswith("image") else "video"
        raise ValueError(
            f"{tok.numel()} {what} placeholder tokens in input_ids (outside padding) but {name} describes {total} "
            f"(= sum of t*h*w/{merge}**2 over {len(grid)} grids). If the prompt was truncated, use "
            "attnlib.rope.reconcile_image_tokens to drop the orphaned tokens and grids first.")
    starts, acc = [], 0
    for n in sizes:
        starts.append(acc)
        acc += n
    sizes_t = torch.tensor(sizes, device=device)
    local = torch.arange(total, device=device) - torch.repeat_interleave(
        torch.tensor(starts, device=device), sizes_t, output_size=total)
    return tok, local, llm, sizes, starts, sizes_t


def _time_offsets(variant, kind, t_idx, spg_tok, tps):
    """Temporal offsets of tokens with merged temporal index ``t_idx`` (see the module docstring);
    ``spg_tok`` is each token's seconds per grid step."""
    if variant == "qwen3_omni":
        if kind == "image":
            return (t_idx * int(tps) if float(tps).is_integer() else t_idx.float() * tps).double()
        return ((t_idx.float() * spg_tok) * float(tps)).double()
    if variant == "qwen2_5_vl" and kind == "video":
        return ((t_idx.float() * spg_tok) * float(tps)).long()
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
            Qwen3-Omni videos; default 1.0; ignored by ``qwen2_vl`` and ``qwen3_vl``).
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
    valid = None  # no padding
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"attention_mask must have input_ids' shape {(B, S)}, got {tuple(attention_mask.shape)}")
        valid = (attention_mask.to(device=input_ids.device) != 0).reshape(-1)
    pos, deltas = _positions_flat(input_ids.reshape(-1), valid, [S] * B, config, image_grid_thw,
                                  video_grid_thw, second_per_grid_ts)
    return pos.view(3, B, S), deltas


def _positions_flat(ids, valid, seqlens, config, image_grid_thw, video_grid_thw, second_per_grid_ts):
    """Core on a flat token stream holding sequences of lengths ``seqlens`` back to back
    (``valid`` [N] bool marks real tokens; None: no padding).

    Every token gets an increment: 1 for a real text (or standalone audio) token, the block's extent
    (max offset + 1) on a vision block's last token, 0 elsewhere. A token's start position is the
    exclusive cumulative sum of increments within its sequence; vision tokens add their (t, h, w)
    offsets. Each step is a whole-tensor op; nothing loops over tokens.
    """
    device = ids.device
    variant, merge, tps = config.variant, config.spatial_merge_size, config.tokens_per_second
    is_float = variant == "qwen3_omni"
    dtype = torch.float64 if is_float else torch.long
    N, n_seg = ids.numel(), len(seqlens)
    lens = torch.tensor(seqlens, dtype=torch.long, device=device)
    cu = torch.cumsum(lens, 0)  # sequence ends (exclusive)

    image_grid = _check_grid(image_grid_thw, "image_grid_thw")
    video_grid = _check_grid(video_grid_thw, "video_grid_thw")
    n_videos = len(video_grid)
    if second_per_grid_ts is None or variant in ("qwen2_vl", "qwen3_vl"):  # unused by these two
        spg = torch.ones(n_videos, dtype=torch.float32, device=device)
    else:
        spg = torch.as_tensor(second_per_grid_ts, device=device).to(torch.float32).reshape(-1)
        if spg.numel() != n_videos:
            raise ValueError(f"second_per_grid_ts has {spg.numel()} entries but video_grid_thw has {n_videos} videos")
    if variant == "qwen3_vl" and n_videos:
        # Qwen3-VL: one block per frame (frames are separated by timestamp text), temporal offset 0.
        spg = torch.repeat_interleave(spg, torch.tensor([t for t, _, _ in video_grid], device=device))
        video_grid = [[1, h, w] for t, h, w in video_grid for _ in range(t)]
    ends_list = list(itertools.accumulate(seqlens))

    inc = torch.ones(N, dtype=dtype, device=device) if valid is None else valid.to(dtype)
    off = None  # [3, N] vision offsets, allocated when there is vision
    omni = None  # lazily built helpers for Qwen3-Omni's audio-in-video runs
    mixed = []  # (sequence, first flat index, max offset) of audio-in-video runs

    for kind, grid, token_id in (("image", image_grid, config.image_token_id), ("video", video_grid, config.video_token_id)):
        is_tok = ids == token_id if valid is None else (ids == token_id) & valid
        if not grid and not bool(is_tok.any()):
            continue
        name = f"{kind}_grid_thw"
        tok, local, llm, sizes, starts, sizes_t = _blocks(is_tok, grid, merge, name, device)
        M = tok.numel()
        hw_tok = torch.repeat_interleave(torch.tensor([h * w for _, h, w in llm], device=device), sizes_t, output_size=M)
        w_tok = torch.repeat_interleave(torch.tensor([w for _, _, w in llm], device=device), sizes_t, output_size=M)
        spg_tok = torch.repeat_interleave(spg, sizes_t, output_size=M) if kind == "video" else None
        t_idx = torch.div(local, hw_tok, rounding_mode="floor")
        rem = local - t_idx * hw_tok
        h_idx = torch.div(rem, w_tok, rounding_mode="floor")
        if off is None:
            off = torch.zeros(3, N, dtype=dtype, device=device)
        off[0].index_copy_(0, tok, _time_offsets(variant, kind, t_idx, spg_tok, tps).to(dtype))
        off[1].index_copy_(0, tok, h_idx.to(dtype))
        off[2].index_copy_(0, tok, (rem - h_idx * w_tok).to(dtype))
        inc.index_fill_(0, tok, 0)
        # per block (Python over the few grids): first/last token, same sequence, one run of real tokens
        n_blocks = len(sizes)
        fl = tok[torch.tensor(starts + [st + n - 1 for st, n in zip(starts, sizes)], device=device)].tolist()
        first, last = fl[:n_blocks], fl[n_blocks:]
        seq_of = [bisect.bisect_right(ends_list, i) for i in fl]
        split = [seq_of[b] != seq_of[n_blocks + b] or last[b] - first[b] + 1 != sizes[b] for b in range(n_blocks)]
        if valid is not None and any(split):  # padding holes inside a block are fine: count real tokens
            real_before = torch.cumsum(valid.long(), 0)
            span = (real_before[torch.tensor(last, device=device)] - real_before[torch.tensor(first, device=device)] + 1).tolist()
            split = [sp and (seq_of[b] != seq_of[n_blocks + b] or span[b] != sizes[b]) for b, sp in enumerate(split)]
        t_last = torch.tensor([t - 1 for t, _, _ in llm], device=device)
        last_t = _time_offsets(variant, kind, t_last, spg if kind == "video" else None, tps).tolist()
        extent = [max(lt, h - 1, w - 1) + 1 for lt, (_, h, w) in zip(last_t, llm)]
        if kind == "video" and config.audio_token_id is not None and bool((ids == config.audio_token_id).any()):
            if omni is None:
                omni = _OmniHelpers(ids, torch.ones_like(ids, dtype=torch.bool) if valid is None else valid,
                                    config.audio_token_id, lens)
            _audio_in_video(split, extent, first, last, sizes, off, inc, omni, mixed, dtype)
        if any(split):
            b = split.index(True)
            raise ValueError(
                f"the placeholder tokens of {kind} {b} ({sizes[b]} tokens for grid {grid[b]}) are not one "
                "contiguous run inside one sequence: check that input_ids and the grids belong together "
                "(or use reconcile_image_tokens after truncation)")
        inc.index_add_(0, torch.tensor(last, device=device), torch.tensor(extent, dtype=dtype, device=device))

    L = seqlens[0] if n_seg else 0
    if n_seg and L > 0 and all(n == L for n in seqlens):  # a padded batch: cumulative sums per row
        csum = torch.cumsum(inc.view(n_seg, L), 1).view(-1)
        seq_total = csum.view(n_seg, L)[:, -1]
        start = csum - inc
        n_valid = lens if valid is None else valid.view(n_seg, L).sum(1)
    else:  # packed sequences of different lengths
        csum = torch.cumsum(inc, 0)
        at_end = (cu - 1).clamp_min(0)  # cumulative sums at each sequence's end (0 before the first token)
        ends_sum = torch.where(cu > 0, csum[at_end], 0) if N else torch.zeros(n_seg, dtype=dtype, device=device)
        seq_total = torch.diff(ends_sum, prepend=ends_sum.new_zeros(1))
        start = csum - inc - torch.repeat_interleave(torch.cumsum(seq_total, 0) - seq_total, lens, output_size=N)
        if valid is None:
            n_valid = lens
        else:
            real = torch.where(cu > 0, torch.cumsum(valid.long(), 0)[at_end], 0) if N else torch.zeros_like(cu)
            n_valid = torch.diff(real, prepend=real.new_zeros(1))
    if valid is not None:
        start = start * valid  # padded slots: 0
    pos = start.expand(3, N).clone() if off is None else start + off
    top = seq_total - 1  # every item starts after the previous one's max, so the last one holds the max
    for seq, first_tok, block_max in mixed:  # Qwen3-Omni: text after these runs may start below their max
        top[seq] = torch.maximum(top[seq], start[first_tok] + block_max)
    deltas = (top + 1 - n_valid.to(dtype)).unsqueeze(1)
    if is_float:
        return pos.float(), deltas.float()
    return pos, deltas


class _OmniHelpers:
    """Views Qwen3-Omni's audio-in-video merge needs: real tokens in order, their audio flags and sequence."""

    def __init__(self, ids, valid, audio_token_id, lens):
        self.is_audio = (ids == audio_token_id) & valid
        self.vidx = torch.nonzero(valid).squeeze(1)  # flat index of the k-th real token
        self.compressed = torch.cumsum(valid.long(), 0) - 1  # index among real tokens
        self.is_audio_c = self.is_audio[self.vidx]
        seg = torch.repeat_interleave(torch.arange(lens.numel(), device=ids.device), lens)
        self.seg = seg
        self.seg_c = seg[self.vidx]
        self.not_audio_c = torch.nonzero(~self.is_audio_c).squeeze(1).tolist()  # real-token indices, sorted
        cu = torch.cumsum(lens, 0)
        real_ends = torch.where(cu > 0, (self.compressed + 1)[(cu - 1).clamp_min(0)], 0) if ids.numel() else cu
        self.real_ends = real_ends.tolist()  # end (exclusive) of each sequence among real tokens


def _audio_in_video(split, extent, first, last, sizes, off, inc, omni, mixed, dtype):
    """Qwen3-Omni ``use_audio_in_video``: a video whose run also holds audio tokens.

    The run starts at the video's first token and extends over interleaved audio tokens and the audio
    tokens right after its last video token. As the reference does, video positions (offset
    ``(t, h, w)``) and audio positions (offset ``a`` on all axes) are merged by temporal offset, video
    first on ties, and given to the run's tokens in order; the next text starts one after the max of
    the merged sequence's last same-source stretch. Loops over videos, never over tokens; updates
    the per-video lists ``split``, ``extent`` and ``last`` in place.
    """
    for b in range(len(first)):
        c0, c1 = int(omni.compressed[first[b]]), int(omni.compressed[last[b]])
        n_video = int((~omni.is_audio_c[c0: c1 + 1]).sum())
        # audio tokens right after the last video token, up to the next non-audio token or sequence end
        k = bisect.bisect_right(omni.not_audio_c, c1)
        stop = omni.not_audio_c[k] if k < len(omni.not_audio_c) else omni.vidx.numel()
        stop = min(stop, omni.real_ends[int(omni.seg_c[c0])])
        tail = stop - (c1 + 1)
        n_audio = (c1 + 1 - c0) - n_video + tail
        if n_audio == 0:
            continue
        run_tok = omni.vidx[c0: c1 + 1 + tail]
        video_tok = run_tok[~omni.is_audio[run_tok]]
        if video_tok.numel() != sizes[b] or int(omni.seg[run_tok[0]]) != int(omni.seg[run_tok[-1]]):
            split[b] = True
            continue
        merged = torch.cat((off[:, video_tok], torch.arange(n_audio, device=off.device, dtype=dtype).expand(3, -1)), dim=1)
        source = torch.cat((torch.zeros(n_video, dtype=torch.bool, device=off.device),
                            torch.ones(n_audio, dtype=torch.bool, device=off.device)))
        order = torch.sort(merged[0], stable=True).indices
        merged, source = merged[:, order], source[order]
        off[:, run_tok] = merged
        inc[run_tok] = 0
        # the last stretch of the merged sequence coming from one source
        changes = torch.nonzero(source != source[-1])
        tail_start = int(changes[-1, 0]) + 1 if changes.numel() else 0
        extent[b] = merged[:, tail_start:].max().item() + 1
        last[b] = int(run_tok[-1])
        split[b] = False
        mixed.append((int(omni.seg[run_tok[0]]), int(run_tok[0]), merged.max()))


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

    Returns ``(q_rot, k_rot)`` in q's / k's dtype, float32 math. On CUDA with Triton installed (and
    ``ATTNLIB_ROTARY_KERNEL`` not ``0``) this is one fused kernel launch that computes the angles from
    the three position rows in-kernel (``attnlib_kernels.rotary.apply_mrope_qk``): no ``[B, S, R]``
    cos/sin table is materialized. Elsewhere the table path below is used (and is the reference).
    """
    key = (tuple(int(v) for v in mrope_section), float(theta), bool(interleaved))
    rope = _MROPE_CACHE.get(key)
    if rope is None:
        rope = _MROPE_CACHE[key] = MRotaryEmbedding(2 * sum(key[0]), key[1], key[0], key[2])
    if all(isinstance(t, torch.Tensor) for t in (q, k, position_ids)):  # else the table path names the bad argument
        inv_freq = rope._on(rope._inv_freq, q.device)
        kernels = _kernel_for(q, inv_freq, k)
        if kernels is not None and position_ids.device == q.device:
            return kernels.apply_mrope_qk(q, k, position_ids, inv_freq, rope.mrope_section,
                                          interleaved_sections=rope.interleaved)
    cos, sin = rope.cos_sin(position_ids)
    return apply_rotary_qk(q, k, cos, sin, interleaved=False)
