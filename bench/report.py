"""Benchmark results as tables and pictures.

    python bench/report.py RUN.json                  # pytest-benchmark JSON -> markdown table, ratios to baseline
    python bench/report.py RUN.json --plot RUN.png   # ... and a PNG of the same ratios (needs matplotlib)
    python bench/report.py --plots [NAME ...]        # redraw the PNGs of bench/results/ from their markdown tables

``PLOTS`` says which table of which results file each picture draws; every picture names the machine, the
load and the date of the run it shows. Adding a picture is one entry.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------
# pytest-benchmark JSON
# ---------------------------------------------------------------------------------------------------
def json_groups(data: dict) -> dict[str, list[tuple[str, float, float | None, bool]]]:
    """group -> ``(variant, median ms, ratio to the group's baseline or None, is baseline)``, baseline first."""
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b.get("group") or b["name"]].append(b)
    out = {}
    for group, rows in groups.items():
        base = next((r for r in rows if r.get("extra_info", {}).get("baseline")), None)
        ordered = sorted(rows, key=lambda r: (not r.get("extra_info", {}).get("baseline"), r["name"]))
        out[group] = [(r.get("extra_info", {}).get("variant", r["name"]), r["stats"]["median"] * 1e3,
                       r["stats"]["median"] / base["stats"]["median"] if base else None, r is base) for r in ordered]
    return out


def json_machine(data: dict) -> str:
    mi = data.get("machine_info", {})
    extra = data["benchmarks"][0].get("extra_info", {}) if data["benchmarks"] else {}
    return (f"machine: {mi.get('cpu', {}).get('brand_raw', platform.processor())}, "
            f"{mi.get('cpu', {}).get('count', '?')} cores, python {mi.get('python_version', '?')}, "
            f"torch {extra.get('torch', '?')}, device {extra.get('device', '?')}; date {data.get('datetime', '')[:10]}")


def markdown(data: dict) -> str:
    lines = [json_machine(data), "", "| group | variant | median (ms) | ratio to baseline |", "|---|---|---:|---:|"]
    for group, rows in json_groups(data).items():
        for variant, ms, ratio, is_base in rows:
            text = "baseline" if is_base else (f"{ratio:.3f}x" if ratio is not None else "")
            lines.append(f"| {group} | {variant} | {ms:.3f} | {text} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# markdown tables of bench/results/
# ---------------------------------------------------------------------------------------------------
@dataclass
class Table:
    heading: str            # the nearest "#" heading above it
    header: list
    rows: list

    def column(self, name: str) -> int:
        return self.header.index(name)


def md_tables(text: str) -> list[Table]:
    tables, heading, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-:| ]+\|$", lines[i + 1]):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            tables.append(Table(heading, header, rows))
            continue
        i += 1
    return tables


def table(name: str, heading: str, first_column: str, nth: int = 0) -> Table:
    """The ``nth`` table under ``heading`` (a prefix) in ``bench/results/name`` whose first column is named
    ``first_column``."""
    found = [t for t in md_tables((RESULTS / name).read_text())
             if t.heading.startswith(heading) and t.header[0] == first_column]
    if len(found) <= nth:
        raise LookupError(f"bench/results/{name}: no table #{nth} under {heading!r} starting with {first_column!r}")
    return found[nth]


def _num(cell: str) -> float:
    return float(re.match(r"[-0-9.]+", cell.replace(",", "")).group(0))


def ratio_groups(t: Table, group: str, variant: str, ms: str, ratio: str,
                 skip: Callable[[str], bool] = lambda v: False):
    """Rows of ``t`` as ``json_groups`` gives them; a ratio cell ``baseline`` (or ``1.00x`` first) is the base."""
    out = defaultdict(list)
    for row in t.rows:
        v = row[t.column(variant)]
        if skip(v):
            continue
        cell = row[t.column(ratio)]
        is_base = cell in ("baseline", "—") or not out[row[t.column(group)]] and _num(cell) == 1.0
        out[row[t.column(group)]].append((v, _num(row[t.column(ms)]), 1.0 if is_base else _num(cell), is_base))
    return dict(out)


