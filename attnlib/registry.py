"""The backend registry and the selection rules.

Selection, first match wins:

1. ``backend=`` on the call or on ``Attention(...)``;
2. ``with attnlib.use_backend(name):`` (a contextvar: thread- and task-safe);
3. the environment variable ``DIFFUSION_ATTENTION_BACKEND``;
4. ``auto``: the first backend of ``auto_order(device)`` (``AUTO_ORDER`` plus backends registered with
   ``auto_before``) that can serve the call.

A chosen backend that cannot serve a call falls back to ``auto`` with one warning per
(backend, reason), or raises :class:`BackendUnavailableError` when ``ATTNLIB_FALLBACK=error``.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import threading
import warnings
from typing import Iterable, Iterator

import torch

from .backends.base import Backend, PlaceholderBackend
from .errors import BackendUnavailableError
from .inputs import AttentionCall, validate_call
from .userframe import user_stacklevel
from .settings import BACKEND as ENV_BACKEND, FALLBACK as ENV_FALLBACK, FALLBACK_POLICIES

#: built-in backends: canonical name -> (module, class)
BUILTIN_BACKENDS = {
    "math": ("attnlib.backends.math", "MathBackend"),
    "sdpa": ("attnlib.backends.sdpa", "SdpaBackend"),
    "flex": ("attnlib.backends.flex", "FlexBackend"),
    "flash": ("attnlib.backends.flash", "FlashBackend"),
    "xformers": ("attnlib.backends.xformers", "XformersBackend"),
    "triton": ("attnlib.backends.triton", "TritonBackend"),
}

#: other spellings (vLLM-Omni, diffusers, common shorthands), after lower-casing and '-' -> '_'; the one
#: list (docs/backends.md embeds ``attnlib info --aliases``; the unknown-name error quotes from it)
ALIASES = {
    # math
    "_native_math": "math", "native_math": "math", "torch_math": "math", "reference": "math",
    # sdpa
    "torch_sdpa": "sdpa", "native": "sdpa", "native_sdpa": "sdpa", "_native_efficient": "sdpa",
    "_native_cudnn": "sdpa", "scaled_dot_product_attention": "sdpa",
    # flash
    "flash_attn": "flash", "flash_attention": "flash", "flash_varlen": "flash", "_flash_3": "flash",
    "_flash_varlen_3": "flash", "flash_attn_3": "flash", "fa2": "flash", "fa3": "flash", "fa4": "flash",
    "_native_flash": "flash", "flash_attn_varlen": "flash",
    # flex
    "flex_attention": "flex", "_native_flex": "flex",
    # xformers
    "xformers_attn": "xformers",
    # triton
    "triton_attn": "triton", "attnlib_triton": "triton",
}

#: auto-selection order per device type; the first backend whose ``why_not`` is empty serves.
#: Evidence for the order: docs/backends.md (benchmarks in bench/results/).
AUTO_ORDER = {
    "cuda": ("flash", "xformers", "triton", "sdpa", "flex", "math"),
    "cpu": ("sdpa", "flex", "math"),
}
DEFAULT_AUTO_ORDER = ("sdpa", "math")

_registry: dict[str, Backend] = {}
_aliases: dict[str, str] = {}
_extra_auto: dict[str, str] = {}          # third-party name -> name it is tried before
_lock = threading.Lock()
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("attnlib_backend", default=None)
#: ``use_backend``'s current choice, mirrored where compiled code can read it: torch.compile cannot read a
#: ContextVar, so inside a compiled region selection reads this (process-wide) value instead, and the
#: compiled graph is guarded on it (entering ``use_backend`` with another name recompiles)
_compiled_override: list = [None]
_warned: set = set()          # (backend, reasons) already warned about; reset_warnings() clears it


def reset_warnings() -> None:
    """Forget which fallbacks were warned about (each warns once per process otherwise; tests reset it)."""
    _warned.clear()


def _load_builtins() -> None:
    for name, (module, cls) in BUILTIN_BACKENDS.items():
        try:
            backend = getattr(importlib.import_module(module), cls)()
        except (ImportError, AttributeError) as e:  # a module that cannot even import is reported, not fatal
            backend = PlaceholderBackend(name, f"backend module failed to import: {e}")
        _registry[name] = backend
    _aliases.update(ALIASES)


_probed: list = [False]


def _run_probes() -> None:
    """Run every backend's environment probes (imports, device queries) once, outside any compiled region:
    they are cached as plain values that compiled code reads without tracing them."""
    for backend in list(_backends().values()):
        try:
            backend.run_probes()
        except Exception:  # noqa: BLE001 - a probe that fails is reported by the call that needs it
            pass
    _probed[0] = True


def _ensure_probed() -> None:
    if torch.compiler.is_compiling():
        # probed at trace time if the first call ever is being traced; the flag is read inside comptime so
        # that the traced path is the same when dynamo restarts its analysis (a changed path is an error)
        from torch._dynamo.comptime import comptime

        comptime(lambda ctx: None if _probed[0] else _run_probes())
    elif not _probed[0]:
        _run_probes()


def register_backend(backend: Backend, *, aliases: Iterable[str] = (), auto_before: str | None = None,
                     replace: bool = False) -> Backend:
    """Add a backend (an instance of :class:`attnlib.backends.base.Backend`) under ``backend.name``.

    ``aliases`` are extra spellings; ``auto_before`` names the backend it is tried before in auto
    selection (left out: it is only used when asked for by name). ``replace=True`` swaps a backend
    registered under the same name and lets an alias of another backend move to this one; without it
    a taken name or alias raises ``ValueError``. An alias that is a registered backend's name always
    raises (the name would win, so the alias could never take effect).
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend needs a Backend instance, got {type(backend).__name__}")
    name = _normalize(backend.name)
    if not name or name == "auto":
        raise ValueError(f"backend name {backend.name!r} is reserved or empty")
    with _lock:
        if not _registry:
            _load_builtins()
        if (name in _registry or name in _aliases) and not replace:
            raise ValueError(f"a backend named {name!r} is already registered; pass replace=True to swap it")
        if auto_before is not None and canonical_name(auto_before) not in _registry:
            raise ValueError(f"auto_before={auto_before!r} is not a registered backend")
        new_aliases = [_normalize(a) for a in ([aliases] if isinstance(aliases, str) else aliases)]
        new_aliases = [a for a in new_aliases if a != name]          # the backend's own name needs no alias
        for a in new_aliases:
            if not a or a == "auto":
                raise ValueError(f"alias {a!r} of backend {name!r} is reserved or empty")
            if a in _registry:          # a canonical name always wins over an alias: it could never take effect
                raise ValueError(f"alias {a!r} of backend {name!r} is the name of the registered backend {a!r}")
            if _aliases.get(a, name) != name and not replace:
                raise ValueError(f"alias {a!r} of backend {name!r} already means {_aliases[a]!r}; "
                                 "pass replace=True to take it over")
        _registry[name] = backend
        for a in new_aliases:
            _aliases[a] = name
        if auto_before is not None:
            _extra_auto[name] = canonical_name(auto_before)
    return backend


