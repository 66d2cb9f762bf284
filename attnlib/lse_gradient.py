"""The exact gradient through the LSE, for backends whose kernels return it without one.

For ``lse_i = log sum_j exp(s_ij)`` with ``s_ij = scale * q_i . k_j`` (+ mask):

    d lse_i / d q_i = scale * sum_j P_ij k_j          (= scale * attention(q, k, v=k)_i)
    d lse_i / d k_j = scale * P_ij q_i                (= d attention(q, k, v)/d v, with dout = scale * dlse * q)

so both come from two ordinary (out-only) attention calls on the same backend, under the same mask: no
``[Sq, Sk]`` matrix is ever built. Rows that see no key have ``P = 0`` and get no gradient. Inside a
compiled region (which cannot trace ``torch.autograd.grad``) the same formulas run on the plan's
materialized mask instead.
"""
from __future__ import annotations

import torch

__all__ = ["with_lse_gradient"]


def with_lse_gradient(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, mask, scale: float, backend: str):
    """``lse`` (values unchanged) carrying the exact gradient to ``q`` and ``k``."""
    return _LseGradient.apply(q, k, lse, mask, scale, backend)


class _LseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, lse, mask, scale, backend):
        ctx.save_for_backward(q, k, lse)
        ctx.args = (mask, scale, backend)
        ctx.set_materialize_grads(False)
        return lse.detach().clone()

    @staticmethod
    def backward(ctx, dlse):
        if dlse is None:
            return None, None, None, None, None, None
        from .api import attention

        q, k, lse = ctx.saved_tensors
        mask, scale, backend = ctx.args
        if torch.compiler.is_compiling():
            dq, dk = _materialized(q, k, lse, dlse, mask, scale)
            return (dq if ctx.needs_input_grad[0] else None), (dk if ctx.needs_input_grad[1] else None), \
                None, None, None, None
        packed = q.dim() == 3
        # [B, H, Sq] (or [H, Tq]) -> broadcastable to the output layout [B, Sq, H, 1] (or [Tq, H, 1])
        c = torch.nan_to_num(dlse.float(), nan=0.0, posinf=0.0, neginf=0.0)
        c = (c.transpose(0, 1) if packed else c.permute(0, 2, 1)).unsqueeze(-1)
        dq = dk = None
        with torch.enable_grad():
            qd, kd = q.detach(), k.detach()
            if ctx.needs_input_grad[0]:
                pk = attention(qd, kd, kd, mask, scale=scale, backend=backend)
                dq = (scale * c * pk.float()).to(q.dtype)
            if ctx.needs_input_grad[1]:
                vk = kd.clone().requires_grad_()
                out = attention(qd, kd, vk, mask, scale=scale, backend=backend)
                (dk,) = torch.autograd.grad(out, vk, (scale * c * qd.float()).to(out.dtype))
        return dq, dk, None, None, None, None


def _materialized(q, k, lse, dlse, mask, scale):
    """The same gradients from the explicit ``P`` (float32, ``[B, Hq, Sq, Sk]``) under the plan's mask."""
    from .plan import plan_for

    packed = q.dim() == 3
    if packed:
        q, k, lse, dlse = q.unsqueeze(0), k.unsqueeze(0), lse.unsqueeze(0), dlse.unsqueeze(0)
    hq, hkv = q.shape[2], k.shape[2]
    qh = q.transpose(1, 2).float()                                          # [B, Hq, Sq, D]
    kh = k.transpose(1, 2).float().repeat_interleave(hq // hkv, dim=1)      # [B, Hq, Sk, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    plan = plan_for(mask, q.shape[1], k.shape[1])
    if plan.dense is not None and plan.dense.mask.dtype != torch.bool:
        scores = scores + plan.dense.mask.float()
    visible = plan.materialize(q.device)
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse.float())
    p = torch.exp(scores - lse_safe.unsqueeze(-1)).masked_fill(~visible, 0.0)
    ds = torch.nan_to_num(dlse.float(), nan=0.0, posinf=0.0, neginf=0.0).unsqueeze(-1) * p * scale
    dq = torch.matmul(ds, kh).transpose(1, 2)                               # [B, Sq, Hq, D]
    dk = torch.matmul(ds.transpose(-1, -2), qh)                             # [B, Hq, Sk, D]
    dk = dk.unflatten(1, (hkv, hq // hkv)).sum(2).transpose(1, 2)           # [B, Sk, Hkv, D]
    if packed:
        dq, dk = dq[0], dk[0]
    return dq.to(q.dtype), dk.to(k.dtype)
