"""The one dispatch below the front door: select a backend, run its forward, differentiate.

``run(call, backend)`` is what ``attnlib.attention`` does after validation, and what sequence parallelism,
ring steps and the adapters call with plans of their own. Everything a backend does not do itself
happens here, once:

* paged keys are gathered (only the pages the requests use) for kernels that read contiguous keys;
* padded key slots (and, for kernels that read them, other sequences' non-finite keys) are zeroed for
  kernels that weight hidden keys by 0 (``0 * NaN`` is NaN: garbage in a ``torch.empty`` cache tail must
  not reach an output), and rows with a non-finite query or first visible key are set to NaN (never
  silently 0);
* plans in which a row sees several key runs (chunked causal, sink + window) run on kernels that take one
  run per row as one call per layer (:meth:`attnlib.plan.Plan.layers`), merged by the LSE rule;
* sinks are applied through the LSE for kernels without them (:func:`attnlib.merge.apply_sinks`);
* rows with no visible key become output 0 and LSE ``-inf`` (or the sink);
* gradients of merged results (and of an LSE whose kernel gives it none) come from the backend's fused
  ``backward`` from the saved output and LSE, or from the reference formula
  (:func:`attnlib.reference.attention_backward`) when it has none.
"""
from __future__ import annotations

import os
from dataclasses import replace

import torch

from .backends.base import Backend, as_batch, gathers, native_parts
from .inputs import AttentionCall
from .merge import apply_sinks, merge_partials
from .plan import Modifiers
from .reference import attention_backward, sink_gradient
from .inputs import validate_call
from .registry import record_fallback, registry_generation, registry_override, registry_warn_again, select_backend
from . import settings

__all__ = ["run", "attend", "execute", "block_backward"]


def run(call: AttentionCall, backend: str | None = None):
    """Select a backend for ``call`` and run it: ``(out, lse or None)`` in the caller's layout."""
    chosen = select_backend(call, backend)
    out, lse = execute(chosen, call)
    return call.restore(out, lse if call.return_lse else None)


# -- the front door's fast path: calls with the signature of an earlier one skip validation and selection ----
#: signature -> (the earlier call, the backend chosen for it, the objects its key names by identity, the
#: fallback warning it gave); bounded, oldest out first
_PREPARED: dict = {}
PREPARED_SIZE = 256


def attend(q, k, v, mask, scale, return_lse: bool, softcap, alibi_slopes, sinks, block_table, backend):
    """``attnlib.attention`` below the parallel dispatch: validate, select and run, or, for a call with the
    signature of an earlier one (shapes, dtypes, device, the same mask object or an equal structured mask,
    the same modifier tensors, grad mode, the backend request and the environment that steers selection),
    reuse that call's validation, plan and backend choice (what it would compute again is a function of
    the signature alone)."""
    key = None
    if not torch.compiler.is_compiling() and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) \
            and isinstance(v, torch.Tensor) and (sinks is None or isinstance(sinks, torch.Tensor)) \
            and not getattr(mask, "replans", False):
        key = _signature(q, k, v, mask, scale, return_lse, softcap, alibi_slopes, sinks, block_table, backend)
        hit = _PREPARED.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[2], (_anchor(mask), alibi_slopes, sinks, block_table))):
            template, chosen, _, warning = hit
            if warning is not None:
                registry_warn_again(*warning)
            call = template.with_tensors(q, k, v)
            out, lse = execute(chosen, call)
            return call.restore(out, lse if return_lse else None)
    call = validate_call(q, k, v, mask, scale, return_lse, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                         block_table=block_table)
    if key is None:                       # compiling (or not tensors: validation has raised)
        chosen = select_backend(call, backend)
        out, lse = execute(chosen, call)
        return call.restore(out, lse if call.return_lse else None)
    with record_fallback() as seen:
        chosen = select_backend(call, backend)
    if key is not None:
        if len(_PREPARED) >= PREPARED_SIZE:
            _PREPARED.pop(next(iter(_PREPARED)))
        _PREPARED[key] = (call, chosen, (_anchor(mask), alibi_slopes, sinks, block_table), seen[0] if seen else None)
    out, lse = execute(chosen, call)
    return call.restore(out, lse if call.return_lse else None)


def _structured(mask) -> bool:
    """Masks compared by value (no tensor inside): ``None``, ``Causal``, ``BlockDiagonal``."""
    return mask is None or type(mask).__eq__ is not object.__eq__


def _anchor(mask):
    """What a cached signature holds of the mask by identity (tensor masks), or None (compared by value)."""
    return None if _structured(mask) else mask