def _backends() -> dict[str, Backend]:
    if not _registry:
        with _lock:
            if not _registry:
                _load_builtins()
    return _registry


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def canonical_name(name: str) -> str:
    """Canonical backend name for any accepted spelling; ``ValueError`` listing valid names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str name, got {type(name).__name__}")
    n = _normalize(name)
    reg = _backends()
    if n == "auto" or n in reg:
        return n
    if n in _aliases:
        return _aliases[n]
    valid = ", ".join(["auto", *reg])
    raise ValueError(f"unknown attention backend {name!r}; valid names: {valid} (also {len(_aliases)} aliases "
                     f"such as {', '.join(_alias_examples())}; `attnlib info --aliases` lists them)")


def _alias_examples(per_backend: int = 1) -> list[str]:
    """The first ``per_backend`` aliases of each backend, in registration order."""
    seen: dict[str, int] = {}
    out = []
    for alias, target in _aliases.items():
        if seen.get(target, 0) < per_backend:
            seen[target] = seen.get(target, 0) + 1
            out.append(alias)
    return out


def alias_map() -> dict[str, str]:
    """Every accepted alias (normalized: lower-case, ``_`` for ``-``) -> canonical backend name: the
    built-in ``ALIASES`` plus those given to :func:`register_backend`."""
    _backends()
    return dict(_aliases)


def get_backend(name: str) -> Backend:
    """The backend object for a name or alias (not ``auto``)."""
    n = canonical_name(name)
    if n == "auto":
        raise ValueError("'auto' is a selection rule, not a backend; use resolve_backend(...)")
    return _backends()[n]


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Select a backend inside a ``with`` block (thread- and task-local); ``None`` clears the override."""
    value = None if name is None else canonical_name(name)
    token = _override.set(value)
    previous, _compiled_override[0] = _compiled_override[0], value
    try:
        yield
    finally:
        _override.reset(token)
        _compiled_override[0] = previous