# ---------------------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ratio_axes(ax, groups: dict, *, xlabel: str, ms_label: bool = True) -> None:
    """One horizontal bar per variant, clustered by group; the baseline (1.0) is a dashed line."""
    ours = list(dict.fromkeys(v for rows in groups.values() for v, _, _, b in rows if not b and "attnlib" in v))
    blues = ["#1f77b4", "#17becf", "#2ca02c", "#9467bd", "#0b3d91"]
    others = ["#ff7f0e", "#d62728", "#8c564b", "#e377c2"]
    color, n_other = {}, 0
    for rows in groups.values():
        for v, _, _, is_base in rows:
            if v in color:
                continue
            if is_base:
                color[v] = "0.65"
            elif v in ours:
                color[v] = blues[ours.index(v) % len(blues)]
            else:
                color[v] = others[n_other % len(others)]
                n_other += 1
    y, ticks, labels = 0.0, [], []
    for group, rows in groups.items():
        ticks.append(y + (len(rows) - 1) / 2)
        labels.append(group.split(":")[0] if len(group) > 40 and ":" in group else group)   # attnlib bench: the name
        for variant, ms, ratio, is_base in rows:
            ax.barh(y, ratio, color=color[variant], height=0.8)
            text = "baseline" if is_base else f"{ratio:.3g}x"
            if ms_label:
                text += f" ({ms:.0f} ms)" if ms >= 100 else f" ({ms:.3g} ms)"
            at = max(ratio, 1.0)
            ax.text(at + 0.02, y, f" {variant}: {text}", va="center", fontsize=7)
            y += 1
        y += 0.8
    ax.axvline(1.0, color="0.3", linestyle="--", linewidth=0.8)
    ax.set_yticks(ticks, [_wrap(g, 28) for g in labels], fontsize=8)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel(xlabel, fontsize=8)
    hi = max(r for rows in groups.values() for _, _, r, _ in rows)
    ax.set_xlim(0, max(hi * 1.65, hi + 1.3))
    ax.grid(axis="x", alpha=0.3)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join(lines + [line])


def _rows(groups: dict) -> int:
    return sum(len(r) for r in groups.values()) + len(groups)


def save(fig, path: pathlib.Path, caption: str) -> None:
    """Write ``fig`` with ``caption`` (machine, load, date, source) under it."""
    width = int(fig.get_figwidth() * 17)
    caption = "\n".join(_wrap(part, width) for part in caption.split("\n"))
    fig.text(0.01, 0.008, caption, fontsize=7, color="0.3", va="bottom")
    fig.tight_layout(rect=(0, (0.14 * (caption.count("\n") + 1) + 0.08) / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110, metadata={"Software": None})
    _pyplot().close(fig)


def ratio_figure(groups: dict, title: str, caption: str, path: pathlib.Path, *, xlabel: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.24 * _rows(groups)))
    ratio_axes(ax, groups, xlabel=xlabel)
    ax.set_title(title, fontsize=10, loc="left")
    save(fig, path, caption)


LOWER = "time relative to the group's baseline (dashed line = 1; shorter bar = faster)"


def plot_core(path):
    t = table("core_cpu.md", "After the score modifiers", "group")
    ratio_figure(ratio_groups(t, "group", "variant", "median (ms)", "ratio to baseline"),
                 "attnlib's sdpa lowering vs raw SDPA and hand-written baselines (CPU, fp32, forward, "
                 "non-finite guard on)",
                 "2-core AMD EPYC VM, nothing else running (load average 0.9-1.4, the benchmark itself); 2026-12-07; "
                 "torch 2.13.0+cpu; pytest-benchmark medians (bench/bench_core.py, bench/results/core_cpu.md)",
                 path, xlabel=LOWER)


def plot_flex(path):
    t = table("flex_cpu.md", "The CPU shape guard's cost", "workload")
    ratio_figure(ratio_groups(t, "workload", "variant", "median (ms)", "vs first row",
                              skip=lambda v: "guard off" in v),
                 "Packed varlen / CFG vs a dense [T, T] mask: per-sequence loop (baseline), attnlib sdpa and flex "
                 "(CPU)",
                 "2-core AMD EPYC VM, nothing else running (load average 0.5-1.0, the benchmark itself); "
                 "2026-12-01; torch 2.13.0+cpu, fp32, H=8, D=64; medians of 11 interleaved rounds\n"
                 "(bench/bench_flex.py, bench/results/flex_cpu.md, \"The CPU shape guard's cost\")",
                 path, xlabel=LOWER)


def plot_compile(path):
    t = table("compile_cpu.md", "Compiled models", "model")
    groups = {}
    for model, host, ours, ratio in t.rows:
        groups[model] = [("host SDPA path", _num(host), 1.0, True), ("attnlib", _num(ours), _num(ratio), False)]
    ratio_figure(groups, "Compiled models (torch.compile fullgraph, inductor): attnlib inside vs the host's own SDPA "
                 "path (CPU)",
                 "2-core AMD EPYC VM, nothing else running (load average 1.0-1.1, the benchmark itself); 2026-12-01; "
                 "torch 2.13.0+cpu, fp32, transformers 5.24, diffusers 0.42\nmedian of interleaved blocks "
                 "(bench/bench_compile.py, bench/results/compile_cpu.md)", path, xlabel=LOWER)


def plot_rope(path):
    t = table("rope_cpu.md", "One intra-op thread", "group")
    ratio_figure(ratio_groups(t, "group", "variant", "median (ms)", "ratio to baseline"),
                 "attnlib.rope vs transformers: mRoPE position ids, rotary, mRoPE tables (CPU, 1 thread)",
                 "2-core AMD EPYC VM shared with other test runs (load average 2.0-2.2); 2026-12-01; torch "
                 "2.13.0+cpu, transformers 5.24.0; pytest-benchmark medians, first of three runs\n"
                 "(bench/bench_rope.py, bench/results/rope_cpu.md)", path, xlabel=LOWER)


