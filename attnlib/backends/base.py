"""What every backend is: capabilities as data, reasons as sentences, one ``forward`` and an optional fused
``backward``.

A backend module reads top to bottom: ``Capabilities``, ``unavailable_reason`` (environment),
``extra_reasons`` (call-specific limits the table cannot express), lowering from the plan, the call.
Backends see BSHD tensors only (packed calls have batch 1 and ``plan.packed``); the dispatch
(:mod:`attnlib.dispatch`) does the rest: layouts, rows with no key, multi-tile plans on kernels that take
one key run per row, sinks on kernels without them, paged keys for kernels that read contiguous ones.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..inputs import AttentionCall
from ..plan import FEATURES, Modifiers
from .common import tile_plan

#: every plan feature a backend can list (``attnlib.plan.Plan.features`` produces subsets of these)
ALL_FEATURES = FEATURES
#: the mask-shaped subset (what the classic capability matrix shows)
ALL_MASK_FEATURES = frozenset({"causal", "window", "block_diagonal", "key_padding", "dense"})
#: served for every backend that returns an LSE, by the dispatch: multi-tile plans as several calls merged
#: with the LSE rule, sinks by rescaling with the LSE
WITH_LSE = frozenset({"multi_tile", "sinks"})
#: served for every backend by the dispatch: paged keys gathered (only the visible pages) into contiguous ones
ALWAYS = frozenset({"paged"})

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype))


@dataclass(frozen=True)
class Capabilities:
    """What a backend can serve: every field is a claim ``tests/test_capabilities_truthful.py`` checks by
    running it. ``reasons`` turns each mismatch with a call into one sentence; limits the fields cannot
    express belong in ``Backend.extra_reasons``.

    ``features``: the plan features its ``forward`` handles itself (:data:`ALL_FEATURES`); with ``lse`` the
    dispatch adds :data:`WITH_LSE`, and it always adds :data:`ALWAYS`. The flags say what the dispatch must
    normalize around the kernel: ``exact_empty_rows`` (rows with no key already give 0 / -inf);
    ``isolates_padding`` / ``isolates_sequences`` / ``isolates_hidden`` (key slots hidden as padding / as
    another packed sequence / by any rule, causality and windows included, are never read into a row's
    arithmetic, whatever they hold: kernels that weight them by 0 compute ``0 * NaN``, so otherwise the
    dispatch zeroes them first); ``propagates_nonfinite`` (a row with a non-finite query, or that sees a
    non-finite key or value, comes back non-finite; kernels that return a row as 0 when every score is NaN
    do not, and the dispatch marks those rows NaN).
    """

    devices: frozenset = frozenset({"cpu", "cuda"})
    dtypes: frozenset = frozenset({torch.float16, torch.bfloat16, torch.float32})
    max_head_dim: int | None = None      # for D and Dv; None: any
    features: frozenset = ALL_MASK_FEATURES
    gqa: bool = True                     # Hq != Hkv
    lse: bool = True                     # return_lse=True
    #: backward: True (on every device of ``devices``), False (nowhere) or the device types that have it
    autograd: bool | frozenset = True
    head_dim_v_differs: bool = True      # Dv != D
    exact_empty_rows: bool = False
    isolates_padding: bool = False
    isolates_sequences: bool = False
    isolates_hidden: bool = False
    propagates_nonfinite: bool = False

    def autograd_on(self, device_type: str) -> bool:
        """Whether calls whose inputs require grad are served on ``device_type``."""
        if isinstance(self.autograd, bool):
            return self.autograd and device_type in self.devices
        return device_type in self.autograd and device_type in self.devices

    def served(self) -> frozenset:
        """Every plan feature the backend serves, its own and the dispatch's."""
        return self.features | ALWAYS | (WITH_LSE if self.lse else frozenset())

    def reasons(self, call: AttentionCall) -> list[str]:
        out = []
        dev = call.device.type
        if dev not in self.devices:
            out.append(f"device={dev} (supported: {', '.join(sorted(self.devices))})")
        if call.dtype not in self.dtypes:
            names = ", ".join(sorted(dtype_name(d) for d in self.dtypes))
            out.append(f"dtype={dtype_name(call.dtype)} (supported: {names})")
        for d, what in ((call.head_dim, "head_dim"), (call.head_dim_v, "head_dim_v")):
            if self.max_head_dim is not None and d > self.max_head_dim:
                out.append(f"{what}={d} (supported: <= {self.max_head_dim})")
        missing = call.features - self.served()
        if missing:
            what = type(call.mask).__name__ if call.mask is not None else "the call"
            out.append(f"{what} needs {', '.join(sorted(missing))} "
                       f"(supported: {', '.join(sorted(self.served())) or 'no mask'})")
        if call.heads_q != call.heads_kv and not self.gqa:
            out.append(f"GQA/MQA (Hq={call.heads_q}, Hkv={call.heads_kv}) is not supported")
        if call.return_lse and not self.lse:
            out.append("return_lse=True is not supported")
        if call.requires_grad and dev in self.devices and not self.autograd_on(dev):
            where = sorted(self.autograd & self.devices) if not isinstance(self.autograd, bool) else []
            out.append(f"autograd (inputs require grad) on device={dev} (supported: {', '.join(where)})" if where
                       else "autograd (inputs require grad) is not supported")
        if call.head_dim_v != call.head_dim and not self.head_dim_v_differs:
            out.append(f"head_dim_v={call.head_dim_v} != head_dim={call.head_dim} is not supported")
        return out


