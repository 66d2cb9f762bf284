"""QwenImage's 3-axis video RoPE plus 1-D text RoPE (the MMDiT joint-attention positions).

Semantics (equal to diffusers' ``QwenEmbedRope`` / ``QwenEmbedLayer3DRope``):

* The rotary dims are split into three axes ``axes_dim = (d_frame, d_height, d_width)``; axis ``a``
  has ``d_a // 2`` frequencies ``theta ** (-2f / d_a)`` and the table concatenates the three axes'
  frequencies in that order (``sum(axes_dim) // 2`` columns in all).
* Image ``i`` of a sample (latent-patch grid ``(F, H, W)``, tokens in ``(f, h, w)`` row-major order)
  gets frame positions ``i, ..., i + F - 1``. Height positions are ``0 .. H-1``, or with
  ``scale_rope=True`` centred: ``-(H - H // 2), ..., H // 2 - 1`` (width likewise).
* Text token ``j`` gets position ``m + j`` on all three axes, where ``m`` is the largest image extent:
  ``max(H // 2, W // 2)`` over the images with ``scale_rope`` (``max(H, W)`` without). Text length is
  the padded text width (``encoder_hidden_states.shape[1]``), never a mask sum.
* The layered variant (``QwenEmbedLayer3DRope``) puts its last grid, the condition image, at frame
  position ``-1`` and starts text at ``max(m, number_of_layers)``.

The tables are float32 ``(cos, sin)`` pairs to apply with
``attnlib.rope.apply_rotary(x, cos, sin, interleaved=True)`` -- diffusers multiplies adjacent pairs as
complex numbers, which is the interleaved pairing.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

from .rotary import rotary_inv_freq

__all__ = ["QwenEmbedRope", "QwenEmbedLayer3DRope"]

_CACHE_SIZE = 128


def _as_int(v, name: str) -> int:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.is_floating_point():
            raise TypeError(f"{name} must be an int, got a tensor of shape {tuple(v.shape)} and dtype {v.dtype}")
        return int(v.item())
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {v!r}")
    return v


def _is_shape(entry) -> bool:
    return isinstance(entry, (tuple, list)) and len(entry) == 3 and all(
        isinstance(v, int) or (isinstance(v, torch.Tensor) and v.numel() == 1) for v in entry)


def _normalize_video_fhw(video_fhw) -> tuple[tuple[int, int, int], ...]:
    """One sample's image grids from ``(F, H, W)``, a list of them, or diffusers' per-batch form."""
    if _is_shape(video_fhw) and not (isinstance(video_fhw, list) and all(_is_shape(e) for e in video_fhw)):
        grids = [video_fhw]
    elif isinstance(video_fhw, (list, tuple)) and len(video_fhw) > 0 and all(_is_shape(e) for e in video_fhw):
        grids = list(video_fhw)
    elif isinstance(video_fhw, (list, tuple)) and len(video_fhw) > 0 and all(
            isinstance(e, (list, tuple)) and len(e) > 0 and all(_is_shape(g) for g in e) for e in video_fhw):
        # diffusers' ``img_shapes``: one list of grids per batch entry; all must be the same.
        first = _normalize_video_fhw(list(video_fhw[0]))
        for b, entry in enumerate(video_fhw[1:], start=1):
            if _normalize_video_fhw(list(entry)) != first:
                raise ValueError(
                    f"video_fhw gives different image grids per batch entry ({first} vs {tuple(entry)} at entry {b}): "
                    "one RoPE table serves the whole batch, so compute it per sample (call once per entry)")
        return first
    else:
        raise TypeError("video_fhw must be (frames, height, width), a list of such grids for one sample, or "
                        f"diffusers' per-batch img_shapes (a list of lists of grids); got {video_fhw!r}")
    out = []
    for g in grids:
        f, h, w = (_as_int(v, "video_fhw entries") for v in g)
        if f <= 0 or h <= 0 or w <= 0:
            raise ValueError(f"video_fhw grids must be positive (frames, height, width), got {(f, h, w)}")
        out.append((f, h, w))
    return tuple(out)


def _text_width(txt_len) -> int:
    if isinstance(txt_len, torch.Tensor) and txt_len.dim() >= 2:
        return int(txt_len.shape[1])  # the padded text tensor [B, S_txt, ...]: its width
    if isinstance(txt_len, torch.Tensor) and txt_len.dim() == 1:
        raise TypeError("txt_len is a 1-D tensor (per-sample lengths?): pass the padded text width as an int or "
                        "the text tensor itself [B, S_txt, ...]; text RoPE uses the padded width, never a mask sum")
    n = _as_int(txt_len, "txt_len")
    if n < 0:
        raise ValueError(f"txt_len must be >= 0, got {n}")
    return n


class QwenEmbedRope:
    """QwenImage video + text RoPE tables (see the module docstring for the exact positions).

    Args:
        theta: frequency base.
        axes_dim: rotary dims of the frame, height and width axes (each even); the tables have
            ``sum(axes_dim) // 2`` columns, i.e. they rotate a head dim of ``sum(axes_dim)``.
        scale_rope: centre the height/width positions on 0.

    Results are cached per ``(grids, text width, device)`` (128 entries); treat them as read-only.
    """

    def __init__(self, theta: float = 10000, axes_dim: Sequence[int] = (16, 56, 56), scale_rope: bool = True):
        axes_dim = tuple(int(d) for d in axes_dim)
        if len(axes_dim) != 3 or any(d <= 0 or d % 2 for d in axes_dim):
            raise ValueError(f"axes_dim must be three positive even ints (frame, height, width), got {axes_dim}")
        self.theta = theta
        self.axes_dim = axes_dim
        self.scale_rope = bool(scale_rope)
        self._inv = [rotary_inv_freq(d, theta) for d in axes_dim]
        self._cache: OrderedDict = OrderedDict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(theta={self.theta}, axes_dim={self.axes_dim}, scale_rope={self.scale_rope})"

    # -- positions ------------------------------------------------------------------------------
    def _axis_positions(self, n: int) -> torch.Tensor:
        if self.scale_rope:
            return torch.arange(n) - (n - n // 2)
        return torch.arange(n)

    def _extent(self, h: int, w: int) -> int:
        return max(h // 2, w // 2) if self.scale_rope else max(h, w)

    def _frame_starts(self, grids) -> list[int]:
        return list(range(len(grids)))

    def _text_start(self, grids) -> int:
        return max(self._extent(h, w) for _, h, w in grids)

    def _angles(self, frames: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
        """``[N, sum(axes_dim) // 2]`` float32 angles for per-token (frame, height, width) positions."""
        return torch.cat([p.float().unsqueeze(-1) * inv for p, inv in zip((frames, heights, widths), self._inv)], dim=-1)

    def _image_angles(self, f: int, h: int, w: int, frame_start: int) -> torch.Tensor:
        fp = (torch.arange(f) + frame_start).view(f, 1, 1).expand(f, h, w)
        hp = self._axis_positions(h).view(1, h, 1).expand(f, h, w)
        wp = self._axis_positions(w).view(1, 1, w).expand(f, h, w)
        return self._angles(fp.reshape(-1), hp.reshape(-1), wp.reshape(-1))

    # -- public ---------------------------------------------------------------------------------
    def forward(self, video_fhw, txt_len, device=None):
        """Tables for one sample's image tokens and the text tokens.

        Args:
            video_fhw: ``(F, H, W)`` in latent-patch units, a list of them (several images of one
                sample, concatenated in order), or diffusers' per-batch ``img_shapes`` (a list of such
                lists, all equal).
            txt_len: padded text width (int or 0-d tensor), or the padded text tensor
                ``[B, S_txt, ...]`` whose width is used.
            device: where the tables go (default CPU).

        Returns ``((img_cos, img_sin), (txt_cos, txt_sin))``: float32 ``[sum(F*H*W), R]`` and
        ``[S_txt, R]`` with ``R = sum(axes_dim) // 2``; apply with ``apply_rotary(..., interleaved=True)``.
        """
        grids = _normalize_video_fhw(video_fhw)
        n_txt = _text_width(txt_len)
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (grids, n_txt, device)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        img = torch.cat([self._image_angles(f, h, w, s) for (f, h, w), s in zip(grids, self._frame_starts(grids))])
        t = torch.arange(n_txt) + self._text_start(grids)
        txt = self._angles(t, t, t)
        img, txt = img.to(device), txt.to(device)
        out = ((img.cos(), img.sin()), (txt.cos(), txt.sin()))
        self._cache[key] = out
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return out

    __call__ = forward


class QwenEmbedLayer3DRope(QwenEmbedRope):
    """QwenImage-Layered RoPE: grids ``0 .. L-1`` are layers, the last grid is the condition image.

    Layer ``i`` gets frame positions ``i .. i + F - 1``; the condition image (one frame) gets frame
    position ``-1``; text starts at ``max(largest image extent, L)`` where ``L = len(grids) - 1``.
    Same arguments and return value as :class:`QwenEmbedRope`.
    """

    def _frame_starts(self, grids) -> list[int]:
        f_cond = grids[-1][0]
        if f_cond != 1:
            raise ValueError(f"the condition image (last grid of video_fhw) must have 1 frame, got {grids[-1]}")
        return list(range(len(grids) - 1)) + [-1]

    def _text_start(self, grids) -> int:
        return max(super()._text_start(grids), len(grids) - 1)