def _requested(backend: str | None) -> tuple[str, str]:
    if backend is not None:
        return canonical_name(backend), "the backend= argument"
    ctx = _compiled_override[0] if torch.compiler.is_compiling() else _override.get()
    if ctx is not None:
        return ctx, "use_backend(...)"
    env = os.environ.get(ENV_BACKEND)
    if env:
        try:
            return canonical_name(env), f"${ENV_BACKEND}"
        except ValueError as e:
            raise ValueError(f"${ENV_BACKEND}={env!r}: {e}; fix or unset the environment variable") from None
    return "auto", "auto"


def fallback_policy() -> str:
    """``$ATTNLIB_FALLBACK`` (``warn`` when unset); an unknown value raises naming the valid ones."""
    raw = os.environ.get(ENV_FALLBACK, "")
    value = raw.strip().lower() or FALLBACK_POLICIES[0]
    if value not in FALLBACK_POLICIES:
        raise ValueError(f"${ENV_FALLBACK}={raw!r} is not a fallback policy; valid values: "
                         f"{', '.join(FALLBACK_POLICIES)} (unset means {FALLBACK_POLICIES[0]})")
    return value


def auto_order(device_type: str) -> tuple[str, ...]:
    """The auto-selection order on ``device_type``: ``AUTO_ORDER`` with each backend registered with
    ``auto_before`` inserted before the one it names (``attnlib info`` prints it)."""
    order = list(AUTO_ORDER.get(device_type, DEFAULT_AUTO_ORDER))
    for name, before in _extra_auto.items():
        if before in order:
            order.insert(order.index(before), name)
    return tuple(order)


def _auto(call: AttentionCall) -> Backend:
    reg = _backends()
    reasons = {}
    for name in auto_order(call.device.type):
        b = reg[name]
        why = b.why_not(call)
        if not why:
            return b
        reasons[name] = why
    raise BackendUnavailableError("no attention backend can serve this call", reasons)


def select_backend(call: AttentionCall, backend: str | None = None) -> Backend:
    """Apply the selection rules to a validated call."""
    _ensure_probed()
    name, source = _requested(backend)
    if name == "auto":
        return _auto(call)
    policy = fallback_policy()          # validated whenever a backend is named, not only on a fallback
    chosen = _backends()[name]
    why = chosen.why_not(call)
    if not why:
        return chosen
    if policy == "error":
        raise BackendUnavailableError(f"backend {name!r} (chosen by {source}) cannot serve this call "
                                      f"(${ENV_FALLBACK}=error forbids falling back)", {name: why})
    fallback = _auto(call)
    message = (f"attnlib: backend {name!r} (chosen by {source}) cannot serve this call: {'; '.join(why)}; "
               f"using {fallback.name!r} instead (set {ENV_FALLBACK}=error to raise)")
    key = (name, tuple(why))
    if torch.compiler.is_compiling():    # warn once, when the graph is traced (not each time it runs)
        from torch._dynamo.comptime import comptime

        comptime(_warn_at_trace_time)
    else:
        _warn_once(key, message, user_stacklevel() + 1)
    return fallback


def _warn_at_trace_time(ctx) -> None:
    """Run by dynamo while tracing ``select_backend`` (comptime functions read the frame's locals)."""
    _warn_once(ctx.get_local("key").as_python_constant(), ctx.get_local("message").as_python_constant(), 2)


def _warn_once(key, message: str, stacklevel: int) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


_backends()      # load the built-in backends at import time (their probes run at the first call)


def resolve_backend(q, k, v, mask=None, backend: str | None = None, *, scale=None, return_lse: bool = False) -> str:
    """The name of the backend that would serve this call (validates the inputs like a real call)."""
    return select_backend(validate_call(q, k, v, mask, scale, return_lse), backend).name


def list_backends() -> list[dict]:
    """One row per registered backend: ``name``, ``available``, ``reason``, ``implementation``."""
    rows = []
    for name, b in _backends().items():
        reason = b.unavailable_reason()
        rows.append({"name": name, "available": reason is None, "reason": reason or "",
                     "implementation": b.implementation if reason is None else ""})
    return rows
