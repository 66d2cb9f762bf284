"""``attnlib bench`` as a user runs it (tiny shapes): the table, pytest-benchmark JSON that ``pytest-benchmark
compare`` reads, the PNG chart, the check against math before timing, and the counting behind TFLOP/s."""
import dataclasses
import json
import random
import struct
import subprocess
import sys

import pytest
import torch

import attnlib.backends as attnlib_backends
from attnlib import BlockDiagonal, Causal, DenseMask, KeyPadding, benchmark, cli, masks
from attnlib.progress import Progress

FAST = ["--min-time", "0.01"]


def _bench(*args):
    return cli.main(["bench", *FAST, *args])


def test_a_shape_end_to_end_table_json_and_chart(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    assert _bench("--shape", "2,16,24,4,2,8", "--mask", "causal", "--backends", "sdpa,math", "--json", str(js),
                  "--plot", str(png)) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("  sdpa ", "  math "))}
    assert set(rows) == {"sdpa", "math"}
    assert rows["sdpa"][4] == "1.00x" and rows["sdpa"][-1] == "ok" and rows["math"][-1] == "ok"
    # visible pairs of Causal() with Sq=16, Sk=24 (offset 8): rows see 9..24 keys, x B=2 x Hq=4
    assert f"{2 * 4 * sum(range(9, 25)) / 1e6:.4g}M visible" in out
    assert "checked: whole call" in out and "not run:" not in out.split("checked:")[0]

    data = json.loads(js.read_text())
    assert [b["name"] for b in data["benchmarks"]] == ["shape 2,16,24,4,2,8 causal[sdpa]",
                                                       "shape 2,16,24,4,2,8 causal[math]"]
    sdpa, math_ = data["benchmarks"]
    assert sdpa["extra_info"]["baseline"] and not math_["extra_info"]["baseline"]
    assert sdpa["stats"]["rounds"] == len(sdpa["stats"]["data"]) >= benchmark.MIN_ROUNDS
    assert sdpa["extra_info"]["visible_pairs"] == 2 * 4 * sum(range(9, 25))
    assert sdpa["extra_info"]["check"]["error"] <= sdpa["extra_info"]["check"]["tol"]
    proc = subprocess.run([sys.executable, "-m", "pytest_benchmark", "compare", str(js), "--columns=median,rounds"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and "causal[sdpa]" in proc.stdout and "causal[math]" in proc.stdout, proc.stderr

    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 500 and height > 200


def test_a_named_workload_runs_at_tiny_sizes(monkeypatch, capsys):
    tiny = dataclasses.replace(benchmark.workload("varlen"), sizes={"cpu": dict(lens=(5, 17, 9), Hq=4, Hkv=2, D=16)})
    monkeypatch.setattr(benchmark, "WORKLOADS", (tiny,))
    monkeypatch.setattr(benchmark, "FULL_CHECK_SCORES", 0)              # exercise the subset check
    assert _bench("--workloads", "varlen", "--backends", "sdpa", "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert "BlockDiagonal(3 blocks: q [5, 17, 9], causal)" in out
    assert "checked: query head 3 of 4 (kv head 1)" in out


def test_missing_features_skip_their_workloads_with_a_reason():
    paged = benchmark.workload("paged_decode").needs()
    sparse = benchmark.workload("video_sparse").needs()
    import inspect

    assert (paged is None) == ("block_table" in inspect.signature(__import__("attnlib").attention).parameters)
    assert (sparse is None) == hasattr(masks, "BlockSparse")
    if paged:
        assert "block_table" in paged
    if sparse:
        assert "BlockSparse" in sparse


class _Wrong(attnlib_backends.Backend):
    name = "fake_wrong"
    implementation = "returns q"

    def forward(self, call):
        return call.q.clone(), None


class _Raises(attnlib_backends.Backend):
    name = "fake_raises"

    def forward(self, call):
        raise RuntimeError("boom\nsecond line")


def test_a_wrong_or_raising_backend_is_reported_and_not_timed(isolated_registry, tmp_path, capsys):
    isolated_registry.register_backend(_Wrong())
    isolated_registry.register_backend(_Raises())
    js = tmp_path / "b.json"
    assert _bench("--shape", "1,8,8,2,2,8", "--backends", "fake_raises,sdpa,fake_wrong", "--json", str(js)) == 1
    out = capsys.readouterr().out
    assert "WRONG: not timed" in out and "ERROR: RuntimeError: boom\n" in out
    assert "FAILED: fake_raises on shape 1,8,8,2,2,8 causal, fake_wrong on shape 1,8,8,2,2,8 causal" in out
    assert [b["param"] for b in json.loads(js.read_text())["benchmarks"]] == ["sdpa"]


def test_backends_that_cannot_serve_say_why(capsys):
    # flex cannot take fp64: listed with its reason, sdpa is timed
    assert _bench("--shape", "1,8,8,2,2,8", "--backends", "sdpa,flex", "--dtype", "fp64") == 0
    out = capsys.readouterr().out
    assert "flex: cannot serve this call: dtype=fp64" in out


@pytest.mark.parametrize("args,needle", [
    (["--shape", "1,2,3"], "--shape 1,2,3: give six positive ints"),
    (["--shape", "1,8,8,3,2,8"], "Hq (3) must be a multiple of Hkv (2)"),
    (["--workloads", "bogus"], "--workloads bogus: unknown; choose from prefill,"),
    (["--shape", "1,8,8,2,2,8", "--mask", "bogus"], "--mask bogus: unknown; choose from none, causal"),
    (["--shape", "1,8,8,2,2,8", "--mask", "window"], "--mask window: write it as window=N"),
    (["--backends", "bogus"], "--backends: unknown attention backend 'bogus'"),
    (["--mask", "none"], "--mask applies to --shape calls"),
    (["--min-time", "0"], "--min-time 0"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, needle, capsys):
    assert _bench(*args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_list_names_every_workload_and_mask(capsys):
    assert _bench("--list") == 0
    out = capsys.readouterr().out
    assert all(w.name in out for w in benchmark.WORKLOADS) and all(m.name in out for m in benchmark.USER_MASKS)


@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 8, 13])
def test_statistics_are_pytest_benchmarks(n):
    stats_mod = pytest.importorskip("pytest_benchmark.stats")
    rng = random.Random(n)
    data = [rng.uniform(1e-3, 2e-3) for _ in range(n)]
    theirs = stats_mod.Stats()
    for x in data:
        theirs.update(x)
    ours = benchmark.stats(data)
    for name in stats_mod.Stats.fields:
        assert ours[name] == pytest.approx(getattr(theirs, name)) if isinstance(ours[name], float) \
            else ours[name] == getattr(theirs, name), name


def _materialized_pairs(mask, b, h, sq, sk):
    m = mask.materialize(sq, sk, "cpu") if mask is not None else torch.ones(sq, sk, dtype=torch.bool)
    if isinstance(mask, BlockDiagonal):
        return h * int(m.sum())
    return int(m.expand(b, h, sq, sk).sum())


@pytest.mark.parametrize("mask,b,sq,sk", [
    (None, 2, 5, 7),
    (Causal(), 2, 5, 9), (Causal(), 1, 9, 5), (Causal(align="top_left"), 1, 6, 11),
    (Causal(window=3), 2, 7, 7), (Causal(window=4), 1, 3, 10),
    (BlockDiagonal([3, 1, 5], [4, 6, 2], causal=True), 1, 9, 12),
    (BlockDiagonal([3, 4], [5, 2], causal=True, window=2), 1, 7, 7),
    (BlockDiagonal([3, 4]), 1, 7, 7),
    (KeyPadding(torch.tensor([[1, 1, 0, 1, 0, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)), 2, 4, 6),
    (KeyPadding(torch.tensor([[1, 1, 0, 1, 0, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool), causal=True, window=3),
     2, 4, 6),
    (DenseMask(torch.rand(2, 1, 4, 6, generator=torch.Generator().manual_seed(0)) > 0.5), 2, 4, 6),
    *([] if not hasattr(masks, "BlockSparse") else [
        (masks.BlockSparse(torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool), (3, 4)), 2, 5, 10),
        (masks.BlockSparse(torch.rand(3, 2, 3, generator=torch.Generator().manual_seed(1)) > 0.5, (3, 4)), 2, 5, 10),
        (masks.BlockSparse(torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool), (3, 4), causal=True), 1, 5, 10),
    ]),
    *([] if "chunk" not in getattr(Causal, "__dataclass_fields__", {}) else [
        (Causal(chunk=3, window=2, sink=1), 1, 7, 9),
        (BlockDiagonal([4, 5], causal=True, chunk=2, sink=1), 1, 9, 9),
    ]),
])
def test_visible_pairs_equal_the_materialized_mask(mask, b, sq, sk):
    assert benchmark.visible_pairs(mask, b, 3, sq, sk) == _materialized_pairs(mask, b, 3, sq, sk)


class _Stream:
    def __init__(self, tty):
        self.text, self.tty = "", tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return self.tty


def test_progress_redraws_one_line_on_a_terminal_and_prints_rarely_elsewhere():
    tty = _Stream(True)
    p = Progress(4, "job", stream=tty)
    p.update("a", advance=1)
    p.update("b", advance=2)
    p.close()
    assert tty.text.count("\r\033[K") >= 3 and "\n" not in tty.text and "3/4" in tty.text and "[###" in tty.text
    log = _Stream(False)
    p = Progress(4, "job", stream=log, interval=3600)
    p.update("a", advance=4)
    assert log.text == ""                                          # a short run prints nothing
    p = Progress(4, "job", stream=log, interval=0)
    p.update("b", advance=1)
    assert log.text.startswith("job: 1/4 b (") and "\r" not in log.text


def test_docs_list_every_workload():
    import pathlib

    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md").read_text()
    assert all(f"| `{w.name}` |" in text for w in benchmark.WORKLOADS)
    assert all(f"`{benchmark._mask_usage(m)}`" in text for m in benchmark.USER_MASKS if m.needs() is None)


def test_the_paged_workload_builds_a_pool_whose_pages_are_the_contiguous_caches():
    w = benchmark.workload("paged_decode")
    p = w.build(dict(kv_lens=(5, 17, 1), page=4, Hq=4, Hkv=2, D=8), torch.device("cpu"), torch.float32,
                torch.Generator().manual_seed(0))
    table = p.kwargs["block_table"]
    assert table.dtype == torch.int32 and table.shape == (3, 5) and p.k.shape == (5 + 2 + 1 + 4, 4, 2, 8)
    used = [int(x) for r, n in enumerate((2, 5, 1)) for x in table[r, :n]]
    assert len(set(used)) == len(used)                       # no page shared between requests
    k, v = p.reference_kv
    for r, (start, n) in enumerate(((0, 5), (5, 17), (22, 1))):
        for j in range(n):
            assert torch.equal(k[start + j], p.k[table[r, j // 4], j % 4])
    assert p.mask == BlockDiagonal([1, 1, 1], [5, 17, 1], causal=True) and p.q.shape == (3, 4, 8)


def test_the_sparse_video_layout_keeps_each_frame_and_the_first(monkeypatch):
    monkeypatch.setattr(masks, "BlockSparse", lambda layout, block_size: ("layout", layout, block_size),
                        raising=False)
    w = benchmark.workload("video_sparse")
    p = w.build(dict(B=1, S=64, H=2, D=8, block=8, frames=4, extra=0.0), torch.device("cpu"), torch.float32,
                torch.Generator().manual_seed(0))
    _, layout, bs = p.mask
    frame_of_block = [0, 0, 1, 1, 2, 2, 3, 3]                # 4 frames of 16 tokens, 2 blocks each
    assert bs == 8 and layout.tolist() == [[f == g or g == 0 for g in frame_of_block] for f in frame_of_block]