def plot_parallel(path):
    plt = _pyplot()
    fwd = table("parallel_cpu.md", "2. Step time", "group")
    bwd = table("parallel_cpu.md", "3. After the fused ring backward", "group")
    groups = {}
    for t in (fwd, bwd):
        for row in t.rows:
            group, variant = row[0], row[1]
            if not group.startswith("fwd") or "1 thread" in variant and "ranks" not in variant:
                continue
            if group.startswith("fwd+bwd") and t is fwd:
                continue                               # superseded by section 3
            ratio = row[t.column("vs 1 process 2 threads")]
            label = group.replace(" (B1 H8 D64 fp32, sdpa)", "")
            groups.setdefault(label, []).append((variant.replace(", 2 ranks x 1 thread", ""), _num(row[2]),
                                                 1.0 if ratio == "—" else _num(ratio), ratio == "—"))
    bytes_t = table("parallel_cpu.md", "1. Bytes", "strategy", nth=1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 1.5 + 0.22 * _rows(groups)), gridspec_kw={"width_ratios": [3, 2]})
    ratio_axes(a, groups, xlabel="step time relative to one process on both cores (dashed line = 1; shorter = faster)")
    a.set_title("Step time: 2 gloo ranks x 1 thread vs 1 process x 2 threads", fontsize=10, loc="left")
    rows = [r for r in bytes_t.rows if r[bytes_t.column("S")] == "2048"]
    labels = [f"{r[0]}, Hkv={r[3]}" for r in rows]
    col = bytes_t.column
    measured = [(_num(r[col("fwd: measured / rank")]), _num(r[col("bwd: measured / rank")])) for r in rows]
    analytic = [(_num(r[col("fwd: analytic")]), _num(r[col("bwd: analytic")])) for r in rows]
    y = list(range(len(rows)))
    b.barh([i - 0.2 for i in y], [m[0] for m in measured], height=0.4, label="forward, measured")
    b.barh([i + 0.2 for i in y], [m[1] for m in measured], height=0.4, label="backward, measured")
    b.scatter([x[0] for x in analytic], [i - 0.2 for i in y], marker="|", s=250, color="k", zorder=3,
              label="analytic minimum")
    b.scatter([x[1] for x in analytic], [i + 0.2 for i in y], marker="|", s=250, color="k", zorder=3)
    b.set_yticks(y, labels, fontsize=8)
    b.invert_yaxis()
    b.set_xlabel("MiB each rank sends per attention call (4 ranks, S=2048, B=1, Hq=8, D=64, fp32)", fontsize=8)
    b.tick_params(axis="x", labelsize=8)
    b.legend(fontsize=7, loc="lower right")
    b.grid(axis="x", alpha=0.3)
    b.set_title("Bytes sent: measured = analytic minimum on every rank", fontsize=10, loc="left")
    save(fig, path, "2-core AMD EPYC VM, gloo over TCP loopback, torch 2.13.0+cpu, fp32, sdpa; 2026-12-01; load "
                    "average 1.1-3.5 during the step runs (mostly the benchmark's own two ranks), fwd+bwd rerun at "
                    "1.7-1.9; medians of 10 (S=2048) / 3 (S=8192) rounds\n(bench/bench_parallel.py, "
                    "bench/results/parallel_cpu.md; bytes are machine-independent)")


#: picture in bench/results/ -> the function that draws it from the markdown tables
PLOTS: dict[str, Callable[[pathlib.Path], None]] = {
    "core_cpu.png": plot_core,
    "flex_cpu.png": plot_flex,
    "parallel_cpu.png": plot_parallel,
    "rope_cpu.png": plot_rope,
    "compile_cpu.png": plot_compile,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="?", help="a pytest-benchmark JSON file (--benchmark-json or attnlib bench --json)")
    p.add_argument("--plot", metavar="PNG", help="with JSON: also draw the ratios to each group's baseline")
    p.add_argument("--plots", nargs="*", metavar="NAME",
                   help=f"redraw these pictures (default all): {', '.join(PLOTS)}")
    args = p.parse_args(argv)
    if args.plots is not None:
        for name in args.plots or PLOTS:
            if name not in PLOTS:
                p.error(f"--plots {name}: unknown; choose from {', '.join(PLOTS)}")
            PLOTS[name](RESULTS / name)
            print(f"wrote bench/results/{name}")
        return 0
    if not args.json:
        p.error("give a JSON file or --plots")
    data = json.load(open(args.json))
    print(markdown(data))
    if args.plot:
        groups = {g: [(v, ms, r if r is not None else 1.0, b) for v, ms, r, b in rows]
                  for g, rows in json_groups(data).items()}
        load = data.get("load_average", {}).get("before")
        caption = json_machine(data) + (f"; load average {load}" if load else "")
        ratio_figure(groups, pathlib.Path(args.json).name, caption, pathlib.Path(args.plot), xlabel=LOWER)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
