"""The supported versions are one table (attnlib.versions): pyproject's ranges, the test pins, the README and
``attnlib info`` all say what it says."""
import pathlib
import re

import pytest

from attnlib import cli, versions

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")          # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_pyproject_ranges_are_the_tables():
    project = _pyproject()
    extras = project["optional-dependencies"]
    for e in versions.SUPPORTED:
        where = project["dependencies"] if e.extra is None else extras[e.extra]
        named = [r for r in where if re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() == e.package]
        assert named == [versions.requirement(e)], (e.package, where)
    core = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in project["dependencies"]}
    assert core == {e.package for e in versions.SUPPORTED if e.extra is None}


def test_the_test_pins_are_the_tested_versions():
    pins = dict(line.split("==") for line in (ROOT / "scripts" / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pins = {name.lower(): version for name, version in pins.items()}
    torch_pin = re.search(r"ATTNLIB_TORCH_VERSION:-([0-9.]+)", (ROOT / "scripts" / "bootstrap.sh").read_text())
    pins["torch"] = torch_pin.group(1)
    for e in versions.SUPPORTED:
        if e.tested is not None:
            assert pins[e.package] == e.tested, e.package
            assert tuple(map(int, e.tested.split("."))) >= tuple(map(int, e.minimum.split(".")))


def test_the_readme_shows_the_table():
    assert versions.markdown_table() in (ROOT / "README.md").read_text(), \
        "README.md is stale: paste attnlib.versions.markdown_table()"


def test_attnlib_info_prints_every_range(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for e in versions.SUPPORTED:
        assert re.search(rf"^{re.escape(e.package)} +.*\(supported: {re.escape(versions.supported_range(e))}\)$",
                         out, re.MULTILINE), e.package
