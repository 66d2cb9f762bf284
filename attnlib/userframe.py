"""Where "the user's line" is, for warnings: the first frame of code the user wrote.

A frame is *library code* when its file lies in an installed package or the standard library (the
interpreter's ``stdlib``/``purelib``/``platlib`` paths, every ``site-packages``/``dist-packages``
directory on ``sys.path``, ``site``'s own lists) or in attnlib's own packages (``attnlib``,
``attnlib_kernels``, ``models_ref``, wherever they are installed, editable checkouts included), or is
code the interpreter or a compiler generated (``<frozen ...>``, torch.fx's ``<eval_with_key>``).
Everything else is the user's: a script, ``python -c`` / ``<stdin>``, a notebook cell, a project's own
modules. No package is named, so a wrapper that sits between the model and
attnlib (``kernels``' layer hooks, ``accelerate``, ``peft``, a newer transformers) is skipped because it
is installed, not because it is known. :func:`add_library_root` registers another directory to skip
(a vendored copy of a library inside a project, say).
"""
from __future__ import annotations

import os
import site
import sys
import sysconfig

__all__ = ["user_stacklevel", "is_library_file", "add_library_root"]

#: pseudo-filenames of generated code (the interpreter's frozen modules, torch.fx graph modules)
_GENERATED = ("<frozen", "<eval_with_key")
_extra_roots: list[str] = []
_roots_cache: list = []
_verdicts: dict[str, bool] = {}


def _norm(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def _library_roots() -> tuple[str, ...]:
    if _roots_cache:
        return _roots_cache[0]
    roots = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            roots.add(p)
    for getter in ("getsitepackages", "getusersitepackages"):
        fn = getattr(site, getter, None)       # virtualenv's old site module lacks them
        if fn is not None:
            try:
                got = fn()
            except Exception:  # noqa: BLE001
                continue
            roots.update([got] if isinstance(got, str) else got)
    for p in sys.path:
        parts = os.path.normcase(p).replace("\\", "/").split("/")
        if "site-packages" in parts or "dist-packages" in parts:
            roots.add(p)
    here = os.path.dirname(os.path.abspath(__file__))           # attnlib/
    top = os.path.dirname(here)
    for pkg in ("attnlib", "attnlib_kernels", "models_ref"):
        roots.add(os.path.join(top, pkg))
    roots.update(_extra_roots)
    out = tuple(sorted({_norm(r) + os.sep for r in roots if r}))
    _roots_cache.append(out)
    return out


def add_library_root(path: str) -> None:
    """Treat files under ``path`` as library code (their frames are never "the user's line")."""
    _extra_roots.append(str(path))
    _roots_cache.clear()
    _verdicts.clear()


def is_library_file(filename: str) -> bool:
    """True when frames of ``filename`` are library code (see the module docstring)."""
    got = _verdicts.get(filename)
    if got is None:
        if not filename:
            got = True
        elif filename.startswith("<"):
            got = filename.startswith(_GENERATED)
        else:
            path = _norm(filename)
            got = any(path.startswith(root) for root in _library_roots())
        _verdicts[filename] = got
    return got


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` call in the caller's own frame point at the
    first frame of user code (add 1 per frame the warn call sits deeper); 1 (the caller) when no frame
    is user code."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        if not is_library_file(frame.f_code.co_filename):
            return level
        frame, level = frame.f_back, level + 1
    return 1