def _signature(q, k, v, mask, scale, return_lse, softcap, alibi_slopes, sinks, block_table, backend) -> tuple:
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or
                                        (sinks is not None and sinks.requires_grad))
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, grad,
            mask if _structured(mask) else id(mask), scale, return_lse, softcap, id(alibi_slopes), id(sinks),
            id(block_table), backend, registry_override(), registry_generation(),
            os.environ.get(settings.BACKEND), os.environ.get(settings.FALLBACK),
            os.environ.get(settings.NONFINITE_GUARD), os.environ.get(settings.TRITON_INTERPRET))


def execute(backend: Backend, call: AttentionCall, _padding_seen: bool = False):
    """``call`` on ``backend`` (already selected): ``(out BSHD, lse [B, Hq, Sq] or None)``."""
    caps = backend.capabilities
    if not call.plan.tiles or call.seqlen_k == 0:       # no row sees a key (no keys, empty blocks): no kernel
        return _nothing_visible(call)
    if gathers(call.plan, caps):
        _padding_seen = _empty_slots_seen(call.plan)
        call = gathered(call)
    if call.plan.key_valid is not None and call.plan.packed:
        batch = as_batch(call)
        if batch is not None:
            return _unbatch(call, *execute(backend, batch, _padding_seen))
    call, marked = _guard(call, caps, _padding_seen)
    parts = native_parts(call, caps)
    sinks_here = call.plan.mods.sinks is not None and parts[0].plan.mods.sinks is None
    lse_grad = call.return_lse and call.requires_grad and not backend.lse_has_gradient
    if len(parts) == 1 and parts[0] is call and not lse_grad:
        out, lse = _native(backend, call, marked)
    elif call.requires_grad:
        out, lse = _Composite.apply(call.q, call.k, call.v, call.plan.mods.sinks, marked,
                                    (backend, call, sinks_here))
    else:
        out, lse = _composite(backend, call, parts, sinks_here, marked)
    return out, (lse if call.return_lse else None)


def _nothing_visible(call: AttentionCall):
    """Output 0 and LSE ``-inf`` (or the sink) for every row, differentiable (zero gradients)."""
    sinks = call.plan.mods.sinks
    out, lse = _Nothing.apply(call.q, call.k, call.v, sinks, call.head_dim_v)
    return out, (lse if call.return_lse else None)


class _Nothing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, dv):
        b, sq, hq, _ = q.shape
        ctx.like = tuple((t.shape, t.dtype, t.device) for t in (q, k, v))
        ctx.sinks_like = None if sinks is None else sinks.dtype
        lse = torch.full((b, hq, sq), float("-inf"), dtype=torch.float32, device=q.device)
        if sinks is not None:
            lse = sinks.detach().float()[None, :, None].expand(b, hq, sq).clone()
        return q.new_zeros(b, sq, hq, dv), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dsinks = None
        if ctx.sinks_like is not None and dlse is not None:       # lse = sink: d lse / d sink = 1
            dsinks = torch.nan_to_num(dlse.float(), nan=0.0).sum(dim=(0, 2)).to(ctx.sinks_like)
        zeros = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.like]
        return (*zeros, dsinks, None)


def gathered(call: AttentionCall) -> AttentionCall:
    """A paged call with its logical keys gathered from the page pools (``[1, Tk, Hkv, D]``; only the pages
    the requests use are read)."""
    kv = call.plan.kv
    k, v = kv.gather(call.k).unsqueeze(0), kv.gather(call.v).unsqueeze(0)
    return call.replace(k=k, v=v, plan=call.plan.with_call(call.plan.mods, None))


