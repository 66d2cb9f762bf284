"""The mask pictures of docs/masks.md are what the masks say today: each is re-rendered from
``mask.materialize()`` and compared pixel for pixel with the committed PNG."""
import importlib.util
import pathlib
import re
import sys

import pytest
import torch

from attnlib import Causal

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("render_masks", ROOT / "docs" / "render_masks.py")
render_masks = sys.modules["render_masks"] = importlib.util.module_from_spec(_spec)   # dataclasses look it up
_spec.loader.exec_module(render_masks)


def test_every_committed_mask_picture_is_fresh():
    stale = render_masks.stale()
    assert not stale, f"stale mask pictures {stale}: run `python docs/render_masks.py` and commit docs/images/masks"


def test_masks_md_shows_every_picture_and_every_file_is_a_picture():
    shown = set(re.findall(r"\(images/masks/([a-z_]+)\.png\)", (ROOT / "docs" / "masks.md").read_text()))
    names = {p.name for p in render_masks.available()}
    assert shown == names
    files = {p.stem for p in (ROOT / "docs" / "images" / "masks").glob("*.png")}
    assert files == names, "a picture in docs/images/masks that docs/render_masks.py does not draw (or the reverse)"


def test_a_picture_shows_what_the_mask_lets_through():
    cell, gap = render_masks.CELL, render_masks.GAP
    img = render_masks.render(Causal(), 2, 5)                  # bottom-right: row 0 sees keys 0..3
    assert img.shape == (2 * cell + gap, 5 * cell + gap, 3)
    colors = [[tuple(img[i * cell + gap + 3, j * cell + gap + 3].tolist()) for j in range(5)] for i in range(2)]
    blue, gray = render_masks.VISIBLE, render_masks.HIDDEN
    assert colors == [[blue] * 4 + [gray], [blue] * 5]
    empty = render_masks.render(Causal(), 3, 2)                # Sq > Sk: row 0 sees nothing
    assert tuple(empty[gap + 3, gap + 3].tolist()) == render_masks.EMPTY_ROW


def test_png_codec_round_trips_and_rejects_foreign_files():
    img = torch.randint(0, 256, (7, 5, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(render_masks.decode_png(render_masks.encode_png(img)), img)
    with pytest.raises(ValueError):
        render_masks.decode_png(b"GIF89a" + bytes(20))
