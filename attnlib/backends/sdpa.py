"""``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``.

Lowering:
- ``Causal``: ``is_causal=True`` only when the diagonal offset is 0 (``Sq == Sk``, or top-left);
  one-query decode with no window needs no mask at all; anything else gets a cached bool grid.
  ``is_causal`` is never passed when it would mean top-left for a bottom-right mask.
- ``BlockDiagonal``: consecutive blocks of equal ``(Sq, Sk)`` become one batched call on free views
  (CFG branches, equal-length packing); other blocks are called one by one on views. No ``[T, T]`` mask.
- ``KeyPadding``: a ``[B, 1, 1, Sk]`` bool mask. ``DenseMask``: passed through.
- GQA: query heads folded into the query axis when the mask allows it (no K/V copies), else
  ``enable_gqa=True`` (K/V expanded only on the LSE path, whose kernels lack it).
- Rows with no visible key: unmasked before the call (SDPA would give NaN), then zeroed (LSE -inf).
- LSE: from the fused CPU flash kernel on CPU and the memory-efficient kernel on CUDA (one pass);
  a second pass over the scores only where neither applies.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..inputs import AttentionCall
from ..masks import BlockDiagonal, Causal, DenseMask, KeyPadding
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
        mask = call.mask
        if isinstance(mask, BlockDiagonal):
            return _block_diagonal(call.q, call.k, call.v, mask, call.scale, call.return_lse)
        q, k, v = call.q, call.k, call.v
        if call.packed:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        out, lse = _dense(q, k, v, mask, call.scale, call.return_lse)
        if call.packed:
            out, lse = out[0], (lse[0] if lse is not None else None)
        return out, lse


# ---------------------------------------------------------------------------------------------
# mask lowering: (attn_mask, is_causal, empty_rows) for BHSD tensors
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _causal_lowering(sq: int, sk: int, offset: int, window, device: torch.device):
    """Lower one causal diagonal. Returns ``(attn_mask | None, is_causal, empty_rows | None)``."""
    if window is None and offset == 0:
        return None, True, None
    if window is None and offset >= sk - 1:
        return None, False, None  # every query sees every key (one-token decode against a cache)
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    keep = j <= i + offset
    if window is not None:
        keep &= j > i + offset - window
    empty = ~keep.any(dim=-1)                      # [sq]
    if sk == 0 or bool(empty.any()):
        keep = keep | empty.unsqueeze(-1)
        return keep, False, empty
    return keep, False, None


def _lower_dense_mask(mask, sq: int, sk: int, dtype: torch.dtype, device: torch.device):
    """Returns ``(attn_mask, is_causal, empty_rows)``; empty_rows broadcasts to ``[B, H, Sq]``."""
    if mask is None:
        return None, False, None
    if isinstance(mask, Causal):
        return _causal_lowering(sq, sk, mask.offset(sq, sk), mask.window, device)
    if isinstance(mask, KeyPadding):
        valid = mask.valid
        empty = ~valid.any(dim=-1)                 # [B]
        valid = valid | empty.unsqueeze(-1)
        return valid[:, None, None, :], False, empty[:, None, None]
    if isinstance(mask, DenseMask):
        m = mask.mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        if mask.is_bool:
            empty = ~m.any(dim=-1)
            return m | empty.unsqueeze(-1), False, empty
        finite = m > _NEG_INF
        empty = ~finite.any(dim=-1)
        m = torch.where(empty.unsqueeze(-1), torch.zeros((), dtype=m.dtype, device=m.device), m)
        return m.to(dtype), False, empty
    raise TypeError(f"sdpa cannot lower {type(mask).__name__} here")


# ---------------------------------------------------------------------------------------------
# calls
# ---------------------------------------------------------------------------------------------
def _dense(q, k, v, mask, scale: float, return_lse: bool):
    """BSHD in, ``(out BSHD, lse [B,H,Sq] | None)`` out."""
    b, sq, hq, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if sk == 0:
        out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
        lse = torch.full((b, hq, sq), _NEG_INF, device=q.device) if return_lse else None
        return out, lse
    attn_mask, is_causal, empty = _lower_dense_mask(mask, sq, sk, q.dtype, q.device)
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


def _block_diagonal(q, k, v, mask: BlockDiagonal, scale: float, return_lse: bool):
    """THD in, ``(out [Tq,H,Dv], lse [H,Tq] | None)`` out."""
    block_mask = Causal(window=mask.window) if mask.causal else None
    outs, lses = [], []
    for q0, k0, n, lq, lk in _runs(mask):
        if lq == 0:
            continue
        qg = q.narrow(0, q0, n * lq).view(n, lq, *q.shape[1:])
        kg = k.narrow(0, k0, n * lk).view(n, lk, *k.shape[1:])
        vg = v.narrow(0, k0, n * lk).view(n, lk, *v.shape[1:])
        out, lse = _dense(qg, kg, vg, block_mask, scale, return_lse)
        outs.append(out.reshape(n * lq, *out.shape[2:]))
        if return_lse:
            lses.append(lse.transpose(0, 1).reshape(lse.shape[1], n * lq))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    lse = None
    if return_lse:
        lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=1)
    return out, lse


@functools.lru_cache(maxsize=1024)
def _runs(mask: BlockDiagonal):
    """Maximal runs of consecutive blocks with equal (Sq, Sk): ``(q_start, k_start, n, Sq, Sk)``."""
    runs = []
    q0 = k0 = 0
    for lq, lk in zip(mask.q_seqlens, mask.kv_seqlens):
        if runs and runs[-1][3] == lq and runs[-1][4] == lk:
            a, b, n, _, _ = runs[-1]
            runs[-1] = (a, b, n + 1, lq, lk)
        else:
            runs.append((q0, k0, 1, lq, lk))
        q0 += lq
        k0 += lk
    return tuple(runs)
