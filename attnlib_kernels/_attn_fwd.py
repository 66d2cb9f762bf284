"""Triton forward kernel for attnlib attention (FlashAttention-2 style online softmax).

Imported lazily by :mod:`attnlib_kernels.attention`, so that ``TRITON_INTERPRET`` can be set
before Triton is first imported. Nothing here validates input: the wrapper does that.

Index conventions shared by every kernel in this package
---------------------------------------------------------
* Dense BSHD: q ``[B, Sq, Hq, D]``, k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, DV]``.
* Packed THD: q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, *]``; the wrapper passes batch stride 0 and
  ``cu_seqlens_q/k`` (int32 ``[N + 1]``); block ``b`` starts at row ``cu[b]``.
* Every position is *block relative*: query ``i`` in ``[0, Lq)``, key ``j`` in ``[0, Lk)``, where
  ``Lq/Lk`` are the lengths of this batch row / packed block. Key tiles always start at multiples of
  ``BLOCK_K`` from the start of the sequence, so a sequence meets the same tiles, in the same order,
  whether it runs alone, padded in a batch or packed with others (batch invariance).
* Mask, per block: causal ``j <= i + off`` with ``off = Lk - Lq`` (bottom-right) or ``0``
  (top-left); window ``W`` also needs ``j > i + off - W``; key_valid ``[B, Sk]`` hides keys.
"""

import os

import triton
import triton.language as tl

# The Triton 3.9 interpreter multiplies bf16 operands of tl.dot as their raw uint16 bits (numpy has no
# bfloat16). Under the interpreter only, bf16 dot operands are widened to fp32 first: bf16 x bf16
# products are exact in fp32 and the accumulation is fp32, as on the tensor cores.
_WIDEN_BF16_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """``a @ b + acc`` in float32. ``IEEE`` (fp32 inputs) forbids TF32 so fp32 matches the reference."""
    if _WIDEN_BF16_DOT:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load(ptrs, mask, USE_MASK: tl.constexpr):
    """``tl.load`` with ``mask`` (0 where False) only when USE_MASK: unmasked loads vectorize freely."""
    if USE_MASK:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _diagonal(Lq, Lk, CAUSAL: tl.constexpr, TOP_LEFT: tl.constexpr):
    """The causal diagonal offset of a block: ``Lk - Lq`` bottom-right, 0 top-left (and when not causal)."""
    off = Lk * 0
    if CAUSAL:
        if not TOP_LEFT:
            off = Lk - Lq
    return off


@triton.jit
def _visible(qi, kj, Lk, off, window, kv_valid,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KEY_VALID: tl.constexpr):
    """May query ``qi`` see key ``kj``? attnlib's visibility rule (``attnlib.plan``) in device code.

    ``qi``/``kj`` are index tensors that broadcast against each other (``offs_q[:, None]`` and
    ``offs_k[None, :]`` for a ``[Q, K]`` tile, the other way round for the transposed dK/dV tile);
    ``kv_valid`` is the int8 key_valid row broadcast like ``kj`` (ignored unless HAS_KEY_VALID).
    """
    ok = kj < Lk
    if CAUSAL:
        ok = ok & (kj <= qi + off)
        if HAS_WINDOW:
            ok = ok & (kj > qi + off - window)
    if HAS_KEY_VALID:
        ok = ok & (kv_valid != 0)
    return ok


