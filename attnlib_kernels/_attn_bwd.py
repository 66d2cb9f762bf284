"""Triton backward kernels for attnlib attention on a tile table (FlashAttention-2 style, atomic-free).

Three launches, all deterministic (no atomics):

1. ``_attn_bwd_preprocess``: ``delta[i] = sum_d dO[i, d] * O[i, d] - dLSE[i]``.
2. ``_attn_bwd_dkdv_kernel``: one program per (key work item, kv head, batch row). A key work item is a
   tile of a key *segment* (the key axis cut at every run boundary of the table, so each segment lies
   wholly inside or outside every run); the program walks, for every query head of its GQA group and every
   (group, run) *contribution* that covers the segment, the query tiles that can see its keys, so dK/dV
   are summed in registers in a fixed order.
3. ``_attn_bwd_dq_kernel``: one program per (query work item, query head, batch row); the forward's key
   loop over the group's runs.

With ``P = exp2(x - LSE log2 e)`` (``x`` the modified score in log2 units, LSE including the sink):
``dV = P^T dO``, ``dP = dO V^T``, ``dS = P (dP - delta)``, times ``1 - t^2`` under a softcap (``t`` the
tanh), ``dQ = scale dS K``, ``dK = scale dS^T Q``. Gradient through the LSE enters as ``-dLSE`` in delta.
Conventions (tile table, positions, alignment) are those of :mod:`attnlib_kernels._attn_fwd`.
"""

import triton
import triton.language as tl

from attnlib_kernels._attn_fwd import (_LOG2E, _dot, _group, _key_range, _key_rows, _layout_rows, _load,
                                       _masked_start, _run, _scores, _seen_span, _visible)


@triton.jit
def _attn_bwd_preprocess(
    Out, DOut, DLse, Delta,
    # Out, DOut: [B, Sq, Hq, DV] (own strides); DLse, Delta: float32 [B, Hq, Sq] contiguous
    stride_ob, stride_os, stride_oh,
    stride_db, stride_ds, stride_dh,
    seqlen_q, heads,
    DV: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # grid: (cdiv(Sq, BLOCK_Q), Hq, B)
    pid_q = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_q[:, None] < seqlen_q) & (offs_dv[None, :] < DV)
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_q.to(tl.int64)[:, None] * stride_os
                + offs_dv[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
                 + offs_q.to(tl.int64)[:, None] * stride_ds + offs_dv[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    l_ptrs = (b.to(tl.int64) * heads + h) * seqlen_q + offs_q
    if HAS_DLSE:
        dl = tl.load(DLse + l_ptrs, mask=offs_q < seqlen_q, other=0.0)
        delta = delta - tl.where((dl == dl) & (tl.abs(dl) < float("inf")), dl, 0.0)
    tl.store(Delta + l_ptrs, delta, mask=offs_q < seqlen_q)


@triton.jit
def _row_stats(lse_ptr, delta_ptr, q_tok, row_ok):
    """LSE in log2 units, with rows that saw nothing (-inf) or lie outside their group set to +inf so that
    ``exp2(x - lse) = 0`` for them; and delta (0 outside)."""
    lse = tl.load(lse_ptr + q_tok, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * _LOG2E
    delta = tl.load(delta_ptr + q_tok, mask=row_ok, other=0.0)
    return lse, delta


# ------------------------------------------------------------------------------------------------------
# dQ
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _dq_tile(dq, q, do, lse, delta, start_k, k_ptr, v_ptr, stride_ks, stride_vs, kpos0, BlockTable, req, stride_bt,
             kv_ptr, lay_rows, lay_ok, lay_k0, lay_bk, qi, offs_d, offs_dv, Lk, off, causal, window,
             qk_scale, cap_scale, cap_log2, slope2,
             D: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, HAS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
             HAS_KEY_VALID: tl.constexpr, LAYOUT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
             PAGED: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr):
    """Accumulate dQ of query rows ``qi`` over the run-local key tile at ``start_k``."""
    offs_k = start_k + tl.arange(0, BLOCK_K)
    in_k = offs_k < Lk
    row0, rel = _key_rows(kpos0, start_k, in_k, BlockTable, req, stride_bt, BLOCK_K, PAGED, PAGE, MASKED)
    k_ptrs = k_ptr + row0 * stride_ks + rel[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = v_ptr + row0 * stride_vs + rel[:, None] * stride_vs + offs_dv[None, :]
    if MASKED:
        keep = in_k
        if HAS_KEY_VALID:
            keep = keep & (tl.load(kv_ptr + kpos0 + offs_k, mask=in_k, other=0) != 0)
        # hidden keys load as 0 (and non-finite elements become 0): dS is 0 where a row cannot see a key, and
        # 0 * garbage must not reach dQ
        k = tl.load(k_ptrs, mask=keep[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_ptrs, mask=keep[:, None] & (offs_dv[None, :] < DV), other=0.0)
        k = tl.where((k == k) & (tl.abs(k) < float("inf")), k, 0.0)
        v = tl.where((v == v) & (tl.abs(v) < float("inf")), v, 0.0)
    else:
        k = _load(k_ptrs, offs_d[None, :] < D, BLOCK_D != D)
        v = _load(v_ptrs, offs_dv[None, :] < DV, BLOCK_DV != DV)
    qk = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_K], dtype=tl.float32), IEEE)
    x, t = _scores(qk, qi, offs_k[None, :], off, qk_scale, cap_scale, cap_log2, slope2, SOFTCAP, HAS_ALIBI)
    if MASKED:
        ok = _visible(qi, offs_k[None, :], Lk, off, causal, window, HAS_CAUSAL, HAS_WINDOW) & keep[None, :]
        if LAYOUT:
            col = (lay_k0 + offs_k) // lay_bk
            lay = tl.load(lay_rows[:, None] + col[None, :], mask=lay_ok[:, None] & in_k[None, :], other=0)
            ok = ok & (lay != 0)
        x = tl.where(ok, x, float("-inf"))
    p = tl.exp2(x - lse[:, None])
    dp = _dot(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_K], dtype=tl.float32), IEEE)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return _dot(ds.to(k.dtype), k, dq, IEEE)


