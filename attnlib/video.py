"""Video token geometry: block-sparse attention layouts built from a video grid.

A video diffusion transformer sees a latent video of ``T`` frames of ``H x W`` patches as ``T * H * W``
tokens in frame-major raster order (frame, row, column), often next to a run of text tokens. The layouts
here turn that geometry into :class:`attnlib.BlockSparse` masks, so every backend runs them exactly and
kernels that skip blocks run them fast:

* :func:`sliding_tile` -- Sliding Tile Attention: tokens reordered tile by tile, each query tile sees a
  fixed-size 3-D window of tiles whose centre is clamped inside the video;
* :func:`spatiotemporal_window` -- a 3-D window of tiles truncated at the borders, any axis whole, the time
  axis optionally causal (streaming);
* :func:`radial` -- Radial Attention's static pattern: frames far apart see a spatial band that halves each
  time the frame distance doubles;
* :func:`topk_blocks` -- a data-dependent selection: for each query block and head, the key blocks with the
  highest pooled ``q . k`` score, computed on the device with no host read.

Text tokens are dense: every text query sees every key and every query sees every text key. Layouts are
expressed in *attention order*: video tokens first (in the layout's token order), text last. A
:class:`TokenOrder` moves tensors between the model's order and that order; :meth:`VideoLayout.attention`
does both moves around one call. Block layouts are conservative: a block pair is visible when the pattern
lets any of its token pairs attend, and then every token pair of the two blocks attends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .api import attention
from .masks import BlockSparse

__all__ = ["VideoGrid", "TokenOrder", "VideoLayout", "sliding_tile", "spatiotemporal_window", "radial",
           "topk_blocks", "block_density"]


def _positive(value, name: str, zero: bool = False) -> int:
    low = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _triple(value, name: str, none_ok: bool = False) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{name} must be a (frames, rows, columns) triple, got {value!r}")
    return tuple(None if none_ok and x is None else _positive(x, f"{name} entry") for x in value)


# ---------------------------------------------------------------------------------------------------
# the grid and token orders
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoGrid:
    """The token sequence of a video model: ``frames x height x width`` video tokens in frame-major raster
    order (token ``t * H * W + h * W + w``), and ``text`` text tokens in front (``text_first=True``, as in
    joint ``[text, video]`` sequences) or behind."""

    frames: int
    height: int
    width: int
    text: int = 0
    text_first: bool = False

    def __post_init__(self):
        _positive(self.frames, "VideoGrid(frames)")
        _positive(self.height, "VideoGrid(height)")
        _positive(self.width, "VideoGrid(width)")
        _positive(self.text, "VideoGrid(text)", zero=True)
        if not isinstance(self.text_first, bool):
            raise TypeError(f"VideoGrid(text_first=...) must be a bool, got {self.text_first!r}")

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def tokens(self) -> int:
        """Video and text tokens together (the sequence length of q, k and v)."""
        return self.video_tokens + self.text

    def _video_start(self) -> int:
        return self.text if self.text_first else 0

    def natural_order(self) -> "TokenOrder":
        """Frame-major raster video tokens, then the text (the identity when the text is already behind)."""
        video = torch.arange(self.video_tokens) + self._video_start()
        return TokenOrder.from_perm(self._with_text(video))

    def tile_order(self, tile) -> "TokenOrder":
        """Tile-major order: the video cut into tiles of ``tile = (frames, rows, columns)`` tokens, tiles in
        raster order over the tile grid, tokens in raster order inside each tile; then the text. Each
        ``tile`` side must divide the grid's."""
        tt, th, tw = self._check_tile(tile)
        t, h, w = self.frames, self.height, self.width
        video = torch.arange(self.video_tokens).view(t // tt, tt, h // th, th, w // tw, tw)
        video = video.permute(0, 2, 4, 1, 3, 5).reshape(-1) + self._video_start()
        return TokenOrder.from_perm(self._with_text(video))

    def tiles(self, tile) -> tuple[int, int, int]:
        """The tile grid: how many tiles along frames, rows and columns."""
        tt, th, tw = self._check_tile(tile)
        return (self.frames // tt, self.height // th, self.width // tw)

    def _with_text(self, video: torch.Tensor) -> torch.Tensor:
        if not self.text:
            return video
        start = 0 if self.text_first else self.video_tokens
        return torch.cat([video, torch.arange(start, start + self.text)])

    def _check_tile(self, tile) -> tuple[int, int, int]:
        tile = _triple(tile, "tile")
        for side, n, axis in zip(tile, (self.frames, self.height, self.width), ("frames", "height", "width")):
            if n % side:
                raise ValueError(f"tile {tile} does not divide the video grid ({self.frames}, {self.height}, "
                                 f"{self.width}) along {axis} ({n} % {side} != 0): pick a tile side that divides "
                                 f"it, or pad the latent to a multiple of the tile")
        return tile


@dataclass(frozen=True, eq=False)
class TokenOrder:
    """A reordering of the model's token sequence: attention position ``p`` holds model token ``perm[p]``;
    ``inverse`` undoes it. ``to_attention`` / ``to_model`` apply it along the sequence axis (``dim=-3``:
    the S of BSHD and the T of THD tensors); both return ``x`` itself when the order is the identity."""

    perm: torch.Tensor
    inverse: torch.Tensor
    identity: bool
    _device: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_perm(cls, perm: torch.Tensor) -> "TokenOrder":
        perm = perm.to(torch.int64)
        n = perm.numel()
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(n)
        return cls(perm, inverse, bool(torch.equal(perm, torch.arange(n))))

    def _on(self, which: str, device) -> torch.Tensor:
        base = self.perm if which == "perm" else self.inverse
        if base.device == torch.device(device):
            return base
        key = (which, str(device))
        got = self._device.get(key)
        if got is None:
            got = base.to(device)
            if not torch.compiler.is_compiling():
                self._device[key] = got
        return got

    def _apply(self, x: torch.Tensor, which: str, dim: int) -> torch.Tensor:
        if x.shape[dim] != self.perm.numel():
            raise ValueError(f"this token order covers {self.perm.numel()} tokens but the tensor has {x.shape[dim]} "
                             f"along dim {dim}; pass the whole sequence (video and text) or the right dim=")
        return x if self.identity else x.index_select(dim, self._on(which, x.device))

    def to_attention(self, x: torch.Tensor, dim: int = -3) -> torch.Tensor:
        """``x`` (model order) in attention order."""
        return self._apply(x, "perm", dim)

    def to_model(self, x: torch.Tensor, dim: int = -3) -> torch.Tensor:
        """``x`` (attention order) back in model order."""
        return self._apply(x, "inverse", dim)


@dataclass(frozen=True, eq=False)
class VideoLayout:
    """A block layout over a video grid in attention order: ``layout`` bool ``[nQ, nK]`` for blocks of
    ``block_size`` tokens, the :class:`TokenOrder` it needs, and :attr:`mask` (the
    :class:`attnlib.BlockSparse`, built once)."""

    layout: torch.Tensor
    block_size: int
    order: TokenOrder
    grid: VideoGrid
    _mask: list = field(default_factory=list, repr=False)

    @property
    def mask(self) -> BlockSparse:
        if not self._mask:
            self._mask.append(BlockSparse(self.layout, self.block_size))
        return self._mask[0]

    def density(self) -> float:
        """The fraction of (query, key) token pairs the layout lets attend (partial last blocks counted by
        their real size): the share of the dense attention FLOPs that a block-skipping kernel runs."""
        return block_density(self.layout, self.block_size, self.grid.tokens, self.grid.tokens)

    def attention(self, q, k, v, **kwargs):
        """``attnlib.attention`` with this layout on model-order ``q``, ``k``, ``v`` (BSHD or THD): the
        tensors are moved to attention order, attended, and the output (and LSE) moved back."""
        o = self.order
        got = attention(o.to_attention(q), o.to_attention(k), o.to_attention(v), self.mask, **kwargs)
        if kwargs.get("return_lse"):
            out, lse = got
            return o.to_model(out), o.to_model(lse, dim=-1)
        return o.to_model(got)


def block_density(layout: torch.Tensor, block_size, seqlen_q: int, seqlen_k: int) -> float:
    """The fraction of token pairs a block layout (any leading dims) lets attend, partial blocks by size."""
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    nq, nk = layout.shape[-2:]
    rows = torch.full((nq,), float(bq))
    rows[-1] = seqlen_q - bq * (nq - 1)
    cols = torch.full((nk,), float(bk))
    cols[-1] = seqlen_k - bk * (nk - 1)
    pairs = (layout.float().cpu() * rows[:, None] * cols[None, :]).sum() / layout[..., 0, 0].numel()
    return float(pairs) / (seqlen_q * seqlen_k)


# ---------------------------------------------------------------------------------------------------
# tile windows: Sliding Tile Attention and spatio-temporal windows
# ---------------------------------------------------------------------------------------------------
def _axis_clamped(n: int, k: int) -> torch.Tensor:
    """bool [n, n]: a window of ``k`` tiles around the query tile, its start clamped into ``[0, n - k]``."""
    q = torch.arange(n)[:, None]
    start = (q - (k - 1) // 2).clamp(min=0, max=max(n - k, 0))
    kv = torch.arange(n)[None, :]
    return (kv >= start) & (kv < start + k)


def _axis_truncated(n: int, k, causal: bool) -> torch.Tensor:
    """bool [n, n]: tiles ``q - (k-1)//2 .. q + k//2`` (causal: ``q - k + 1 .. q``), cut at the borders;
    ``k=None``: the whole axis (causal: every tile up to the query's)."""
    q = torch.arange(n)[:, None]
    kv = torch.arange(n)[None, :]
    if causal:
        return (kv <= q) if k is None else (kv <= q) & (kv > q - k)
    if k is None:
        return torch.ones(n, n, dtype=torch.bool)
    return (kv >= q - (k - 1) // 2) & (kv <= q + k // 2)


def _tile_layout(grid: VideoGrid, tile, axes, block_size) -> VideoLayout:
    """The layout of per-axis tile visibilities ``axes`` ([n_t, n_t], [n_h, n_h], [n_w, n_w]) over the
    tile-major order, split into blocks of ``block_size`` tokens (a divisor of the tile volume)."""
    volume = math.prod(tile)
    if block_size is None:
        block_size = volume
    _positive(block_size, "block_size")
    if volume % block_size:
        raise ValueError(f"block_size={block_size} must divide the tile volume {volume} ({tile}): a block may not "
                         "straddle two tiles")
    at, ah, aw = axes
    tiles = (at[:, None, None, :, None, None] & ah[None, :, None, None, :, None] & aw[None, None, :, None, None, :])
    n = at.shape[0] * ah.shape[0] * aw.shape[0]
    video = tiles.reshape(n, n)
    r = volume // block_size
    if r > 1:
        video = video.repeat_interleave(r, 0).repeat_interleave(r, 1)
    return VideoLayout(_with_dense_text(video, grid.video_tokens, grid.text, block_size), block_size,
                       grid.tile_order(tile), grid)


def _with_dense_text(video: torch.Tensor, video_tokens: int, text: int, block_size: int) -> torch.Tensor:
    """The video block layout with the text's blocks appended (attention order: text last): rows and columns
    of every block holding a text token are all True."""
    n = -(-(video_tokens + text) // block_size)
    out = torch.zeros(n, n, dtype=torch.bool)
    nv = video.shape[0]
    out[:nv, :nv] = video
    first_text = video_tokens // block_size
    if text:
        out[first_text:, :] = True
        out[:, first_text:] = True
    return out


def sliding_tile(grid: VideoGrid, tile, window, *, block_size: int | None = None) -> VideoLayout:
    """Sliding Tile Attention: the video in tile-major order (:meth:`VideoGrid.tile_order`), and each query
    tile seeing a window of ``window = (frames, rows, columns)`` tiles.

    The window keeps its full size at the borders: along each axis its start is the query tile minus
    ``(k - 1) // 2``, clamped into ``[0, n - k]`` (``n`` tiles on that axis), so every query tile sees the
    same number of key tiles (a window larger than the axis covers it all). Blocks are whole tiles, or
    ``block_size`` (a divisor of the tile volume) for kernels that want smaller ones. Text is dense.
    """
    window = _triple(window, "window")
    counts = grid.tiles(tile)
    axes = [_axis_clamped(n, k) for n, k in zip(counts, window)]
    return _tile_layout(grid, _triple(tile, "tile"), axes, block_size)


def spatiotemporal_window(grid: VideoGrid, tile, window, *, causal: bool = False,
                          block_size: int | None = None) -> VideoLayout:
    """A 3-D window of tiles in tile-major order, cut at the borders (edge tiles see fewer tiles).

    ``window = (frames, rows, columns)`` in tiles: key tile ``kv`` is seen along an axis iff
    ``q - (k - 1) // 2 <= kv <= q + k // 2``; ``None`` takes the whole axis (``(1, None, None)`` with
    ``tile=(1, H, W)``: each frame on its own; ``(None, 1, 1)``: the same spatial tile in every frame).
    ``causal=True`` makes the time axis causal: ``q - k + 1 <= kv <= q`` in tiles (frame-causal when the
    tile is one frame deep), for streaming generation. Text is dense.
    """
    window = _triple(window, "window", none_ok=True)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    counts = grid.tiles(tile)
    axes = [_axis_truncated(n, k, causal and a == 0) for a, (n, k) in enumerate(zip(counts, window))]
    return _tile_layout(grid, _triple(tile, "tile"), axes, block_size)


# ---------------------------------------------------------------------------------------------------
# Radial Attention
# ---------------------------------------------------------------------------------------------------
def radial(grid: VideoGrid, *, block_size: int = 128, decay: float = 1.0, sink_frames: int = 0) -> VideoLayout:
    """Radial Attention's static layout over the natural (frame-major) order, text last.

    For query token ``(frame i, spatial index s)`` and key token ``(frame j, spatial index s')`` (``s`` counts
    ``h * W + w`` inside a frame of ``N = H * W`` tokens) at frame distance ``d = |i - j|``: ``d = 0`` is
    dense; otherwise the key is seen iff ``|s - s'| < band(d)`` with ``band(d) = decay * N / 2**floor(log2 d)``
    -- the band halves each time the distance doubles. Where the band would be narrower than a block it
    stays one block wide and only distances ``d`` divisible by ``ceil(block_size / band(d))`` keep it, so the
    density keeps falling. ``sink_frames``: the first frames are seen whole by every query. The block layout
    marks a block pair visible when any of its token pairs is. Text is dense.
    """
    _positive(block_size, "block_size")
    _positive(sink_frames, "sink_frames", zero=True)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay > 0:
        raise ValueError(f"decay must be a number > 0, got {decay!r}")
    n_frame, t = grid.tokens_per_frame, grid.frames
    d = torch.arange(t, dtype=torch.float64)
    band = decay * n_frame / torch.exp2(torch.floor(torch.log2(d.clamp(min=1))))
    band[0] = float("inf")
    narrow = band < block_size
    stride = torch.where(narrow, torch.ceil(block_size / band), torch.ones_like(band))
    kept = torch.remainder(d, stride) == 0
    band = torch.where(narrow, torch.full_like(band, float(block_size)), band)
    band = torch.where(kept, band, torch.full_like(band, -1.0))       # [T]: -1: the frame pair sees nothing
    video = _segments_cover(grid.video_tokens, n_frame, block_size, band, sink_frames)
    return VideoLayout(_with_dense_text(video, grid.video_tokens, grid.text, block_size), block_size,
                       grid.natural_order(), grid)


def _segments_cover(video_tokens: int, n_frame: int, bs: int, band: torch.Tensor, sink_frames: int) -> torch.Tensor:
    """bool [nB, nB] over the video blocks (the last one may be partial): any token pair of the two blocks
    visible under the per-distance ``band`` rule. A block is cut into its per-frame segments."""
    nb = -(-video_tokens // bs)
    m = -(-bs // n_frame) + 1                                        # most frames one block touches
    start = torch.arange(nb) * bs
    stop = torch.clamp(start + bs, max=video_tokens)                 # [nB] token ranges
    first_frame = start // n_frame
    frame = first_frame[:, None] + torch.arange(m)[None, :]          # [nB, m]
    lo = torch.maximum(start[:, None], frame * n_frame) - frame * n_frame
    hi = torch.minimum(stop[:, None], (frame + 1) * n_frame) - 1 - frame * n_frame
    ok = hi >= lo                                                    # the block has tokens in that frame
    fq, fk = frame[:, None, :, None], frame[None, :, None, :]        # [nB, nB, m, m]
    dist = (fq - fk).abs().clamp(max=band.numel() - 1)
    gap = torch.maximum(lo[None, :, None, :] - hi[:, None, :, None], lo[:, None, :, None] - hi[None, :, None, :])
    gap = gap.clamp(min=0).to(torch.float64)
    seen = (gap < band[dist]) | (fk < sink_frames)
    seen = seen & ok[:, None, :, None] & ok[None, :, None, :]
    return seen.any(-1).any(-1)


# ---------------------------------------------------------------------------------------------------
# data-dependent top-k blocks
# ---------------------------------------------------------------------------------------------------
def _pool(x: torch.Tensor, b: int) -> torch.Tensor:
    """``[B, S, H, D]`` -> float32 ``[B, H, ceil(S / b), D]``: the mean of each block's real tokens."""
    bsz, s, h, d = x.shape
    n = -(-s // b)
    xp = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, n * b - s))
    sums = xp.view(bsz, n, b, h, d).sum(2)
    counts = torch.full((n,), float(b), device=x.device)
    counts[-1] = s - b * (n - 1)
    return (sums / counts[None, :, None, None]).transpose(1, 2)


def topk_blocks(q: torch.Tensor, k: torch.Tensor, block_size, keep, *, include: torch.Tensor | None = None,
                causal: bool = False) -> BlockSparse:
    """A per-head block selection from pooled scores: for each batch row, query head and query block, the
    ``keep`` key blocks with the highest ``mean(q_block) . mean(k_block)`` (each block's real tokens
    averaged), as a :class:`attnlib.BlockSparse` with a ``[B, Hq, nQ, nK]`` layout on q's device.

    Everything runs on the device with no host read (the layout never leaves the device, and a compiled
    region traces it without a graph break). ``q`` ``[B, Sq, Hq, D]`` and ``k`` ``[B, Sk, Hkv, D]`` (or THD
    ``[T, H, D]``) in the attention order the layout will be used in (e.g. :meth:`VideoGrid.tile_order`
    for cube-by-cube selection). ``keep``: an int (key blocks per query block) or a float in ``(0, 1]``
    (that fraction of the key blocks, rounded up). ``include``: a bool layout broadcastable to
    ``[B, Hq, nQ, nK]`` added to the selection (text blocks, a local window). ``causal=True``: key blocks
    wholly after a query block's last (bottom-right) position are never chosen, and the mask is causal.
    """
    if q.dim() == 3 and k.dim() == 3:
        q, k = q[None], k[None]
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must both be BSHD [B, S, H, D] or THD [T, H, D], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    bsz, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if k.shape[0] != bsz or k.shape[3] != d or hq % hkv:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)}: same batch and head dim, and "
                         "query heads a multiple of key heads")
    bq, bk = (block_size, block_size) if not isinstance(block_size, (tuple, list)) else tuple(block_size)
    _positive(bq, "block_size")
    _positive(bk, "block_size")
    nq, nk = -(-sq // bq), -(-sk // bk)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be an int (key blocks per query block) or a float fraction, got {keep!r}")
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise ValueError(f"keep as a fraction must be in (0, 1], got {keep}")
        keep = math.ceil(keep * nk)
    _positive(keep, "keep")
    keep = min(keep, nk)
    pq = _pool(q, bq)                                                  # [B, Hq, nQ, D]
    pk = _pool(k, bk).repeat_interleave(hq // hkv, dim=1)              # [B, Hq, nK, D]
    scores = torch.matmul(pq, pk.transpose(-1, -2))                    # [B, Hq, nQ, nK]
    if causal:
        last_row = torch.clamp(torch.arange(nq, device=q.device) * bq + bq - 1, max=sq - 1) + (sk - sq)
        first_key = torch.arange(nk, device=q.device) * bk
        future = first_key[None, :] > last_row[:, None]                # [nQ, nK]
        scores = scores.masked_fill(future, float("-inf"))
    chosen = torch.topk(scores, keep, dim=-1).indices
    layout = torch.zeros(scores.shape, dtype=torch.bool, device=q.device).scatter_(-1, chosen, True)
    if causal:
        layout = layout & ~future
    if include is not None:
        if not isinstance(include, torch.Tensor) or include.dtype != torch.bool:
            raise TypeError("include must be a bool tensor broadcastable to [B, Hq, nQ, nK]")
        try:
            torch.broadcast_shapes(include.shape, layout.shape)
        except RuntimeError:
            raise ValueError(f"include of shape {tuple(include.shape)} does not broadcast to [B, Hq, nQ, nK] = "
                             f"{list(layout.shape)}") from None
        layout = layout | include.to(q.device)
    return BlockSparse(layout, (bq, bk), causal=causal)
