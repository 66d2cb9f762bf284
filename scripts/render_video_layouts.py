"""Render the pictures of docs/video.md from the layouts themselves (deterministic PNG bytes, stdlib only).

    python scripts/render_video_layouts.py          # rewrites docs/images/video_*.png

Rows are query blocks, columns key blocks (attention order): dark = visible video block pair, orange = a
block holding text (dense), white = skipped; thin grey lines separate frames (or tiles rows). A test
re-renders every picture and compares the bytes, so the pictures cannot drift from the code.
"""
from __future__ import annotations

import pathlib
import struct
import sys
import zlib

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attnlib import video  # noqa: E402
from attnlib.masks import Causal  # noqa: E402

OUT = ROOT / "docs" / "images"
DARK, TEXT, EMPTY, LINE = (31, 78, 121), (230, 159, 0), (255, 255, 255), (200, 200, 200)


def png(pixels: list[list[tuple[int, int, int]]]) -> bytes:
    """An 8-bit RGB PNG of ``pixels`` (rows of (r, g, b))."""
    h, w = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def picture(layout: torch.Tensor, scale: int, text_from: int | None = None, group: int | None = None,
            gap: int = 0) -> list[list[tuple[int, int, int]]]:
    """Pixels of one bool ``[nQ, nK]`` layout (or several side by side for ``[H, nQ, nK]``, ``gap`` apart)."""
    lays = [layout] if layout.dim() == 2 else list(layout)
    n_q, n_k = lays[0].shape
    width = len(lays) * n_k * scale + (len(lays) - 1) * gap
    rows = []
    for y in range(n_q * scale):
        row = []
        for i, lay in enumerate(lays):
            if i:
                row += [EMPTY] * gap
            for x in range(n_k * scale):
                qb, kb = y // scale, x // scale
                on_line = group and ((y % (group * scale) == 0 and y) or (x % (group * scale) == 0 and x))
                if lay[qb, kb]:
                    text = text_from is not None and (qb >= text_from or kb >= text_from)
                    row.append(TEXT if text else DARK)
                else:
                    row.append(LINE if on_line else EMPTY)
        rows.append(row[:width])
    return rows


def pictures() -> dict[str, bytes]:
    """Every picture of docs/video.md, by file name."""
    out = {}
    g = video.VideoGrid(4, 16, 16, text=48)                    # 4 frames of 4 x 4 tiles (4 x 4 tokens), text
    sta = video.sliding_tile(g, (1, 4, 4), (3, 3, 3))
    out["video_sliding_tile.png"] = png(picture(sta.layout, 4, text_from=64, group=16))
    win = video.spatiotemporal_window(g, (1, 4, 4), (3, 3, 3))
    out["video_window.png"] = png(picture(win.layout, 4, text_from=64, group=16))
    causal = video.spatiotemporal_window(g, (1, 4, 4), (2, None, None), causal=True)
    out["video_window_causal.png"] = png(picture(causal.layout, 4, text_from=64, group=16))
    rad = video.radial(video.VideoGrid(16, 16, 16, text=64), block_size=32)   # 8 blocks a frame
    out["video_radial.png"] = png(picture(rad.layout, 2, text_from=128, group=8))
    gen = torch.Generator().manual_seed(0)
    tg = video.VideoGrid(4, 8, 8)
    t, h, w = torch.meshgrid(torch.arange(4.0), torch.arange(8.0), torch.arange(8.0), indexing="ij")
    coords = torch.stack([t, h, w], -1).view(256, 3)
    # smooth features of position, one random set per head: nearby tokens get similar queries and keys
    freqs = 0.5 * torch.randn(2, 3, 16, generator=gen)
    phase = 6.3 * torch.rand(2, 1, 16, generator=gen)
    feat = torch.cos(coords @ freqs + phase).permute(1, 0, 2)[None]          # [1, 256, 2, 16]
    order = tg.tile_order((1, 4, 4))
    q = order.to_attention(feat + 0.3 * torch.randn(feat.shape, generator=gen))
    k = order.to_attention(feat)
    top = video.topk_blocks(q, k, 16, 4)
    out["video_topk.png"] = png(picture(top.layout[0], 8, group=4, gap=8))
    ar = Causal(chunk=4, window=3, sink=4).materialize(32, 32)
    out["video_autoregressive.png"] = png(picture(ar, 6, group=4))
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in pictures().items():
        (OUT / name).write_bytes(data)
        print(f"wrote {OUT / name} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
