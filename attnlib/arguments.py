"""Command-line argument checks shared by ``attnlib check`` and ``attnlib bench``.

Each bad argument becomes one ``UsageError`` line that names the flag and the fix (exit status 2).
"""
from __future__ import annotations

import torch


class UsageError(Exception):
    """A bad command-line argument: printed as one line, exit status 2."""


def device_arg(dev: str | None, default: str | None = None) -> str:
    """``--device``: ``cpu`` or ``cuda`` (default: ``default``, else cuda when torch sees one)."""
    dev = dev or default or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev not in ("cpu", "cuda"):
        raise UsageError(f"--device {dev!r}: use cpu or cuda")
    if dev == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: torch {torch.__version__} sees no CUDA device here; use --device cpu")
    return dev


def backend_args(names, flag: str, purpose: str) -> tuple[list[str], list[dict]]:
    """``--backend(s)`` values: ``(names that can run here, rows of those that cannot)``, canonical, no repeats.

    ``purpose`` finishes the sentence for ``auto`` ("name the backends to <purpose>").
    """
    from .registry import canonical_name, list_backends

    rows = {r["name"]: r for r in list_backends()}
    chosen: list[str] = []
    for n in names or ():
        try:
            c = canonical_name(n)
        except ValueError as e:
            raise UsageError(f"{flag}: {e}") from None
        if c == "auto":
            raise UsageError(f"{flag} auto: name the backends to {purpose}")
        chosen += [c] if c not in chosen else []
    return [n for n in chosen if rows[n]["available"]], [rows[n] for n in chosen if not rows[n]["available"]]
