"""The README's usage example runs as written (and its fallback warning points at the example's line)."""
import pathlib
import warnings

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_usage_example_runs():
    text = README.read_text()
    start = text.index("```python\nimport torch, attnlib") + len("```python\n")
    code = text[start:text.index("```", start)]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        namespace = {}
        exec(compile(code, "README-usage", "exec"), namespace)
    assert namespace["out"].shape == (2, 16, 8, 64)
    assert namespace["pinned"].backend == "sdpa"
    assert all(x.filename == "README-usage" for x in w if "attnlib:" in str(x.message))
