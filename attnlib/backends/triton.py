"""``triton``: attnlib's own FlashAttention-2 style kernels (``attnlib_kernels.attention``).

One kernel family serves every mask natively, so no mask is ever materialized:

- ``Causal``: ``causal=True``, ``top_left`` for ``align="top_left"``, ``window`` as is.
- ``BlockDiagonal``: packed THD with the mask's cached ``cu_seqlens_q/k`` on q's device and its
  Python-int ``max_seqlen_q/k`` (no device sync); ``causal``/``window`` per block.
- ``KeyPadding``: ``key_valid`` ``[B, Sk]`` read by the kernel (with ``causal=True``: both).
- ``DenseMask``: not served (it is a materialized mask by definition); ``why_not`` says so.

Fully-masked key tiles (causal, window, other blocks) are skipped, not computed and discarded.
GQA reads kv head ``h // (Hq // Hkv)`` without expanding K/V. Autograd via the Triton backward.

Available on CUDA with triton, and on CPU only under ``TRITON_INTERPRET=1`` (slow: tests only).

Deterministic mode: with ``torch.use_deterministic_algorithms(True)`` or ``ATTNLIB_DETERMINISTIC=1``
the kernels use one fixed tile configuration per (device, head dims, dtype), which makes a
sequence's output bitwise identical whether it runs alone, padded in a batch, or packed with others
(see ``attnlib_kernels.attention``). The kernels never use atomics, so the backward is
deterministic in either mode.
"""
from __future__ import annotations

import os

import torch

from .. import settings
from ..caching import probe
from ..inputs import AttentionCall
from .base import Backend, Capabilities
from .common import run_tiles

_INTERPRET_HINT = "set TRITON_INTERPRET=1 before triton is imported to run the kernels on the CPU (slow)"


class TritonBackend(Backend):
    name = "triton"
    lse_has_gradient = True
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        max_head_dim=256,
        features=frozenset({"causal", "window", "block_diagonal", "key_padding"}),
        exact_empty_rows=True,
        isolates_padding=True,        # padded and other sequences' keys are never loaded
        isolates_sequences=True,
        propagates_nonfinite=True,    # (a causally hidden value still meets a zero weight in a masked tile)
    )
    implementation = "attnlib_kernels Triton FA2-style forward + backward"

    def unavailable_reason(self) -> str | None:
        return _environment_reason()

    def extra_reasons(self, call: AttentionCall) -> list[str]:
        out = []
        if call.device.type == "cpu" and not _interpreting():
            out.append(f"device=cpu needs the Triton interpreter; {_INTERPRET_HINT}")
        if call.device.type == "cuda" and _interpreting():
            out.append("TRITON_INTERPRET=1 is set: the kernels run interpreted on the CPU, not on cuda")
        if _lower(call.plan) is None:
            out.append(f"a plan the kernels cannot take ({_first_line(call.plan)}): they run one tile per sequence, "
                       "causal bottom-right or top-left")
        return out

    def forward(self, call: AttentionCall):
        from attnlib_kernels.attention import attention

        q, k, v = call.q, call.k, call.v
        kwargs = _lower(call.plan)
        if kwargs.get("tiles"):
            return run_tiles(call, self.forward)
        if kwargs.get("empty"):               # no row sees a key
            out = q.new_zeros(*q.shape[:-1], call.head_dim_v)
            return out, (torch.full((call.batch, call.heads_q, call.seqlen_q), float("-inf"), device=q.device)
                         if call.return_lse else None)
        if "cu_seqlens_q" in kwargs:
            vl = call.plan.varlen()
            cu_q, cu_k = vl.cu_on(q.device)
            kwargs = dict(kwargs, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
            out, lse = attention(q[0], k[0], v[0], scale=call.scale, return_lse=True,
                                 deterministic=deterministic_mode(), **kwargs)
            return out.unsqueeze(0), (lse.unsqueeze(0) if call.return_lse else None)
        out, lse = attention(q, k, v, scale=call.scale, return_lse=True, deterministic=deterministic_mode(), **kwargs)
        return out, (lse if call.return_lse else None)


def _first_line(plan) -> str:
    return plan.describe().splitlines()[0]


@probe
def _environment_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'attnlib[triton]')"
    if torch.cuda.is_available() or _interpreting():
        return None
    return f"no CUDA device; {_INTERPRET_HINT}"


def _interpreting() -> bool:
    return os.environ.get(settings.TRITON_INTERPRET, "0") == "1"


def deterministic_mode() -> bool:
    """True under ``torch.use_deterministic_algorithms(True)`` or ``ATTNLIB_DETERMINISTIC=1``."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get(settings.DETERMINISTIC, "0") == "1"


# ---------------------------------------------------------------------------------------------
# lowering, from the plan: keyword arguments of attnlib_kernels.attention.attention (None: not expressible)
# ---------------------------------------------------------------------------------------------
def _lower(plan) -> dict | None:
    if plan.dense is not None or plan.sparse is not None or plan.mods.any or plan.kv is not None:
        return None
    tile = plan.single
    if tile is not None and not plan.packed:
        kwargs = {}
        if tile.causal and not tile.full:
            if tile.bottom_right:
                kwargs = {"causal": True, "top_left": False, "window": tile.window}
            elif tile.offset == 0:
                kwargs = {"causal": True, "top_left": True, "window": tile.window}
            else:
                return None
        if plan.key_valid is not None:
            kwargs["key_valid"] = plan.key_valid
        return kwargs
    if not plan.tiles:
        return {"empty": True}
    if plan.key_valid is not None:
        return None
    vl = plan.varlen() if plan.packed else None
    if vl is None:          # one call per run of equal tiles, each tile on its own (a diagonal the kernels take)
        ok = all(t.full or not t.causal or t.bottom_right or t.offset == 0 for t in plan.tiles)
        return {"tiles": True} if ok else None
    return {"cu_seqlens_q": None, "cu_seqlens_k": None, "max_seqlen_q": vl.max_seqlen_q,
            "max_seqlen_k": vl.max_seqlen_k, "causal": vl.causal, "window": vl.window,
            "check_cu_seqlens": False}   # built from the plan's Python ints
