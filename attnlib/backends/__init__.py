"""Attention backends: one module each (math, sdpa, flex, flash, xformers, triton).

No backend module imports another; ``attnlib.registry`` knows all of them and ``attnlib.dispatch`` runs
them.

This package is also the extension API for third-party backends (docs/backends.md, "Writing a
backend"): subclass :class:`Backend`, declare :class:`Capabilities`, implement ``forward(call)`` on the
validated :class:`AttentionCall` (BSHD tensors and its plan), optionally a fused ``backward``, and pass an
instance to ``attnlib.register_backend``.
"""
from ..inputs import AttentionCall
from .base import ALL_FEATURES, ALL_MASK_FEATURES, Backend, Capabilities, dtype_name

__all__ = ["Backend", "Capabilities", "AttentionCall", "dtype_name", "ALL_FEATURES", "ALL_MASK_FEATURES"]
