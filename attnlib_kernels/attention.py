"""attnlib's own attention kernels: one Triton kernel family for every attnlib mask.

``attention(q, k, v, scale=...)`` computes ``softmax(q k^T * scale + mask) v`` without ever
materializing a mask. Masks arrive as arguments:

* dense BSHD (``q [B, Sq, Hq, D]``, ``k [B, Sk, Hkv, D]``, ``v [B, Sk, Hkv, Dv]``) or packed THD
  (``q [Tq, Hq, D]``, ``k/v [Tk, Hkv, *]`` with ``cu_seqlens_q/k``: query block ``b`` =
  rows ``cu_q[b]:cu_q[b+1]`` sees only key rows ``cu_k[b]:cu_k[b+1]``);
* ``causal`` (bottom-right by default, ``top_left=True`` for ``j <= i``), ``window`` W;
* ``key_valid [B, Sk]`` (dense only): False hides key ``j`` of batch row ``b``.

Causal alignment, per batch row or packed block with ``Sq`` queries and ``Sk`` keys (``1`` = may
attend)::

    Sq=2, Sk=5, bottom-right (default)        Sq=2, Sk=5, top_left=True
        1 1 1 1 0                                 1 0 0 0 0
        1 1 1 1 1                                 1 1 0 0 0

    with window=2 (bottom-right): query i sees keys j with i + 3 - 2 < j <= i + 3
        0 0 1 1 0
        0 0 0 1 1

GQA/MQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``; K/V are never expanded.
A query row with no visible key gets output 0 and LSE ``-inf``.

Autograd: gradients for q, k, v (and through the returned LSE) come from the FA2-style backward
kernels in :mod:`attnlib_kernels._attn_bwd`; nothing is recomputed in PyTorch.

Determinism / batch invariance: every kernel in this family is deterministic (no atomics, no
split-k), and key tiles are aligned to each sequence's own start. With ``deterministic=True`` the
tile configuration depends only on (device kind, head dims, dtype) -- never on the batch or on
sequence lengths -- so one sequence's output and LSE are bitwise identical whether it runs alone,
right-padded in a dense batch with ``key_valid``, or packed with other sequences (e.g. CFG branches).
With ``deterministic=False`` the query tile may shrink for short queries (decode), which changes the
bits (not the accuracy) depending on the batch's longest query.

On CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before ``triton`` is imported).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["attention", "kernel_config", "triton_available", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


_TRITON_IMPORTABLE: list = []     # computed once: a plain value that torch.compile reads without tracing the import


def _triton_importable() -> bool:
    if not _TRITON_IMPORTABLE:
        try:
            import triton  # noqa: F401
            _TRITON_IMPORTABLE.append(True)
        except ImportError:
            _TRITON_IMPORTABLE.append(False)
    return _TRITON_IMPORTABLE[0]


def triton_available(device: torch.device | str | None = None) -> bool:
    """True when the kernels can run on ``device``: CUDA with triton, or CPU under the interpreter."""
    if not _triton_importable():
        return False
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type == "cuda":
        if torch.cuda.is_available():
            return True
    if dev is None or dev.type == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return False


# --------------------------------------------------------------------------------------------
# tile configurations
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel. ``block_q`` tiles queries, ``block_k`` keys."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


def _interpreted(device: torch.device) -> bool:
    return device.type != "cuda"


def kernel_config(kind: str, head_dim: int, head_dim_v: int, dtype: torch.dtype, device: torch.device,
                  *, max_seqlen_q: int | None = None, deterministic: bool = False) -> KernelConfig:
    """The tile configuration for ``kind`` in {"fwd", "bwd_dkdv", "bwd_dq", "bwd_pre"}.

    Depends only on the device kind, head dims and dtype; with ``deterministic=False`` the forward
    may also use a smaller query tile when ``max_seqlen_q`` is small (decode-like calls).
    Chosen by hand for H100-class GPUs (sm_90; also valid on sm_80): no autotuning, so a config is
    reproducible and batch invariance holds.
    """
    if _interpreted(device):
        # interpreter: tiny tiles keep the numpy emulation fast and exercise multi-tile paths
        return KernelConfig(16, 16, 1, 1)
    if kind not in _CONFIGS:
        raise ValueError(f"unknown kernel kind {kind!r}")
    d = max(head_dim, head_dim_v)
    wide = dtype == torch.float32  # fp32 tiles take twice the shared memory / registers
    table = _CONFIGS[kind][1 if wide else 0]
    cfg = next(c for limit, c in table if d <= limit)
    if kind == "fwd" and not deterministic and max_seqlen_q is not None and max_seqlen_q <= 64 and cfg.block_q > 64:
        cfg = KernelConfig(64, cfg.block_k, cfg.num_warps, cfg.num_stages)
    return cfg


_K = KernelConfig
#: (block_q, block_k, warps, stages) per kind, per (fp16/bf16, fp32), per head-dim bucket ``(max d, config)``;
#: checked with the sm_90 compile check of bench/bench_triton_attention.py (--compile-check) for shared
#: memory and register spills. fwd / bwd_dq: block_q query rows per program, block_k key rows per step;
#: bwd_dkdv: block_k key rows per program, block_q query rows per step.
_CONFIGS = {
    "fwd": (((128, _K(128, 64, 8, 3)), (MAX_HEAD_DIM, _K(64, 32, 8, 2))),
            ((64, _K(32, 32, 4, 1)), (MAX_HEAD_DIM, _K(16, 16, 4, 1)))),
    "bwd_dkdv": (((64, _K(32, 128, 8, 2)), (128, _K(32, 64, 8, 1)), (MAX_HEAD_DIM, _K(32, 32, 8, 1))),
                 ((128, _K(16, 32, 4, 1)), (MAX_HEAD_DIM, _K(16, 16, 4, 1)))),
    "bwd_dq": (((64, _K(128, 64, 8, 2)), (128, _K(64, 32, 8, 2)), (MAX_HEAD_DIM, _K(32, 32, 8, 1))),
               ((64, _K(32, 16, 4, 1)), (MAX_HEAD_DIM, _K(16, 16, 4, 1)))),
    "bwd_pre": (((128, _K(64, 16, 4, 1)), (MAX_HEAD_DIM, _K(32, 16, 4, 1))),) * 2,
}


# Configs that failed to launch for lack of shared memory are replaced by smaller ones once, then
# remembered, so every later call with the same key uses the same (deterministic) config.
_CONFIG_OVERRIDES: dict[tuple, KernelConfig] = {}


def _launch(kernel, grid_fn, cfg_key: tuple, cfg: KernelConfig, args: tuple, kwargs: dict):
    cfg = _CONFIG_OVERRIDES.get(cfg_key, cfg)
    while True:
        try:
            kernel[grid_fn(cfg)](*args, **kwargs, BLOCK_Q=cfg.block_q, BLOCK_K=cfg.block_k,
                                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            return
        except Exception as exc:  # triton.runtime.errors.OutOfResources on small-smem GPUs
            if type(exc).__name__ != "OutOfResources":
                raise
            if cfg.num_stages > 1:
                cfg = KernelConfig(cfg.block_q, cfg.block_k, cfg.num_warps, cfg.num_stages - 1)
            elif max(cfg.block_q, cfg.block_k) > 16:
                if cfg.block_q >= cfg.block_k:
                    cfg = KernelConfig(cfg.block_q // 2, cfg.block_k, cfg.num_warps, 1)
                else:
                    cfg = KernelConfig(cfg.block_q, cfg.block_k // 2, cfg.num_warps, 1)
            else:
                raise
            _CONFIG_OVERRIDES[cfg_key] = cfg


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  causal, top_left, window, key_valid, check_cu_seqlens):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype={t.dtype} is not supported; use float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float, got {scale}; the usual value is head_dim ** -0.5")

    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if packed:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("packed mode needs both cu_seqlens_q and cu_seqlens_k (pass the same tensor "
                             "twice for self-attention)")
        if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
            raise ValueError(f"packed (cu_seqlens) mode needs q [Tq, Hq, D], k/v [Tk, Hkv, D]; got ranks "
                             f"{q.dim()}, {k.dim()}, {v.dim()}")
        if key_valid is not None:
            raise ValueError("key_valid is for dense [B, S, H, D] inputs; in packed mode give each sequence "
                             "its true length through cu_seqlens instead")
    else:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"dense mode needs q [B, Sq, Hq, D], k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv]; got "
                             f"ranks {q.dim()}, {k.dim()}, {v.dim()} (for packed [T, H, D] pass cu_seqlens_q/k)")
        if not (q.shape[0] == k.shape[0] == v.shape[0]):
            raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    hq, d = q.shape[-2], q.shape[-1]
    hkv, dk = k.shape[-2], k.shape[-1]
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in all but the last dim")
    if d != dk:
        raise ValueError(f"q head dim {d} != k head dim {dk}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"Hq={hq} must be a multiple of Hkv={hkv} (GQA/MQA)")
    dv = v.shape[-1]
    for name, n in (("q/k head dim", d), ("v head dim", dv)):
        if not 1 <= n <= MAX_HEAD_DIM:
            raise ValueError(f"{name} {n} is not supported by the triton kernels (1..{MAX_HEAD_DIM})")

    n_rows = (cu_seqlens_q.numel() - 1) if packed and isinstance(cu_seqlens_q, torch.Tensor) else q.shape[0]
    if hq > 65535 or n_rows > 65535:
        raise ValueError(f"{'blocks' if packed else 'batch'}={n_rows}, Hq={hq}: the kernels launch one grid row per "
                         "batch row / block and per head, at most 65535 each; split the call")
    if top_left and not causal:
        raise ValueError("top_left=True selects the causal alignment; it needs causal=True")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"window must be a Python int or None, got {type(window).__name__}")
        if not causal:
            raise ValueError("window needs causal=True (it is the causal sliding window of the W newest keys)")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")

    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m is not None and (isinstance(m, bool) or not isinstance(m, int)):
            raise TypeError(f"{name} must be a Python int (no device sync), got {type(m).__name__}")

    if packed:
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if not isinstance(cu, torch.Tensor):
                raise TypeError(f"{name} must be an int32 tensor, got {type(cu).__name__}")
            if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 2:
                raise ValueError(f"{name} must be a 1-D int32 tensor [N + 1], got dtype={cu.dtype} "
                                 f"shape={tuple(cu.shape)}")
            if cu.device != q.device:
                raise ValueError(f"{name} is on {cu.device} but q is on {q.device}; move it to q's device")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel() - 1} blocks but cu_seqlens_k has "
                             f"{cu_seqlens_k.numel() - 1}")
        if check_cu_seqlens:
            for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]),
                                    ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
                c = cu.detach().to("cpu", torch.int64)
                if int(c[0]) != 0 or bool((c[1:] < c[:-1]).any()):
                    raise ValueError(f"{name} must start at 0 and be non-decreasing, got {c.tolist()}")
                if int(c[-1]) != total:
                    raise ValueError(f"{name} ends at {int(c[-1])} but the tensor has {total} tokens; "
                                     "the sequence lengths must sum to the token count")
                longest = int((c[1:] - c[:-1]).max())
                given = max_seqlen_q if name == "cu_seqlens_q" else max_seqlen_k
                if given is not None and given < longest:
                    raise ValueError(f"max_seqlen_{name[-1]}={given} is shorter than the longest block "
                                     f"({longest}) in {name}")
    if key_valid is not None:
        if not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool:
            raise TypeError("key_valid must be a bool tensor [B, Sk] (True = key may be seen)")
        if tuple(key_valid.shape) != (q.shape[0], k.shape[1]):
            raise ValueError(f"key_valid has shape {tuple(key_valid.shape)}, expected [B, Sk] = "
                             f"{[q.shape[0], k.shape[1]]}")
        if key_valid.device != q.device:
            raise ValueError(f"key_valid is on {key_valid.device} but q is on {q.device}; move it to q's device")
    if not triton_available(q.device):
        raise RuntimeError(f"the triton attention kernels cannot run on {q.device}: they need CUDA with triton, "
                           "or TRITON_INTERPRET=1 set before triton is imported (CPU)")


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------------------------
# launches
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Meta:
    """Everything about a call that is not a tensor (kept by autograd for the backward)."""

    scale: float
    packed: bool
    n_blocks: int
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    top_left: bool
    window: int | None
    deterministic: bool


def _pow2(n: int) -> int:
    """Head-dim tile: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (max(1, n) - 1).bit_length())


