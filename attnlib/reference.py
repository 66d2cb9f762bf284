"""The plain attention formula over a materialized mask: the reference every backend and the tolerance
policy (:mod:`attnlib.testing`) compare against. Not a backend (the ``math`` backend serves calls with it);
it imports only the mask vocabulary.

Rows with no visible key give output 0 and LSE -inf (no NaN in values or gradients).
"""
from __future__ import annotations

import torch

from .masks import DenseMask


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_attention(q, k, v, mask, scale: float, *, packed: bool, compute_dtype: torch.dtype | None = None):
    """Plain attention over a materialized mask. Returns ``(out, lse)`` in ``compute_dtype``.

    Dense: q ``[B,Sq,Hq,D]`` -> out ``[B,Sq,Hq,Dv]``, lse ``[B,Hq,Sq]``; packed: q ``[Tq,Hq,D]`` ->
    out ``[Tq,Hq,Dv]``, lse ``[Hq,Tq]``. ``compute_dtype`` defaults to float64 for float64 inputs and
    float32 otherwise; passing the input dtype gives the "naive same-dtype" implementation.
    """
    cd = compute_dtype or _compute_dtype(q.dtype)
    if packed:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    hq, hkv = q.shape[2], k.shape[2]
    qh = q.transpose(1, 2).to(cd)                       # [B, Hq, Sq, D]
    kh, vh = k.transpose(1, 2).to(cd), v.transpose(1, 2).to(cd)
    if hq != hkv:                                       # GQA: query head h reads kv head h // (Hq // Hkv)
        kh, vh = kh.repeat_interleave(hq // hkv, dim=1), vh.repeat_interleave(hq // hkv, dim=1)
    sq, sk = qh.shape[2], kh.shape[2]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if mask is not None:
        if isinstance(mask, DenseMask) and not mask.is_bool:
            bias = mask.mask.to(device=scores.device, dtype=cd)
            scores = scores + bias
        else:
            visible = mask.materialize(sq, sk, device=scores.device)
            scores = scores.masked_fill(~visible, float("-inf"))
    # softmax with an explicit, detached row max: exact, and safe for rows with no visible key
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.matmul(p, vh).transpose(1, 2)           # [B, Sq, Hq, Dv]
    lse = (torch.log(denom) + row_max).squeeze(-1)      # log(0) = -inf for empty rows
    if packed:
        out, lse = out[0], lse[0]
    return out, lse.float() if cd != torch.float64 else lse
