"""The attention formula on a plan, forward and backward: what the ``math`` backend runs, what the fused
backward of backends without one falls back to, and what the tolerance policy (:mod:`attnlib.testing`)
measures against. Not a backend; it imports only the plan.

With ``s = scale * q . k``, in this order: ``softcap`` (``s <- c tanh(s / c)``), the additive bias (ALiBi
and a float ``DenseMask``), the mask, then the softmax over the visible keys plus the sink logit (no
value). Rows with no visible key give output 0 and LSE ``-inf`` (with a sink: LSE = the sink); no NaN
in values or gradients. Keys a row cannot see never reach it, whatever they hold (``torch.empty`` slots
included); a non-finite query, or a non-finite key or value the row sees, makes the row non-finite.
"""
from __future__ import annotations

import torch

from .plan import Plan

__all__ = ["reference_attention", "reference_for", "attention_backward", "sink_gradient", "default_compute_dtype"]

#: the largest float32 ``[B, Hq, rows, Sk]`` block the chunked backward materializes at once (bytes)
BLOCK_BYTES = 1 << 28


def default_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _heads(q, k, v, cd):
    """BSHD -> BHSD in ``cd``, K/V expanded for GQA (query head h reads kv head h // (Hq // Hkv))."""
    hq, hkv = q.shape[2], k.shape[2]
    qh = q.transpose(1, 2).to(cd)
    kh, vh = k.transpose(1, 2).to(cd), v.transpose(1, 2).to(cd)
    if hq != hkv:
        kh, vh = kh.repeat_interleave(hq // hkv, dim=1), vh.repeat_interleave(hq // hkv, dim=1)
    return qh, kh, vh


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """bool ``[B, H, S]`` of BHSD ``x``: every element of the row is finite."""
    return torch.isfinite(x).all(-1)


def _scores(qh, kh, plan: Plan, scale: float, rows: slice, cd, bias):
    """Modified scores ``[B, Hq, r, Sk]`` of query rows ``rows`` (before the mask), and the softcap's tanh."""
    s = torch.matmul(qh[:, :, rows], kh.transpose(-1, -2)) * scale
    t = None
    if plan.mods.softcap is not None:
        c = plan.mods.softcap
        t = torch.tanh(s / c)
        s = c * t
    if bias is not None:
        s = s + bias[..., rows, :]
    return s, t


def _sink(plan: Plan, cd, device):
    sinks = plan.mods.sinks
    return None if sinks is None else sinks.to(device=device, dtype=cd)[None, :, None]      # [1, Hq, 1]


def reference_attention(q, k, v, plan: Plan, scale: float, *, compute_dtype: torch.dtype | None = None):
    """The formula on BSHD tensors (contiguous keys): ``(out [B, Sq, Hq, Dv], lse [B, Hq, Sq])`` in
    ``compute_dtype`` (default: float64 for float64 inputs, float32 otherwise; the input dtype gives the
    "naive same-dtype" implementation). Differentiable, sinks included."""
    cd = compute_dtype or default_compute_dtype(q.dtype)
    qh, kh, vh = _heads(q, k, v, cd)
    b, hq, sq, _ = qh.shape
    sk = kh.shape[2]
    bias = plan.bias(hq, qh.device, cd)
    visible = plan.materialize(qh.device)
    visible = visible.reshape((1,) * (4 - visible.dim()) + tuple(visible.shape))
    s, _ = _scores(qh, kh, plan, scale, slice(None), cd, bias)
    s = s.masked_fill(~visible, float("-inf"))
    row_max = s.detach().amax(dim=-1) if sk else torch.full((b, hq, sq), float("-inf"), dtype=cd, device=qh.device)
    sink = _sink(plan, cd, qh.device)
    if sink is not None:
        row_max = torch.maximum(row_max, sink.detach())
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max[..., None])
    denom = e.sum(dim=-1)
    if sink is not None:
        denom = denom + torch.exp(sink - row_max)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))[..., None]
    # hidden keys never reach a row: zero non-finite values, then mark the rows that see one
    v_ok = _finite_rows(vh)                                                   # [B, Hq, Sk]
    out = torch.matmul(p, torch.where(v_ok[..., None], vh, torch.zeros((), dtype=cd, device=vh.device)))
    sees_bad = (visible & ~v_ok[:, :, None, :]).any(-1) if sk else None       # [B, Hq, Sq]
    if sees_bad is not None:
        out = out.masked_fill(sees_bad[..., None], float("nan"))
    lse = torch.log(denom) + row_max                                          # log(0) = -inf for empty rows
    return out.transpose(1, 2), lse