def _strides3(t, packed):
    """(batch, seq, head) strides of a BSHD tensor, or (0, token, head) of a THD tensor."""
    if packed:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(lse, packed):
    if packed:  # [Hq, Tq]
        return 0, lse.stride(0)
    return lse.stride(0), lse.stride(1)  # [B, Hq, Sq]


def _common_flags(meta: _Meta, key_valid):
    return dict(IS_VARLEN=meta.packed, CAUSAL=meta.causal, TOP_LEFT=meta.top_left,
                HAS_WINDOW=meta.window is not None, HAS_KEY_VALID=key_valid is not None)


_DUMMIES: dict[tuple, torch.Tensor] = {}


def _dummy(device, dtype=torch.int32):
    """A 1-element placeholder for pointer arguments a kernel variant never reads (cached: no launch)."""
    key = (str(device), dtype)
    t = _DUMMIES.get(key)
    if t is None:
        t = _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return t


def _forward(q, k, v, cu_q, cu_k, key_valid, meta: _Meta):
    import triton

    from attnlib_kernels._attn_fwd import _attn_fwd_kernel

    hq, d = q.shape[-2], q.shape[-1]
    hkv, dv = k.shape[-2], v.shape[-1]
    out = torch.empty(q.shape[:-1] + (dv,), dtype=q.dtype, device=q.device)
    if meta.packed:
        lse = torch.empty((hq, q.shape[0]), dtype=torch.float32, device=q.device)
        seqlen_q, seqlen_k = 0, 0
    else:
        lse = torch.empty((q.shape[0], hq, q.shape[1]), dtype=torch.float32, device=q.device)
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    cfg = kernel_config("fwd", d, dv, q.dtype, q.device, max_seqlen_q=meta.max_seqlen_q,
                        deterministic=meta.deterministic)
    kvm = key_valid.view(torch.int8) if key_valid is not None else _dummy(q.device, torch.int8)
    stride_mb = kvm.stride(0) if key_valid is not None else 0
    cu_q = cu_q if cu_q is not None else _dummy(q.device)
    cu_k = cu_k if cu_k is not None else _dummy(q.device)
    args = (q, k, v, out, lse, kvm, cu_q, cu_k,
            *_strides3(q, meta.packed), *_strides3(k, meta.packed), *_strides3(v, meta.packed),
            *_strides3(out, meta.packed), *_lse_strides(lse, meta.packed), stride_mb,
            seqlen_q, seqlen_k, meta.scale * _LOG2E, meta.window or 0)
    kwargs = dict(GROUP=hq // hkv, D=d, DV=dv, **_common_flags(meta, key_valid),
                  BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv), IEEE=q.dtype == torch.float32)
    key = ("fwd", q.device.type, d, dv, q.dtype, cfg)
    _launch(_attn_fwd_kernel, lambda c: (triton.cdiv(meta.max_seqlen_q, c.block_q), hq, meta.n_blocks),
            key, cfg, args, kwargs)
    return out, lse


