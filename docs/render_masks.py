"""Draw the mask pictures of docs/masks.md from attnlib's own masks.

    python docs/render_masks.py            # (re)write docs/images/masks/*.png
    python docs/render_masks.py --check    # exit 1 when a committed picture differs from a fresh render

Each picture is ``mask.materialize(Sq, Sk)``, i.e. what attnlib's plan says every backend computes: rows are
queries (first at the top), columns are keys (first on the left); blue = visible, light gray = hidden, pale
red = a query row that sees no key at all (its output is 0), darker gray column = a padding key
(``KeyPadding``), dark frame = a ``BlockDiagonal`` block (query block x its key block). A ``KeyPadding``
mask is drawn once per batch row, side by side.

The PNG encoder is a few lines of this file (8-bit RGB, no text, no timestamps), so a picture's pixels
depend only on attnlib, not on a plotting library's version or fonts; the docs test decodes and compares
pixels. Adding a picture is one ``Picture`` entry (and a line in docs/masks.md).
"""
from __future__ import annotations

import pathlib
import struct
import sys
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch

import attnlib
from attnlib.masks import BlockDiagonal, Causal, DenseMask, KeyPadding

OUT = pathlib.Path(__file__).resolve().parent / "images" / "masks"
CELL = 16         # pixels per (query, key) cell, gap included
GAP = 2           # white gap between cells
VISIBLE = (47, 101, 173)
HIDDEN = (236, 236, 236)
PADDING = (200, 200, 200)
EMPTY_ROW = (246, 208, 208)
FRAME = (40, 40, 40)
WHITE = (255, 255, 255)


def _valid(*rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r] for r in rows])


@dataclass(frozen=True)
class Picture:
    """``make() -> (mask, Sq, Sk)``; ``needs() -> reason or None`` holds it back while a feature is missing."""

    name: str
    make: Callable
    needs: Callable[[], str | None] = lambda: None


def _causal_has(name: str):
    return lambda: None if name in getattr(Causal, "__dataclass_fields__", {}) else f"Causal has no {name}"


def _block_sparse():
    layout = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)
    return attnlib.masks.BlockSparse(layout, 3), 9, 12


PICTURES: tuple[Picture, ...] = (
    Picture("none", lambda: (None, 4, 8)),
    Picture("causal_square", lambda: (Causal(), 6, 6)),
    Picture("causal_bottom_right", lambda: (Causal(), 4, 10)),
    Picture("causal_top_left", lambda: (Causal(align="top_left"), 4, 10)),
    Picture("causal_decode", lambda: (Causal(), 1, 10)),
    Picture("causal_q_longer", lambda: (Causal(), 7, 4)),
    Picture("causal_window", lambda: (Causal(window=3), 8, 8)),
    Picture("causal_window_cache", lambda: (Causal(window=4), 4, 10)),
    Picture("block_diagonal", lambda: (BlockDiagonal([3, 5, 2]), 10, 10)),
    Picture("block_diagonal_causal", lambda: (BlockDiagonal([3, 5, 2], causal=True), 10, 10)),
    Picture("block_diagonal_caches", lambda: (BlockDiagonal([1, 2, 3], [4, 5, 3], causal=True), 6, 12)),
    Picture("block_diagonal_window", lambda: (BlockDiagonal([6, 4], causal=True, window=2), 10, 10)),
    Picture("cfg_branches", lambda: (BlockDiagonal([4, 4], [6, 5]), 8, 11)),
    Picture("key_padding", lambda: (KeyPadding(_valid("1111111100", "0011111111", "1101100111")), 4, 10)),
    Picture("key_padding_causal", lambda: (KeyPadding(_valid("001111", "111111"), causal=True), 6, 6)),
    Picture("key_padding_empty_row", lambda: (KeyPadding(_valid("0011111", "0000000")), 3, 7)),
    Picture("dense", lambda: (DenseMask((torch.arange(6)[:, None] + 2 * torch.arange(9)[None, :]) % 3 != 0), 6, 9)),
    # chunks, sinks, block-sparse layouts: drawn when this attnlib has them
    Picture("causal_chunk", lambda: (Causal(chunk=3), 9, 9), needs=_causal_has("chunk")),
    Picture("causal_chunk_window", lambda: (Causal(chunk=3, window=2), 9, 9), needs=_causal_has("chunk")),
    Picture("causal_window_sink", lambda: (Causal(window=3, sink=2), 9, 9), needs=_causal_has("sink")),
    Picture("block_diagonal_chunk", lambda: (BlockDiagonal([4, 6], causal=True, chunk=2), 10, 10),
            needs=_causal_has("chunk")),
    Picture("block_sparse", _block_sparse,
            needs=lambda: None if hasattr(attnlib.masks, "BlockSparse") else "attnlib.masks has no BlockSparse"),
)


