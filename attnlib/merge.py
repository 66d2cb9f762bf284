"""Combining partial attention results: the LSE rule and sinks. One implementation, used by multi-tile
plans on kernels that take one key run per row, by ring attention, and by sinks on any backend.

Partial results ``(out_i, lse_i)`` over disjoint key sets combine exactly as
``lse = logsumexp_i lse_i`` and ``out = sum_i exp(lse_i - lse) out_i`` (in float32). A sink logit
``sink_h`` is one more partial result with no value: ``out' = out * sigmoid(lse - sink)``,
``lse' = logaddexp(lse, sink)``. Rows that no part saw stay 0 / ``-inf`` (with a sink: 0 / ``sink``).
Tensors: ``out`` BSHD ``[B, S, H, Dv]``, ``lse`` ``[B, H, S]``; everything here is differentiable.
"""
from __future__ import annotations

import torch

__all__ = ["merge_partials", "apply_sinks"]


def merge_partials(parts, like: torch.Tensor | None = None):
    """``(out, lse)`` of partial results ``[(out_i, lse_i), ...]`` over disjoint keys; ``out`` in the parts'
    dtype, ``lse`` float32 (float64 for float64 parts). An empty list needs ``like = (b, s, h, dv)``-shaped
    zeros."""
    parts = list(parts)
    if not parts:
        if like is None:
            raise ValueError("merge_partials of no parts needs like=")
        b, s, h, _ = like.shape
        return like.new_zeros(like.shape), torch.full((b, h, s), float("-inf"), dtype=torch.float32,
                                                      device=like.device)
    cd = _compute_dtype(parts[0][0])
    if len(parts) == 1:
        return parts[0][0], parts[0][1].to(cd)
    # pairwise, not over a torch.stack of the parts: inductor (torch 2.13, CPU) can reuse a slice of a stacked
    # buffer for another tensor while the stack is still read (wrong merged rows in large compiled graphs)
    lses = [l.to(cd) for _, l in parts]                               # each [B, H, S]
    top = lses[0].detach()
    for l in lses[1:]:
        top = torch.maximum(top, l.detach())                           # NaN propagates, as amax does
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(lses[0] - top)
    for l in lses[1:]:
        total = total + torch.exp(l - top)
    seen = total != 0                                                  # NaN (a non-finite input) propagates
    merged = top + torch.log(torch.where(seen, total, torch.ones_like(total)))
    out = None
    for o, l in parts:
        w = torch.exp(l.to(cd) - merged).transpose(1, 2).unsqueeze(-1)         # [B, S, H, 1]
        term = w * o.to(cd)
        out = term if out is None else out + term
    lse = torch.where(seen, merged, torch.full_like(merged, float("-inf")))
    return out.to(parts[0][0].dtype), lse


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor):
    """Add one sink logit per head (``sinks [H]``) to finished ``(out, lse)``: the sink joins every row's
    softmax denominator and carries no value."""
    cd = _compute_dtype(out)
    s = sinks.to(cd)[None, :, None]                                    # [1, H, 1]
    lse = lse.to(cd)
    new = torch.logaddexp(lse, s.expand_as(lse))
    keep = torch.exp(lse - new)                                        # sigmoid(lse - sink); 0 for empty rows
    out = (out.to(cd) * keep.transpose(1, 2).unsqueeze(-1)).to(out.dtype)
    return out, new


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 results, float32 otherwise (and for the LSE)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
