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
from ..masks import BlockDiagonal
from .base import ALL_MASK_FEATURES, Backend, Capabilities

_INTERPRET_HINT = "set TRITON_INTERPRET=1 before triton is imported to run the kernels on the CPU (slow)"


class TritonBackend(Backend):
    name = "triton"
    lse_has_gradient = True
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        max_head_dim=256,
        masks=ALL_MASK_FEATURES - {"dense"},
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
        diagonal = _diagonal_reason(call.plan)
        if diagonal:
            out.append(diagonal)
        return out

    def forward(self, call: AttentionCall):
        from attnlib_kernels.attention import attention

        q, k, v = call.q, call.k, call.v
        kwargs = _lower(call)
        packed_rows = call.packed and not isinstance(call.mask, BlockDiagonal)
        if packed_rows:  # THD without a BlockDiagonal: one sequence, i.e. a batch of 1
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        out, lse = attention(q, k, v, scale=call.scale, return_lse=True, deterministic=deterministic_mode(),
                             **kwargs)
        if packed_rows:
            out, lse = out[0], lse[0]
        return out, (lse if call.return_lse else None)


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
# mask lowering, from the plan: keyword arguments of attnlib_kernels.attention.attention
# ---------------------------------------------------------------------------------------------
def _diagonal_reason(plan) -> str | None:
    """The kernels place the causal diagonal at ``Sk - Sq`` (bottom-right) or ``0`` (top-left), per block."""
    for b in plan.blocks:
        if b.causal and b.offset not in (b.k_len - b.q_len, 0):
            return (f"a causal block with diagonal offset {b.offset} ({b.q_len} queries x {b.k_len} keys): the "
                    "kernels place the diagonal bottom-right or top-left only")
        if b.causal and plan.packed and b.offset != b.k_len - b.q_len:
            return "packed blocks with a top-left diagonal: the kernels are bottom-right per block"
    return None


def _lower(call: AttentionCall) -> dict:
    plan = call.plan
    device = call.q.device
    if isinstance(call.mask, BlockDiagonal):
        mask = call.mask
        return {
            "cu_seqlens_q": mask.cu_seqlens_q_on(device),
            "cu_seqlens_k": mask.cu_seqlens_k_on(device),
            "max_seqlen_q": mask.max_seqlen_q,
            "max_seqlen_k": mask.max_seqlen_k,
            "causal": mask.causal,
            "window": mask.window,
            "check_cu_seqlens": False,  # built and checked by BlockDiagonal itself
        }
    if plan.dense is not None:
        raise TypeError("triton cannot lower a DenseMask (it is a materialized mask by definition): use Causal, "
                        "BlockDiagonal or KeyPadding, or another backend")
    block = plan.single
    kwargs = {}
    if block.causal:
        top_left = block.offset == 0 and block.k_len != block.q_len
        kwargs = {"causal": True, "top_left": top_left, "window": block.window}
    if plan.key_valid is not None:
        kwargs["key_valid"] = plan.key_valid
    return kwargs
