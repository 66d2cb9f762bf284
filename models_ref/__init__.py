"""Small reference model blocks built only on attnlib.

``qwen_image`` (QwenImage MMDiT, equal to diffusers), ``bagel`` (Bagel's mixture-of-transformers packed
attention with KV cache and batched CFG), ``qwen3_omni`` (code predictor, thinker attention, the
thinker->talker condition stream), ``ar_video`` (frame-autoregressive video attention with a rolling KV
cache of frames and a sink frame), ``parity`` (the cross-backend table ``attnlib check`` prints).

This module holds only what the blocks share: :class:`RMSNorm`.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned ``weight`` (diffusers' and transformers' state_dict name).

    The mean square is taken in float32 (float64 for float64 input, so a float64 run is a true
    reference); the normalized value is cast back to the input dtype before the weight multiplies it,
    as transformers' Qwen norms and diffusers' ``RMSNorm`` (with a weight of the input's dtype) do.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float64 else x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
