"""Pure tensor/Python lowering shared by the ``flash`` and ``xformers`` backends.

Nothing here imports flash-attn or xformers: every function turns an attnlib mask into the
arguments those libraries take (window sizes, cu_seqlens, unpadded keys, attn_bias specs, additive
bias tensors) and is unit-tested on the CPU.

Conventions recalled (``off = Sk - Sq``; query ``i``, key ``j`` inside one sequence):

- flash-attn ``window_size=(left, right)``: ``i + off - left <= j <= i + off + right``, ``-1`` meaning
  unlimited; ``causal=True`` forces ``right = 0``. attnlib ``Causal(window=W)`` is ``(W - 1, 0)``.
- xformers ``...FromBottomRight...LocalAttention...(W)``: ``i + off - W < j <= i + off`` (same W).
- xformers ``BlockDiagonalCausalFromBottomRightMask`` rejects blocks with fewer keys than queries;
  attnlib drops those leading query rows (they see no key and return 0) before the call instead.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from ..masks import BlockDiagonal, Causal, DenseMask, KeyPadding

_NEG_INF = float("-inf")

__all__ = [
    "round_up", "flash_window_size", "FlashCausalPlan", "flash_causal_plan", "KeyPaddingVarlen",
    "lower_key_padding", "unpad_keys", "pad_keys", "varlen_lse_to_dense", "uniform_cu_seqlens",
    "pad_head_dims", "XformersBiasSpec", "xformers_bias_spec", "kept_query_index", "additive_bias",
    "xformers_dense_lse", "xformers_varlen_lse", "bias_alignment",
]


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# ---------------------------------------------------------------------------------------------
# flash-attn: causal / window
# ---------------------------------------------------------------------------------------------
def flash_window_size(window: Optional[int]) -> tuple[int, int]:
    """attnlib ``window=W`` (the W newest keys, diagonal included) -> flash-attn ``(W - 1, 0)``."""
    return (-1, -1) if window is None else (window - 1, 0)


@dataclass(frozen=True)
class FlashCausalPlan:
    """How a dense call with ``mask`` (None or Causal) runs on flash-attn's bottom-right kernel.

    ``key_stop``: only ``k[:, :key_stop]`` takes part (top-left with ``Sk > Sq``: later keys are never
    visible, and truncating them makes top-left equal bottom-right). ``reason``: not expressible.
    """

    causal: bool = False
    window_size: tuple = (-1, -1)
    key_stop: Optional[int] = None
    reason: Optional[str] = None


def flash_causal_plan(mask, seqlen_q: int, seqlen_k: int) -> FlashCausalPlan:
    if mask is None:
        return FlashCausalPlan()
    if not isinstance(mask, Causal):
        raise TypeError(f"flash_causal_plan takes None or Causal, got {type(mask).__name__}")
    win = flash_window_size(mask.window)
    if not mask.top_left or seqlen_q == seqlen_k:
        return FlashCausalPlan(True, win)
    if seqlen_k > seqlen_q:
        return FlashCausalPlan(True, win, key_stop=seqlen_q)
    return FlashCausalPlan(reason=(
        f"Causal(align='top_left') with more queries ({seqlen_q}) than keys ({seqlen_k}) cannot be expressed "
        "with flash-attn's bottom-right causal/window_size; use sdpa, xformers or flex"))


# ---------------------------------------------------------------------------------------------
# KeyPadding -> varlen over keys (queries are never dropped)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyPaddingVarlen:
    """Varlen arguments for a dense call with ``KeyPadding``: batch row ``b`` is one sequence.

    ``key_index`` (int64 ``[Tk]``) gathers the valid keys of ``k.reshape(B * Sk, ...)`` in order (any
    pattern: left, right, holes); queries are packed as ``q.reshape(B * Sq, ...)``, so
    ``cu_seqlens_q = [0, Sq, 2 Sq, ...]``. ``max_seqlen_k`` is ``Sk``, an upper bound known without a
    device sync. ``empty_rows`` (bool ``[B]``): batch rows with no valid key (output 0, LSE -inf).
    """

    key_index: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    empty_rows: torch.Tensor


def uniform_cu_seqlens(batch: int, seqlen: int, device) -> torch.Tensor:
    """int32 ``[0, S, 2S, ..., B*S]`` on ``device`` (cached; no sync)."""
    return _uniform_cu(batch, seqlen, str(torch.device(device)))


@functools.lru_cache(maxsize=256)
def _uniform_cu(batch: int, seqlen: int, device: str) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)[: batch + 1]


def lower_key_padding(valid: torch.Tensor, seqlen_q: int) -> KeyPaddingVarlen:
    """``valid`` bool ``[B, Sk]`` -> varlen arguments. One device sync (the number of valid keys)."""
    if valid.dtype != torch.bool or valid.dim() != 2:
        raise TypeError(f"valid must be a bool [B, Sk] tensor, got {valid.dtype} {tuple(valid.shape)}")
    batch, seqlen_k = valid.shape
    key_index = valid.reshape(-1).nonzero().squeeze(1)
    counts = valid.sum(dim=1, dtype=torch.int32)
    cu_k = torch.zeros(batch + 1, dtype=torch.int32, device=valid.device)
    cu_k[1:] = torch.cumsum(counts, 0, dtype=torch.int32)
    return KeyPaddingVarlen(key_index, uniform_cu_seqlens(batch, seqlen_q, valid.device), cu_k,
                            seqlen_q, seqlen_k, counts == 0)


def unpad_keys(x: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
    """``x [B, Sk, H, D]`` -> the valid keys packed ``[Tk, H, D]`` (a gather; differentiable)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).index_select(0, key_index)