def attention_backward(q, k, v, out, lse, dout, dlse, plan: Plan, scale: float, *, dq=None, dk=None, dv=None,
                       compute_dtype: torch.dtype | None = None):
    """Gradients of the call whose (final, sinks included) ``out``/``lse`` are given, from ``dout`` and
    ``dlse`` (either may be None), over the keys of ``plan`` only: the flash-attention backward rule
    ``P = exp(s - lse)``, ``dS = P (dP - rowsum(dO * O) + dlse)``, chained through the softcap, in
    ``compute_dtype`` (float32 unless float64) on chunks of query rows. BSHD tensors.

    Accumulates into ``dq``/``dk``/``dv`` (float tensors shaped like q, k, v) when given, else returns new
    ones. The rows' ``out``/``lse`` may come from a merge of several plans (the ring, multi-tile plans):
    each part's gradient then follows from its own keys (gradients to ``sinks``: :func:`sink_gradient`)."""
    cd = compute_dtype or default_compute_dtype(q.dtype)
    qh, kh, vh = _heads(q, k, v, cd)
    b, hq, sq, d = qh.shape
    sk, hkv = kh.shape[2], k.shape[2]
    zero = torch.zeros((), dtype=cd, device=qh.device)
    kh = torch.where(_finite_rows(kh)[..., None], kh, zero)           # hidden garbage stays out of dQ
    vh = torch.where(_finite_rows(vh)[..., None], vh, zero)           # ... and out of dP
    do = (torch.zeros_like(out) if dout is None else dout).transpose(1, 2).to(cd)     # [B, Hq, Sq, Dv]
    delta = (do * out.transpose(1, 2).to(cd)).sum(-1)                                  # [B, Hq, Sq]
    if dlse is not None:
        delta = delta - torch.nan_to_num(dlse.to(cd), nan=0.0, posinf=0.0, neginf=0.0)
    lse = lse.to(cd)
    lse_ok = torch.isfinite(lse)
    lse_safe = torch.where(lse_ok, lse, torch.zeros_like(lse))
    bias = plan.bias(hq, qh.device, cd)
    visible = plan.materialize(qh.device)
    visible = visible.reshape((1,) * (4 - visible.dim()) + tuple(visible.shape))
    gq = torch.zeros(b, hq, sq, d, dtype=cd, device=qh.device)
    gk = torch.zeros(b, hq, sk, d, dtype=cd, device=qh.device)
    gv = torch.zeros(b, hq, sk, vh.shape[-1], dtype=cd, device=qh.device)
    rows = max(1, BLOCK_BYTES // max(1, b * hq * sk * torch.finfo(cd).bits // 8))
    for a in range(0, sq, rows):
        r = slice(a, min(sq, a + rows))
        s, t = _scores(qh, kh, plan, scale, r, cd, bias)
        seen = visible[:, :, r] & lse_ok[:, :, r, None]
        p = torch.where(seen, torch.exp(s - lse_safe[:, :, r, None]), zero)
        gv += torch.matmul(p.transpose(-1, -2), do[:, :, r])
        ds = torch.where(seen, p * (torch.matmul(do[:, :, r], vh.transpose(-1, -2)) - delta[:, :, r, None]), zero)
        if t is not None:
            ds = ds * (1 - t * t)                                     # d(c tanh(s / c)) / ds
        gq[:, :, r] = torch.matmul(ds, kh) * scale
        gk += torch.matmul(ds.transpose(-1, -2), qh[:, :, r]) * scale
    if hq != hkv:
        g = hq // hkv
        gk = gk.unflatten(1, (hkv, g)).sum(2)
        gv = gv.unflatten(1, (hkv, g)).sum(2)
    gq, gk, gv = gq.transpose(1, 2), gk.transpose(1, 2), gv.transpose(1, 2)
    if dq is None:
        return gq, gk, gv
    dq += gq.to(dq.dtype)
    dk += gk.to(dk.dtype)
    dv += gv.to(dv.dtype)
    return dq, dk, dv


def sink_gradient(out, lse, dout, dlse, sinks: torch.Tensor) -> torch.Tensor:
    """``d loss / d sinks`` ``[Hq]`` from the final ``out``/``lse`` (sinks included): with the sink's weight
    ``P_sink = exp(sink - lse)`` and ``delta = rowsum(dO * O) - dlse``, ``d sink_h = -sum P_sink * delta``."""
    delta = torch.zeros_like(lse, dtype=torch.float32)
    if dout is not None:
        delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)          # BSHD -> [B, Hq, Sq]
    if dlse is not None:
        delta = delta - torch.nan_to_num(dlse.float(), nan=0.0, posinf=0.0, neginf=0.0)
    p_sink = torch.exp(sinks.float()[None, :, None] - lse.float())
    p_sink = torch.where(torch.isfinite(lse), p_sink, torch.zeros_like(p_sink))
    return -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)


def reference_for(q, k, v, mask=None, scale: float | None = None, *, compute_dtype: torch.dtype | None = None,
                  softcap=None, alibi_slopes=None, sinks=None, block_table=None):
    """:func:`reference_attention` with ``attnlib.attention``'s arguments (a mask, THD or BSHD tensors, the
    score modifiers, a paged layout): ``(out, lse)`` in the caller's layout, in ``compute_dtype``."""
    from .inputs import validate_call

    call = validate_call(q, k, v, mask, scale, True, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                         block_table=block_table)
    k, v, plan = call.k, call.v, call.plan
    if plan.kv is not None:
        k, v = plan.kv.gather(k).unsqueeze(0), plan.kv.gather(v).unsqueeze(0)
        plan = plan.with_call(plan.mods, None)
    out, lse = reference_attention(call.q, k, v, plan, call.scale, compute_dtype=compute_dtype)
    return call.restore(out, lse)
