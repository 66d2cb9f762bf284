"""bench/report.py: pytest-benchmark JSON -> markdown, and the pictures of bench/results/ still find the
tables they draw (a results file edited without its picture's table fails here)."""
import importlib.util
import pathlib
import struct
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
report = sys.modules["bench_report"] = importlib.util.module_from_spec(_spec)   # dataclasses look it up
_spec.loader.exec_module(report)

_DATA = {"machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}, "python_version": "3.11"},
         "datetime": "2026-12-07T00:00:00", "benchmarks": [
             {"group": "g", "name": "a", "stats": {"median": 0.002}, "extra_info": {"variant": "new", "torch": "2.x",
                                                                                  "device": "cpu"}},
             {"group": "g", "name": "b", "stats": {"median": 0.004},
              "extra_info": {"variant": "old", "baseline": True}},
         ]}


def test_json_to_markdown_puts_the_baseline_first_with_ratios():
    lines = report.markdown(_DATA).splitlines()
    assert lines[0] == "machine: Test CPU, 2 cores, python 3.11, torch 2.x, device cpu; date 2026-12-07"
    assert lines[-2:] == ["| g | old | 4.000 | baseline |", "| g | new | 2.000 | 0.500x |"]


@pytest.mark.parametrize("name", list(report.PLOTS))
def test_each_result_picture_draws_from_its_table(name, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / name
    report.PLOTS[name](out)
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and min(struct.unpack(">II", head[16:24])) > 300
    assert (report.RESULTS / name).exists(), f"bench/results/{name} is not committed: python bench/report.py --plots"