def pad_keys(packed: torch.Tensor, key_index: torch.Tensor, batch: int, seqlen_k: int) -> torch.Tensor:
    """Inverse of :func:`unpad_keys`: ``[Tk, H, D]`` -> ``[B, Sk, H, D]`` with zeros at invalid keys."""
    out = packed.new_zeros(batch * seqlen_k, *packed.shape[1:])
    out = out.index_copy(0, key_index, packed)
    return out.view(batch, seqlen_k, *packed.shape[1:])


def varlen_lse_to_dense(lse: torch.Tensor, batch: int, seqlen_q: int) -> torch.Tensor:
    """Varlen LSE ``[H, B * Sq]`` of equal-length sequences -> dense ``[B, H, Sq]`` (a view)."""
    return lse.view(lse.shape[0], batch, seqlen_q).permute(1, 0, 2)


def pad_head_dims(q, k, v, multiple: int = 8):
    """Zero-pad head dims to one common size, a multiple of ``multiple`` (flash kernels need both).

    Zero columns in q/k change no score; zero columns in v add zero output columns (sliced off by the
    caller, who keeps the original ``Dv``). Returns ``(q, k, v)`` unchanged when nothing is needed.
    """
    d, dv = q.shape[-1], v.shape[-1]
    target = round_up(max(d, dv), multiple)
    if d == dv == target:
        return q, k, v
    pad = torch.nn.functional.pad
    if d != target:
        q, k = pad(q, (0, target - d)), pad(k, (0, target - d))
    if dv != target:
        v = pad(v, (0, target - dv))
    return q, k, v


# ---------------------------------------------------------------------------------------------
# xformers: attn_bias choice
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class XformersBiasSpec:
    """Which xformers ``attn_bias`` serves a mask, and how the call is reshaped around it.

    ``kind``: an exact ``xformers.ops.fmha.attn_bias`` class name, ``"none"`` (no bias), ``"tensor"``
    (a materialized additive bias, see :func:`additive_bias`) or ``"empty"`` (no query sees any key:
    output 0, LSE -inf, no kernel call). ``q_seqlens``/``kv_seqlens``/``window``: constructor arguments.
    Dense calls run on ``q[:, q_start:]`` and ``k[:, :key_stop]``; packed calls on the query rows
    listed by ``kept_queries`` (``(start, count)`` runs; None = all): the dropped rows see no key.
    """

    kind: str
    q_seqlens: Optional[tuple] = None
    kv_seqlens: Optional[tuple] = None
    window: Optional[int] = None
    q_start: int = 0
    key_stop: Optional[int] = None
    kept_queries: Optional[tuple] = None


