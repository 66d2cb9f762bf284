"""``xformers``: ``xformers.ops.memory_efficient_attention`` with the matching ``attn_bias``.

Detected lazily: importing this module never imports xformers.

Lowering (pure helpers in :mod:`attnlib.backends.lowering`; xformers checks bias types by *exact* type,
so each is built from its own class):

========================================  ===================================================
``None``                                  no bias
``Causal()`` (bottom-right)               ``LowerTriangularMask`` when ``Sq == Sk``, else
                                          ``LowerTriangularFromBottomRightMask``; rows before the
                                          diagonal (``Sq > Sk``) are not sent to the kernel
``Causal(window=W)``                      ``LowerTriangularFromBottomRightLocalAttentionMask(W)``
``Causal(align="top_left")``              first ``Sq`` keys when ``Sk > Sq`` (then bottom-right ==
                                          top-left); ``LowerTriangularMask`` when ``Sq > Sk``
``BlockDiagonal``                         ``BlockDiagonalMask`` / ``...CausalFromBottomRightMask`` /
                                          ``...CausalLocalAttentionFromBottomRightMask``; query rows
                                          that see no key (a causal block with fewer keys than
                                          queries, which xformers rejects) are dropped and re-added as 0
``KeyPadding`` / ``DenseMask``            a materialized additive bias, last dim padded to xformers'
                                          16-byte alignment, broadcast axes expanded (stride 0)
========================================  ===================================================

GQA: the 5-D BMGHK layout with expanded (stride-0) K/V views; when gradients are needed K/V are
repeated (xformers' backward operators do not take BMGHK). LSE: ``memory_efficient_attention_forward_
requires_grad`` (the public API that returns it) with ``memory_efficient_attention_backward`` for
autograd. Rows with no visible key return 0 and LSE ``-inf``. ``why_not`` carries xformers' own
``not_supported_reasons`` when no operator fits.
"""
from __future__ import annotations

import functools
import importlib
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..inputs import AttentionCall
from .base import Backend, Capabilities
from .lowering import (XformersBiasSpec, additive_bias, kept_query_index, xformers_bias_spec, xformers_dense_lse,
                       xformers_varlen_lse)

_NEG_INF = float("-inf")
_VARLEN_KINDS = ("BlockDiagonalMask", "BlockDiagonalCausalFromBottomRightMask",
                 "BlockDiagonalCausalLocalAttentionFromBottomRightMask")


def _cuda_available() -> bool:
    """Patched in tests; the one place this module asks whether CUDA exists."""
    return torch.cuda.is_available()


@dataclass(frozen=True, eq=False)
class _Xformers:
    version: str
    ops: Any          # xformers.ops
    fmha: Any         # xformers.ops.fmha
    bias: Any         # xformers.ops.fmha.attn_bias


@functools.lru_cache(maxsize=1)
def _detect() -> tuple[Optional[_Xformers], str]:
    """``(modules or None, reason when None)``. Cached; tests call ``_detect.cache_clear()``."""
    try:
        xf = importlib.import_module("xformers")
        ops = importlib.import_module("xformers.ops")
        fmha = importlib.import_module("xformers.ops.fmha")
        bias = importlib.import_module("xformers.ops.fmha.attn_bias")
    except ModuleNotFoundError:
        cuda = "" if _cuda_available() else " and torch has no CUDA device"
        return None, f"xformers not installed (pip install xformers){cuda}"
    except Exception as e:  # noqa: BLE001 - a broken build is reported, not raised
        return None, f"xformers failed to import: {type(e).__name__}: {e}"
    return _Xformers(str(getattr(xf, "__version__", "?")), ops, fmha, bias), ""


@dataclass
class _Lowered:
    """One call in xformers' terms: kernel tensors, attn_bias, and how to map results back."""

    spec: XformersBiasSpec
    q: Any = None
    k: Any = None
    v: Any = None
    bias: Any = None
    empty: Optional[torch.Tensor] = None     # "tensor" bias: rows with no key, [b?, h?, sq] (LSE layout)
    bmghk: bool = False