def available() -> list[Picture]:
    return [p for p in PICTURES if p.needs() is None]


@dataclass
class Panel:
    visible: torch.Tensor                     # bool [Sq, Sk]
    padded: list = field(default_factory=list)       # key columns that are padding
    blocks: list = field(default_factory=list)       # (q0, q1, k0, k1) frames


def panels(mask, sq: int, sk: int) -> list[Panel]:
    """What one picture shows: one panel, or one per batch row of a ``KeyPadding``."""
    if mask is None:
        return [Panel(torch.ones(sq, sk, dtype=torch.bool))]
    m = mask.materialize(sq, sk, "cpu")
    if isinstance(mask, KeyPadding):
        return [Panel(m[b, 0], padded=[j for j in range(sk) if not mask.valid[b, j]]) for b in range(m.shape[0])]
    blocks = []
    if isinstance(mask, BlockDiagonal):
        cq, ck = mask.cu_seqlens_q.tolist(), mask.cu_seqlens_k.tolist()
        blocks = [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(mask.num_blocks)]
    while m.dim() > 2:
        m = m[0]
    return [Panel(m, blocks=blocks)]


def render(mask, sq: int, sk: int) -> torch.Tensor:
    """uint8 ``[H, W, 3]``."""
    ps = panels(mask, sq, sk)
    width = len(ps) * sk * CELL + (len(ps) - 1) * CELL + GAP
    img = torch.tensor(WHITE, dtype=torch.uint8).expand(sq * CELL + GAP, width, 3).clone()
    for n, p in enumerate(ps):
        x0 = n * (sk + 1) * CELL
        empty = ~p.visible.any(dim=1)
        for i in range(sq):
            for j in range(sk):
                color = VISIBLE if p.visible[i, j] else EMPTY_ROW if empty[i] else PADDING if j in p.padded \
                    else HIDDEN
                y, x = i * CELL + GAP, x0 + j * CELL + GAP
                img[y:y + CELL - GAP, x:x + CELL - GAP] = torch.tensor(color, dtype=torch.uint8)
        for q0, q1, k0, k1 in p.blocks:
            if q1 == q0 or k1 == k0:
                continue
            top, bottom, left, right = q0 * CELL, q1 * CELL + GAP - 1, x0 + k0 * CELL, x0 + k1 * CELL + GAP - 1
            frame = torch.tensor(FRAME, dtype=torch.uint8)
            img[top:top + 2, left:right + 1] = frame
            img[bottom - 1:bottom + 1, left:right + 1] = frame
            img[top:bottom + 1, left:left + 2] = frame
            img[top:bottom + 1, right - 1:right + 1] = frame
    return img


def encode_png(img: torch.Tensor) -> bytes:
    """8-bit RGB PNG, filter 0 on every row, no ancillary chunks."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + bytes(img[r].reshape(-1).tolist()) for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def decode_png(data: bytes) -> torch.Tensor:
    """The inverse of ``encode_png`` (only what it writes); ValueError for anything else."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", body[:10])
            if (depth, color) != (8, 2):
                raise ValueError(f"not 8-bit RGB (depth {depth}, color type {color})")
            size = (h, w)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    h, w = size
    raw = zlib.decompress(idat)
    rows = [raw[r * (3 * w + 1):(r + 1) * (3 * w + 1)] for r in range(h)]
    if any(row[0] != 0 for row in rows):
        raise ValueError("rows use PNG filters: not written by docs/render_masks.py")
    return torch.tensor(list(b"".join(row[1:] for row in rows)), dtype=torch.uint8).reshape(h, w, 3)


def picture_pixels(p: Picture) -> torch.Tensor:
    return render(*p.make())


def stale() -> list[str]:
    """Pictures whose committed file is missing or differs from a fresh render (with why)."""
    out = []
    for p in available():
        path = OUT / f"{p.name}.png"
        if not path.exists():
            out.append(f"{path.name}: missing")
            continue
        try:
            committed = decode_png(path.read_bytes())
        except ValueError as e:
            out.append(f"{path.name}: {e}")
            continue
        fresh = picture_pixels(p)
        if committed.shape != fresh.shape or not torch.equal(committed, fresh):
            out.append(f"{path.name}: differs from a fresh render")
    return out


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        bad = stale()
        for line in bad:
            print(line)
        return 1 if bad else 0
    if argv:
        print(__doc__)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    for p in available():
        (OUT / f"{p.name}.png").write_bytes(encode_png(picture_pixels(p)))
        print(f"wrote {OUT.relative_to(OUT.parents[2])}/{p.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
