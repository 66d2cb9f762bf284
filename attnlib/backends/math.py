"""``math``: the reference. Every plan (any mask, every score modifier), any dtype, differentiable, never fast.

The formula is :func:`attnlib.reference.reference_attention` (scores in float64 for float64 inputs and
float32 otherwise, the mask materialized; rows with no visible key give output 0 and LSE -inf, or the sink;
keys a row cannot see never reach it, whatever they hold).
"""
from __future__ import annotations

import torch

from ..inputs import AttentionCall
from ..plan import FEATURES
from ..reference import reference_attention
from .base import Backend, Capabilities


class MathBackend(Backend):
    name = "math"
    lse_has_gradient = True
    capabilities = Capabilities(dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
                                devices=frozenset({"cpu", "cuda", "mps", "xpu"}),
                                features=FEATURES - {"paged"}, exact_empty_rows=True, isolates_padding=True,
                                isolates_sequences=True, isolates_hidden=True, propagates_nonfinite=True)
    implementation = "torch ops, float32/float64 accumulation"

    def forward(self, call: AttentionCall):
        out, lse = reference_attention(call.q, call.k, call.v, call.plan, call.scale)
        return out.to(call.dtype), (lse if call.return_lse else None)
