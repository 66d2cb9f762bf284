"""attnlib.video: token orders, the layouts against hand-written examples and against token-level rules
re-derived here from each token's (frame, row, column), the top-k selection, and a layout run end to end
(model order in, attention order inside, model order out) against the float64 oracle."""
import importlib.util
import math
import pathlib
import re

import pytest
import torch

import attnlib
from attnlib import video
from attnlib.masks import DenseMask
from attnlib.testing import assert_close_to_reference
from reference64 import attention64

G = video.VideoGrid


def _rows(t):
    return t.int().tolist()


# ---------------------------------------------------------------------------------------------------
# grid and orders
# ---------------------------------------------------------------------------------------------------
def test_grid_counts_and_errors():
    g = G(3, 4, 5, text=7)
    assert (g.tokens_per_frame, g.video_tokens, g.tokens) == (20, 60, 67)
    with pytest.raises(ValueError, match=r"VideoGrid\(height\) must be an int >= 1"):
        G(3, 0, 5)
    with pytest.raises(ValueError, match=r"VideoGrid\(text\) must be an int >= 0"):
        G(3, 4, 5, text=-1)
    with pytest.raises(TypeError, match="text_first"):
        G(3, 4, 5, text_first=1)
    with pytest.raises(ValueError, match=r"does not divide the video grid \(3, 4, 5\) along width"):
        g.tile_order((1, 2, 2))
    with pytest.raises(ValueError, match="triple"):
        g.tile_order((1, 2))


def test_tile_order_by_hand():
    # 2 frames of 2 x 4: frame 0 rows [0 1 2 3] [4 5 6 7], frame 1 rows [8 .. 11] [12 .. 15]; tiles 1 x 2 x 2
    o = G(2, 2, 4).tile_order((1, 2, 2))
    assert o.perm.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert not o.identity
    # text in front moves behind the video; tile (1, 2, 4) is a whole frame: only the text moves
    o = G(2, 2, 4, text=3, text_first=True).tile_order((1, 2, 4))
    assert o.perm.tolist() == list(range(3, 19)) + [0, 1, 2]
    assert G(2, 2, 4, text=3).tile_order((1, 2, 4)).identity
    assert G(2, 2, 4, text=3).natural_order().identity
    assert G(2, 2, 4, text=3, text_first=True).natural_order().perm.tolist() == list(range(3, 19)) + [0, 1, 2]


def test_orders_round_trip_on_bshd_thd_and_lse():
    g = G(4, 4, 6, text=5, text_first=True)
    o = g.tile_order((2, 2, 3))
    assert sorted(o.perm.tolist()) == list(range(g.tokens))
    assert torch.equal(o.perm[o.inverse], torch.arange(g.tokens))
    x = torch.randn(2, g.tokens, 3, 8)
    moved = o.to_attention(x)
    assert not torch.equal(moved, x) and torch.equal(o.to_model(moved), x)
    assert torch.equal(moved[:, 0], x[:, o.perm[0]])
    t = torch.randn(g.tokens, 3, 8)                          # THD: the same dim=-3
    assert torch.equal(o.to_model(o.to_attention(t)), t)
    lse = torch.randn(2, 3, g.tokens)
    assert torch.equal(o.to_model(o.to_attention(lse, dim=-1), dim=-1), lse)
    ident = G(4, 4, 6).natural_order()
    y = x[:, :96]
    assert ident.to_attention(y) is y
    with pytest.raises(ValueError, match="covers 101 tokens but the tensor has 96"):
        o.to_attention(y)


# ---------------------------------------------------------------------------------------------------
# tile windows
# ---------------------------------------------------------------------------------------------------
def _token_coords(grid, tile):
    """(tile t, tile h, tile w) of every video token in attention (tile-major) order, from its own position."""
    model = grid.tile_order(tile).perm[:grid.video_tokens] - (grid.text if grid.text_first else 0)
    t = model // (grid.height * grid.width)
    h = model // grid.width % grid.height
    w = model % grid.width
    return t // tile[0], h // tile[1], w // tile[2]


