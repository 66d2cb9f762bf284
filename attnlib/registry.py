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
#: bumped whenever the registry changes (a backend registered or replaced): caches of selections key on it
generation: list = [0]
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
        generation[0] += 1
    _aliases.update(ALIASES)


#: names of the backends whose environment probes have run (``Backend.run_probes``)
_probed: set = set()


def _probe(name: str) -> None:
    """Run one backend's environment probes (imports, device queries) once, outside any compiled region:
    they are cached as plain values that compiled code reads without tracing them. Probes run lazily:
    a backend is probed the first time selection asks it, so a call served by ``sdpa`` never imports
    what ``flex``'s probes import (the compiler)."""
    if name in _probed:
        return
    try:
        _backends()[name].run_probes()
    except Exception:  # noqa: BLE001 - a probe that fails is reported by the call that needs it
        pass
    _probed.add(name)


def _probe_at_trace_time(ctx) -> None:
    """Run by dynamo while tracing ``_ensure_probed`` (comptime functions read the frame's locals)."""
    _probe(ctx.get_local("name").as_python_constant())


def _ensure_probed(name: str) -> None:
    if torch.compiler.is_compiling():      # probe at trace time; the graph neither runs nor guards on it
        from torch._dynamo.comptime import comptime

        comptime(_probe_at_trace_time)
    elif name not in _probed:
        _probe(name)


def _why_not(name: str, call: AttentionCall) -> list[str]:
    """``why_not`` of the backend registered as ``name``, its probes run first."""
    _ensure_probed(name)
    return _backends()[name].why_not(call)


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
        _probed.discard(name)        # a replaced backend's probes are not the new one's
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


def auto_order(device: str | torch.device) -> tuple[str, ...]:
    """The auto-selection order on ``device`` (a ``torch.device`` or a string such as ``"cpu"``,
    ``"cuda"`` or ``"cuda:1"``; only its type matters): ``AUTO_ORDER`` with each backend registered with
    ``auto_before`` inserted before the one it names (``attnlib info`` prints it)."""
    if isinstance(device, torch.device):
        return _order(device.type)
    if not isinstance(device, str):
        raise TypeError(f"auto_order(device): device must be a torch.device or a str such as 'cpu' or 'cuda:0', "
                        f"got {type(device).__name__}")
    try:
        return _order(torch.device(device).type)
    except RuntimeError as e:
        raise ValueError(f"auto_order(device): {device!r} is not a device string such as 'cpu' or 'cuda:0' ({e})") \
            from None


def _order(device_type: str) -> tuple[str, ...]:
    order = list(AUTO_ORDER.get(device_type, DEFAULT_AUTO_ORDER))
    for name, before in _extra_auto.items():
        if before in order:
            order.insert(order.index(before), name)
    return tuple(order)


def _auto(call: AttentionCall) -> Backend:
    reasons = {}
    for name in _order(call.device.type):
        why = _why_not(name, call)
        if not why:
            return _backends()[name]
        reasons[name] = why
    raise BackendUnavailableError("no attention backend can serve this call", reasons)


def select_backend(call: AttentionCall, backend: str | None = None) -> Backend:
    """Apply the selection rules to a validated call."""
    name, source = _requested(backend)
    if name == "auto":
        return _auto(call)
    policy = fallback_policy()          # validated whenever a backend is named, not only on a fallback
    chosen = _backends()[name]
    why = _why_not(name, call)
    if not why:
        return chosen
    if policy == "error":
        raise BackendUnavailableError(f"backend {name!r} (chosen by {source}) cannot serve this call "
                                      f"(${ENV_FALLBACK}=error forbids falling back)", {name: why})
    fallback = _auto(call)
    message = (f"attnlib: backend {name!r} (chosen by {source}) cannot serve this call: {'; '.join(why)}; "
               f"using {fallback.name!r} instead (set {ENV_FALLBACK}=error to raise)")
    key = (name, tuple(why))
    if _fallback_log[0] is not None:
        _fallback_log[0].append((key, message))
    if torch.compiler.is_compiling():    # warn once, when the graph is traced (not each time it runs)
        from torch._dynamo.comptime import comptime

        comptime(_warn_at_trace_time)
    else:
        _warn_once(key, message, user_stacklevel() + 1)
    return fallback


#: where select_backend reports a fallback while :func:`record_fallback` is active
_fallback_log: list = [None]


@contextlib.contextmanager
def record_fallback():
    """Collect ``(key, message)`` of the fallback the selections inside make (warned or not)."""
    seen: list = []
    previous, _fallback_log[0] = _fallback_log[0], seen
    try:
        yield seen
    finally:
        _fallback_log[0] = previous


def registry_warn_again(key, message: str) -> None:
    """The fallback warning of a selection reused from an earlier call (once per process, as always)."""
    if key not in _warned:
        _warn_once(key, message, user_stacklevel() + 1)


def registry_override():
    """The ``use_backend`` name in effect (outside compiled regions)."""
    return _override.get()


def registry_generation() -> int:
    """Changes whenever a backend is registered or replaced."""
    return generation[0]


def _warn_at_trace_time(ctx) -> None:
    """Run by dynamo while tracing ``select_backend`` (comptime functions read the frame's locals)."""
    _warn_once(ctx.get_local("key").as_python_constant(), ctx.get_local("message").as_python_constant(), 2)


def _warn_once(key, message: str, stacklevel: int) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


_backends()      # load the built-in backends at import time (each one's probes run when selection first asks it)


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
