"""The one dispatch below the front door: select a backend, run its forward, differentiate.

``run(call, backend)`` is what ``attnlib.attention`` does after validation, and what sequence parallelism,
ring steps and the adapters call with plans of their own. Everything a backend does not do itself
happens here, once:

* paged keys are gathered (only the pages the requests use) for kernels that read contiguous keys;
* padded key slots are zeroed for kernels that would multiply them by a zero weight (``0 * NaN`` is
  NaN: garbage in a ``torch.empty`` cache tail must not reach an output);
* plans in which a row sees several key runs (chunked causal, sink + window) run on kernels that take one
  run per row as one call per layer (:meth:`attnlib.plan.Plan.layers`), merged by the LSE rule;
* sinks are applied through the LSE for kernels without them (:func:`attnlib.merge.apply_sinks`);
* rows with no visible key become output 0 and LSE ``-inf`` (or the sink);
* gradients of merged results (and of an LSE whose kernel gives it none) come from the backend's fused
  ``backward`` from the saved output and LSE, or from the reference formula
  (:func:`attnlib.reference.attention_backward`) when it has none.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .backends.base import Backend, native_parts
from .inputs import AttentionCall
from .merge import apply_sinks, merge_partials
from .plan import Modifiers
from .reference import attention_backward, sink_gradient
from .registry import select_backend

__all__ = ["run", "execute", "block_backward"]


def run(call: AttentionCall, backend: str | None = None):
    """Select a backend for ``call`` and run it: ``(out, lse or None)`` in the caller's layout."""
    chosen = select_backend(call, backend)
    out, lse = execute(chosen, call)
    return call.restore(out, lse if call.return_lse else None)


def execute(backend: Backend, call: AttentionCall):
    """``call`` on ``backend`` (already selected): ``(out BSHD, lse [B, Hq, Sq] or None)``."""
    caps = backend.capabilities
    if "paged" in call.plan.features and "paged" not in caps.features:
        call = gathered(call)
    if call.plan.key_valid is not None and not caps.isolates_padding:
        call = _zero_padding(call)
    parts = native_parts(call, caps)
    sinks_here = call.plan.mods.sinks is not None and parts[0].plan.mods.sinks is None
    lse_grad = call.return_lse and call.requires_grad and not backend.lse_has_gradient
    if len(parts) == 1 and parts[0] is call and not lse_grad:
        return _native(backend, call)
    if call.requires_grad:
        out, lse = _Composite.apply(call.q, call.k, call.v, call.plan.mods.sinks, (backend, call, sinks_here))
    else:
        out, lse = _composite(backend, call, parts, sinks_here)
    return out, (lse if call.return_lse else None)


def gathered(call: AttentionCall) -> AttentionCall:
    """A paged call with its logical keys gathered from the page pools (``[1, Tk, Hkv, D]``; only the pages
    the requests use are read)."""
    kv = call.plan.kv
    k, v = kv.gather(call.k).unsqueeze(0), kv.gather(call.v).unsqueeze(0)
    return call.replace(k=k, v=v, plan=call.plan.with_call(call.plan.mods, None))


def _zero_padding(call: AttentionCall) -> AttentionCall:
    """Padded key slots zeroed (differentiable; their gradient is 0 anyway): a kernel that gives them weight
    0 then computes ``0 * 0``, never ``0 * garbage``."""
    keep = call.plan.key_valid[:, :, None, None]
    zero = torch.zeros((), dtype=call.k.dtype, device=call.k.device)
    return call.replace(k=torch.where(keep, call.k, zero), v=torch.where(keep, call.v, zero))


def _empty_rows_bshd(empty: torch.Tensor) -> torch.Tensor:
    """An empty-rows mask broadcastable to ``[B, Hq, Sq]`` as one broadcastable to BSHD ``[B, Sq, Hq, 1]``."""
    while empty.dim() < 3:
        empty = empty.unsqueeze(0)
    return empty.transpose(1, 2).unsqueeze(-1)


def _native(backend: Backend, call: AttentionCall):
    """One forward on the backend, then rows with no visible key normalized to 0 / -inf."""
    out, lse = backend.forward(call)
    if not backend.capabilities.exact_empty_rows and call.plan.may_have_empty_rows:
        empty = call.empty_rows()
        if empty is not None:
            out = out.masked_fill(_empty_rows_bshd(empty), 0.0)
            if lse is not None:
                fill = float("-inf") if call.plan.mods.sinks is None else None
                lse = lse.masked_fill(empty, fill) if fill is not None else torch.where(
                    empty, call.plan.mods.sinks.float()[:, None].expand_as(lse), lse)
    return out, lse


def _composite(backend: Backend, call: AttentionCall, parts, sinks_here: bool):
    """Forward of a call the kernel runs in parts (layers, or the call without its sinks, each with its
    LSE), merged, then the sinks."""
    results = [_native(backend, part if part.return_lse else part.replace(return_lse=True)) for part in parts]
    out, lse = merge_partials(results, like=call.q.new_zeros(call.batch, call.seqlen_q, call.heads_q,
                                                             call.head_dim_v))
    if sinks_here:
        out, lse = apply_sinks(out, lse, call.plan.mods.sinks)
    return out, lse


class _Composite(torch.autograd.Function):
    """A call run in parts, differentiated in one pass: each part's gradient from the final output and LSE
    (the fused backward rule), plus the sinks' own.

    ``spec = (backend, call, sinks_here)`` carries no tensor the function reads: forward and backward each
    rebuild the call from their own tensor arguments (:func:`_own_call`), with plans whose caches are new,
    so that under ``torch.compile`` neither writes to an object created outside it (dynamo traces both as
    subgraphs and refuses such side effects)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, spec):
        backend, call, sinks_here = spec
        call = _own_call(call, q, k, v, sinks)
        with torch.no_grad():
            out, lse = _composite(backend, call, native_parts(call, backend.capabilities), sinks_here)
        ctx.save_for_backward(q, k, v, sinks, out, lse)
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, sinks, out, lse = ctx.saved_tensors
        backend, call, _ = ctx.spec
        call = _own_call(call, q, k, v, sinks)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        if dout is not None or dlse is not None:
            for part in native_parts(call, backend.capabilities):
                block_backward(backend, part, out, lse, dout, dlse, dq, dk, dv)
        dsinks = None
        if ctx.needs_input_grad[3] and sinks is not None:
            dsinks = sink_gradient(out, lse, dout, dlse, sinks)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks, None


def _own_call(call: AttentionCall, q, k, v, sinks) -> AttentionCall:
    """``call`` on these tensors, its plan with a structure cache of its own (and these sinks)."""
    plan = call.plan
    mods = plan.modifiers
    if sinks is not None:
        mods = Modifiers(mods.softcap, mods.alibi, sinks)
    return call.replace(q=q, k=k, v=v, plan=replace(plan, modifiers=mods, _cache={}))


def block_backward(backend: Backend, call: AttentionCall, out, lse, dout, dlse, dq, dk, dv) -> None:
    """Accumulate into float32 ``dq``/``dk``/``dv`` the gradient through ``call``'s keys, from the final
    ``out``/``lse`` (a merge of parts, sinks included): the backend's fused backward, or the reference
    formula."""
    got = backend.backward(call, out, lse, dout, dlse)
    if got is NotImplemented:
        attention_backward(call.q, call.k, call.v, out, lse, dout, dlse, call.plan, call.scale, dq=dq, dk=dk, dv=dv)
        return
    gq, gk, gv = got
    dq += gq.float()
    dk += gk.float()
    dv += gv.float()