@triton.jit
def _sequence(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """``(q_start, k_start, Lq, Lk)`` of batch row / packed block ``b``.

    Packed (IS_VARLEN): the block's first q and k rows (int64) and lengths from ``cu_seqlens``.
    Dense: starts 0 (unused: dense offsets come from the batch stride, see :func:`_seq_offset`).
    """
    if IS_VARLEN:
        cq = tl.load(CuQ + b)
        ck = tl.load(CuK + b)
        Lq = tl.load(CuQ + b + 1) - cq
        Lk = tl.load(CuK + b + 1) - ck
        q_start = cq.to(tl.int64)
        k_start = ck.to(tl.int64)
    else:
        Lq = seqlen_q
        Lk = seqlen_k
        q_start = b.to(tl.int64) * 0
        k_start = b.to(tl.int64) * 0
    return q_start, k_start, Lq, Lk


@triton.jit
def _seq_offset(start, b, stride_s, stride_b, IS_VARLEN: tl.constexpr):
    """Element offset of sequence ``b``'s first row in one tensor: packed row ``start`` or batch row ``b``."""
    if IS_VARLEN:
        o = start * stride_s
    else:
        o = b.to(tl.int64) * stride_b
    return o


@triton.jit
def _query_program(GROUP: tl.constexpr, CAUSAL: tl.constexpr):
    """``(query tile, query head, kv head, batch row / block)`` of a program on the grid
    ``(cdiv(max Sq, BLOCK_Q), Hq, B or N)``; causal grids run the heaviest query tiles (most keys)
    first, for better tail balance."""
    pid_q = tl.program_id(0)
    if CAUSAL:
        pid_q = tl.num_programs(0) - 1 - pid_q
    h = tl.program_id(1)
    return pid_q, h, h // GROUP, tl.program_id(2)


@triton.jit
def _head_base(T, start, b, h, stride_s, stride_b, stride_h, IS_VARLEN: tl.constexpr):
    """``T`` advanced to the first row of sequence ``b`` (packed row ``start``) and to head ``h``."""
    return T + _seq_offset(start, b, stride_s, stride_b, IS_VARLEN) + h.to(tl.int64) * stride_h


@triton.jit
def _key_range(q0, Lq, Lk, window,
               CAUSAL: tl.constexpr, TOP_LEFT: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_KEY_VALID: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """The key tiles query tile ``[q0, q0 + BLOCK_Q)`` walks, as ``(off, lo, a, b_, hi)``.

    ``off`` is the causal diagonal offset (``Lk - Lq`` bottom-right, 0 top-left or non-causal).
    Tiles start at ``lo, lo + BLOCK_K, ... < hi`` (tiles wholly hidden by causal/window are skipped;
    ``hi = 0`` for programs past the block's end); those in ``[a, b_)`` are fully visible to every row
    of the query tile and need no mask arithmetic. One rule for the forward and the dQ kernels, so
    both visit the same tiles in the same order.
    """
    off = _diagonal(Lq, Lk, CAUSAL, TOP_LEFT)
    lo = Lk * 0
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, q0 + BLOCK_Q + off)
        if HAS_WINDOW:
            lo = (tl.maximum(q0 + off - window + 1, 0) // BLOCK_K) * BLOCK_K
    hi = tl.where(q0 < Lq, hi, 0)  # programs past this block's end do nothing
    if HAS_KEY_VALID:
        a = hi
        b_ = hi
    else:
        full_hi = Lk
        if CAUSAL:
            full_hi = tl.minimum(full_hi, q0 + off + 1)
        full_hi = (tl.maximum(full_hi, 0) // BLOCK_K) * BLOCK_K
        full_lo = lo
        if HAS_WINDOW:
            x = tl.maximum(q0 + BLOCK_Q + off - window, 0)
            full_lo = tl.maximum(lo, ((x + BLOCK_K - 1) // BLOCK_K) * BLOCK_K)
        a = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
        b_ = tl.maximum(a, tl.minimum(full_hi, hi))
    return off, lo, a, b_, hi


@triton.jit
def _fwd_key_tiles(
    acc, l_i, m_i, q, k_base, v_base, kv_base,
    offs_q, offs_d, offs_dv, lo, hi, Lk, off, window, qk_scale,
    stride_ks, stride_vs,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr, IEEE: tl.constexpr,
):
    """Fold key tiles starting at ``lo, lo + BLOCK_K, ... < hi`` into the online softmax state.

    ``MASKED=False`` is only used for tiles that every query row of the tile sees completely
    (inside ``Lk``, below the causal diagonal, inside the window, no key_valid); the arithmetic
    after the mask is identical in both variants, so a tile gives the same bits either way.
    """
    for start_k in range(lo, hi, BLOCK_K):
        offs_k = start_k + tl.arange(0, BLOCK_K)
        # kT: [BLOCK_D, BLOCK_K], element (d, j) at k_base + j * stride_ks + d
        kt_ptrs = k_base + offs_k[None, :] * stride_ks + offs_d[:, None]
        v_ptrs = v_base + offs_k[:, None] * stride_vs + offs_dv[None, :]
        if MASKED:
            in_k = offs_k < Lk
            kv = tl.zeros([BLOCK_K], dtype=tl.int8)
            if HAS_KEY_VALID:
                kv = tl.load(kv_base + offs_k, mask=in_k, other=0)
                # hidden keys load as 0 so garbage (even NaN) in padded V rows cannot leak in
                in_k = in_k & (kv != 0)
            kt = tl.load(kt_ptrs, mask=(offs_k[None, :] < Lk) & (offs_d[:, None] < D), other=0.0)
            v = tl.load(v_ptrs, mask=in_k[:, None] & (offs_dv[None, :] < DV), other=0.0)
        else:  # whole tile inside [0, Lk): only a padded head dim needs a mask
            kt = _load(kt_ptrs, offs_d[:, None] < D, BLOCK_D != D)
            v = _load(v_ptrs, offs_dv[None, :] < DV, BLOCK_DV != DV)
        qk = _dot(q, kt, tl.zeros([BLOCK_Q, BLOCK_K], dtype=tl.float32), IEEE)
        if MASKED:
            ok = _visible(offs_q[:, None], offs_k[None, :], Lk, off, window, kv[None, :],
                          CAUSAL, HAS_WINDOW, HAS_KEY_VALID)
            qk = tl.where(ok, qk, float("-inf"))
        # scores in log2 units: s * scale * log2(e)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # row with nothing visible yet
        p = tl.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window"])
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, KeyValid, CuQ, CuK,
    # Q    : dense [B, Sq, Hq, D] strides (stride_qb, stride_qs, stride_qh, 1);
    #        packed [Tq, Hq, D] strides (-, stride_qs, stride_qh, 1) with stride_qb = 0
    # K    : [B, Sk, Hkv, D] / [Tk, Hkv, D]    strides (stride_kb, stride_ks, stride_kh, 1)
    # V    : [B, Sk, Hkv, DV] / [Tk, Hkv, DV]  strides (stride_vb, stride_vs, stride_vh, 1)
    # Out  : [B, Sq, Hq, DV] / [Tq, Hq, DV]    strides (stride_ob, stride_os, stride_oh, 1)
    # Lse  : float32 [B, Hq, Sq] / [Hq, Tq]    strides (stride_lb, stride_lh, 1)
    # KeyValid : int8 [B, Sk] strides (stride_mb, 1); dummy unless HAS_KEY_VALID
    # CuQ, CuK : int32 [N + 1]; dummies unless IS_VARLEN
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_mb,
    seqlen_q, seqlen_k,        # dense Sq, Sk (ignored when IS_VARLEN)
    qk_scale,                  # scale * log2(e)
    window,                    # causal window W (ignored unless HAS_WINDOW)
    GROUP: tl.constexpr,       # Hq // Hkv
    D: tl.constexpr, DV: tl.constexpr,
    IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, TOP_LEFT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
    BLOCK_Q: tl.constexpr,     # query rows per program
    BLOCK_K: tl.constexpr,     # key rows per inner step
    BLOCK_D: tl.constexpr,     # next_pow2(D), masked loads pad the tail
    BLOCK_DV: tl.constexpr,    # next_pow2(DV)
    IEEE: tl.constexpr,
):
    pid_q, h, hk, b = _query_program(GROUP, CAUSAL)
    q_start, k_start, Lq, Lk = _sequence(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    q0 = pid_q * BLOCK_Q
    q_base = _head_base(Q, q_start, b, h, stride_qs, stride_qb, stride_qh, IS_VARLEN)
    k_base = _head_base(K, k_start, b, hk, stride_ks, stride_kb, stride_kh, IS_VARLEN)
    v_base = _head_base(V, k_start, b, hk, stride_vs, stride_vb, stride_vh, IS_VARLEN)
    o_base = _head_base(Out, q_start, b, h, stride_os, stride_ob, stride_oh, IS_VARLEN)
    l_base = _head_base(Lse, q_start, b, h, 1, stride_lb, stride_lh, IS_VARLEN)
    kv_base = KeyValid + b.to(tl.int64) * stride_mb

    offs_q = q0 + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_base + offs_q[:, None] * stride_qs + offs_d[None, :],
                mask=(offs_q[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)

    # ---- key range this query tile can see (tile-skipping; bounds are block relative) ----
    off, lo, a, b_, hi = _key_range(q0, Lq, Lk, window, CAUSAL, TOP_LEFT, HAS_WINDOW, HAS_KEY_VALID,
                                    BLOCK_Q, BLOCK_K)

    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], dtype=tl.float32)
    # ascending tile order in all three parts: same order as a sequence run alone
    acc, l_i, m_i = _fwd_key_tiles(acc, l_i, m_i, q, k_base, v_base, kv_base, offs_q, offs_d, offs_dv,
                                   lo, a, Lk, off, window, qk_scale, stride_ks, stride_vs,
                                   D, DV, BLOCK_Q, BLOCK_K, BLOCK_D, BLOCK_DV,
                                   True, CAUSAL, HAS_WINDOW, HAS_KEY_VALID, IEEE)
    acc, l_i, m_i = _fwd_key_tiles(acc, l_i, m_i, q, k_base, v_base, kv_base, offs_q, offs_d, offs_dv,
                                   a, b_, Lk, off, window, qk_scale, stride_ks, stride_vs,
                                   D, DV, BLOCK_Q, BLOCK_K, BLOCK_D, BLOCK_DV,
                                   False, CAUSAL, HAS_WINDOW, HAS_KEY_VALID, IEEE)
    acc, l_i, m_i = _fwd_key_tiles(acc, l_i, m_i, q, k_base, v_base, kv_base, offs_q, offs_d, offs_dv,
                                   b_, hi, Lk, off, window, qk_scale, stride_ks, stride_vs,
                                   D, DV, BLOCK_Q, BLOCK_K, BLOCK_D, BLOCK_DV,
                                   True, CAUSAL, HAS_WINDOW, HAS_KEY_VALID, IEEE)

    # rows that saw no key: l = 0 -> output 0 and LSE -inf (never 0/0)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    row_ok = offs_q < Lq
    tl.store(o_base + offs_q[:, None] * stride_os + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(l_base + offs_q, lse, mask=row_ok)