class Backend:
    """Base class. Subclasses set ``name``, ``capabilities`` and implement ``forward``."""

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: which implementation runs (e.g. "flash-attn 2.8.3"); shown by ``attnlib info``
    implementation: str = ""
    #: True when the returned LSE is differentiable (its gradient reaches q and k); otherwise the dispatch
    #: differentiates the LSE with :meth:`backward`
    lse_has_gradient: ClassVar[bool] = False

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run in this process at all (package missing...); None if it can."""
        return None

    def extra_reasons(self, call: AttentionCall) -> list[str]:
        """Call-specific limits the capability table cannot express."""
        return []

    def run_probes(self) -> None:
        """Run (and cache) every environment probe ``why_not`` may consult, outside any compiled region.
        Backends whose ``extra_reasons`` consult more probes than ``unavailable_reason`` extend it."""
        self.unavailable_reason()

    def why_not(self, call: AttentionCall) -> list[str]:
        """Sentences saying why this backend cannot serve ``call``; empty means it can. Call-specific limits
        are asked of each part the dispatch hands the forward (:func:`native_parts`)."""
        env = self.unavailable_reason()
        if env:
            return [env]
        out = self.capabilities.reasons(call)
        if out:
            return out
        for part in native_parts(call, self.capabilities):
            for r in self.extra_reasons(part):
                if r not in out:
                    out.append(r)
        return out

    def forward(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(out [B, Sq, Hq, Dv], lse float32 [B, Hq, Sq] or None)``; ``lse`` is None unless
        ``call.return_lse``. Only plans whose features are in ``capabilities.features`` arrive here."""
        raise NotImplementedError

    def backward(self, call: AttentionCall, out: torch.Tensor, lse: torch.Tensor, dout, dlse):
        """Fused backward from the saved output and LSE: ``(dq, dk, dv)`` of ``call``'s keys for
        ``dout``/``dlse`` (either may be None), where ``out``/``lse`` may be the merge of several calls
        (the ring, multi-tile plans) and include sinks. Return ``NotImplemented`` to use the reference
        formula (:func:`attnlib.reference.attention_backward`, float32 in chunks)."""
        return NotImplemented

    def __repr__(self):
        return f"<attnlib backend {self.name!r}>"


