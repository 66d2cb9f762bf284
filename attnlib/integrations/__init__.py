"""Adapters that plug attnlib into the stacks models already run on.

Each adapter imports its host library and is imported on demand, so ``import attnlib.integrations``
works with none of them installed:

* ``attnlib.integrations.transformers`` -- ``register()`` adds ``attn_implementation="attnlib"``.
* ``attnlib.integrations.diffusers`` -- attention processors (``QwenImageAttnProcessor``, ``use_attnlib``).
* ``attnlib.integrations.vllm_omni`` -- a drop-in for vLLM-Omni's diffusion ``Attention`` layer
  (needs no vLLM install).

``available()`` says which hosts are importable here. See ``docs/integrations.md``.
"""
from __future__ import annotations

import importlib.util

__all__ = ["available", "HOSTS"]

#: adapter module -> the host package it needs (None: no host needed)
HOSTS = {"transformers": "transformers", "diffusers": "diffusers", "vllm_omni": None}


def available() -> dict[str, bool]:
    """``{adapter: importable}`` without importing any host library."""
    return {name: host is None or importlib.util.find_spec(host) is not None for name, host in HOSTS.items()}
