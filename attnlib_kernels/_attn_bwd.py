"""Triton backward kernels for attnlib attention (FlashAttention-2 style, atomic-free).

Three launches, all deterministic (no atomics, no split-k):

1. ``_attn_bwd_preprocess``: ``delta[i] = sum_d dO[i, d] * O[i, d] - dLSE[i]``.
2. ``_attn_bwd_dkdv_kernel``: one program per (key tile, kv head); it walks the query tiles that
   can see the key tile for *every* query head of its GQA group, so dK/dV of a kv head are summed
   in registers in a fixed order.
3. ``_attn_bwd_dq_kernel``: one program per (query tile, query head); walks the visible key tiles.

With ``P = exp(S * scale - LSE)``: ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - delta)``,
``dQ = scale * dS K``, ``dK = scale * dS^T Q``. Gradient through LSE enters as ``-dLSE`` in delta
(``d LSE / d S = P``). Index conventions (block-relative positions, mask rule, tile alignment) are
those documented in :mod:`attnlib_kernels._attn_fwd`.
"""

import triton
import triton.language as tl

from attnlib_kernels._attn_fwd import (_diagonal, _dot, _head_base, _key_range, _load, _query_program, _sequence,
                                      _visible)


@triton.jit(do_not_specialize=["seqlen_q"])
def _attn_bwd_preprocess(
    Out, DOut, DLse, Delta, CuQ,
    # Out, DOut : [B, Sq, Hq, DV] / [Tq, Hq, DV]  strides (stride_ob, stride_os, stride_oh, 1),
    #             DOut has its own (stride_db, stride_ds, stride_dh, 1)
    # DLse      : float32 [B, Hq, Sq] / [Hq, Tq] like Lse (stride_lb, stride_lh, 1); dummy unless HAS_DLSE
    # Delta     : float32, same shape and strides as Lse
    # CuQ       : int32 [N + 1]; dummy unless IS_VARLEN
    stride_ob, stride_os, stride_oh,
    stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh,
    seqlen_q,
    DV: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # grid: (cdiv(max Sq, BLOCK_Q), Hq, B or N)
    pid_q = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if IS_VARLEN:
        q_start = tl.load(CuQ + b)
        Lq = tl.load(CuQ + b + 1) - q_start
        o_off = q_start.to(tl.int64) * stride_os
        d_off = q_start.to(tl.int64) * stride_ds
        l_off = q_start.to(tl.int64)
    else:
        Lq = seqlen_q
        o_off = b.to(tl.int64) * stride_ob
        d_off = b.to(tl.int64) * stride_db
        l_off = b.to(tl.int64) * stride_lb
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_q[:, None] < Lq) & (offs_dv[None, :] < DV)
    o = tl.load(Out + o_off + h.to(tl.int64) * stride_oh + offs_q[:, None] * stride_os + offs_dv[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + d_off + h.to(tl.int64) * stride_dh + offs_q[:, None] * stride_ds + offs_dv[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    l_ptrs = l_off + h.to(tl.int64) * stride_lh + offs_q
    if HAS_DLSE:
        delta = delta - tl.load(DLse + l_ptrs, mask=offs_q < Lq, other=0.0)
    tl.store(Delta + l_ptrs, delta, mask=offs_q < Lq)


@triton.jit
def _load_row_stats(Lse, Delta, l_ptrs, row_ok):
    """LSE in log2 units, with rows that saw no key (-inf) or lie outside the block set to +inf so
    that ``exp2(s - lse) = 0`` for them; and delta (0 outside the block)."""
    lse = tl.load(Lse + l_ptrs, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + l_ptrs, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_query_tiles(
    dk, dv, k, v, q_base, do_base, Lse, Delta, l_base,
    offs_k, offs_d, offs_dv, lo, hi, Lq, Lk, off, window, qk_scale, kv,
    stride_qs, stride_ds,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr, IEEE: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over query tiles ``lo, lo + BLOCK_Q, ... < hi``."""
    for start_q in range(lo, hi, BLOCK_Q):
        offs_q = start_q + tl.arange(0, BLOCK_Q)
        row_ok = offs_q < Lq
        q = tl.load(q_base + offs_q[:, None] * stride_qs + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(do_base + offs_q[:, None] * stride_ds + offs_dv[None, :],
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        lse, delta = _load_row_stats(Lse, Delta, l_base + offs_q, row_ok)
        # transposed scores: [BLOCK_K, BLOCK_Q]
        qkt = _dot(k, tl.trans(q), tl.zeros([BLOCK_K, BLOCK_Q], dtype=tl.float32), IEEE)
        if MASKED:
            okt = _visible(offs_q[None, :], offs_k[:, None], Lk, off, window, kv[:, None],
                           CAUSAL, HAS_WINDOW, HAS_KEY_VALID)
            qkt = tl.where(okt, qkt, float("-inf"))
        pt = tl.exp2(qkt * qk_scale - lse[None, :])
        dv = _dot(pt.to(do.dtype), do, dv, IEEE)
        dpt = _dot(v, tl.trans(do), tl.zeros([BLOCK_K, BLOCK_Q], dtype=tl.float32), IEEE)
        dst = pt * (dpt - delta[None, :])
        dk = _dot(dst.to(q.dtype), q, dk, IEEE)
    return dk, dv


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV_, KeyValid, CuQ, CuK,
    # Q, DOut  : [B, Sq, Hq, D|DV] / [Tq, Hq, D|DV]; strides (stride_qb, stride_qs, stride_qh, 1) and
    #            (stride_db, stride_ds, stride_dh, 1)
    # K, V     : [B, Sk, Hkv, D|DV] / [Tk, Hkv, D|DV]; strides (stride_kb, stride_ks, stride_kh, 1),
    #            (stride_vb, stride_vs, stride_vh, 1)
    # DK, DV_  : contiguous, same shapes as K, V; strides (stride_gkb, stride_gks, stride_gkh, 1) and
    #            (stride_gvb, stride_gvs, stride_gvh, 1)
    # Lse, Delta : float32 [B, Hq, Sq] / [Hq, Tq]; strides (stride_lb, stride_lh, 1)
    # KeyValid : int8 [B, Sk]; strides (stride_mb, 1)
    # CuQ, CuK : int32 [N + 1]
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_gkb, stride_gks, stride_gkh,
    stride_gvb, stride_gvs, stride_gvh,
    stride_lb, stride_lh,
    stride_mb,
    seqlen_q, seqlen_k, qk_scale, sm_scale, window,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, TOP_LEFT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
    BLOCK_Q: tl.constexpr,    # query rows per inner step
    BLOCK_K: tl.constexpr,    # key rows per program
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr,
):
    # grid: (cdiv(max Sk, BLOCK_K), Hkv, B or N)
    pid_k = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start, k_start, Lq, Lk = _sequence(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ok = offs_k < Lk
    k = tl.load(_head_base(K, k_start, b, hk, stride_ks, stride_kb, stride_kh, IS_VARLEN)
                + offs_k[:, None] * stride_ks + offs_d[None, :], mask=k_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(_head_base(V, k_start, b, hk, stride_vs, stride_vb, stride_vh, IS_VARLEN)
                + offs_k[:, None] * stride_vs + offs_dv[None, :], mask=k_ok[:, None] & (offs_dv[None, :] < DV),
                other=0.0)
    kv = tl.zeros([BLOCK_K], dtype=tl.int8)
    if HAS_KEY_VALID:
        kv = tl.load(KeyValid + b.to(tl.int64) * stride_mb + offs_k, mask=k_ok, other=0)

    # ---- query range that can see this key tile ----
    off = _diagonal(Lq, Lk, CAUSAL, TOP_LEFT)
    lo = 0
    hi = Lq
    if CAUSAL:
        lo = (tl.maximum(k0 - off, 0) // BLOCK_Q) * BLOCK_Q
        if HAS_WINDOW:
            hi = tl.minimum(Lq, k0 + BLOCK_K - 1 - off + window)
    hi = tl.where(k0 < Lk, hi, 0)
    # ---- query tiles in [a, b_) see every key of this tile (rows past Lq contribute 0 anyway) ----
    if HAS_KEY_VALID:
        a = hi
        b_ = hi
    else:
        full_lo = lo
        if CAUSAL:
            x = tl.maximum(k0 + BLOCK_K - 1 - off, 0)
            full_lo = tl.maximum(lo, ((x + BLOCK_Q - 1) // BLOCK_Q) * BLOCK_Q)
        full_hi = hi
        if HAS_WINDOW:
            full_hi = tl.minimum(hi, (tl.maximum(k0 - off + window, 0) // BLOCK_Q) * BLOCK_Q)
        a = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
        b_ = tl.maximum(a, tl.minimum(full_hi, hi))

    dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = _head_base(Q, q_start, b, h, stride_qs, stride_qb, stride_qh, IS_VARLEN)
        do_base = _head_base(DOut, q_start, b, h, stride_ds, stride_db, stride_dh, IS_VARLEN)
        l_base = _head_base(0, q_start, b, h, 1, stride_lb, stride_lh, IS_VARLEN)
        dk, dv = _dkdv_query_tiles(dk, dv, k, v, q_base, do_base, Lse, Delta, l_base,
                                   offs_k, offs_d, offs_dv, lo, a, Lq, Lk, off, window, qk_scale, kv,
                                   stride_qs, stride_ds, D, DV, BLOCK_Q, BLOCK_K,
                                   True, CAUSAL, HAS_WINDOW, HAS_KEY_VALID, IEEE)
        dk, dv = _dkdv_query_tiles(dk, dv, k, v, q_base, do_base, Lse, Delta, l_base,
                                   offs_k, offs_d, offs_dv, a, b_, Lq, Lk, off, window, qk_scale, kv,
                                   stride_qs, stride_ds, D, DV, BLOCK_Q, BLOCK_K,
                                   False, CAUSAL, HAS_WINDOW, HAS_KEY_VALID, IEEE)
        dk, dv = _dkdv_query_tiles(dk, dv, k, v, q_base, do_base, Lse, Delta, l_base,
                                   offs_k, offs_d, offs_dv, b_, hi, Lq, Lk, off, window, qk_scale, kv,
                                   stride_qs, stride_ds, D, DV, BLOCK_Q, BLOCK_K,
                                   True, CAUSAL, HAS_WINDOW, HAS_KEY_VALID, IEEE)
    dk = dk * sm_scale
    tl.store(_head_base(DK, k_start, b, hk, stride_gks, stride_gkb, stride_gkh, IS_VARLEN)
             + offs_k[:, None] * stride_gks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=k_ok[:, None] & (offs_d[None, :] < D))
    tl.store(_head_base(DV_, k_start, b, hk, stride_gvs, stride_gvb, stride_gvh, IS_VARLEN)
             + offs_k[:, None] * stride_gvs + offs_dv[None, :],
             dv.to(DV_.dtype.element_ty), mask=k_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _dq_key_tiles(
    dq, q, do, lse, delta, k_base, v_base, kv_base,
    offs_q, offs_d, offs_dv, lo, hi, Lk, off, window, qk_scale,
    stride_ks, stride_vs,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr, IEEE: tl.constexpr,
):
    """Accumulate dQ of one query tile over key tiles ``lo, lo + BLOCK_K, ... < hi``."""
    for start_k in range(lo, hi, BLOCK_K):
        offs_k = start_k + tl.arange(0, BLOCK_K)
        k_ok = offs_k < Lk
        k_ptrs = k_base + offs_k[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_base + offs_k[:, None] * stride_vs + offs_dv[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=k_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            v = tl.load(v_ptrs, mask=k_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        else:  # whole tile inside [0, Lk)
            k = _load(k_ptrs, offs_d[None, :] < D, BLOCK_D != D)
            v = _load(v_ptrs, offs_dv[None, :] < DV, BLOCK_DV != DV)
        qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_Q, BLOCK_K], dtype=tl.float32), IEEE)
        if MASKED:
            kv = tl.zeros([BLOCK_K], dtype=tl.int8)
            if HAS_KEY_VALID:
                kv = tl.load(kv_base + offs_k, mask=k_ok, other=0)
            ok = _visible(offs_q[:, None], offs_k[None, :], Lk, off, window, kv[None, :],
                          CAUSAL, HAS_WINDOW, HAS_KEY_VALID)
            qk = tl.where(ok, qk, float("-inf"))
        p = tl.exp2(qk * qk_scale - lse[:, None])
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_Q, BLOCK_K], dtype=tl.float32), IEEE)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, IEEE)
    return dq


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window"])
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, KeyValid, CuQ, CuK,
    # Q, DOut, K, V, Lse, Delta, KeyValid, CuQ, CuK : as in _attn_bwd_dkdv_kernel
    # DQ : contiguous, same shape as Q; strides (stride_gqb, stride_gqs, stride_gqh, 1)
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_gqb, stride_gqs, stride_gqh,
    stride_lb, stride_lh,
    stride_mb,
    seqlen_q, seqlen_k, qk_scale, sm_scale, window,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, TOP_LEFT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
    BLOCK_Q: tl.constexpr,    # query rows per program
    BLOCK_K: tl.constexpr,    # key rows per inner step
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_q, h, hk, b = _query_program(GROUP, CAUSAL)
    q_start, k_start, Lq, Lk = _sequence(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    q0 = pid_q * BLOCK_Q
    offs_q = q0 + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_q < Lq
    q = tl.load(_head_base(Q, q_start, b, h, stride_qs, stride_qb, stride_qh, IS_VARLEN)
                + offs_q[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(_head_base(DOut, q_start, b, h, stride_ds, stride_db, stride_dh, IS_VARLEN)
                 + offs_q[:, None] * stride_ds + offs_dv[None, :], mask=row_ok[:, None] & (offs_dv[None, :] < DV),
                 other=0.0)
    lse, delta = _load_row_stats(Lse, Delta, _head_base(0, q_start, b, h, 1, stride_lb, stride_lh, IS_VARLEN) + offs_q,
                                 row_ok)
    k_base = _head_base(K, k_start, b, hk, stride_ks, stride_kb, stride_kh, IS_VARLEN)
    v_base = _head_base(V, k_start, b, hk, stride_vs, stride_vb, stride_vh, IS_VARLEN)
    kv_base = KeyValid + b.to(tl.int64) * stride_mb

    # ---- key range: the forward kernel's rule ----
    off, lo, a, b_, hi = _key_range(q0, Lq, Lk, window, CAUSAL, TOP_LEFT, HAS_WINDOW, HAS_KEY_VALID,
                                    BLOCK_Q, BLOCK_K)

    dq = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    dq = _dq_key_tiles(dq, q, do, lse, delta, k_base, v_base, kv_base, offs_q, offs_d, offs_dv,
                       lo, a, Lk, off, window, qk_scale, stride_ks, stride_vs,
                       D, DV, BLOCK_Q, BLOCK_K, BLOCK_D, BLOCK_DV,
                       True, CAUSAL, HAS_WINDOW, HAS_KEY_VALID, IEEE)
    dq = _dq_key_tiles(dq, q, do, lse, delta, k_base, v_base, kv_base, offs_q, offs_d, offs_dv,
                       a, b_, Lk, off, window, qk_scale, stride_ks, stride_vs,
                       D, DV, BLOCK_Q, BLOCK_K, BLOCK_D, BLOCK_DV,
                       False, CAUSAL, HAS_WINDOW, HAS_KEY_VALID, IEEE)
    dq = _dq_key_tiles(dq, q, do, lse, delta, k_base, v_base, kv_base, offs_q, offs_d, offs_dv,
                       b_, hi, Lk, off, window, qk_scale, stride_ks, stride_vs,
                       D, DV, BLOCK_Q, BLOCK_K, BLOCK_D, BLOCK_DV,
                       True, CAUSAL, HAS_WINDOW, HAS_KEY_VALID, IEEE)
    dq = dq * sm_scale
    tl.store(_head_base(DQ, q_start, b, h, stride_gqs, stride_gqb, stride_gqh, IS_VARLEN)
             + offs_q[:, None] * stride_gqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