def xformers_bias_spec(mask, seqlen_q: int, seqlen_k: int) -> XformersBiasSpec:
    """Choose the attn_bias for ``mask`` on a call with ``Sq``/``Sk`` (totals for BlockDiagonal)."""
    if isinstance(mask, BlockDiagonal):
        return _block_diagonal_spec(mask)
    if seqlen_q == 0 or seqlen_k == 0:
        return XformersBiasSpec("empty")
    if mask is None:
        return XformersBiasSpec("none")
    if isinstance(mask, (KeyPadding, DenseMask)):
        return XformersBiasSpec("tensor")
    if not isinstance(mask, Causal):
        raise TypeError(f"no xformers lowering for {type(mask).__name__}")
    key_stop = None
    if mask.top_left and seqlen_k > seqlen_q:
        key_stop = seqlen_k = seqlen_q            # later keys are never visible: now bottom-right == top-left
    elif mask.top_left and seqlen_q > seqlen_k:
        if mask.window is None:
            return XformersBiasSpec("LowerTriangularMask")      # xformers' own causal mask is top-left
        return XformersBiasSpec("tensor")
    q_start = max(0, seqlen_q - seqlen_k)       # bottom-right: these leading rows see no key
    sq = seqlen_q - q_start
    if mask.window is not None:
        return XformersBiasSpec("LowerTriangularFromBottomRightLocalAttentionMask", window=mask.window,
                                q_start=q_start, key_stop=key_stop)
    kind = "LowerTriangularMask" if sq == seqlen_k else "LowerTriangularFromBottomRightMask"
    return XformersBiasSpec(kind, q_start=q_start, key_stop=key_stop)


@functools.lru_cache(maxsize=1024)
def _block_diagonal_spec(mask: BlockDiagonal) -> XformersBiasSpec:
    kept, runs, start = [], [], 0
    for lq, lk in zip(mask.q_seqlens, mask.kv_seqlens):
        keep = min(lq, lk) if mask.causal else (lq if lk > 0 else 0)
        kept.append(keep)
        if keep:
            runs.append((start + lq - keep, keep))   # causal: the last `keep` rows see keys
        start += lq
    if sum(kept) == 0:
        return XformersBiasSpec("empty")
    dropped = tuple(kept) != mask.q_seqlens
    if not mask.causal:
        kind = "BlockDiagonalMask"
    elif mask.window is None:
        kind = "BlockDiagonalCausalFromBottomRightMask"
    else:
        kind = "BlockDiagonalCausalLocalAttentionFromBottomRightMask"
    return XformersBiasSpec(kind, q_seqlens=tuple(kept), kv_seqlens=mask.kv_seqlens, window=mask.window,
                            kept_queries=_merge_runs(runs) if dropped else None)


def _merge_runs(runs):
    out = []
    for s, n in runs:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((s, n))
    return tuple(out)


def kept_query_index(kept_queries: tuple, device) -> torch.Tensor:
    """int64 index of the kept packed query rows (cached per device)."""
    return _kept_index(kept_queries, str(torch.device(device)))


@functools.lru_cache(maxsize=256)
def _kept_index(kept_queries: tuple, device: str) -> torch.Tensor:
    if not kept_queries:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(s, s + n) for s, n in kept_queries]).to(device)


def bias_alignment(dtype: torch.dtype) -> int:
    """xformers wants every bias stride but the last to be a multiple of 16 bytes (8 fp16/bf16 elements)."""
    return 128 // torch.finfo(dtype).bits


