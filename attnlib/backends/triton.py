"""``triton``: attnlib's own FlashAttention-2 style kernels (``attnlib_kernels.attention``).

The kernels read the plan itself, so no mask is ever materialized and no plan is split into calls:

- the plan's groups and their key runs become a ``TileTable`` (query range + up to ``R`` runs of
  ``(k_start, k_len, offset, causal, window)``), built on the host once per plan structure and copied to the
  device once: ``Causal`` (any alignment, window, chunk, sink), ``BlockDiagonal`` (one group per sequence),
  restricted ring-step plans (any offsets), dense batches (the batch rows share the table);
- ``key_valid`` ``[B, Sk]`` is read by the kernels; ``BlockSparse`` layouts (host or device, per head or
  batch) become lists of the kernel tiles to visit, built on the device with torch ops (no host read);
- softcap, ALiBi and sinks are applied in the forward and backward kernels (gradients to ``sinks`` too);
- paged KV: the kernels read key ``j`` of request ``r`` through ``block_table`` (any page size up to
  ``MAX_PAGE_SIZE``); long decode calls split their keys (split-K) and merge by the LSE rule;
- ``DenseMask``: not served (it is a materialized mask by definition); ``why_not`` says so.

Tiles no query can see (causal, window, other sequences, unlisted blocks) are skipped, not computed and
discarded; whole visible tiles run without mask arithmetic. GQA reads kv head ``h // (Hq // Hkv)`` without
expanding K/V. Autograd via the Triton backward; ``backward`` serves ring attention's fused block gradients.

Available on CUDA with triton, and on CPU only under ``TRITON_INTERPRET=1`` (slow: tests only).

Deterministic mode: with ``torch.use_deterministic_algorithms(True)`` or ``ATTNLIB_DETERMINISTIC=1``
the kernels use one fixed tile configuration per (device, head dims, dtype) and no split-K, which makes a
sequence's output bitwise identical whether it runs alone, padded in a batch, or packed with others
(see ``attnlib_kernels.attention``). The kernels never use atomics, so the backward is deterministic in
either mode (paged key gradients add shared pages with ``index_put_``).
"""
from __future__ import annotations

import os

import torch

from .. import settings
from ..caching import host_lru, probe
from ..inputs import AttentionCall
from .base import Backend, Capabilities

_INTERPRET_HINT = "set TRITON_INTERPRET=1 before triton is imported to run the kernels on the CPU (slow)"


class TritonBackend(Backend):
    name = "triton"
    lse_has_gradient = True
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        max_head_dim=256,
        features=frozenset({"causal", "window", "multi_tile", "block_diagonal", "key_padding", "block_sparse",
                            "softcap", "alibi", "sinks", "paged"}),
        exact_empty_rows=True,
        # keys outside a row's runs (padding, other sequences, unread pages) are never read; inside a run, keys
        # no row of a tile sees load as 0 and hidden scores are -inf, but a non-finite value that one row of a
        # tile sees and another does not reaches both (as NaN): no isolates_hidden claim
        isolates_padding=True,
        isolates_sequences=True,
        propagates_nonfinite=True,
    )
    implementation = "attnlib_kernels Triton FA2-style forward + backward on tile tables"

    def unavailable_reason(self) -> str | None:
        return _environment_reason()

    def extra_reasons(self, call: AttentionCall) -> list[str]:
        from attnlib_kernels.attention import MAX_PAGE_SIZE

        out = []
        if call.device.type == "cpu" and not _interpreting():
            out.append(f"device=cpu needs the Triton interpreter; {_INTERPRET_HINT}")
        if call.device.type == "cuda" and _interpreting():
            out.append("TRITON_INTERPRET=1 is set: the kernels run interpreted on the CPU, not on cuda")
        plan = call.plan
        if plan.sparse is not None and len(plan.tiles) > 1:
            out.append(f"a block-sparse layout over a plan of {len(plan.tiles)} tiles: the kernels take block "
                       "layouts on one tile (BlockSparse and its restrictions)")
        if plan.kv is not None and plan.kv.page_size > MAX_PAGE_SIZE:
            out.append(f"page size {plan.kv.page_size} (supported: 1..{MAX_PAGE_SIZE})")
        return out

    def forward(self, call: AttentionCall):
        from attnlib_kernels.attention import attention_tiles

        out, lse = attention_tiles(call.q, call.k, call.v, tile_table(call.plan), scale=call.scale,
                                   return_lse=True, deterministic=deterministic_mode(), **_restrictions(call))
        return out, (lse if call.return_lse else None)

    def backward(self, call: AttentionCall, out, lse, dout, dlse):
        from attnlib_kernels.attention import attention_tiles_backward

        kw = _restrictions(call)
        kw.pop("sinks")       # the final LSE already holds them; their own gradient is the caller's
        return attention_tiles_backward(call.q, call.k, call.v, out, lse, dout, dlse, tile_table(call.plan),
                                        scale=call.scale, deterministic=deterministic_mode(), **kw)


def tile_table(plan):
    """The plan's ``attnlib_kernels.attention.TileTable`` (cached with the plan's structure)."""
    kv = plan.kv
    return plan.derived(("triton_tiles", None if kv is None else kv.kv_seqlens), _build_table)


def _build_table(plan):
    from attnlib_kernels.attention import TileTable

    groups = []           # the plan's groups, from its tiles (no plan cache is written while compiling)
    for t in plan.tiles:
        run = (t.k_start, t.k_len, t.offset, t.causal, t.window)
        if groups and groups[-1][:2] == (t.q_start, t.q_len):
            groups[-1][2].append(run)
        else:
            groups.append((t.q_start, t.q_len, [run]))
    kv = plan.kv
    return TileTable(plan.seqlen_q, plan.seqlen_k, groups, kv_seqlens=None if kv is None else kv.kv_seqlens)


def _restrictions(call: AttentionCall) -> dict:
    """Keyword arguments of ``attention_tiles`` for the plan's tensor restriction, modifiers and KV layout."""
    plan = call.plan
    mods = plan.mods
    kw = dict(key_valid=plan.key_valid, softcap=mods.softcap, alibi_slopes=mods.alibi, sinks=mods.sinks)
    if plan.sparse is not None:
        lay = plan.sparse
        layout = lay.layout if lay.layout.device == call.device else _layout_on(lay, str(call.device))
        kw["block_layout"] = (layout, lay.bq, lay.bk, lay.q_origin, lay.k_origin)
    if plan.kv is not None:
        kw["block_table"] = plan.kv.block_table
    return kw


@host_lru(16)
def _layout_on(lay, device: str) -> torch.Tensor:
    """A host block layout on the call's device (copied once per layout object)."""
    return lay.layout.to(device, non_blocking=True)


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