class XformersBackend(Backend):
    name = "xformers"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        notes=("KeyPadding/DenseMask as a materialized additive bias",
               "GQA via BMGHK (forward); repeated K/V with grad"),
    )

    def __init__(self):
        self._last = threading.local()

    @property
    def implementation(self) -> str:  # type: ignore[override]
        xf, _ = _detect()
        return f"xformers {xf.version} memory_efficient_attention" if xf is not None else ""

    def unavailable_reason(self) -> Optional[str]:
        xf, reason = _detect()
        if xf is None:
            return reason
        if not _cuda_available():
            return (f"xformers {xf.version} is installed but torch has no CUDA device "
                    "(torch.cuda.is_available() is False)")
        return None

    def extra_reasons(self, call: AttentionCall) -> list[str]:
        xf, _ = _detect()
        low = self._lowered(call, xf)
        if low.spec.kind == "empty":
            return []
        reasons = _xformers_reasons(xf, low, call)
        if reasons:   # no forward follows: do not keep this call's tensors (and bias) alive
            self._last.entry = None
        return reasons

    def forward(self, call: AttentionCall):
        xf, reason = _detect()
        if xf is None:
            raise RuntimeError(reason)
        low = self._lowered(call, xf)
        self._last.entry = None
        return _run(xf, low, call)

    def _lowered(self, call: AttentionCall, xf: _Xformers) -> _Lowered:
        """Lower once per call: ``why_not`` and ``forward`` of the same call share the work."""
        entry = getattr(self._last, "entry", None)
        if entry is not None and entry[0]() is call:
            return entry[1]
        low = _lower(xf, call)
        self._last.entry = (weakref.ref(call), low)
        return low


# ---------------------------------------------------------------------------------------------
# lowering to xformers tensors + attn_bias
# ---------------------------------------------------------------------------------------------
def _lower(xf: _Xformers, call: AttentionCall) -> _Lowered:
    mask = call.mask
    spec = xformers_bias_spec(mask, call.seqlen_q, call.seqlen_k)
    if spec.kind == "empty":
        return _Lowered(spec)
    q, k, v = call.q, call.k, call.v
    if call.packed:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if spec.q_start:
        q = q[:, spec.q_start:]
    if spec.key_stop is not None:
        k, v = k[:, : spec.key_stop], v[:, : spec.key_stop]
    if spec.kept_queries is not None:
        q = q.index_select(1, kept_query_index(spec.kept_queries, q.device))
    b, sq, hq = q.shape[:3]
    sk = k.shape[1]
    empty = None
    if spec.kind == "none":
        bias = None
    elif spec.kind == "tensor":
        bias, empty = additive_bias(mask, b, hq, sq, sk, q.dtype, q.device)
        while empty.dim() < 3:
            empty = empty.unsqueeze(0)
    else:
        bias = _bias_object(xf, spec, str(q.device))
    hkv = k.shape[2]
    bmghk = False
    if hq != hkv:
        ratio = hq // hkv
        if call.requires_grad:  # xformers' backward operators do not take BMGHK: repeat K/V (a copy)
            k, v = k.repeat_interleave(ratio, dim=2), v.repeat_interleave(ratio, dim=2)
        else:
            bmghk = True
            q = q.unflatten(2, (hkv, ratio))
            k = k.unsqueeze(3).expand(b, sk, hkv, ratio, k.shape[-1])
            v = v.unsqueeze(3).expand(b, sk, hkv, ratio, v.shape[-1])
            if isinstance(bias, torch.Tensor):
                bias = bias.unflatten(1, (hkv, ratio))
    return _Lowered(spec, q, k, v, bias, empty, bmghk)


@functools.lru_cache(maxsize=512)
def _bias_object(xf: _Xformers, spec: XformersBiasSpec, device: str):
    """The exact xformers attn_bias for ``spec`` (cached: block-diagonal seqstarts go to the device once)."""
    ab = xf.bias
    kind = spec.kind
    if kind == "LowerTriangularMask":
        obj = ab.LowerTriangularMask()
    elif kind == "LowerTriangularFromBottomRightMask":
        obj = ab.LowerTriangularFromBottomRightMask()
    elif kind == "LowerTriangularFromBottomRightLocalAttentionMask":
        obj = ab.LowerTriangularFromBottomRightLocalAttentionMask(spec.window)
    elif kind in _VARLEN_KINDS:
        obj = _from_seqlens(ab.BlockDiagonalMask, list(spec.q_seqlens), list(spec.kv_seqlens), torch.device(device))
        if kind == "BlockDiagonalCausalFromBottomRightMask":
            obj = obj.make_causal_from_bottomright()
        elif kind == "BlockDiagonalCausalLocalAttentionFromBottomRightMask":
            obj = obj.make_local_attention_from_bottomright(spec.window)
    else:  # pragma: no cover - xformers_bias_spec names only the kinds above
        raise ValueError(f"unknown xformers bias kind {kind!r}")
    if type(obj).__name__ != kind:
        raise RuntimeError(f"xformers built {type(obj).__name__} where {kind} was needed")
    return obj


def _from_seqlens(cls, q_seqlens, kv_seqlens, device: torch.device):
    try:
        return cls.from_seqlens(q_seqlens, kv_seqlens, device=device)
    except TypeError:  # older xformers: no device argument; seqstart built on the CPU then moved
        obj = cls.from_seqlens(q_seqlens, kv_seqlens)
        return obj.to(device) if hasattr(obj, "to") else obj


