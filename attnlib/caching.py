"""Host-side caches that stay correct and quiet inside ``torch.compile``.

Two kinds, both for pure functions of Python values:

- :func:`probe`: an environment fact (is a package importable, which kernels exist), computed once per
  process. The value is a plain Python object that a compiled region reads without tracing the probe
  (``functools.lru_cache``'s wrapper is ignored by dynamo, which would re-run the body, imports included,
  at trace time).
- :func:`host_lru`: ``functools.lru_cache`` for eager calls; inside a compiled region the function runs
  directly (once, at trace time: the compiled graph is the cache), so dynamo never meets the wrapper.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

__all__ = ["probe", "host_lru"]


def probe(fn: Callable[[], object]) -> Callable[[], object]:
    """Cache a zero-argument environment probe for the process; ``cache_clear()`` forgets it (tests)."""
    box: list = []

    @functools.wraps(fn)
    def cached():
        if not box:
            box.append(fn())
        return box[0]

    cached.cache_clear = box.clear
    return cached


def host_lru(maxsize: int):
    """``functools.lru_cache(maxsize)`` outside compiled regions; a plain call inside them."""
    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args):
            if torch.compiler.is_compiling():
                return fn(*args)
            return cached(*args)

        call.cache_clear = cached.cache_clear
        call.cache_info = cached.cache_info
        return call
    return wrap
