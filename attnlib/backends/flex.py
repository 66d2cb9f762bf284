"""``flex``: placeholder until the backend is built; it resolves by name and falls back cleanly."""
from __future__ import annotations

from .base import PlaceholderBackend


class FlexBackend(PlaceholderBackend):
    def __init__(self):
        super().__init__("flex", "not implemented yet in this attnlib version")