def additive_bias(mask, batch: int, heads: int, seqlen_q: int, seqlen_k: int, dtype: torch.dtype, device):
    """Materialize ``mask`` as an additive bias ``[B, H, Sq, Sk]`` laid out as xformers requires.

    Storage has its last dim padded to :func:`bias_alignment` and is sliced back to ``Sk``;
    broadcast axes are ``expand``-ed (stride 0), never copied. Rows with no visible key are
    *unmasked* (bias 0) so the kernel computes finite numbers, and reported as ``empty_rows``
    (bool, broadcastable to ``[B, H, Sq]``; None when there are none) for the caller to zero.
    """
    align = bias_alignment(dtype)
    if isinstance(mask, KeyPadding):
        valid = mask.valid.to(device)
        empty = ~valid.any(dim=-1)                                    # [B]
        keep = valid | empty.unsqueeze(-1)
        store = torch.zeros(batch, 1, 1, round_up(seqlen_k, align), dtype=dtype, device=device)
        store[..., :seqlen_k].masked_fill_(~keep[:, None, None, :], _NEG_INF)
        return (store[..., :seqlen_k].expand(batch, heads, seqlen_q, seqlen_k), empty[:, None, None])
    if isinstance(mask, DenseMask):
        m = mask.mask.to(device)
        while m.dim() < 4:
            m = m.unsqueeze(0)
        if mask.is_bool:
            visible = m
        else:
            visible = m > _NEG_INF
        empty = ~visible.any(dim=-1)                                   # [b?, h?, sq?]
        shape = list(m.shape)
        shape[-1] = round_up(seqlen_k, align)
        store = torch.zeros(shape, dtype=dtype, device=device)
        body = store[..., :seqlen_k]
        if mask.is_bool:
            body.masked_fill_(~(visible | empty.unsqueeze(-1)), _NEG_INF)
        else:
            body.copy_(torch.where(empty.unsqueeze(-1), torch.zeros((), dtype=m.dtype, device=device), m)
                       .expand(body.shape))
        return body.expand(batch, heads, seqlen_q, seqlen_k), empty
    if isinstance(mask, Causal):
        visible = mask.materialize(seqlen_q, seqlen_k, device=device)
        empty = ~visible.any(dim=-1)
        store = torch.zeros(seqlen_q, round_up(seqlen_k, align), dtype=dtype, device=device)
        store[:, :seqlen_k].masked_fill_(~(visible | empty.unsqueeze(-1)), _NEG_INF)
        return store[:, :seqlen_k].expand(batch, heads, seqlen_q, seqlen_k), empty
    raise TypeError(f"additive_bias cannot materialize {type(mask).__name__}")


def xformers_dense_lse(lse: torch.Tensor, heads: int, seqlen_q: int) -> torch.Tensor:
    """xformers dense LSE ``[B, H, M]`` or ``[B, G, H/G, M]`` (M may be padded) -> ``[B, H, Sq]``."""
    return lse.reshape(lse.shape[0], heads, lse.shape[-1])[..., :seqlen_q]


def xformers_varlen_lse(lse: torch.Tensor, q_seqlens: tuple, heads: int) -> torch.Tensor:
    """xformers varlen LSE -> ``[H, Tq]``.

    Packed operators (flash) return ``[1, H, >=Tq]``; padded ones (cutlass) ``[N, H, >=max_q]``, one
    row per block. With one block both read the same.
    """
    lse = lse.reshape(lse.shape[0], heads, lse.shape[-1])
    total = sum(q_seqlens)
    if lse.shape[0] == 1:
        return lse[0, :, :total]
    if lse.shape[0] != len(q_seqlens):
        raise ValueError(f"xformers LSE of shape {tuple(lse.shape)} matches neither packed [1, H, {total}] nor "
                         f"padded [{len(q_seqlens)}, H, max_q]")
    block, pos = _padded_lse_index(tuple(q_seqlens), str(lse.device))
    return lse[block, :, pos].transpose(0, 1)


@functools.lru_cache(maxsize=256)
def _padded_lse_index(q_seqlens: tuple, device: str):
    block = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(q_seqlens)])
    pos = torch.cat([torch.arange(n) for n in q_seqlens])
    return block.to(device), pos.to(device)