def _backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, key_valid, meta: _Meta):
    import triton

    from attnlib_kernels._attn_bwd import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess

    hq, d = q.shape[-2], q.shape[-1]
    hkv, dv = k.shape[-2], v.shape[-1]
    dout = _last_dim_contiguous(dout)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dvv = torch.empty_like(v, memory_format=torch.contiguous_format)
    seqlen_q, seqlen_k = (0, 0) if meta.packed else (q.shape[1], k.shape[1])
    flags = _common_flags(meta, key_valid)
    ieee = q.dtype == torch.float32
    bd, bdv = _pow2(d), _pow2(dv)
    kvm = key_valid.view(torch.int8) if key_valid is not None else _dummy(q.device, torch.int8)
    stride_mb = kvm.stride(0) if key_valid is not None else 0
    cu_q = cu_q if cu_q is not None else _dummy(q.device)
    cu_k = cu_k if cu_k is not None else _dummy(q.device)
    lse_strides = _lse_strides(lse, meta.packed)

    # 1. delta = rowsum(dO * O) - dLSE
    delta = torch.empty_like(lse)
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    cfg = kernel_config("bwd_pre", d, dv, q.dtype, q.device)
    _attn_bwd_preprocess[(triton.cdiv(meta.max_seqlen_q, cfg.block_q), hq, meta.n_blocks)](
        out, dout, dlse if dlse is not None else delta, delta, cu_q,
        *_strides3(out, meta.packed), *_strides3(dout, meta.packed), *lse_strides, seqlen_q,
        DV=dv, IS_VARLEN=meta.packed, HAS_DLSE=dlse is not None, BLOCK_Q=cfg.block_q, BLOCK_DV=bdv,
        num_warps=cfg.num_warps)

    common = (meta.scale * _LOG2E, meta.scale, meta.window or 0)
    # 2. dK, dV: one program per (key tile, kv head), summing its GQA group in registers
    cfg = kernel_config("bwd_dkdv", d, dv, q.dtype, q.device)
    args = (q, k, v, dout, lse, delta, dk, dvv, kvm, cu_q, cu_k,
            *_strides3(q, meta.packed), *_strides3(k, meta.packed), *_strides3(v, meta.packed),
            *_strides3(dout, meta.packed), *_strides3(dk, meta.packed), *_strides3(dvv, meta.packed),
            *lse_strides, stride_mb, seqlen_q, seqlen_k, *common)
    kwargs = dict(GROUP=hq // hkv, D=d, DV=dv, **flags, BLOCK_D=bd, BLOCK_DV=bdv, IEEE=ieee)
    _launch(_attn_bwd_dkdv_kernel, lambda c: (triton.cdiv(meta.max_seqlen_k, c.block_k), hkv, meta.n_blocks),
            ("bwd_dkdv", q.device.type, d, dv, q.dtype, cfg), cfg, args, kwargs)
    # 3. dQ: one program per (query tile, query head)
    cfg = kernel_config("bwd_dq", d, dv, q.dtype, q.device)
    args = (q, k, v, dout, lse, delta, dq, kvm, cu_q, cu_k,
            *_strides3(q, meta.packed), *_strides3(k, meta.packed), *_strides3(v, meta.packed),
            *_strides3(dout, meta.packed), *_strides3(dq, meta.packed),
            *lse_strides, stride_mb, seqlen_q, seqlen_k, *common)
    _launch(_attn_bwd_dq_kernel, lambda c: (triton.cdiv(meta.max_seqlen_q, c.block_q), hq, meta.n_blocks),
            ("bwd_dq", q.device.type, d, dv, q.dtype, cfg), cfg, args, kwargs)
    return dq, dk, dvv


# --------------------------------------------------------------------------------------------
# the kernels as torch.library custom ops: torch.compile / torch.export see one opaque node per call
# (shapes from the fake implementations), autograd through the backward op
# --------------------------------------------------------------------------------------------
def _meta(scale, packed, n_blocks, max_seqlen_q, max_seqlen_k, causal, top_left, window, deterministic) -> _Meta:
    return _Meta(scale=scale, packed=packed, n_blocks=n_blocks, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                 causal=causal, top_left=top_left, window=None if window < 0 else window, deterministic=deterministic)


@torch.library.custom_op("attnlib::triton_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: Optional[torch.Tensor],
            cu_k: Optional[torch.Tensor], key_valid: Optional[torch.Tensor], scale: float, packed: bool, n_blocks: int,
            max_seqlen_q: int, max_seqlen_k: int, causal: bool, top_left: bool, window: int,
            deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``; ``window`` -1 means none (custom-op schemas take plain ints)."""
    meta = _meta(scale, packed, n_blocks, max_seqlen_q, max_seqlen_k, causal, top_left, window, deterministic)
    return _forward(q, k, v, cu_q, cu_k, key_valid, meta)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, cu_q, cu_k, key_valid, scale, packed, n_blocks, max_seqlen_q, max_seqlen_k, causal, top_left,
              window, deterministic):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    lse_shape = (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])
    return out, q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("attnlib::triton_attention_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, cu_q: Optional[torch.Tensor], cu_k: Optional[torch.Tensor],
            key_valid: Optional[torch.Tensor], scale: float, packed: bool, n_blocks: int, max_seqlen_q: int,
            max_seqlen_k: int, causal: bool, top_left: bool, window: int,
            deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    meta = _meta(scale, packed, n_blocks, max_seqlen_q, max_seqlen_k, causal, top_left, window, deterministic)
    return _backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, key_valid, meta)


@_bwd_op.register_fake
def _bwd_fake(dout, dlse, q, k, v, out, lse, cu_q, cu_k, key_valid, *meta):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


_META_ARGS = ("scale", "packed", "n_blocks", "max_seqlen_q", "max_seqlen_k", "causal", "top_left", "window",
              "deterministic")


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, key_valid, *meta = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, key_valid)
    ctx.meta = tuple(meta)
    ctx.mark_non_differentiable(*(t for t in (cu_q, cu_k, key_valid) if t is not None))


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, key_valid = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _bwd_op(dout, dlse, q, k, v, out, lse, cu_q, cu_k, key_valid, *ctx.meta)
    return (dq, dk, dv) + (None,) * (3 + len(_META_ARGS))


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def attention(q, k, v, *, scale: float,
              cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
              causal: bool = False, top_left: bool = False,
              window: int | None = None,
              key_valid=None,
              return_lse: bool = False,
              deterministic: bool = False,
              check_cu_seqlens: bool = True):
    """Attention with masks as arguments; returns ``out`` or ``(out, lse)``.

    Args:
        q, k, v: dense ``[B, Sq, Hq, D]``, ``[B, Sk, Hkv, D]``, ``[B, Sk, Hkv, Dv]`` or packed
            ``[Tq, Hq, D]``, ``[Tk, Hkv, D]``, ``[Tk, Hkv, Dv]``; fp16, bf16 or fp32; D, Dv <= 256.
        scale: positive softmax scale (usually ``D ** -0.5``).
        cu_seqlens_q, cu_seqlens_k: int32 ``[N + 1]`` block boundaries (packed mode). Block ``b``'s
            queries see only block ``b``'s keys; blocks may have different q and kv lengths.
        max_seqlen_q, max_seqlen_k: Python ints, the longest block (packed mode). When omitted they
            are read from cu_seqlens (one device sync).
        causal: key ``j`` visible to query ``i`` iff ``j <= i + (Sk - Sq)`` (bottom-right, per block);
            ``top_left=True``: iff ``j <= i``.
        window: with ``causal``, also require ``j > i + off - window`` (the W newest keys incl. the
            diagonal), ``off = Sk - Sq`` or 0 for top-left.
        key_valid: bool ``[B, Sk]`` (dense only), False hides the key.
        return_lse: also return the float32 log-sum-exp of the scaled scores, ``[B, Hq, Sq]`` dense
            or ``[Hq, Tq]`` packed; ``-inf`` for rows that see no key. Differentiable.
        deterministic: fixed tile configuration (see module docstring): batch-invariant bits.
        check_cu_seqlens: verify cu_seqlens (starts at 0, non-decreasing, sums to the token count);
            costs one device sync on GPU. Callers holding a validated ``BlockDiagonal`` pass False.

    Output: q's layout and dtype, last dim Dv.
    """
    _check_inputs(q, k, v, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  causal, top_left, window, key_valid, check_cu_seqlens)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    packed = cu_seqlens_q is not None
    if packed:
        cu_q = cu_seqlens_q.to(torch.int32).contiguous()
        cu_k = cu_seqlens_k.to(torch.int32).contiguous()
        n_blocks = cu_q.numel() - 1
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_q[1:] - cu_q[:-1]).max()) if n_blocks else 0
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_k[1:] - cu_k[:-1]).max()) if n_blocks else 0
        key_valid_ = None
    else:
        cu_q = cu_k = None
        n_blocks = q.shape[0]
        max_seqlen_q, max_seqlen_k = q.shape[1], k.shape[1]
        key_valid_ = key_valid.contiguous() if key_valid is not None else None
    meta = _Meta(scale=float(scale), packed=packed, n_blocks=n_blocks,
                 max_seqlen_q=max(int(max_seqlen_q), 0), max_seqlen_k=max(int(max_seqlen_k), 0),
                 causal=bool(causal), top_left=bool(top_left and causal), window=window,
                 deterministic=bool(deterministic))
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0 or meta.max_seqlen_q == 0:
        out, lse = _empty(q, v, meta)  # nothing to attend: zeros / -inf (not differentiable)
    else:
        out, lse = _fwd_op(q, k, v, cu_q, cu_k, key_valid_, meta.scale, meta.packed, meta.n_blocks, meta.max_seqlen_q,
                           meta.max_seqlen_k, meta.causal, meta.top_left, -1 if meta.window is None else meta.window,
                           meta.deterministic)
    return (out, lse) if return_lse else out


def _empty(q, v, meta):
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    shape = (q.shape[1], q.shape[0]) if meta.packed else (q.shape[0], q.shape[2], q.shape[1])
    return out, torch.full(shape, float("-inf"), dtype=torch.float32, device=q.device)


