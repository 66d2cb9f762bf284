"""``triton``: placeholder until the backend is built; it resolves by name and falls back cleanly."""
from __future__ import annotations

from .base import PlaceholderBackend


class TritonBackend(PlaceholderBackend):
    def __init__(self):
        super().__init__("triton", "not implemented yet in this attnlib version")