def _xformers_reasons(xf: _Xformers, low: _Lowered, call: AttentionCall) -> list[str]:
    """xformers' own dispatch: when no operator fits, its per-operator ``not_supported_reasons``.

    Uses xformers' dispatcher (``fmha.dispatch._dispatch_fw`` / ``_dispatch_bw``, whose
    ``NotImplementedError`` lists every operator's reasons); if that private API moved, the kernel
    call itself reports instead.
    """
    try:
        dispatch = importlib.import_module("xformers.ops.fmha.dispatch")
        inp = xf.fmha.Inputs(query=low.q, key=low.k, value=low.v, attn_bias=low.bias, p=0.0, scale=call.scale)
    except Exception:  # noqa: BLE001
        return []
    needs_grad = call.requires_grad or call.return_lse
    try:
        fw = dispatch._dispatch_fw(inp, needs_grad)
    except NotImplementedError as e:
        return [f"xformers has no forward operator for this call: {_condense(e)}"]
    except Exception:  # noqa: BLE001
        return []
    if call.requires_grad:
        try:
            varlen = low.spec.kind in _VARLEN_KINDS
            dispatch._dispatch_bw(inp, varlen_lse_packed=getattr(fw, "VARLEN_LSE_PACKED", None) if varlen else None)
        except NotImplementedError as e:
            return [f"xformers has no backward operator for this call: {_condense(e)}"]
        except Exception:  # noqa: BLE001
            return []
    return []


def _condense(err: Exception) -> str:
    """xformers' dispatch error on one line, without its echo of the input shapes."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    first = next((i for i, ln in enumerate(lines) if "is not supported because" in ln), None)
    if first is not None:
        lines = lines[first:]
    return " ".join(lines)


# ---------------------------------------------------------------------------------------------
# the call
# ---------------------------------------------------------------------------------------------
class _MemEffWithLse(torch.autograd.Function):
    """Output and LSE in one pass, differentiable through ``memory_efficient_attention_backward``."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale, ops):
        out, lse = ops.memory_efficient_attention_forward_requires_grad(q, k, v, attn_bias=bias, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bias, ctx.scale, ctx.ops = bias, scale, ops
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.ops.memory_efficient_attention_backward(dout.contiguous(), out, lse, q, k, v,
                                                                 attn_bias=ctx.bias, scale=ctx.scale)
        return dq, dk, dv, None, None, None


def _run(xf: _Xformers, low: _Lowered, call: AttentionCall):
    spec = low.spec
    hq, dv = call.heads_q, call.head_dim_v
    if spec.kind == "empty":
        out = call.q.new_zeros(*call.q.shape[:-1], dv)
        lse = None
        if call.return_lse:
            shape = (hq, call.seqlen_q) if call.packed else (call.batch, hq, call.seqlen_q)
            lse = torch.full(shape, _NEG_INF, device=call.device)
        return out, lse
    if call.return_lse:
        out, lse = _MemEffWithLse.apply(low.q, low.k, low.v, low.bias, call.scale, xf.ops)
    else:
        out = xf.ops.memory_efficient_attention(low.q, low.k, low.v, attn_bias=low.bias, scale=call.scale)
        lse = None
    if low.bmghk:
        out = out.flatten(2, 3)
    sq = out.shape[1]
    if lse is not None:
        lse = lse.float()
        lse = xformers_varlen_lse(lse, spec.q_seqlens, hq) if spec.kind in _VARLEN_KINDS else \
            xformers_dense_lse(lse, hq, sq)                     # [H, Tq'] or [B, H, Sq']
    if low.empty is not None:
        out = out.masked_fill(low.empty.transpose(1, 2).unsqueeze(-1), 0.0)
        if lse is not None:
            lse = lse.masked_fill(low.empty, _NEG_INF)
    # rows that were not sent to the kernel see no key: 0 / -inf
    if spec.q_start:
        out = F.pad(out, (0, 0, 0, 0, spec.q_start, 0))
        if lse is not None:
            lse = F.pad(lse, (spec.q_start, 0), value=_NEG_INF)
    if spec.kept_queries is not None:
        idx = kept_query_index(spec.kept_queries, out.device)
        out = out.new_zeros(1, call.seqlen_q, hq, out.shape[-1]).index_copy(1, idx, out)
        if lse is not None:
            lse = torch.full((hq, call.seqlen_q), _NEG_INF, device=lse.device).index_copy(1, idx, lse)
    if call.packed:
        out = out[0]
        if lse is not None and lse.dim() == 3:
            lse = lse[0]
    return out, lse
