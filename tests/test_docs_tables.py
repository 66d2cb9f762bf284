"""The facts docs/backends.md shows come from one place in the code: each table equals its source, and the
"Writing a backend" example runs as written."""
import pathlib
import re
import warnings

import torch

import attnlib
from attnlib import cli, registry

ROOT = pathlib.Path(__file__).resolve().parent.parent
BACKENDS_MD = (ROOT / "docs" / "backends.md").read_text()


def _table_after(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped of backticks) of the first markdown table whose header row starts with ``header``."""
    start = text.index(header)
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("`") for c in line.strip("|").split("|")])
    return rows


def test_capability_matrix_is_the_generated_one():
    generated = cli.capability_matrix(list(registry.BUILTIN_BACKENDS))
    assert generated in BACKENDS_MD, "docs/backends.md is stale: paste `attnlib info --capabilities`"


def test_alias_table_equals_ALIASES():
    assert cli.alias_table(registry.ALIASES) in BACKENDS_MD, "docs/backends.md is stale: paste `attnlib info --aliases`"
    parsed = {}
    for canonical, spellings in _table_after(BACKENDS_MD, "| canonical | also accepted |"):
        for alias in spellings.split(", "):
            parsed[alias.strip("`")] = canonical
    assert parsed == registry.ALIASES


def test_auto_order_table_equals_AUTO_ORDER():
    rows = _table_after(BACKENDS_MD, "| device | order |")
    assert {dev.lower(): tuple(order.split(" > ")) for dev, order in rows} == registry.AUTO_ORDER


def test_docs_are_for_users():
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = doc.read_text()
        assert not re.search(r"DESIGN\.md|\bissues? #?\d+", text, re.IGNORECASE), doc.name


def test_writing_a_backend_example_runs(isolated_registry):
    start = BACKENDS_MD.index("```python", BACKENDS_MD.index("## Writing a backend")) + len("```python\n")
    code = BACKENDS_MD[start:BACKENDS_MD.index("```", start)]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        namespace = {}
        exec(compile(code, "backends-md-example", "exec"), namespace)
    msgs = [str(x.message) for x in w if "'mine'" in str(x.message)]
    assert len(msgs) == 1 and "DenseMask needs dense" in msgs[0] and "using 'sdpa' instead" in msgs[0], msgs
    q = namespace["q"]
    assert registry.auto_order("cpu")[:2] == ("mine", "sdpa")
    assert registry.resolve_backend(q, q, q) == "mine"               # auto: tried before sdpa
    assert registry.resolve_backend(q, q, q, return_lse=True) == "mine"
    assert registry.resolve_backend(q.double(), q.double(), q.double()) == "sdpa"
    dense = attnlib.DenseMask(torch.ones(8, 8, dtype=torch.bool))
    torch.testing.assert_close(namespace["out"], attnlib.attention(q, q, q, dense, backend="sdpa"))  # the fallback's
    checked = [r for r in namespace["results"] if not r.skipped]
    assert len(checked) > 30 and all(r.passed for r in checked)      # the documented check checks
