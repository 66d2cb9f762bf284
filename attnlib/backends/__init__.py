"""Attention backends: one module each (math, sdpa, flex, flash, xformers, triton).

No backend module imports another; ``attnlib.registry`` knows all of them.
"""
from .base import Backend, Capabilities

__all__ = ["Backend", "Capabilities"]
