"""``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``.

Lowering:
Lowering reads the call's plan (:mod:`attnlib.plan`):

- one causal block: ``is_causal=True`` only when the plan's diagonal offset is 0 (``Sq == Sk``, or
  top-left); a plan where every query sees every key (one-query decode) needs no mask at all; anything
  else gets the plan's bool grid (cached per plan and device). ``is_causal`` is never passed when it
  would mean top-left for a bottom-right mask.
- ``BlockDiagonal``: the plan's runs of equal blocks become one batched call on free views
  (CFG branches, equal-length packing); other blocks are called one by one on views. No ``[T, T]`` mask.
- ``KeyPadding``: a ``[B, 1, 1, Sk]`` bool mask (``[B, 1, Sq, Sk]`` with ``causal=True``).
  ``DenseMask``: passed through.
- GQA: query heads folded into the query axis when the mask allows it (no K/V copies), else
  ``enable_gqa=True`` (K/V expanded only on the LSE path, whose kernels lack it).
- Rows with no visible key: unmasked before the call (SDPA would give NaN), then zeroed (LSE -inf).
- LSE: from the fused CPU flash kernel on CPU and the memory-efficient kernel on CUDA (one pass);
  a second pass over the scores only where neither applies.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ..caching import host_lru

from ..inputs import AttentionCall
from ..masks import BlockDiagonal
from ..plan import Plan, block_plan
from .base import Backend, Capabilities
from .common import repeat_kv, zero_rows

_NEG_INF = float("-inf")


class SdpaBackend(Backend):
    name = "sdpa"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda", "mps", "xpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    )
    implementation = f"torch {torch.__version__} scaled_dot_product_attention"

    def forward(self, call: AttentionCall):
        plan = call.plan
        if isinstance(call.mask, BlockDiagonal):
            return _block_diagonal(call.q, call.k, call.v, plan, call.scale, call.return_lse)
        q, k, v = call.q, call.k, call.v
        if call.packed:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        out, lse = _dense(q, k, v, plan, call.scale, call.return_lse)
        if call.packed:
            out, lse = out[0], (lse[0] if lse is not None else None)
        return out, lse


# ---------------------------------------------------------------------------------------------
# mask lowering, from the plan: (attn_mask, is_causal, empty_rows) for BHSD tensors
# ---------------------------------------------------------------------------------------------
@host_lru(256)
def _structured_lowering(plan: Plan, device: torch.device):
    """One block, no tensors. Returns ``(attn_mask | None, is_causal, empty_rows | None)``."""
    block = plan.single
    if plan.structure_full:
        return None, False, None        # e.g. one-token decode against a cache
    if block.causal and block.offset == 0 and block.window is None and block.k_len == plan.seqlen_k:
        return None, True, None         # torch's is_causal is the top-left diagonal
    keep = plan.structure_grid(device)
    empty = plan.empty_rows_on(device)  # [Sq] from the plan's Python ints (no device read)
    if empty is not None:               # SDPA gives NaN for rows with no key: unmask them, zero them after
        keep = keep | empty.unsqueeze(-1)
    return keep, False, empty


def _lower(plan: Plan, dtype: torch.dtype, device: torch.device):
    """Returns ``(attn_mask, is_causal, empty_rows)``; empty_rows broadcasts to ``[B, H, Sq]``."""
    if plan.dense is not None:
        m = plan.dense.mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        empty = plan.empty_rows_on(device)
        if m.dtype == torch.bool:
            return m | empty.unsqueeze(-1), False, empty
        m = torch.where(empty.unsqueeze(-1), torch.zeros((), dtype=m.dtype, device=m.device), m)
        return m.to(dtype), False, empty
    if plan.key_valid is not None:
        valid = plan.key_valid
        if plan.structure_full:
            keep = valid[:, None, None, :]                               # [B, 1, 1, Sk]
        else:
            keep = plan.structure_grid(device)[None, None] & valid[:, None, None, :]
        empty = plan.empty_rows_on(device)                               # [B, 1, Sq or 1]
        if plan.structure_full:
            empty = empty[..., :1]
        return keep | empty.unsqueeze(-1), False, empty
    return _structured_lowering(plan, device)


# ---------------------------------------------------------------------------------------------
# calls
# ---------------------------------------------------------------------------------------------
def _dense(q, k, v, plan: Plan, scale: float, return_lse: bool):
    """BSHD in, ``(out BSHD, lse [B,H,Sq] | None)`` out."""
    b, sq, hq, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if sk == 0:
        out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
        lse = torch.full((b, hq, sq), _NEG_INF, device=q.device) if return_lse else None
        return out, lse
    attn_mask, is_causal, empty = _lower(plan, q.dtype, q.device)
    # GQA: when the mask does not depend on the query position, fold each kv group's query heads into
    # the query axis ([B, Hkv, ratio*Sq, D]); no K/V copies, and decode becomes one longer query block.
    fold = hq != hkv and not is_causal and (attn_mask is None or (
        attn_mask.shape[-2] == 1 and (attn_mask.dim() < 3 or attn_mask.shape[-3] == 1)))
    if fold:
        qh = qh.reshape(b, hkv, (hq // hkv) * sq, qh.shape[-1])
    if return_lse:
        out, lse = _sdpa_with_lse(qh, kh, vh, attn_mask, is_causal, scale)
    else:
        gqa = {"enable_gqa": True} if qh.shape[1] != hkv else {}
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, is_causal=is_causal, scale=scale, **gqa)
        lse = None
    if fold:
        out = out.reshape(b, hq, sq, out.shape[-1])
        lse = lse.reshape(b, hq, sq) if lse is not None else None
    out, lse = zero_rows(out, lse, empty)
    return out.transpose(1, 2), lse


def _sdpa_with_lse(qh, kh, vh, attn_mask, is_causal: bool, scale: float):
    """One fused pass returning (out, lse) where torch offers a kernel for it; else a second pass."""
    ratio = qh.shape[1] // kh.shape[1]
    kx, vx = repeat_kv(kh, ratio, head_dim=1), repeat_kv(vh, ratio, head_dim=1)
    float_mask = None
    if attn_mask is not None:
        float_mask = attn_mask if attn_mask.dtype != torch.bool else torch.zeros(
            attn_mask.shape, dtype=qh.dtype, device=qh.device).masked_fill(~attn_mask, _NEG_INF)
    if qh.device.type == "cpu":
        d, dv = qh.shape[-1], vh.shape[-1]
        qp, kp, vp = qh, kx, vx
        if dv < d:    # the fused kernel wants one head size: zero columns change no score and no output
            vp = F.pad(vx, (0, d - dv))
        elif d < dv:
            qp, kp = F.pad(qh, (0, dv - d)), F.pad(kx, (0, dv - d))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qp, kp, vp, 0.0, is_causal, attn_mask=float_mask, scale=scale)
        return out[..., :dv], lse.float()
    if qh.device.type == "cuda" and qh.dtype != torch.float64:
        try:
            bias = None if float_mask is None else float_mask.expand(qh.shape[0], qh.shape[1], qh.shape[2], kx.shape[2])
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                qh, kx, vx, bias, True, 0.0, is_causal, scale=scale)[:2]
            return out, lse[..., : qh.shape[2]].float()
        except RuntimeError:
            pass  # kernel constraints not met: exact second pass below
    out = F.scaled_dot_product_attention(qh, kx, vx, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    with torch.no_grad():
        scores = torch.matmul(qh.float(), kx.float().transpose(-1, -2)) * scale
        if is_causal:
            sq, sk = scores.shape[-2:]
            scores = scores.masked_fill(~torch.ones(sq, sk, dtype=torch.bool, device=qh.device).tril(), _NEG_INF)
        if float_mask is not None:
            scores = scores + float_mask.float()
        lse = torch.logsumexp(scores, dim=-1)
    return out, lse


def _block_diagonal(q, k, v, plan: Plan, scale: float, return_lse: bool):
    """THD in, ``(out [Tq,H,Dv], lse [H,Tq] | None)`` out: one batched call per run of equal blocks."""
    outs, lses = [], []
    for q0, k0, n, block in plan.runs():
        lq, lk = block.q_len, block.k_len
        if lq == 0:
            continue
        qg = q.narrow(0, q0, n * lq).view(n, lq, *q.shape[1:])
        kg = k.narrow(0, k0, n * lk).view(n, lk, *k.shape[1:])
        vg = v.narrow(0, k0, n * lk).view(n, lk, *v.shape[1:])
        out, lse = _dense(qg, kg, vg, block_plan(block), scale, return_lse)
        outs.append(out.reshape(n * lq, *out.shape[2:]))
        if return_lse:
            lses.append(lse.transpose(0, 1).reshape(lse.shape[1], n * lq))
    if not outs:
        out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
        lse = torch.full((q.shape[1], q.shape[0]), _NEG_INF, device=q.device) if return_lse else None
        return out, lse
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    lse = None
    if return_lse:
        lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=1)
    return out, lse