def native_parts(call: AttentionCall, caps: Capabilities) -> list[AttentionCall]:
    """The calls the dispatch hands a backend's ``forward`` for ``call``: paged keys gathered unless it lists
    ``paged`` (the plan then has contiguous keys), one call per layer of a multi-tile plan unless it lists
    ``multi_tile``, sinks left out (and applied through the LSE) unless it lists ``sinks``. The one place
    this rule lives: the dispatch and ``why_not`` both read it."""
    plan = call.plan
    if gathers(plan, caps):         # the gathered call, with stand-ins for the logical keys
        plan = plan.with_call(plan.mods, None)
        call = call.replace(plan=plan, k=_stand_in(call.k, plan.seqlen_k), v=_stand_in(call.v, plan.seqlen_k))
    if plan.key_valid is not None and plan.packed:
        batch = as_batch(call)
        if batch is not None:
            call, plan = batch, batch.plan
    feats = plan.features
    layered = "multi_tile" in feats and "multi_tile" not in caps.features
    sinks_here = plan.mods.sinks is not None and (layered or "sinks" not in caps.features)
    if layered:
        plans = plan.layers()
    elif sinks_here:
        plans = (plan.with_call(plan.mods.without_sinks(), plan.kv),)
    else:
        return [call] if plan is call.plan else [call.replace(plan=plan)]
    return [call.replace(plan=p, return_lse=True) for p in plans]


def _stand_in(pool: torch.Tensor, seqlen_k: int) -> torch.Tensor:
    """A ``[1, Sk, Hkv, D]`` stand-in (stride 0, no memory) for the keys gathered from ``pool``."""
    return pool.new_empty(()).expand(1, seqlen_k, *pool.shape[2:])


def as_batch(call: AttentionCall) -> AttentionCall | None:
    """A packed call with a key mask whose sequences all have one shape (one run of equal tiles over
    every query and key, e.g. the windows of ``BlockDiagonal.from_device_lengths``) as a batch of those
    sequences: kernels take the key mask per sequence instead of a ``[Tq, Tk]`` grid. None otherwise.
    The dispatch runs it; ``why_not`` asks the backend about it."""
    plan = call.plan
    if plan.max_runs != 1 or len(plan.runs()) != 1:
        return None
    q0, k0, n, step, tile = plan.runs()[0]
    if (q0, k0) != (0, 0) or step != tile.k_len or n * tile.q_len != call.seqlen_q or n * step != call.seqlen_k:
        return None
    q = call.q.reshape(n, tile.q_len, *call.q.shape[2:])
    k, v = (x.reshape(n, tile.k_len, *x.shape[2:]) for x in (call.k, call.v))
    mods = plan.modifiers
    if mods is not None and mods.alibi is not None and mods.alibi.dim() == 2:     # [1, Hq]: one row per sequence
        mods = Modifiers(mods.softcap, mods.alibi.expand(n, -1), mods.sinks)
    sub = replace(tile_plan(tile), key_valid=plan.key_valid.reshape(n, tile.k_len), modifiers=mods)
    return call.replace(q=q, k=k, v=v, plan=sub, batch=n, seqlen_q=tile.q_len, seqlen_k=tile.k_len, thd=False)


def gathers(plan, caps: Capabilities) -> bool:
    """The dispatch gathers the paged keys of ``plan`` for this backend: it does not list ``paged``, or the
    key lengths live on the device (``PagedKv.kv_seqused``: right-aligned windows, served by the gather)."""
    kv = plan.kv
    return kv is not None and ("paged" not in caps.features or kv.kv_seqused is not None)


class PlaceholderBackend(Backend):
    """A registered name whose implementation is not built yet: it resolves and falls back cleanly."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self._reason = reason

    def unavailable_reason(self) -> str | None:
        return self._reason

    def forward(self, call):  # pragma: no cover - never selected
        raise RuntimeError(self._reason)
