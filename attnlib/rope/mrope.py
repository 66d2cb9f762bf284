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

Qwen3-Omni positions are summed exactly and rounded to float32 once. With time steps that are
binary fractions (0.25, 0.5, 1, 2 s per grid step ...) that is the reference bit for bit; with others
(e.g. 2/30 s at 30 fps) the reference, which rounds after every float32 addition, can differ in the
last bit, and inside an audio-in-video run its order of audio and video at a tie that only its
rounding creates can differ too.

Everything is vectorized: about ten passes over the tokens and ~130 small tensor ops over the grids,
whatever the number of images, videos, rows or frames (see ``positions_flat``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .rotary import kernel_for, apply_rotary_qk, rotary_inv_freq

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
def _check_grid(grid, name: str, merge: int, device, values: bool = True):
    """``[N, 3]`` int patch grids as a long tensor on ``device`` (validated; the entries only with
    ``values``), or None when absent or empty."""
    if grid is None:
        return None
    if not isinstance(grid, torch.Tensor):
        grid = torch.as_tensor(grid)
    if grid.dim() != 2 or grid.shape[-1] != 3 or grid.is_floating_point():
        raise ValueError(f"{name} must be an int tensor [N, 3] of (t, h, w) patch counts, got {tuple(grid.shape)} {grid.dtype}")
    if grid.dtype != torch.long or grid.device != device:
        grid = grid.to(device=device, dtype=torch.long)
    if not grid.numel():
        return None
    if not values:
        return grid
    if int(grid.min()) <= 0:
        raise ValueError(f"{name} entries must be positive, got {grid.tolist()}")
    if merge > 1 and bool((grid[:, 1:] % merge).any()):
        raise ValueError(f"{name} heights/widths must be divisible by spatial_merge_size={merge}, got {grid.tolist()}")
    return grid


def _time_offsets(variant, k, spg, tps):
    """Temporal offsets of merged temporal index ``k`` (see the module docstring): of an image when
    ``spg`` is None, else of a video with ``spg`` seconds per grid step (like ``k``). int64, float64
    for Qwen3-Omni."""
    if variant == "qwen3_omni":
        if spg is None:
            return (k * int(tps) if float(tps).is_integer() else k.float() * tps).double()
        return ((k.float() * spg) * float(tps)).double()
    if variant == "qwen2_5_vl" and spg is not None:
        return ((k.float() * spg) * float(tps)).long()
    return k


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
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.device != input_ids.device:
            attention_mask = torch.as_tensor(attention_mask, device=input_ids.device)
        valid = attention_mask.bool().reshape(-1)  # nonzero = real token
    pos, deltas = positions_flat(input_ids.reshape(-1), valid, [S] * B, config, image_grid_thw,
                                  video_grid_thw, second_per_grid_ts)
    return pos.view(3, B, S), deltas


def positions_flat(ids, valid, seqlens, config, image_grid_thw, video_grid_thw, second_per_grid_ts):
    """Core on a flat token stream holding sequences of lengths ``seqlens`` back to back
    (``valid`` [N] bool marks real tokens, with equal ``seqlens`` -- a padded batch; None: no padding).

    Each sequence's real tokens are one window of the stream (left, right or no padding; a batch
    with holes is compressed to its real tokens first and scattered back). The output is one
    cumulative sum along the tokens of per-token slopes -- text 1 on every axis, vision 0 on ``t``
    and ``h`` and 1 on ``w``, padding 0 -- plus jumps at a few tokens. With the slopes alone the sum
    is the text position; the jumps, which depend only on the shapes of the blocks and never on
    where a block starts, add the rest:

    * a window: -1 at its first token (its text starts at 0), minus its total after its last;
    * a block: +1 at its first token (it starts at the text position it interrupts) and
      ``extent - 1`` after its last (the text after it starts at ``start + extent``);
    * a row (frame ``k``, height ``j``) of a block: ``(toff(k), j, -1)`` at its first token (its
      offsets, the ``w`` slope taken back) and ``-(toff(k), j, w - 1)`` after its last.

    The rows of all blocks come from one ``repeat_interleave`` over the grids and all jumps are
    added with one ``index_add_``; nothing loops over blocks, rows or tokens in Python. Qwen3-Omni's
    audio-in-video runs are summed over as a whole and written afterwards.
    """
    device = ids.device
    variant, merge, tps = config.variant, config.spatial_merge_size, config.tokens_per_second
    is_float = variant == "qwen3_omni"
    dtype = torch.float64 if is_float else torch.long
    N, n_seq = ids.numel(), len(seqlens)
    if N == 0:
        out_dtype = torch.float32 if is_float else torch.long
        return torch.zeros(3, 0, dtype=out_dtype, device=device), torch.zeros(n_seq, 1, dtype=out_dtype, device=device)

    # -- windows [win_start, win_end): the real tokens of each sequence -------------------------------
    if valid is not None:
        L = seqlens[0]
        v2 = valid.view(n_seq, L)
        n_pad = L - v2.sum(1)
        starts_real = v2[:, 0]
        edges = (v2[:, 1:] != v2[:, :-1]).sum(1)  # padding/real changes along each row
        # real tokens in one run per row: <= 1 change, or 2 with padding on both sides; more: holes
        holes, both_sides, most_pad = torch.stack((edges + starts_real, edges, n_pad)).amax(1).tolist()
        if not most_pad:
            valid = None  # no padding after all
        elif holes > 2:  # padding inside a row: number the real tokens alone, then scatter back
            keep = torch.nonzero(valid).squeeze(1)
            pos, deltas = positions_flat(ids.index_select(0, keep), None, (L - n_pad).tolist(), config, image_grid_thw,
                                          video_grid_thw, second_per_grid_ts)
            return pos.new_zeros(3, N).index_copy_(1, keep, pos), deltas
        else:
            lead = v2.view(torch.uint8).argmax(1) if both_sides == 2 else n_pad * ~starts_real
            win_start = torch.arange(0, N, L, device=device) + lead
            n_real = L - n_pad
    if valid is None:
        if all(n == seqlens[0] for n in seqlens):
            n_real = torch.full((n_seq,), seqlens[0], dtype=torch.long, device=device)
            win_start = torch.arange(0, N, max(seqlens[0], 1), device=device)
        else:
            n_real = torch.tensor(seqlens, dtype=torch.long, device=device)
            win_start = n_real.cumsum(0) - n_real
    win_end = win_start + n_real

    # -- grids --------------------------------------------------------------------------------------
    image_grid = _check_grid(image_grid_thw, "image_grid_thw", merge, device, values=False)
    video_grid = _check_grid(video_grid_thw, "video_grid_thw", merge, device, values=False)
    n_img = 0 if image_grid is None else image_grid.shape[0]
    n_vid = 0 if video_grid is None else video_grid.shape[0]
    spg = None  # seconds per grid step of each video (only Qwen2.5-VL and Qwen3-Omni use it; default 1)
    if second_per_grid_ts is not None and variant in ("qwen2_5_vl", "qwen3_omni"):
        spg = torch.as_tensor(second_per_grid_ts, device=device)
        spg = (spg if spg.dtype == torch.float32 else spg.float()).reshape(-1)
        if spg.numel() != n_vid:
            raise ValueError(f"second_per_grid_ts has {spg.numel()} entries but video_grid_thw has {n_vid} videos")
    if variant == "qwen3_vl" and n_vid:
        # Qwen3-VL: one block per frame (frames are separated by timestamp text), temporal offset 0.
        _check_grid(video_grid, "video_grid_thw", merge, device)
        video_grid = torch.repeat_interleave(video_grid, video_grid[:, 0], dim=0)
        video_grid[:, 0] = 1
        n_vid = video_grid.shape[0]

    # -- placeholders: image and video tokens, counted in one pass (the videos' after all images) ---------
    is_tok = ids == _token_pair(config.image_token_id, config.video_token_id, device)  # [2, N]
    if valid is not None:
        is_tok &= valid
    seen = is_tok.view(-1).cumsum(0)
    grid = video_grid if not n_img else image_grid if not n_vid else torch.cat((image_grid, video_grid))
    if grid is None:
        have, want = [int(seen[N - 1]), int(seen[-1])], [0, 0]
    else:
        div = _divisor(merge, device)
        llm = grid.div(div, rounding_mode="floor")  # merged (t, h, w)
        t, h, w = llm.T
        size = llm.prod(1)
        ends = size.cumsum(0)  # placeholders up to each grid's last one
        rows = t * h
        row_end = rows.cumsum(0)
        i = max(n_img - 1, 0)
        stats = torch.stack((grid.min(), (grid % div).max(), seen[N - 1], seen[-1], ends[i], ends[-1],
                             row_end[-1], row_end[i])).tolist()
        if stats[0] <= 0 or stats[1]:
            _check_grid(image_grid, "image_grid_thw", merge, device)  # raises for the grid at fault
            _check_grid(video_grid, "video_grid_thw", merge, device)
        have, want = stats[2:4], [stats[4] if n_img else 0, stats[5]]
        R, R_img = stats[6], stats[7] if n_img else 0  # rows, rows of the images
    for kind, n, h_, w_ in (("image", n_img, have[0], want[0]), ("video", n_vid, have[1] - have[0], want[1] - want[0])):
        if h_ != w_:
            raise ValueError(
                f"{h_} {kind} placeholder tokens in input_ids (outside padding) but {kind}_grid_thw describes {w_} "
                f"(= sum of t*h*w/{merge}**2 over {n} grids). If the prompt was truncated, use "
                "attnlib.rope.reconcile_image_tokens to drop the orphaned tokens and grids first.")

    # per-token slopes: text 1 on every axis; vision 0 on t/h and 1 on w; padding 0 (bool -> float64
    # copies are 4x faster from uint8)
    out = torch.empty(3, N, dtype=dtype, device=device)
    slope_w = None if valid is None else valid.view(torch.uint8)
    slope_th = slope_w if grid is None else \
        (~(is_tok[0] | is_tok[1]) if valid is None else valid ^ (is_tok[0] | is_tok[1])).view(torch.uint8)
    for part, slope in ((out[:2], slope_th), (out[2:], slope_w)):
        part.fill_(1) if slope is None else part.copy_(slope.expand_as(part))

    # the jumps (see the docstring): windows and blocks on every axis (all_idx), rows per axis (row_idx)
    all_idx = [win_start, win_end]
    mixed = None
    if grid is None:
        deltas = torch.zeros(n_seq, dtype=dtype, device=device)
    else:
        # grid i owns placeholders ends[i-1] + 1 .. ends[i]: its first token is where `seen` exceeds ends[i-1].
        # Blocks stay in grid order (images, then videos): every jump below depends on its own block only.
        first, last = torch.searchsorted(seen, torch.cat((ends.new_zeros(1), ends[:-1], ends - 1)), right=True) \
            .remainder_(N).view(2, -1)  # (videos were counted in the second half)
        seq, seq_last = torch.searchsorted(win_end, torch.stack((first, last)), right=True)
        span = last - first + 1
        ok = (span == size) & (seq == seq_last)
        if n_vid and config.audio_token_id is not None:  # Qwen3-Omni: audio inside videos (use_audio_in_video)
            v = slice(n_img, None)
            if bool(_audio_next_to(ids, config.audio_token_id, last[v], span[v] != size[v], seq[v], win_end).any()):
                is_audio = ids == config.audio_token_id
                if valid is not None:
                    is_audio &= valid
                mixed, n_audio, tail = _audio_runs(torch.nonzero(is_audio).squeeze(1), first[v], last[v], seq[v], win_end)
                if bool(mixed.any()):
                    ok[v] = torch.where(mixed, (span[v] - size[v] == n_audio - tail) & (seq[v] == seq_last[v]), ok[v])
                    span = torch.cat((span[:n_img], span[v] + tail))
                    m_idx = torch.nonzero(mixed).squeeze(1)
                    n_audio = n_audio.index_select(0, m_idx)
                    m_idx = m_idx + n_img  # in the block table
                else:
                    mixed = None
        if not bool(ok.all()):
            i = int(torch.nonzero(~ok)[0, 0])
            kind, grid, j = ("image", image_grid, i) if i < n_img else ("video", video_grid, i - n_img)
            raise ValueError(
                f"the placeholder tokens of {kind} {j} ({int(size[i])} tokens for grid {grid[j].tolist()}) are not one "
                "contiguous run inside one sequence: check that input_ids and the grids belong together "
                "(or use reconcile_image_tokens after truncation)")
        spg_v = None  # seconds per grid step of each video, where the time offsets use it
        if n_vid and variant in ("qwen2_5_vl", "qwen3_omni"):
            spg_v = spg if spg is not None else torch.ones(n_vid, device=device)
        if mixed is not None:  # a run has no rows: it is summed over as a whole and written afterwards
            m_t, m_h, m_w = llm.T.index_select(1, m_idx)
            run_tok, run_off, run_of, m_extent, m_max = _merge_audio_in_video(
                variant, tps, m_t, m_h, m_w, spg_v.index_select(0, m_idx - n_img), first.index_select(0, m_idx), n_audio,
                dtype)
            rows = rows.index_fill(0, m_idx, 0)
            row_end = rows.cumsum(0)
            R = int(row_end[-1])  # (the images' rows are before the videos': R_img is unchanged)

        # rows q of every block: frame k = q // h, height j = q % h, from first + q * w, w tokens
        rb = torch.repeat_interleave(rows, output_size=R)  # block of each row
        q = torch.arange(R, device=device) - (row_end - rows).index_select(0, rb)
        h_r, w_r = h.index_select(0, rb), w.index_select(0, rb)
        k = torch.div(q, h_r, rounding_mode="floor")
        j = q - k * h_r
        rs = first.index_select(0, rb) + q * w_r
        if spg_v is None and not is_float:  # toff(k) = k
            toff = k
            t_last = t - 1
        else:  # rows in grid order: the images' first, then the videos'
            toff = [_time_offsets(variant, k[:R_img], None, tps)] if R_img else []
            if R > R_img:
                toff.append(_time_offsets(variant, k[R_img:], spg_v.index_select(0, rb[R_img:] - n_img), tps))
            toff = torch.cat(toff) if len(toff) > 1 else toff[0] if toff else k.to(dtype)
            if mixed is None:
                t_last = toff.index_select(0, row_end - 1)  # the last row's frame
            else:  # (mixed runs have no rows; their extent is the merge's)
                t_last = toff.index_select(0, (row_end - 1).clamp_(min=0)) if R else toff.new_zeros(rows.shape)
                t_last = t_last.index_fill(0, m_idx, 0)
        extent = torch.maximum(t_last + 1, torch.maximum(h, w))
        row_first = torch.stack((toff, j, torch.full_like(j, -1))).to(dtype)
        row_last = torch.stack((toff, j, w_r - 1)).to(dtype).neg_()
        row_idx, row_vals = [rs, rs + w_r], [row_first, row_last]
        if mixed is not None:  # a run: the sum runs over its slopes (audio 1 on every axis, video 1 on w)
            extent = extent.to(dtype).index_copy(0, m_idx, m_extent)
            na = n_audio.to(dtype)
            zero = torch.zeros_like(na)
            row_idx += [first.index_select(0, m_idx), first.index_select(0, m_idx) + span.index_select(0, m_idx)]
            row_vals += [torch.stack((zero, zero, zero - 1)),
                         -torch.stack((na, na, (span.index_select(0, m_idx) - 1).to(dtype)))]
        gap = extent - span
        deltas = torch.zeros(n_seq, dtype=dtype, device=device).index_add_(0, seq, gap.to(dtype))  # max + 1 - real
        all_idx += [first, first + span]
    all_vals = [torch.full((n_seq,), -1, dtype=dtype, device=device), 1 - n_real - deltas]
    if grid is not None:
        all_vals += [torch.ones_like(extent, dtype=dtype), (extent - 1).to(dtype)]
    idx = torch.cat(all_idx if grid is None else all_idx + row_idx)
    vals = torch.cat(all_vals).expand(3, -1)
    if grid is not None:
        vals = torch.cat([vals] + row_vals, 1)
    out.index_add_(1, idx.clamp(max=N - 1), vals * (idx < N))  # jumps past the end are dropped
    out.cumsum_(1)

    if mixed is not None:
        start = out[0].index_select(0, first.index_select(0, m_idx))  # a block's t at its first token: its start
        out[:, run_tok] = start[run_of] + run_off
        top = start + m_max + 1 - n_real[seq[m_idx]]  # text after a run may start below its max
        deltas.scatter_reduce_(0, seq[m_idx], top, "amax")
    if is_float:  # float32 as the reference: positions rounded once; deltas = float32(max) + 1 - n in float32
        top = (deltas + (n_real - 1)).float()
        return out.float(), ((top + 1) - n_real.float()).unsqueeze(1)
    return out, deltas.unsqueeze(1)


_CONSTANTS: dict = {}  # small tensors, cached per device: making one costs microseconds


def _divisor(merge, device):
    """``[1, merge, merge]``: patch grid to merged grid."""
    key = ("div", merge, device)
    hit = _CONSTANTS.get(key)
    if hit is None:
        hit = _CONSTANTS[key] = torch.tensor([1, merge, merge], device=device)
    return hit


def _token_pair(image_token_id, video_token_id, device):
    """``[[image_token_id], [video_token_id]]``: both placeholders compared in one pass."""
    key = ("tokens", image_token_id, video_token_id, device)
    hit = _CONSTANTS.get(key)
    if hit is None:
        hit = _CONSTANTS[key] = torch.tensor([[image_token_id], [video_token_id]], device=device)
    return hit


def _audio_next_to(ids, audio_token_id, last, gappy, seq, win_end):
    """Videos that may hold audio: those whose run has other tokens inside, or an audio token right after it."""
    after = last + 1
    return gappy | ((ids[after.clamp(max=ids.numel() - 1)] == audio_token_id) & (after < win_end[seq]))


def _audio_runs(aud, first, last, seq, win_end):
    """Qwen3-Omni ``use_audio_in_video``: which video blocks carry audio tokens.

    A video's run starts at its first token and extends over the audio tokens interleaved with its
    tokens and those right after its last token (up to the next other token or the window's end).
    ``aud``: sorted flat indices of the real audio tokens. Returns ``(mixed [n] bool, n_audio [n],
    tail [n])``: whether the block has audio, its audio tokens, and how many of them follow its last
    video token.
    """
    n = aud.numel()
    after = torch.searchsorted(aud, last, right=True)  # first audio token after the block's last token
    inside = after - torch.searchsorted(aud, first)
    at = after.clamp(max=n - 1)
    key = aud - torch.arange(n, device=aud.device)  # constant along a stretch of consecutive audio tokens
    follows = (after < n) & (aud[at] == last + 1)
    tail = torch.minimum(torch.where(follows, torch.searchsorted(key, key[at], right=True) - after, 0),
                         win_end[seq] - (last + 1))
    n_audio = inside + tail
    return n_audio > 0, n_audio, tail


def _merge_audio_in_video(variant, tps, t, h, w, spg, first, n_audio, dtype):
    """Positions (relative to the run's start) of Qwen3-Omni audio-in-video runs, all runs at once.

    As the reference does, the video positions (offsets ``(t, h, w)`` in token order) and the audio
    positions (offset ``a`` on all axes) of a run are merged by temporal offset, video first on ties
    (a stable sort per run), and given to the run's tokens in order. The text after the run starts
    one after the max of the merged sequence's last same-source stretch.

    Returns ``(token index [E], offsets [3, E], run of each element [E], extent [m], max [m])``.
    """
    device = t.device
    m = t.numel()
    hw = h * w
    size = t * hw
    n_v, n_a = int(size.sum()), int(n_audio.sum())
    runs = torch.arange(m, device=device)
    vrun = torch.repeat_interleave(runs, size, output_size=n_v)
    lv = torch.arange(n_v, device=device) - (torch.cumsum(size, 0) - size)[vrun]
    hwv, wv = hw[vrun], w[vrun]
    kv = torch.div(lv, hwv, rounding_mode="floor")
    rem = lv - kv * hwv
    jv = torch.div(rem, wv, rounding_mode="floor")
    tv = _time_offsets(variant, kv, spg[vrun], tps)
    arun = torch.repeat_interleave(runs, n_audio, output_size=n_a)
    la = (torch.arange(n_a, device=device) - (torch.cumsum(n_audio, 0) - n_audio)[arun]).to(dtype)
    off = torch.cat((torch.stack((tv.to(dtype), jv.to(dtype), (rem - jv * wv).to(dtype))), la.expand(3, -1)), dim=1)
    run = torch.cat((vrun, arun))
    o1 = torch.argsort(off[0], stable=True)
    order = o1[torch.argsort(run[o1], stable=True)]  # by run, then temporal offset, video first on ties
    off, run = off[:, order], run[order]
    is_audio = order >= n_v
    run_len = size + n_audio
    run_end = torch.cumsum(run_len, 0)
    e = torch.arange(n_v + n_a, device=device)
    # the last stretch of each run coming from one source: after the last element of the other source
    other = is_audio != is_audio[run_end - 1][run]
    cut = torch.full((m,), -1, dtype=torch.long, device=device).scatter_reduce(0, run, torch.where(other, e, -1), "amax")
    top = off.amax(0)
    low = float("-inf") if dtype.is_floating_point else torch.iinfo(dtype).min
    floor = torch.full((m,), low, dtype=dtype, device=device)
    extent = floor.scatter_reduce(0, run, torch.where(e > cut[run], top, low), "amax") + 1
    run_max = floor.scatter_reduce(0, run, top, "amax")
    tok = first[run] + (e - (run_end - run_len)[run])
    return tok, off, run, extent, run_max


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
        kernels = kernel_for(q, inv_freq, k)
        if kernels is not None and position_ids.device == q.device:
            return kernels.apply_mrope_qk(q, k, position_ids, inv_freq, rope.mrope_section,
                                          interleaved_sections=rope.interleaved)
    cos, sin = rope.cos_sin(position_ids)
    return apply_rotary_qk(q, k, cos, sin, interleaved=False)