def _guard(call: AttentionCall, caps, padding_seen: bool = False):
    """Garbage and non-finite inputs, for kernels that do not handle them: ``(call, mark)`` where ``mark`` is
    None or a tensor broadcastable to BSHD ``[B, Sq, Hq, 1]`` holding 0 or NaN, added to the output (and its
    transpose to the LSE) after the kernel. ``$ATTNLIB_NONFINITE_GUARD``:

    * on (default): key slots hidden as padding (``KeyPadding``) or as another sequence never reach a row,
      whatever they hold -- a kernel that weights them by 0 computes ``0 * NaN = NaN``, so padded slots are
      zeroed (and, for kernels that read other sequences' keys, non-finite keys and values too, the rows
      that see one marked); and a row with a non-finite query, or whose first visible key is non-finite, is
      NaN: kernels that return a row as 0 when every one of its scores is NaN would drop it silently;
    * ``strict``: also keys hidden by causality, windows or sparsity inside a sequence (every non-finite key
      and value zeroed and the rows that see one marked: one more pass over K and V);
    * ``0``: nothing."""
    mode = os.environ.get(settings.NONFINITE_GUARD, "1")
    plan = call.plan
    if mode == "0":
        return call, None
    if mode == "strict" and not caps.isolates_hidden and not plan.full or plan.packed and not caps.isolates_sequences:
        return _sanitized(call)
    mark = None
    if plan.key_valid is not None and not caps.isolates_padding and not padding_seen:
        keep = plan.key_valid[:, :, None, None]
        call = call.replace(k=torch.where(keep, call.k, 0.0), v=torch.where(keep, call.v, 0.0))
    if not caps.propagates_nonfinite:
        b, sq, hq, _ = call.q.shape
        hkv = call.heads_kv
        k_mark = _first_key_mark(call)                                        # [B, Sq or 1, Hkv or Hq, 1]
        if k_mark.shape[2] == hq:
            mark = _nan_where_nonfinite(call.q) + k_mark
        else:                                 # each kv head's mark added to its group of query heads
            mark = (_nan_where_nonfinite(call.q).view(b, sq, hkv, hq // hkv) + k_mark).view(b, sq, hq, 1)
    return call, mark


def _nan_where_nonfinite(x: torch.Tensor) -> torch.Tensor:
    """``[..., 1]``: NaN where a row of ``x`` holds a non-finite value, else 0: the row's sum times 0 (one pass
    over ``x``; ``0 * inf`` is NaN). A finite row whose sum overflows (entries near the dtype's largest value,
    which overflow any score they enter) is marked too."""
    if x.dtype in (torch.float32, torch.float64):
        return x.sum(-1, keepdim=True) * 0
    return x.sum(-1, keepdim=True, dtype=torch.float32) * 0


def _sanitized(call: AttentionCall):
    """Every non-finite key and value zeroed (differentiable); the rows that see one, or whose query is
    non-finite, to be marked NaN."""
    k_ok = torch.isfinite(call.k).all(-1)                                     # [B, Sk, Hkv] (or a page pool's)
    v_ok = torch.isfinite(call.v).all(-1)
    bad = ~(k_ok & v_ok)
    if call.plan.kv is not None:              # pool slots [P, page, Hkv] -> the logical keys [1, Tk, Hkv]
        bad = bad.flatten(0, 1).index_select(0, call.plan.kv.slot_index()).unsqueeze(0)
    bad = bad.transpose(1, 2)
    zero = torch.zeros((), dtype=call.k.dtype, device=call.k.device)
    call = call.replace(k=torch.where(k_ok[..., None], call.k, zero), v=torch.where(v_ok[..., None], call.v, zero))
    if call.gqa_ratio > 1:
        bad = bad.repeat_interleave(call.gqa_ratio, 1)
    rows = call.plan.rows_seeing(bad).transpose(1, 2).unsqueeze(-1)          # [B, Sq, Hq, 1]
    nan = torch.full((), float("nan"), device=call.q.device)
    return call, torch.where(rows, nan, 0.0) + _nan_where_nonfinite(call.q)


def _empty_slots_seen(plan) -> bool:
    """The empty window slots of a paged call with device lengths hold a key every row of their request
    sees (the newest: one new token per request, or no causal mask), so they need no zeroing."""
    return plan.kv.kv_seqused is not None and all(t.q_len == 1 or not t.causal for t in plan.tiles)


def _unbatch(call: AttentionCall, out, lse):
    """``(out, lse)`` of :func:`~attnlib.backends.base.as_batch`'s call back in the packed call's layout (batch 1)."""
    out = out.reshape(1, call.seqlen_q, *out.shape[2:])
    if lse is not None:
        lse = lse.transpose(0, 1).reshape(1, lse.shape[1], call.seqlen_q)
    return out, lse


def _first_key_mark(call: AttentionCall) -> torch.Tensor:
    """``[B, Sq or 1, Hkv, 1]`` (``[B, Sq, Hq, 1]`` for dense and block-sparse plans, which may differ per
    query head): NaN where the first key a row sees (in each of its key runs) is non-finite.
    A row whose every score is NaN has such a key, and a row that sees such a key must be non-finite
    anyway: marking these rows is exact, and reads about as much of K as there are queries."""
    plan, k = call.plan, call.k
    if plan.kv is not None:                   # a kernel that reads pages: the logical keys it sees
        k = plan.kv.gather(k).unsqueeze(0)
    if plan.structure_full:                 # every row's first key: key 0, or each batch row's first valid one
        if plan.key_valid is None:
            return _nan_where_nonfinite(k[:, :1])                              # [B, 1, Hkv, 1]
        rows, first = plan.tensor_derived(("first_key", str(k.device)), lambda p: _first_valid(p, k.device))
        return _nan_where_nonfinite(k[rows, first])[:, None]
    if plan.dense is not None or plan.sparse is not None:
        bad = (~torch.isfinite(k).all(-1)).transpose(1, 2)                   # [B, Hkv, Sk]
        bad = bad.repeat_interleave(call.gqa_ratio, 1) if call.gqa_ratio > 1 else bad
        rows = plan.rows_seeing(bad).transpose(1, 2).unsqueeze(-1)            # [B, Sq, Hq, 1]
        return torch.where(rows, torch.full((), float("nan"), device=k.device), 0.0)
    b, sk = call.batch, call.seqlen_k
    lo, hi = plan.runs_table_on(k.device)                                     # [R, Sq]
    first = lo.reshape(1, -1).expand(b, -1)                                   # [B, R*Sq]
    seen = (hi >= lo).reshape(1, -1)
    if plan.key_valid is not None:                  # the first valid key at or after each run's start
        valid = plan.key_valid.to(k.device)
        csum = valid.to(torch.int64).cumsum(-1)                               # [B, Sk]
        before = torch.nn.functional.pad(csum, (1, 0))[:, first[0]]           # valid keys before lo
        first = torch.searchsorted(csum, before + 1)                           # [B, R*Sq]
        seen = seen & (first <= hi.reshape(1, -1))
    first = first.clamp(max=max(sk - 1, 0))
    keys = torch.gather(k, 1, first[:, :, None, None].expand(-1, -1, *k.shape[2:]))   # [B, R*Sq, Hkv, D]
    term = torch.where(seen[..., None, None], _nan_where_nonfinite(keys), 0.0)  # [B, R*Sq, Hkv, 1]
    return term.reshape(b, lo.shape[0], lo.shape[1], -1, 1).sum(1)             # [B, Sq, Hkv, 1]


def _first_valid(plan, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batch rows, each row's first valid key)``, int64 ``[B]`` on ``device`` (no valid key: 0)."""
    valid = plan.key_valid.to(device)
    return torch.arange(valid.shape[0], device=device), valid.to(torch.uint8).argmax(-1)


def _empty_rows_bshd(empty: torch.Tensor) -> torch.Tensor:
    """An empty-rows mask broadcastable to ``[B, Hq, Sq]`` as one broadcastable to BSHD ``[B, Sq, Hq, 1]``."""
    while empty.dim() < 3:
        empty = empty.unsqueeze(0)
    return empty.transpose(1, 2).unsqueeze(-1)


def _native(backend: Backend, call: AttentionCall, mark=None):
    """One forward on the backend, the guard's NaN marks added, then rows with no visible key normalized to
    0 / -inf (a row that sees nothing returns 0 whatever its query holds)."""
    out, lse = backend.forward(call)
    if mark is not None:
        out = out + mark.to(out.dtype)
        lse = lse + mark[..., 0].transpose(1, 2) if lse is not None else None
    if not backend.capabilities.exact_empty_rows and call.plan.may_have_empty_rows:
        empty = call.empty_rows()
        if empty is not None:
            out = out.masked_fill(_empty_rows_bshd(empty), 0.0)
            if lse is not None:
                fill = float("-inf") if call.plan.mods.sinks is None else None
                lse = lse.masked_fill(empty, fill) if fill is not None else torch.where(
                    empty, call.plan.mods.sinks.float()[:, None].expand_as(lse), lse)
    return out, lse


def _composite(backend: Backend, call: AttentionCall, parts, sinks_here: bool, mark=None):
    """Forward of a call the kernel runs in parts (layers, or the call without its sinks, each with its
    LSE), merged, then the sinks."""
    results = [_native(backend, part if part.return_lse else part.replace(return_lse=True), mark)
               for part in parts]
    out, lse = merge_partials(results, like=call.q.new_zeros(call.batch, call.seqlen_q, call.heads_q,
                                                             call.head_dim_v))
    if sinks_here:
        out, lse = apply_sinks(out, lse, call.plan.mods.sinks)
    return out, lse


class _Composite(torch.autograd.Function):
    """A call run in parts, differentiated in one pass: each part's gradient from the final output and LSE
    (the fused backward rule), plus the sinks' own.

    ``spec = (backend, call, sinks_here)`` carries no tensor the function reads (the guard's ``mark`` is an
    argument): forward and backward each
    rebuild the call from their own tensor arguments (:func:`_own_call`), with plans whose caches are new,
    so that under ``torch.compile`` neither writes to an object created outside it (dynamo traces both as
    subgraphs and refuses such side effects)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, mark, spec):
        backend, call, sinks_here = spec
        call = _own_call(call, q, k, v, sinks)
        with torch.no_grad():
            out, lse = _composite(backend, call, native_parts(call, backend.capabilities), sinks_here, mark)
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
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks, None, None


def _own_call(call: AttentionCall, q, k, v, sinks) -> AttentionCall:
    """``call`` on these tensors, its plan with a structure cache of its own (and these sinks)."""
    plan = call.plan
    mods = plan.modifiers
    if sinks is not None:
        mods = Modifiers(mods.softcap, mods.alibi, sinks)
    return call.replace(q=q, k=k, v=v, plan=replace(plan, modifiers=mods, _cache={}, _tensor_cache={}))


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