@triton.jit(do_not_specialize=["lay_q0", "lay_k0", "lay_bq", "lay_bk"])
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, Table, KeyValid, Alibi, BlockTable, KvNum, KvIdx, Layout,
    # Q, DOut, DQ: [B, Sq, Hq, *] (own strides; DQ contiguous like Q); K, V as in the forward;
    # Lse, Delta: float32 [B, Hq, Sq] contiguous; the rest as in _attn_fwd_kernel
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_gb, stride_gs, stride_gh,
    stride_mb, stride_ab, stride_bt,
    stride_nb, stride_nh, stride_nq,
    stride_ib, stride_ih, stride_iq,
    stride_yb, stride_yh, stride_yq,
    seqlen_q, heads, work_off, lay_q0, lay_k0, lay_bq, lay_bk,
    qk_scale, sm_scale, cap_scale, cap_log2,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, R: tl.constexpr, GW: tl.constexpr,
    HAS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KEY_VALID: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, SPARSE: tl.constexpr, LAYOUT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr,
):
    # grid: (query work items, Hq, B)
    w = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP
    g = tl.load(Table + work_off + 2 * w)
    q0 = tl.load(Table + work_off + 2 * w + 1)
    q_start, Lq, req, req_base = _group(Table, g, GW)
    offs_q = q0 + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_q < Lq
    q_tok = q_start + offs_q
    rel_q = tl.arange(0, BLOCK_Q)
    q_row0 = (q_start + q0).to(tl.int64)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_row0 * stride_qs
                + rel_q[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DOut + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + q_row0 * stride_ds
                 + rel_q[:, None] * stride_ds + offs_dv[None, :], mask=row_ok[:, None] & (offs_dv[None, :] < DV),
                 other=0.0)
    stats = (b.to(tl.int64) * heads + h) * seqlen_q
    lse, delta = _row_stats(Lse + stats, Delta + stats, q_tok, row_ok)
    k_ptr = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_ptr = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    kv_ptr = KeyValid + b.to(tl.int64) * stride_mb
    lay_rows = _layout_rows(Layout, b, h, q_tok, row_ok, lay_q0, lay_bq, stride_yb, stride_yh, stride_yq, LAYOUT)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b * stride_ab + h) * _LOG2E
    nrows = tl.minimum(Lq - q0, BLOCK_Q)
    qt = q0 // BLOCK_Q
    qi = offs_q[:, None]
    dq = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for r in tl.static_range(R):
        k_start, Lk, off, causal, window = _run(Table, g, r, GW)
        kpos0 = k_start
        if PAGED:
            kpos0 = k_start - req_base
        lay_k0r = k_start + lay_k0
        lo, a, b_, hi = _key_range(q0, nrows, Lq, Lk, off, causal, window, HAS_KEY_VALID or LAYOUT,
                                   HAS_CAUSAL, HAS_WINDOW, BLOCK_K)
        if SPARSE:
            n = tl.load(KvNum + b * stride_nb + h * stride_nh + qt * stride_nq, mask=(Lk > 0) & (q0 < Lq), other=0)
            idx = KvIdx + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + qt.to(tl.int64) * stride_iq
            for i in range(0, n):
                start_k = tl.load(idx + i) * BLOCK_K
                if (start_k >= a) & (start_k < b_):
                    dq = _dq_tile(dq, q, do, lse, delta, start_k, k_ptr, v_ptr, stride_ks, stride_vs, kpos0,
                                  BlockTable, req, stride_bt, kv_ptr, lay_rows, row_ok, lay_k0r, lay_bk, qi, offs_d,
                                  offs_dv, Lk, off, causal, window, qk_scale, cap_scale, cap_log2, slope2, D, DV,
                                  BLOCK_K, BLOCK_D, BLOCK_DV, False, HAS_CAUSAL, HAS_WINDOW, HAS_KEY_VALID, LAYOUT,
                                  SOFTCAP, HAS_ALIBI, PAGED, PAGE, IEEE)
                else:
                    dq = _dq_tile(dq, q, do, lse, delta, start_k, k_ptr, v_ptr, stride_ks, stride_vs, kpos0,
                                  BlockTable, req, stride_bt, kv_ptr, lay_rows, row_ok, lay_k0r, lay_bk, qi, offs_d,
                                  offs_dv, Lk, off, causal, window, qk_scale, cap_scale, cap_log2, slope2, D, DV,
                                  BLOCK_K, BLOCK_D, BLOCK_DV, True, HAS_CAUSAL, HAS_WINDOW, HAS_KEY_VALID, LAYOUT,
                                  SOFTCAP, HAS_ALIBI, PAGED, PAGE, IEEE)
        else:
            n_lo = (a - lo + BLOCK_K - 1) // BLOCK_K    # boundary tiles [lo, a), [b_, hi), then whole ones
            for i in range(0, n_lo + (tl.maximum(hi - b_, 0) + BLOCK_K - 1) // BLOCK_K):
                start_k = _masked_start(i, n_lo, lo, b_, BLOCK_K)
                dq = _dq_tile(dq, q, do, lse, delta, start_k, k_ptr, v_ptr, stride_ks, stride_vs, kpos0, BlockTable,
                              req, stride_bt, kv_ptr, lay_rows, row_ok, lay_k0r, lay_bk, qi, offs_d, offs_dv, Lk, off,
                              causal, window, qk_scale, cap_scale, cap_log2, slope2, D, DV, BLOCK_K, BLOCK_D,
                              BLOCK_DV, True, HAS_CAUSAL, HAS_WINDOW, HAS_KEY_VALID, LAYOUT, SOFTCAP, HAS_ALIBI,
                              PAGED, PAGE, IEEE)
            for start_k in range(a, b_, BLOCK_K):
                dq = _dq_tile(dq, q, do, lse, delta, start_k, k_ptr, v_ptr, stride_ks, stride_vs, kpos0, BlockTable,
                              req, stride_bt, kv_ptr, lay_rows, row_ok, lay_k0r, lay_bk, qi, offs_d, offs_dv, Lk, off,
                              causal, window, qk_scale, cap_scale, cap_log2, slope2, D, DV, BLOCK_K, BLOCK_D,
                              BLOCK_DV, False, HAS_CAUSAL, HAS_WINDOW, HAS_KEY_VALID, LAYOUT, SOFTCAP, HAS_ALIBI,
                              PAGED, PAGE, IEEE)
    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh + q_row0 * stride_gs
             + rel_q[:, None] * stride_gs + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


# ------------------------------------------------------------------------------------------------------
# dK, dV
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _query_range(kl0, ncols, Lq, off, causal, window,
                 ALL_MASKED: tl.constexpr, HAS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 BLOCK_Q: tl.constexpr):
    """Group-local query tiles that can see run-local keys ``[kl0, kl0 + ncols)``, as ``(lo, a, b_, hi)``
    (tiles in ``[a, b_)`` see every one of those keys: no mask arithmetic)."""
    lo = Lq * 0
    hi = Lq
    full_lo = lo
    full_hi = Lq
    if HAS_CAUSAL:
        c = causal != 0
        lo = tl.where(c, (tl.maximum(kl0 - off, 0) // BLOCK_Q) * BLOCK_Q, 0)
        x = tl.maximum(kl0 + ncols - 1 - off, 0)
        full_lo = tl.where(c, tl.maximum(lo, ((x + BLOCK_Q - 1) // BLOCK_Q) * BLOCK_Q), 0)
        if HAS_WINDOW:
            w = c & (window != 0)
            hi = tl.where(w, tl.minimum(Lq, kl0 + ncols - 1 - off + window), Lq)
            full_hi = tl.where(w, tl.minimum(hi, (tl.maximum(kl0 - off + window, 0) // BLOCK_Q) * BLOCK_Q), hi)
    hi = tl.maximum(hi, 0)
    if ALL_MASKED:
        a = hi
        b_ = hi
    else:
        a = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
        b_ = tl.maximum(a, tl.minimum(full_hi, hi))
    return lo, a, b_, hi


@triton.jit
def _dkdv_tile(dk, dv, k, v, keep, start_q, q_ptr, do_ptr, lse_ptr, delta_ptr, q_start, Lq, kj, lay_base, lay_cols,
               lay_q0, lay_bq, off, causal, window, Lk, qk_scale, cap_scale, cap_log2, slope2, stride_qs, stride_ds,
               stride_yq, offs_d, offs_dv,
               D: tl.constexpr, DV: tl.constexpr, BLOCK_Q: tl.constexpr, MASKED: tl.constexpr,
               HAS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
               LAYOUT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, IEEE: tl.constexpr):
    """Accumulate dK, dV of the key tile (run-local keys ``kj`` [K]) over the query tile at ``start_q``."""
    offs_q = start_q + tl.arange(0, BLOCK_Q)
    row_ok = offs_q < Lq
    q_tok = q_start + offs_q
    rel_q = tl.arange(0, BLOCK_Q)
    q_row0 = (q_start + start_q).to(tl.int64)
    q = tl.load(q_ptr + q_row0 * stride_qs + rel_q[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(do_ptr + q_row0 * stride_ds + rel_q[:, None] * stride_ds + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse, delta = _row_stats(lse_ptr, delta_ptr, q_tok, row_ok)
    # transposed scores: [BLOCK_K, BLOCK_Q]
    qkt = _dot(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_Q], dtype=tl.float32), IEEE)
    x, t = _scores(qkt, offs_q[None, :], kj[:, None], off, qk_scale, cap_scale, cap_log2, slope2, SOFTCAP, HAS_ALIBI)
    if MASKED:
        okt = _visible(offs_q[None, :], kj[:, None], Lk, off, causal, window, HAS_CAUSAL, HAS_WINDOW)
        if HAS_KEY_VALID:
            okt = okt & keep[:, None]
        if LAYOUT:
            r = (tl.where(row_ok, q_tok, 0) + lay_q0) // lay_bq
            lay = tl.load(lay_base + r.to(tl.int64)[None, :] * stride_yq + lay_cols[:, None],
                          mask=row_ok[None, :] & keep[:, None], other=0)
            okt = okt & (lay != 0)
        x = tl.where(okt, x, float("-inf"))
    pt = tl.exp2(x - lse[None, :])
    dv = _dot(pt.to(do.dtype), do, dv, IEEE)
    dpt = _dot(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_Q], dtype=tl.float32), IEEE)
    dst = pt * (dpt - delta[None, :])
    if SOFTCAP:
        dst = dst * (1.0 - t * t)
    dk = _dot(dst.to(q.dtype), q, dk, IEEE)
    return dk, dv


@triton.jit(do_not_specialize=["lay_q0", "lay_k0", "lay_bq", "lay_bk"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV_, Table, KeyValid, Alibi, BlockTable, QNum, QIdx, Layout,
    # DK, DV_: contiguous [B, Sk, Hkv, *] (paged: [1, Tk, Hkv, *] in logical key order); Table: key work items
    # (k0, k_end, first contribution, end, request, request key base) at kwork_off, contributions (group, run)
    # at contrib_off; QNum int32 [B?, H?, nKt], QIdx int32 [B?, H?, nKt, nQt] (query tiles listing each key tile)
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_gkb, stride_gks, stride_gkh,
    stride_gvb, stride_gvs, stride_gvh,
    stride_mb, stride_ab, stride_bt,
    stride_nb, stride_nh, stride_nk,
    stride_ib, stride_ih, stride_ik,
    stride_yb, stride_yh, stride_yq,
    seqlen_q, heads, kwork_off, contrib_off, lay_q0, lay_k0, lay_bq, lay_bk,
    qk_scale, sm_scale, cap_scale, cap_log2,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, GW: tl.constexpr,
    HAS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KEY_VALID: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, SPARSE: tl.constexpr, LAYOUT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr,
):
    # grid: (key work items, Hkv, B)
    w = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    item = Table + kwork_off + 6 * w
    k0 = tl.load(item)
    k_end = tl.load(item + 1)
    c0 = tl.load(item + 2)
    c1 = tl.load(item + 3)
    req = tl.load(item + 4)
    req_base = tl.load(item + 5)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ok = offs_k < k_end
    kpos0 = k0
    if PAGED:
        kpos0 = k0 - req_base
    row0, rel = _key_rows(kpos0, 0, k_ok, BlockTable, req, stride_bt, BLOCK_K, PAGED, PAGE, True)
    keep = k_ok
    if HAS_KEY_VALID:
        keep = keep & (tl.load(KeyValid + b.to(tl.int64) * stride_mb + offs_k, mask=k_ok, other=0) != 0)
    # value rows no query of any covering run may see load as 0: garbage there never meets a zero weight
    seen = offs_k < 0
    for c in range(c0, c1):
        grp = tl.load(Table + contrib_off + 2 * c)
        k_start, Lk, off, causal, window = _run(Table, grp, tl.load(Table + contrib_off + 2 * c + 1), GW)
        kbeg, kend = _seen_span(0, tl.load(Table + grp * GW + 1) - 1, Lk, off, causal, window, HAS_CAUSAL,
                                HAS_WINDOW)
        seen = seen | ((offs_k - k_start >= kbeg) & (offs_k - k_start < kend))
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + row0 * stride_ks
                + rel[:, None] * stride_ks + offs_d[None, :], mask=keep[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + row0 * stride_vs
                + rel[:, None] * stride_vs + offs_dv[None, :], mask=(keep & seen)[:, None] & (offs_dv[None, :] < DV),
                other=0.0)
    ncols = tl.minimum(k_end - k0, BLOCK_K)
    lay_cols = (offs_k + lay_k0) // lay_bk
    dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32)
    for gi in range(GROUP):
        h = hk * GROUP + gi
        q_ptr = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_ptr = DOut + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
        stats = (b.to(tl.int64) * heads + h) * seqlen_q
        lay_base = Layout + b.to(tl.int64) * stride_yb + h.to(tl.int64) * stride_yh
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(Alibi + b * stride_ab + h) * _LOG2E
        for c in range(c0, c1):
            grp = tl.load(Table + contrib_off + 2 * c)
            r = tl.load(Table + contrib_off + 2 * c + 1)
            q_start = tl.load(Table + grp * GW)
            Lq = tl.load(Table + grp * GW + 1)
            k_start, Lk, off, causal, window = _run(Table, grp, r, GW)
            kl0 = k0 - k_start
            kj = kl0 + tl.arange(0, BLOCK_K)
            lo, a, b_, hi = _query_range(kl0, ncols, Lq, off, causal, window, HAS_KEY_VALID or LAYOUT,
                                         HAS_CAUSAL, HAS_WINDOW, BLOCK_Q)
            if SPARSE:
                kt = kl0 // BLOCK_K
                n = tl.load(QNum + b * stride_nb + h * stride_nh + kt * stride_nk)
                idx = QIdx + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + kt.to(tl.int64) * stride_ik
                for i in range(0, n):
                    start_q = tl.load(idx + i) * BLOCK_Q
                    if (start_q >= a) & (start_q < b_):
                        dk, dv = _dkdv_tile(dk, dv, k, v, keep, start_q, q_ptr, do_ptr, Lse + stats, Delta + stats,
                                            q_start, Lq, kj, lay_base, lay_cols, lay_q0, lay_bq, off, causal, window,
                                            Lk, qk_scale, cap_scale, cap_log2, slope2, stride_qs, stride_ds,
                                            stride_yq, offs_d, offs_dv, D, DV, BLOCK_Q, False, HAS_CAUSAL,
                                            HAS_WINDOW, HAS_KEY_VALID, LAYOUT, SOFTCAP, HAS_ALIBI, IEEE)
                    else:
                        dk, dv = _dkdv_tile(dk, dv, k, v, keep, start_q, q_ptr, do_ptr, Lse + stats, Delta + stats,
                                            q_start, Lq, kj, lay_base, lay_cols, lay_q0, lay_bq, off, causal, window,
                                            Lk, qk_scale, cap_scale, cap_log2, slope2, stride_qs, stride_ds,
                                            stride_yq, offs_d, offs_dv, D, DV, BLOCK_Q, True, HAS_CAUSAL,
                                            HAS_WINDOW, HAS_KEY_VALID, LAYOUT, SOFTCAP, HAS_ALIBI, IEEE)
            else:
                n_lo = (a - lo + BLOCK_Q - 1) // BLOCK_Q    # the boundary query tiles first, then the whole ones
                for i in range(0, n_lo + (tl.maximum(hi - b_, 0) + BLOCK_Q - 1) // BLOCK_Q):
                    start_q = _masked_start(i, n_lo, lo, b_, BLOCK_Q)
                    dk, dv = _dkdv_tile(dk, dv, k, v, keep, start_q, q_ptr, do_ptr, Lse + stats, Delta + stats,
                                        q_start, Lq, kj, lay_base, lay_cols, lay_q0, lay_bq, off, causal, window, Lk,
                                        qk_scale, cap_scale, cap_log2, slope2, stride_qs, stride_ds, stride_yq,
                                        offs_d, offs_dv, D, DV, BLOCK_Q, True, HAS_CAUSAL, HAS_WINDOW,
                                        HAS_KEY_VALID, LAYOUT, SOFTCAP, HAS_ALIBI, IEEE)
                for start_q in range(a, b_, BLOCK_Q):
                    dk, dv = _dkdv_tile(dk, dv, k, v, keep, start_q, q_ptr, do_ptr, Lse + stats, Delta + stats,
                                        q_start, Lq, kj, lay_base, lay_cols, lay_q0, lay_bq, off, causal, window, Lk,
                                        qk_scale, cap_scale, cap_log2, slope2, stride_qs, stride_ds, stride_yq,
                                        offs_d, offs_dv, D, DV, BLOCK_Q, False, HAS_CAUSAL, HAS_WINDOW,
                                        HAS_KEY_VALID, LAYOUT, SOFTCAP, HAS_ALIBI, IEEE)
    dk = dk * sm_scale
    tl.store(DK + b.to(tl.int64) * stride_gkb + hk.to(tl.int64) * stride_gkh + offs_k.to(tl.int64)[:, None] * stride_gks
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=k_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ + b.to(tl.int64) * stride_gvb + hk.to(tl.int64) * stride_gvh
             + offs_k.to(tl.int64)[:, None] * stride_gvs + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=k_ok[:, None] & (offs_dv[None, :] < DV))