def _pool(token_keep, bs):
    """bool [S, S] -> [nB, nB]: a block pair is visible when any token pair is."""
    s = token_keep.shape[0]
    n = -(-s // bs)
    pad = torch.zeros(n * bs, n * bs, dtype=torch.bool)
    pad[:s, :s] = token_keep
    return pad.view(n, bs, n, bs).any(3).any(1)


def _tile_rule(grid, tile, window, clamped, causal=False):
    """Token-level truth of a tile window over the whole sequence (text last, dense)."""
    counts = grid.tiles(tile)
    coords = _token_coords(grid, tile)
    keep = torch.ones(grid.video_tokens, grid.video_tokens, dtype=torch.bool)
    for axis, (c, n, k) in enumerate(zip(coords, counts, window)):
        q, kv = c[:, None], c[None, :]
        if clamped:
            start = (q - (k - 1) // 2).clamp(0, max(n - k, 0))
            keep &= (kv >= start) & (kv < start + k)
        elif causal and axis == 0:
            keep &= (kv <= q) & ((kv > q - k) if k is not None else True)
        elif k is not None:
            keep &= (kv >= q - (k - 1) // 2) & (kv <= q + k // 2)
    full = torch.ones(grid.tokens, grid.tokens, dtype=torch.bool)
    full[:grid.video_tokens, :grid.video_tokens] = keep
    return full


def test_sliding_tile_by_hand():
    # 4 tiles of 2 tokens along the width; a window of 3 tiles keeps its size at the borders
    lay = video.sliding_tile(G(1, 1, 8), (1, 1, 2), (1, 1, 3))
    assert lay.block_size == 2 and lay.order.identity
    assert _rows(lay.layout) == [[1, 1, 1, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1]]
    assert lay.density() == pytest.approx(12 / 16)
    # a window wider than the axis covers it all
    assert video.sliding_tile(G(1, 1, 8), (1, 1, 2), (1, 1, 9)).layout.all()


@pytest.mark.parametrize("grid, tile, window", [
    (G(4, 6, 6), (2, 2, 2), (1, 3, 3)),
    (G(6, 4, 8, text=5, text_first=True), (2, 2, 2), (3, 2, 3)),
    (G(3, 6, 4, text=3), (1, 3, 2), (2, 1, 5)),
])
def test_sliding_tile_matches_the_token_rule(grid, tile, window):
    lay = video.sliding_tile(grid, tile, window)
    assert torch.equal(lay.layout, _pool(_tile_rule(grid, tile, window, clamped=True), math.prod(tile)))
    # every query tile sees the same number of key tiles
    counts = grid.tiles(tile)
    n_tiles = math.prod(counts)
    assert (lay.layout[:n_tiles, :n_tiles].sum(-1) == math.prod(min(k, n) for k, n in zip(window, counts))).all()


def test_spatiotemporal_window_by_hand():
    lay = video.spatiotemporal_window(G(1, 1, 8), (1, 1, 2), (1, 1, 3))            # cut at the borders
    assert _rows(lay.layout) == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    lay = video.spatiotemporal_window(G(4, 2, 2), (1, 2, 2), (2, None, None), causal=True)   # frame-causal
    assert _rows(lay.layout) == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    lay = video.spatiotemporal_window(G(3, 2, 2), (1, 2, 2), (None, None, None), causal=True)
    assert _rows(lay.layout) == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    # the same spatial tile in every frame (a "temporal head"): 2 frames x 2 tiles, tile-major
    lay = video.spatiotemporal_window(G(2, 2, 2), (1, 1, 2), (None, 1, 1))
    assert _rows(lay.layout) == [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]


@pytest.mark.parametrize("grid, tile, window, causal", [
    (G(4, 6, 6), (1, 2, 2), (3, 1, None), False),
    (G(6, 4, 4, text=6, text_first=True), (2, 2, 2), (2, 3, 1), True),
    (G(5, 2, 6, text=2), (1, 2, 3), (None, 1, 1), False),
])
def test_spatiotemporal_window_matches_the_token_rule(grid, tile, window, causal):
    lay = video.spatiotemporal_window(grid, tile, window, causal=causal)
    want = _pool(_tile_rule(grid, tile, window, clamped=False, causal=causal), math.prod(tile))
    assert torch.equal(lay.layout, want)


def test_smaller_blocks_split_tiles_and_text_is_dense():
    g = G(2, 4, 4, text=5)
    whole = video.sliding_tile(g, (1, 2, 2), (1, 1, 1))
    split = video.sliding_tile(g, (1, 2, 2), (1, 1, 1), block_size=2)
    n = 8                                                         # video tiles
    assert torch.equal(split.layout[:2 * n, :2 * n],
                       whole.layout[:n, :n].repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert split.layout.shape == (19, 19)                         # 16 video blocks + ceil(5 / 2) text blocks
    assert split.layout[16:].all() and split.layout[:, 16:].all()
    assert split.density() == pytest.approx(whole.density())
    with pytest.raises(ValueError, match="must divide the tile volume 4"):
        video.sliding_tile(g, (1, 2, 2), (1, 1, 1), block_size=3)


# ---------------------------------------------------------------------------------------------------
# radial
# ---------------------------------------------------------------------------------------------------
def _radial_rule(grid, bs, decay=1.0, sink=0):
    """Token-level truth of the radial rule (loops over frame pairs), text last and dense."""
    n, t = grid.tokens_per_frame, grid.frames
    s = torch.arange(n)
    keep = torch.zeros(grid.video_tokens, grid.video_tokens, dtype=torch.bool)
    for i in range(t):
        for j in range(t):
            d = abs(i - j)
            if d == 0 or j < sink:
                block = torch.ones(n, n, dtype=torch.bool)
            else:
                band = decay * n / 2 ** math.floor(math.log2(d))
                if band < bs:
                    stride = math.ceil(bs / band)
                    band = bs if d % stride == 0 else -1
                block = (s[:, None] - s[None, :]).abs() < band
            keep[i * n:(i + 1) * n, j * n:(j + 1) * n] = block
    full = torch.ones(grid.tokens, grid.tokens, dtype=torch.bool)
    full[:grid.video_tokens, :grid.video_tokens] = keep
    return full


def test_radial_by_hand():
    # 64 tokens a frame, blocks of 16: d=1 dense, d=2-3 band 32, d=4-7 band 16, d>=8 one block on even d only
    lay = video.radial(G(16, 8, 8), block_size=16)
    row = lay.layout[0].view(16, 4)                               # query block 0 against every frame
    assert _rows(row[:8]) == [[1] * 4, [1] * 4, [1, 1, 1, 0], [1, 1, 1, 0]] + [[1, 1, 0, 0]] * 4
    assert _rows(row[8:]) == [[1, 1, 0, 0], [0] * 4] * 4
    assert torch.equal(lay.layout, lay.layout.T)
    assert lay.order.identity


@pytest.mark.parametrize("grid, bs, decay, sink", [
    (G(5, 3, 4, text=3), 8, 1.0, 0),                     # blocks straddle frames; partial last block
    (G(9, 2, 4, text=4, text_first=True), 4, 0.5, 1),
    (G(12, 4, 4), 16, 1.0, 2),
])
def test_radial_matches_the_token_rule(grid, bs, decay, sink):
    lay = video.radial(grid, block_size=bs, decay=decay, sink_frames=sink)
    assert torch.equal(lay.layout, _pool(_radial_rule(grid, bs, decay, sink), bs))


def test_radial_density_falls_with_length():
    dens = [video.radial(G(t, 16, 16), block_size=64).density() for t in (8, 16, 32, 64)]
    assert all(a > b for a, b in zip(dens, dens[1:])), dens
    assert dens[-1] < dens[0] / 2                                  # O(n log n) pairs, not O(n^2)


def test_layout_errors():
    g = G(2, 4, 4)
    with pytest.raises(ValueError, match="window must be a"):
        video.sliding_tile(g, (1, 2, 2), (1, 1))
    with pytest.raises(ValueError, match="window entry must be an int >= 1"):
        video.sliding_tile(g, (1, 2, 2), (1, None, 1))
    with pytest.raises(ValueError, match="decay must be a number > 0"):
        video.radial(g, decay=0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        video.spatiotemporal_window(g, (1, 2, 2), (1, 1, 1), causal="yes")


# ---------------------------------------------------------------------------------------------------
# a layout end to end vs the float64 oracle
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("make", [
    lambda g: video.sliding_tile(g, (1, 2, 2), (1, 1, 3)),
    lambda g: video.spatiotemporal_window(g, (1, 2, 2), (2, None, 1), causal=True),
    lambda g: video.radial(g, block_size=8, sink_frames=1),
], ids=["sliding_tile", "window", "radial"])
def test_layout_attention_in_model_order_matches_float64(backend, make):
    g = G(4, 2, 4, text=5, text_first=True)
    lay = make(g)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, g.tokens, 4, 16, generator=gen)
    k, v = torch.randn(2, g.tokens, 2, 16, generator=gen), torch.randn(2, g.tokens, 2, 16, generator=gen)
    out, lse = lay.attention(q, k, v, backend=backend, return_lse=True)
    # the truth in model order: token pair (a, b) sees iff the layout's blocks of their attention positions do
    pos = lay.order.inverse
    blocks = pos // lay.block_size
    truth = DenseMask(lay.layout[blocks[:, None], blocks[None, :]])
    ref_out, ref_lse = attention64(q.double(), k.double(), v.double(), truth)
    naive_out, naive_lse = attention64(q, k, v, truth, dtype=torch.float32)
    assert_close_to_reference(out, ref_out, naive_out, torch.float32, "out")
    assert_close_to_reference(lse, ref_lse, naive_lse, torch.float32, "lse")
    assert torch.equal(lay.attention(q, k, v, backend=backend), out)


# ---------------------------------------------------------------------------------------------------
# top-k blocks
# ---------------------------------------------------------------------------------------------------
def test_topk_blocks_shapes_counts_and_heads():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 70, 4, 8, generator=gen), torch.randn(2, 50, 2, 8, generator=gen)
    m = video.topk_blocks(q, k, 16, 2)
    assert isinstance(m, attnlib.BlockSparse) and m.block_size == (16, 16) and not m.causal
    assert m.layout.shape == (2, 4, 5, 4) and (m.layout.sum(-1) == 2).all()
    assert video.topk_blocks(q, k, 16, 0.5).layout.sum(-1).eq(2).all()        # ceil(0.5 * 4)
    assert video.topk_blocks(q, k, 16, 99).layout.all()
    # per head: head 0's queries point at key block 0's direction, head 1's at the last (partial) block's
    q = torch.zeros(1, 32, 2, 4)
    k = torch.zeros(1, 40, 1, 4)
    k[0, :16, 0, 0] = 1.0          # block 0: mean +e0
    k[0, 32:36, 0, 1] = 1.0        # block 2 (8 real tokens): mean 0.5 e1 -- divided by 8, not by 16
    k[0, 16:32, 0, 1] = 0.4        # block 1: mean 0.4 e1, below block 2 only if block 2 is averaged right
    q[0, :, 0, 0] = 1.0
    q[0, :, 1, 1] = 1.0
    lay = video.topk_blocks(q, k, 16, 1).layout
    assert _rows(lay[0, 0]) == [[1, 0, 0], [1, 0, 0]]
    assert _rows(lay[0, 1]) == [[0, 0, 1], [0, 0, 1]]


def test_topk_blocks_causal_and_include():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 64, 2, 8, generator=gen), torch.randn(1, 64, 2, 8, generator=gen)
    m = video.topk_blocks(q, k, 16, 4, causal=True)
    assert m.causal
    future = torch.ones(4, 4, dtype=torch.bool).triu(1)
    assert not (m.layout & future).any()
    assert _rows(m.layout[0, 0].sum(-1)) == [1, 2, 3, 4]                   # all the past, none of the future
    diag = torch.eye(4, dtype=torch.bool)
    m = video.topk_blocks(q, k, 16, 1, include=diag)
    assert (m.layout & diag).eq(diag).all() and (m.layout.sum(-1) <= 2).all()
    with pytest.raises(ValueError, match="does not broadcast"):
        video.topk_blocks(q, k, 16, 1, include=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"keep as a fraction must be in \(0, 1\]"):
        video.topk_blocks(q, k, 16, 1.5)
    with pytest.raises(ValueError, match="keep must be an int >= 1"):
        video.topk_blocks(q, k, 16, 0)
    with pytest.raises(ValueError, match="does not match q"):
        video.topk_blocks(q, k[..., :4], 16, 1)


def test_topk_blocks_run_without_a_host_read():
    """The selection traces into one graph (a host read -- .item(), .tolist(), a bool of a tensor -- would
    break it), and the attention it feeds equals the float64 oracle."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 48, 2, 8, generator=gen) for _ in range(3))

    def select(q, k):
        return video.topk_blocks(q, k, 16, 2, causal=True).layout

    traced = torch.compile(select, fullgraph=True, backend="eager")(q, k)
    assert torch.equal(traced, select(q, k))
    m = video.topk_blocks(q, k, 16, 2, causal=True)
    out = attnlib.attention(q, k, v, m, backend="sdpa")
    ref, _ = attention64(q.double(), k.double(), v.double(), m)
    naive, _ = attention64(q, k, v, m, dtype=torch.float32)
    assert_close_to_reference(out, ref, naive, torch.float32)


# ---------------------------------------------------------------------------------------------------
# docs: the examples run, the pictures are the layouts
# ---------------------------------------------------------------------------------------------------
ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_docs_examples_run():
    text = (ROOT / "docs" / "video.md").read_text()
    namespace = {}
    for code in re.findall(r"```python\n(.*?)```", text, re.S):
        exec(compile(code, "video-md", "exec"), namespace)
    grid, sta = namespace["grid"], namespace["sta"]
    assert namespace["out"].shape == (1, grid.tokens, 8, 64)
    q, k, v = namespace["q"], namespace["k"], namespace["v"]
    torch.testing.assert_close(sta.attention(q, k, v), sta.attention(q, k, v, backend="math"))
    assert namespace["mask"].causal and namespace["mask"].window == 3


def test_pictures_are_rendered_from_the_layouts():
    spec = importlib.util.spec_from_file_location("render_video_layouts", ROOT / "scripts" / "render_video_layouts.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    pictures = render.pictures()
    text = (ROOT / "docs" / "video.md").read_text()
    for name, data in pictures.items():
        assert f"images/{name}" in text, f"docs/video.md does not show {name}"
        assert (ROOT / "docs" / "images" / name).read_bytes() == data, \
            f"docs/images/{name} is stale: run python scripts/render_video_layouts.py"
