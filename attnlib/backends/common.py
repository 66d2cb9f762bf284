"""Small tensor helpers shared by backends (no backend imports another backend)."""
from __future__ import annotations

import torch


def repeat_kv(x: torch.Tensor, ratio: int, head_dim: int = -2) -> torch.Tensor:
    """Expand kv heads for GQA: head ``h`` of the result is kv head ``h // ratio``."""
    if ratio == 1:
        return x
    return x.repeat_interleave(ratio, dim=head_dim)


def zero_rows(out: torch.Tensor, lse: torch.Tensor | None, empty_rows: torch.Tensor | None):
    """Force rows with no visible key to output 0 and LSE -inf.

    ``empty_rows`` is bool, broadcastable to ``out[..., 0]`` and to ``lse`` in their own layouts
    (callers build it in the layout they use).
    """
    if empty_rows is None:
        return out, lse
    out = out.masked_fill(empty_rows.unsqueeze(-1), 0.0)
    if lse is not None:
        lse = lse.masked_fill(empty_rows, float("-inf"))
    return out, lse
