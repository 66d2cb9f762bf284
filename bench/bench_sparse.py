"""Block-sparse attention vs dense SDPA: time ratios per backend and density, the FLOPs a layout skips, and
the output error of the video layouts.

Each group is one sequence length; its baseline is dense ``F.scaled_dot_product_attention`` (no mask) on the
same q, k, v, timed in the same run. Variants: random layouts with exactly ``round(density * nK)`` key blocks
per query block row (the diagonal block included) at 5, 10 and 25 % density on every CPU backend that skips
blocks (``sdpa``, ``flex``), a per-head layout on ``sdpa``, and the video layouts (Sliding Tile, Radial) at
their own density. ``extra_info["density"]`` is the share of dense FLOPs the layout runs (``1 - density``
is skipped; both backends run exactly the visible 64 x 64 blocks).

Default (short): 4096 tokens. ``SPARSE_BENCH_FULL=1``: also 8192 and 16384 tokens, and ``math`` at 4096.
``SPARSE_BENCH_THREADS=n``: ``torch.set_num_threads(n)`` first (compare ratios at equal thread counts).

    python -m pytest bench/bench_sparse.py --benchmark-json=/tmp/sparse.json
    python bench/bench_sparse.py report /tmp/sparse.json                 # markdown table
    python bench/bench_sparse.py plot /tmp/plot.png /tmp/sparse.json ... # scatter (needs matplotlib)
    python bench/bench_sparse.py errors                                  # video layouts vs dense: error
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("SPARSE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["SPARSE_BENCH_THREADS"]))

import attnlib  # noqa: E402
from attnlib import BlockSparse, video  # noqa: E402
from attnlib.video import block_density  # noqa: E402

H, D, BLOCK = 8, 64, 64
FULL = os.environ.get("SPARSE_BENCH_FULL") == "1"
LENGTHS = (4096, 8192, 16384) if FULL else (4096,)
DENSITIES = (0.05, 0.10, 0.25)
ROUNDS = 5


def _available(name):
    return any(r["name"] == name and r["available"] for r in attnlib.list_backends())


BACKENDS = [b for b in ("sdpa", "flex") if _available(b)] + (["math"] if FULL else [])


def balanced_layout(n: int, density: float, seed: int, heads: int | None = None) -> torch.Tensor:
    """bool ``[n, n]`` (or ``[heads, n, n]``): each row exactly ``max(1, round(density * n))`` random blocks,
    the diagonal among them."""
    g = torch.Generator().manual_seed(seed)
    c = max(1, round(density * n))
    rows = []
    for _ in range(heads or 1):
        lay = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            others = torch.randperm(n - 1, generator=g)[:c - 1]
            lay[i, torch.cat([torch.tensor([i]), others + (others >= i).long()])] = True
        rows.append(lay)
    return rows[0] if heads is None else torch.stack(rows)


_QKV: dict = {}


def qkv(s: int):
    if s not in _QKV:
        g = torch.Generator().manual_seed(s)
        _QKV.clear()
        _QKV[s] = tuple(torch.randn(1, s, H, D, generator=g) for _ in range(3))
    return _QKV[s]


def _group(s: int) -> str:
    return f"S={s} (1 x {s}, H{H}, D{D}, fp32, {torch.get_num_threads()} threads)"


def _run(benchmark, group, variant, fn, density, baseline=False):
    benchmark.group = group
    benchmark.extra_info.update(variant=variant, baseline=baseline, density=density, torch=torch.__version__,
                                device="cpu", threads=torch.get_num_threads())
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("s", LENGTHS)
def test_dense_sdpa(benchmark, s):
    q, k, v = (x.transpose(1, 2) for x in qkv(s))
    _run(benchmark, _group(s), "dense SDPA (no mask)", lambda: F.scaled_dot_product_attention(q, k, v), 1.0,
         baseline=True)


@pytest.mark.parametrize("s", LENGTHS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_layout(benchmark, backend, density, s):
    if backend == "math" and s > 4096:
        pytest.skip("math materializes [H, S, S] scores: 4096 tokens only")
    n = s // BLOCK
    mask = BlockSparse(balanced_layout(n, density, seed=n), BLOCK)
    q, k, v = qkv(s)
    _run(benchmark, _group(s), f"{backend} random {density:.0%}",
         lambda: attnlib.attention(q, k, v, mask, backend=backend), block_density(mask.layout, BLOCK, s, s))


@pytest.mark.parametrize("s", LENGTHS)
def test_per_head_layout(benchmark, s):
    n = s // BLOCK
    mask = BlockSparse(balanced_layout(n, 0.10, seed=n + 1, heads=H), BLOCK)
    q, k, v = qkv(s)
    _run(benchmark, _group(s), "sdpa random 10% per head", lambda: attnlib.attention(q, k, v, mask, backend="sdpa"),
         block_density(mask.layout, BLOCK, s, s))


def video_layouts(s: int) -> dict:
    """Sliding Tile and Radial layouts of ``s`` tokens in blocks of 64: frames of 16 x 16 patches."""
    grid = video.VideoGrid(s // 256, 16, 16)
    return {"sliding tile (4,4,4) window (2,2,2)": video.sliding_tile(grid, (4, 4, 4), (2, 2, 2)),
            "radial decay 0.25": video.radial(grid, block_size=BLOCK, decay=0.25)}


@pytest.mark.parametrize("s", LENGTHS)
@pytest.mark.parametrize("name", list(video_layouts(4096)))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "math"])
def test_video_layout(benchmark, backend, name, s):
    lay = video_layouts(s)[name]
    q, k, v = (lay.order.to_attention(x) for x in qkv(s))
    _run(benchmark, _group(s), f"{backend} {name}", lambda: attnlib.attention(q, k, v, lay.mask, backend=backend),
         lay.density())


# ---------------------------------------------------------------------------------------------------
# reports (not run by pytest)
# ---------------------------------------------------------------------------------------------------
def report(path: str) -> None:
    """Markdown table: per group, each variant's share of dense FLOPs, time, ratio to the group's dense
    baseline, and that ratio over the FLOPs share (1 = time exactly follows the FLOPs run)."""
    data = json.load(open(path))
    mi = data.get("machine_info", {})
    print(f"machine: {mi.get('cpu', {}).get('brand_raw', '?')}, {mi.get('cpu', {}).get('count', '?')} cores, "
          f"torch {data['benchmarks'][0]['extra_info'].get('torch')}; date {data.get('datetime', '')[:10]}")
    print()
    print("| group | variant | FLOPs run (share of dense) | median (ms) | time / dense SDPA | time / FLOPs share |")
    print("|---|---|---:|---:|---:|---:|")
    for group, rows in _groups(data).items():
        base = next(r for r in rows if r["extra_info"]["baseline"])
        for r in sorted(rows, key=lambda r: (not r["extra_info"]["baseline"], r["extra_info"]["variant"])):
            x = r["extra_info"]
            ratio = r["stats"]["median"] / base["stats"]["median"]
            print(f"| {group} | {x['variant']} | {x['density']:.3f} | {r['stats']['median'] * 1e3:.1f} | "
                  + ("baseline |  |" if x["baseline"] else f"{ratio:.3f}x | {ratio / x['density']:.2f} |"))


def _groups(data) -> dict:
    groups: dict = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    return groups


def plot(png: str, *paths: str) -> None:
    """One scatter of time / dense SDPA against the FLOPs share, per backend, length and thread count, from
    one or more benchmark JSON files (each ratio against the baseline of its own run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict = {}
    for path in paths:
        for group, rows in _groups(json.load(open(path))).items():
            base = next(r for r in rows if r["extra_info"]["baseline"])
            for r in rows:
                x = r["extra_info"]
                if x["baseline"] or x["variant"].startswith("math"):
                    continue
                label = f"{x['variant'].split()[0]}, S={group.split()[0][2:]}, {x['threads']} thr"
                points.setdefault(label, []).append((x["density"], r["stats"]["median"] / base["stats"]["median"]))
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=100)
    markers, colors = {"sdpa": "o", "flex": "s"}, {"4096": "tab:blue", "8192": "tab:orange", "16384": "tab:green"}
    for label, pts in sorted(points.items(), key=lambda kv: (int(kv[0].split("S=")[1].split(",")[0]), kv[0])):
        backend, length = label.split(",")[0], label.split("S=")[1].split(",")[0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], markers.get(backend, "x"), color=colors.get(length),
                label=label, alpha=0.85, mfc="none" if "2 thr" in label else colors.get(length))
    ax.plot([0, 0.45], [0, 0.45], "k--", lw=0.8, label="time = FLOPs share")
    ax.plot([0.10], [0.30], "r*", ms=11, label="goal: <= 0.3x at 10 %, 4k")
    ax.set_xlabel("FLOPs run (share of dense attention)")
    ax.set_ylabel("time / dense SDPA (same run)")
    ax.set_xlim(0, 0.45)
    ax.set_ylim(0, 1.0)
    ax.set_title("block-sparse attention vs dense SDPA on CPU (fp32, H8, D64)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(png)


def errors(s_video=(16, 16, 16), text=256, heads=24, head_dim=128) -> None:
    """Relative output error of the video layouts vs dense attention on a QwenImage-sized attention (24 heads
    of 128, QwenImage's 3-D RoPE, QK-normalized) over synthetic inputs with local structure (smooth video
    latents, queries and keys from nearby projections), next to random layouts with as many blocks per row
    (a layout with no geometry). Synthetic data: the numbers compare layouts, they do not predict a model's
    quality."""
    from attnlib.rope import QwenEmbedRope, apply_rotary

    g = torch.Generator().manual_seed(0)
    grid = video.VideoGrid(*s_video, text=text, text_first=True)
    t, h, w = s_video
    coords = torch.stack(torch.meshgrid(*(torch.arange(float(n)) for n in s_video), indexing="ij"), -1).view(-1, 3)
    freqs = torch.randn(3, 64, generator=g) * torch.tensor([0.3, 0.25, 0.25])[:, None]
    latent = torch.cos(coords @ freqs + 6.3 * torch.rand(64, generator=g)) + 0.2 * torch.randn(t * h * w, 64,
                                                                                             generator=g)
    tokens = torch.cat([torch.randn(text, 64, generator=g), latent])[None]          # [1, S, 64]: text first

    def proj(w):
        x = (tokens @ w).view(1, -1, heads, head_dim)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    # queries and keys from nearby projections: similar tokens attend to each other (with the smooth latents
    # and RoPE, attention is local, as in trained video DiTs; fully random projections would have no locality)
    wq = torch.randn(64, heads * head_dim, generator=g) / 8
    q, k = proj(wq), proj(wq + 0.5 * torch.randn(wq.shape, generator=g) / 8)
    v = (tokens @ (torch.randn(64, heads * head_dim, generator=g) / 8)).view(1, -1, heads, head_dim)
    (ic, is_), (tc, ts) = QwenEmbedRope()(s_video, text)
    cos, sin = torch.cat([tc, ic]), torch.cat([ts, is_])
    q, k = (apply_rotary(x, cos, sin, interleaved=True) for x in (q, k))
    dense = attnlib.attention(q, k, v, backend="sdpa")

    def err(out):
        return float((out - dense).norm() / dense.norm())

    layouts = {
        "sliding tile (4,4,4), window (3,3,3)": video.sliding_tile(grid, (4, 4, 4), (3, 3, 3)),
        "sliding tile (4,4,4), window (2,2,2)": video.sliding_tile(grid, (4, 4, 4), (2, 2, 2)),
        "window (4,4,4) tiles, (3,3,3) cut": video.spatiotemporal_window(grid, (4, 4, 4), (3, 3, 3)),
        "radial, decay 1": video.radial(grid, block_size=64),
        "radial, decay 0.25": video.radial(grid, block_size=64, decay=0.25),
    }
    print(f"QwenImage-sized attention: {heads} heads x {head_dim}, video {s_video} + {text} text tokens "
          f"({grid.tokens} tokens), 3-D RoPE; relative L2 error of the output vs dense")
    print()
    print("| layout | FLOPs run (share of dense) | error vs dense | random layout, same density: error |")
    print("|---|---:|---:|---:|")
    for name, lay in layouts.items():
        out = lay.attention(q, k, v, backend="sdpa")
        rnd = BlockSparse(_random_like(lay.layout, g), lay.block_size)
        o = lay.order
        out_r = o.to_model(attnlib.attention(o.to_attention(q), o.to_attention(k), o.to_attention(v), rnd,
                                             backend="sdpa"))
        print(f"| {name} | {lay.density():.3f} | {err(out):.3f} | {err(out_r):.3f} |")
    order = grid.tile_order((4, 4, 4))
    qa, ka, va = (order.to_attention(x) for x in (q, k, v))
    n = -(-grid.tokens // 64)
    text_blocks = torch.zeros(n, n, dtype=torch.bool)              # attention order: the text is last
    text_blocks[grid.video_tokens // 64:, :] = True
    text_blocks[:, grid.video_tokens // 64:] = True
    for keep in (0.10, 0.25):
        m = video.topk_blocks(qa, ka, 64, keep, include=text_blocks)
        out = order.to_model(attnlib.attention(qa, ka, va, m, backend="sdpa"))
        dens = block_density(m.layout, 64, grid.tokens, grid.tokens)
        rnd = BlockSparse(_random_like(m.layout[0, 0], g), 64)
        out_r = order.to_model(attnlib.attention(qa, ka, va, rnd, backend="sdpa"))
        print(f"| top-k {keep:.0%} per head (tiles (4,4,4)) + text | {dens:.3f} | {err(out):.3f} | {err(out_r):.3f} |")


def _random_like(layout: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random layout with the same number of visible blocks in each row."""
    out = torch.zeros_like(layout)
    for i, c in enumerate(layout.sum(-1).tolist()):
        out[i, torch.randperm(layout.shape[-1], generator=g)[:c]] = True
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["report"]:
        report(sys.argv[2])
    elif sys.argv[1:2] == ["plot"]:
        plot(sys.argv[2], *sys.argv[3:])
    elif sys.argv[1:2] == ["errors"]:
        errors()
    else:
        sys.exit(__doc__)
