"""``xformers``: placeholder until the backend is built; it resolves by name and falls back cleanly."""
from __future__ import annotations

from .base import PlaceholderBackend


class XformersBackend(PlaceholderBackend):
    def __init__(self):
        super().__init__("xformers", "not implemented yet in this attnlib version")
