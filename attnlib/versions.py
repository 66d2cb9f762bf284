"""The versions of torch and of the optional packages attnlib supports, in one table.

``minimum`` is what attnlib's code needs: pyproject.toml's ranges are exactly ``package>=minimum`` (the core
dependency and the extras; no upper bounds, so a new release is not locked out). ``tested`` is the release
the test suite runs against: ``scripts/constraints.txt`` pins it (torch: ``scripts/bootstrap.sh``), and
``bash scripts/bootstrap.sh --latest`` runs the suite against today's releases instead. ``tests/test_versions.py``
keeps pyproject, the pins and this table equal; ``attnlib info`` prints it with the versions installed here,
and docs/integrations.md embeds :func:`markdown_table`. This module imports nothing from attnlib.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class Supported:
    package: str               # the distribution name (pip)
    minimum: str               # pyproject: ``package>=minimum``
    tested: str | None         # the release the test suite runs; None: needs a GPU, not in the test set
    extra: str | None          # the pyproject extra that installs it; None: a core dependency
    needed_for: str


SUPPORTED: tuple[Supported, ...] = (
    Supported("torch", "2.5", "2.13.0", None,
              "everything: SDPA with `enable_gqa`, `flex_attention` (newer releases add kernels, e.g. varlen in 2.10)"),
    Supported("triton", "3.1", "3.9.0", "triton", "the `triton` backend and the rotary / mRoPE kernels"),
    Supported("flash-attn", "2.6", None, "flash", "the `flash` backend's FA2 (FA3 / FA4 are used when installed)"),
    Supported("xformers", "0.0.28", None, "xformers", "the `xformers` backend"),
    Supported("transformers", "5", "5.25.0", "hf", "`attnlib.integrations.transformers`"),
    Supported("diffusers", "0.42", "0.42.1", "hf", "`attnlib.integrations.diffusers`"),
)


def requirement(entry: Supported) -> str:
    """The pyproject requirement string, e.g. ``"torch>=2.5"``."""
    return f"{entry.package}>={entry.minimum}"


def get(package: str) -> Supported:
    """The row of ``package`` (``KeyError`` naming the known ones otherwise)."""
    for entry in SUPPORTED:
        if entry.package == package:
            return entry
    raise KeyError(f"{package!r} is not in attnlib.versions.SUPPORTED ({', '.join(e.package for e in SUPPORTED)})")


def installed(package: str) -> str | None:
    """The installed version of a distribution (read from its metadata, nothing imported), or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def supported_range(entry: Supported) -> str:
    """One line: ``">= 2.5, tested 2.13; required"``, ``">= 5, tested 5.25; extra [hf]"``."""
    text = f">= {entry.minimum}, " + (f"tested {entry.tested}" if entry.tested else "no tested pin (needs a GPU)")
    return text + (f"; extra [{entry.extra}]" if entry.extra else "; required")


def markdown_table() -> str:
    """The table as markdown (docs/integrations.md embeds it; a test compares)."""
    lines = ["| package | supported | tested | install | needed for |", "|---|---|---|---|---|"]
    for e in SUPPORTED:
        install = f"`attnlib[{e.extra}]`" if e.extra else "always (a dependency)"
        lines.append(f"| `{e.package}` | >= {e.minimum} | {e.tested or '— (needs a GPU)'} | {install} | {e.needed_for} |")
    return "\n".join(lines)
