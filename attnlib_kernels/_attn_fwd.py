"""Triton forward kernels for attnlib attention (FlashAttention-2 style online softmax) on a tile table.

Imported lazily by :mod:`attnlib_kernels.attention`, so that ``TRITON_INTERPRET`` can be set before Triton
is first imported. Nothing here validates input: the wrapper does that.

Conventions shared by every kernel in this package
--------------------------------------------------
* Tensors are BSHD: q ``[B, Sq, Hq, D]``, k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, DV]``; paged keys are the
  flattened page pools ``[num_pages * page, Hkv, D]`` read through ``block_table`` (batch 1).
* The **tile table** (int32, built on the host once per plan, see :class:`attnlib_kernels.attention.TileTable`):
  group ``g`` is a row of ``GW = 4 + 5 R`` ints ``(q_start, q_len, request, request_key_base)`` followed by
  ``R`` runs ``(k_start, k_len, offset, causal, window)`` (``k_len = 0``: unused; ``window = 0``: none).
  Query ``i`` of the group (``0 <= i < q_len``, global row ``q_start + i``) sees key ``j`` of a run
  (``0 <= j < k_len``, global key ``k_start + j``) iff the run is not causal or ``j <= i + offset`` (and
  with a window ``W``: ``j > i + offset - W``); ALiBi's distance is ``|i + offset - j|``.
* Query tiles start at multiples of ``BLOCK_Q`` from their group's start, key tiles at multiples of ``BLOCK_K``
  from their run's start, visited in ascending order: a sequence meets the same tiles whether it runs alone,
  padded in a batch or packed with others (batch invariance).
* Scores are in log2 units: ``x = s * log2(e)`` with ``s`` the modified score (scale, softcap, ALiBi), so the
  softmax uses ``exp2``; the LSE is returned in natural units.
"""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

_INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
# The Triton 3.9 interpreter multiplies bf16 operands of tl.dot as their raw uint16 bits (numpy has no
# bfloat16). Under the interpreter only, bf16 dot operands are widened to fp32 first: bf16 x bf16
# products are exact in fp32 and the accumulation is fp32, as on the tensor cores.
_WIDEN_BF16_DOT = _INTERPRETING
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


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
def _tanh(x):
    """tanh in float32 (libdevice on the GPU; the interpreter has no libdevice)."""
    if _INTERPRETING:
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)
    else:
        return libdevice.tanh(x)


@triton.jit
def _group(Groups, g, GW: tl.constexpr):
    """Group ``g``'s head: ``(q_start, q_len, request, request_key_base)``."""
    p = Groups + g * GW
    return tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3)


@triton.jit
def _run(Groups, g, r, GW: tl.constexpr):
    """``(k_start, k_len, offset, causal, window)`` of run ``r`` of group ``g``."""
    p = Groups + g * GW + 4 + r * 5
    return tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3), tl.load(p + 4)


@triton.jit
def _key_rows(kpos0, start, in_k, BlockTable, req, stride_bt, BLOCK_K: tl.constexpr, PAGED: tl.constexpr,
              PAGE: tl.constexpr, USE_MASK: tl.constexpr):
    """``(row0, rel)``: K/V row of key ``start + t`` (``t < BLOCK_K``) of a run whose first key sits at position
    ``kpos0`` is ``row0 + rel[t]``. Contiguous keys (``PAGED=0``): ``row0`` is the run's first row (int64) and
    ``rel = start + t`` (int32 offsets that depend on the loop variable, so the compiler does not hoist a whole
    tile of them out of the key loop). Paged keys (``kpos0`` = the run's position in its request): with
    ``PAGED=2`` every key tile lies in one page (page size a multiple of ``BLOCK_K``, runs aligned to it): one
    table read per tile, ``row0`` its first slot and ``rel = t``; with ``PAGED=1`` each key's slot
    ``block_table[req, pos // PAGE] * PAGE + pos % PAGE`` (``row0 = 0``)."""
    if PAGED == 2:
        pos = kpos0 + start
        page = tl.load(BlockTable + req.to(tl.int64) * stride_bt + pos // PAGE)
        return page.to(tl.int64) * PAGE + pos % PAGE, tl.arange(0, BLOCK_K)
    elif PAGED == 1:
        kpos = kpos0 + start + tl.arange(0, BLOCK_K)
        bt = BlockTable + req.to(tl.int64) * stride_bt + kpos // PAGE
        if USE_MASK:
            page = tl.load(bt, mask=in_k, other=0)
        else:
            page = tl.load(bt)
        return (kpos0 * 0).to(tl.int64), page.to(tl.int64) * PAGE + (kpos % PAGE)
    else:
        return kpos0.to(tl.int64), start + tl.arange(0, BLOCK_K)


@triton.jit
def _visible(qi, kj, Lk, off, causal, window, HAS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """May group-local query ``qi`` see run-local key ``kj``? The tile rule of ``attnlib.plan`` in device code
    (``qi``/``kj`` broadcast against each other: ``[Q, 1]`` x ``[1, K]`` or transposed). The run's flags turn
    into per-row key bounds first (``window`` is 0 unless the run is causal with a window)."""
    ok = kj < Lk
    if HAS_CAUSAL:
        ok = ok & (kj <= tl.where(causal != 0, qi + off, Lk))
        if HAS_WINDOW:
            ok = ok & (kj > tl.where(window != 0, qi + off - window, -1))
    return ok


@triton.jit
def _seen_span(i0, i1, Lk, off, causal, window, HAS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """``[kbeg, kend)``: the run-local keys some group row of ``[i0, i1]`` may see by the run's rule (the rows'
    union is one interval: two scalars, no work per tile)."""
    kbeg = Lk * 0
    kend = Lk
    if HAS_CAUSAL:
        kend = tl.where(causal != 0, tl.minimum(Lk, i1 + off + 1), Lk)
        if HAS_WINDOW:
            kbeg = tl.where(window != 0, tl.maximum(i0 + off - window + 1, 0), 0)
    return kbeg, kend


@triton.jit
def _scores(qk, qi, kj, off, qk_scale, cap_scale, cap_log2, slope2,
            SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """``(x, t)``: the modified scores of raw ``qk = q . k`` in log2 units, ``x = (c tanh(qk * scale / c) -
    slope |qi + off - kj|) * log2(e)`` (each part when enabled), and the softcap's tanh ``t`` (the
    backward's chain rule; ``qk`` when there is no softcap)."""
    if SOFTCAP:
        t = _tanh(qk * cap_scale)
        x = t * cap_log2
    else:
        t = qk
        x = qk * qk_scale
    if HAS_ALIBI:
        x = x - slope2 * tl.abs(qi + off - kj).to(tl.float32)
    return x, t


@triton.jit
def _key_range(q0, nrows, Lq, Lk, off, causal, window,
               ALL_MASKED: tl.constexpr, HAS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """Run-local key tiles that group rows ``[q0, q0 + nrows)`` walk, as ``(lo, a, b_, hi)``: tiles start at
    ``lo, lo + BLOCK_K, ... < hi`` (tiles hidden by causal / window are skipped; ``hi = 0`` when ``q0 >= Lq``);
    those in ``[a, b_)`` are whole tiles every row sees completely (no mask arithmetic). One rule for the
    forward and the dQ kernels, so both visit the same tiles in the same order."""
    lo = Lk * 0
    hi = Lk
    full_lo = lo
    full_hi = Lk
    if HAS_CAUSAL:
        c = causal != 0
        hi = tl.where(c, tl.minimum(Lk, q0 + nrows + off), Lk)
        full_hi = tl.where(c, tl.minimum(Lk, q0 + off + 1), Lk)
        if HAS_WINDOW:
            w = c & (window != 0)
            lo = tl.where(w, (tl.maximum(q0 + off - window + 1, 0) // BLOCK_K) * BLOCK_K, 0)
            x = tl.maximum(q0 + nrows + off - window, 0)
            full_lo = tl.where(w, tl.maximum(lo, ((x + BLOCK_K - 1) // BLOCK_K) * BLOCK_K), lo)
    hi = tl.where(q0 < Lq, tl.maximum(hi, 0), 0)
    if ALL_MASKED:
        a = hi
        b_ = hi
    else:
        full_hi = (tl.maximum(full_hi, 0) // BLOCK_K) * BLOCK_K
        a = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
        b_ = tl.maximum(a, tl.minimum(full_hi, hi))
    return lo, a, b_, hi


@triton.jit
def _masked_start(i, n_lo, lo, b_, BLOCK: tl.constexpr):
    """Start of the ``i``-th boundary tile: ``[lo, a)`` has ``n_lo`` tiles, then ``[b_, hi)`` (one loop for both
    keeps one copy of the masked tile code, and its registers, in a kernel)."""
    return tl.where(i < n_lo, lo + i * BLOCK, b_ + (i - n_lo) * BLOCK)


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, start_k, k_ptr, v_ptr, stride_ks, stride_vs, kpos0, BlockTable, req, stride_bt,
              kv_ptr, lay_rows, lay_ok, lay_k0, lay_bk, qi, kbeg, kend, offs_d, offs_dv, Lk, off, causal, window,
              qk_scale, cap_scale, cap_log2, slope2,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, HAS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_KEY_VALID: tl.constexpr, LAYOUT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
              PAGED: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr):
    """Fold the run-local key tile at ``start_k`` into the online softmax state of query rows ``qi`` ([Q, 1]).

    ``MASKED=False`` only for whole tiles every row sees completely (no key_valid, no element-wise layout);
    the arithmetic after the mask is the same in both variants, so a tile gives the same bits either way.
    Keys outside the run are never read; in masked tiles a hidden key's score becomes -inf (whatever its key
    holds) and the value rows no (real) row of the tile sees load as 0, so garbage there never meets a zero
    weight (``0 * NaN``). A non-finite value that one row sees and another row of the same tile does not
    reaches both (NaN, never a silent number)."""
    offs_k = start_k + tl.arange(0, BLOCK_K)
    in_k = offs_k < Lk
    row0, rel = _key_rows(kpos0, start_k, in_k, BlockTable, req, stride_bt, BLOCK_K, PAGED, PAGE, MASKED)
    kt_ptrs = k_ptr + row0 * stride_ks + rel[None, :] * stride_ks + offs_d[:, None]
    v_ptrs = v_ptr + row0 * stride_vs + rel[:, None] * stride_vs + offs_dv[None, :]
    if MASKED:
        # keys and values no row of the tile sees load as 0: garbage there (even NaN) cannot reach a row
        seen = offs_k < kend
        if HAS_WINDOW:
            seen = seen & (offs_k >= kbeg)
        if HAS_KEY_VALID:
            kv = tl.load(kv_ptr + kpos0 + offs_k, mask=in_k, other=0) != 0
            seen = seen & kv
        if LAYOUT:
            col = (lay_k0 + offs_k) // lay_bk
            lay = tl.load(lay_rows[:, None] + col[None, :], mask=lay_ok[:, None] & in_k[None, :], other=0) != 0
            seen = seen & (tl.max(lay.to(tl.int32), 0) > 0)
        kt = tl.load(kt_ptrs, mask=seen[None, :] & (offs_d[:, None] < D), other=0.0)
        v = tl.load(v_ptrs, mask=seen[:, None] & (offs_dv[None, :] < DV), other=0.0)
    else:
        kt = _load(kt_ptrs, offs_d[:, None] < D, BLOCK_D != D)
        v = _load(v_ptrs, offs_dv[None, :] < DV, BLOCK_DV != DV)
    qk = _dot(q, kt, tl.zeros([q.shape[0], BLOCK_K], dtype=tl.float32), IEEE)
    x, t = _scores(qk, qi, offs_k[None, :], off, qk_scale, cap_scale, cap_log2, slope2, SOFTCAP, HAS_ALIBI)
    if MASKED:
        ok = _visible(qi, offs_k[None, :], Lk, off, causal, window, HAS_CAUSAL, HAS_WINDOW)
        if HAS_KEY_VALID:
            ok = ok & kv[None, :]
        if LAYOUT:
            ok = ok & lay
        x = tl.where(ok, x, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(x, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # row with nothing visible yet
    p = tl.exp2(x - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(v.dtype), v, acc, IEEE)
    return acc, l_i, m_new


@triton.jit
def _fwd_run(acc, l_i, m_i, q, q0, nrows, Lq, qt, h, b, k_ptr, v_ptr, stride_ks, stride_vs, kpos0, BlockTable, req,
             stride_bt, kv_ptr, lay_rows, lay_ok, lay_k0, lay_bk, KvNum, KvIdx, stride_nb, stride_nh, stride_nq,
             stride_ib, stride_ih, stride_iq, k_lo, k_hi, qi, offs_d, offs_dv, Lk, off, causal, window,
             qk_scale, cap_scale, cap_log2, slope2,
             D: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr, HAS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
             HAS_KEY_VALID: tl.constexpr, SPARSE: tl.constexpr, LAYOUT: tl.constexpr, SOFTCAP: tl.constexpr,
             HAS_ALIBI: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr):
    """Fold one run into the state: its key tiles in ``[k_lo, k_hi)`` (the split-K range; the whole run
    otherwise) that rows ``[q0, q0 + nrows)`` may see. Dense: the whole visible tiles without mask arithmetic,
    then the boundary tiles with it (a fixed order that depends only on the group's geometry). Block-sparse:
    only the listed key tiles of query tile ``qt`` (ascending), each masked unless whole, visible by structure
    and the layout is exact."""
    lo, a, b_, hi = _key_range(q0, nrows, Lq, Lk, off, causal, window, HAS_KEY_VALID or LAYOUT,
                               HAS_CAUSAL, HAS_WINDOW, BLOCK_K)
    kbeg, kend = _seen_span(q0, q0 + nrows - 1, Lk, off, causal, window, HAS_CAUSAL, HAS_WINDOW)
    lo = tl.maximum(lo, k_lo)
    hi = tl.minimum(hi, k_hi)
    a = tl.minimum(tl.maximum(a, lo), tl.maximum(hi, lo))
    b_ = tl.maximum(a, tl.minimum(b_, hi))
    if SPARSE:
        n = tl.load(KvNum + b * stride_nb + h * stride_nh + qt * stride_nq, mask=(Lk > 0) & (q0 < Lq), other=0)
        idx = KvIdx + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + qt.to(tl.int64) * stride_iq
        for i in range(0, n):
            start_k = tl.load(idx + i) * BLOCK_K
            if (start_k >= a) & (start_k < b_):
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_k, k_ptr, v_ptr, stride_ks, stride_vs, kpos0,
                                          BlockTable, req, stride_bt, kv_ptr, lay_rows, lay_ok, lay_k0, lay_bk,
                                          qi, kbeg, kend, offs_d, offs_dv, Lk, off, causal, window, qk_scale, cap_scale,
                                          cap_log2, slope2, D, DV, BLOCK_K, BLOCK_D, BLOCK_DV, False, HAS_CAUSAL,
                                          HAS_WINDOW, HAS_KEY_VALID, LAYOUT, SOFTCAP, HAS_ALIBI, PAGED, PAGE, IEEE)
            else:
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_k, k_ptr, v_ptr, stride_ks, stride_vs, kpos0,
                                          BlockTable, req, stride_bt, kv_ptr, lay_rows, lay_ok, lay_k0, lay_bk,
                                          qi, kbeg, kend, offs_d, offs_dv, Lk, off, causal, window, qk_scale, cap_scale,
                                          cap_log2, slope2, D, DV, BLOCK_K, BLOCK_D, BLOCK_DV, True, HAS_CAUSAL,
                                          HAS_WINDOW, HAS_KEY_VALID, LAYOUT, SOFTCAP, HAS_ALIBI, PAGED, PAGE, IEEE)
    else:
        # ascending tiles (the order depends only on the group's geometry: batch invariance): boundary tiles
        # with mask arithmetic, the whole visible tiles without, boundary tiles again
        for start_k in range(lo, a, BLOCK_K):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_k, k_ptr, v_ptr, stride_ks, stride_vs, kpos0,
                                      BlockTable, req, stride_bt, kv_ptr, lay_rows, lay_ok, lay_k0, lay_bk,
                                      qi, kbeg, kend, offs_d, offs_dv, Lk, off, causal, window, qk_scale, cap_scale,
                                      cap_log2, slope2, D, DV, BLOCK_K, BLOCK_D, BLOCK_DV, True, HAS_CAUSAL,
                                      HAS_WINDOW, HAS_KEY_VALID, LAYOUT, SOFTCAP, HAS_ALIBI, PAGED, PAGE, IEEE)
        for start_k in range(a, b_, BLOCK_K):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_k, k_ptr, v_ptr, stride_ks, stride_vs, kpos0,
                                      BlockTable, req, stride_bt, kv_ptr, lay_rows, lay_ok, lay_k0, lay_bk,
                                      qi, kbeg, kend, offs_d, offs_dv, Lk, off, causal, window, qk_scale, cap_scale,
                                      cap_log2, slope2, D, DV, BLOCK_K, BLOCK_D, BLOCK_DV, False, HAS_CAUSAL,
                                      HAS_WINDOW, HAS_KEY_VALID, LAYOUT, SOFTCAP, HAS_ALIBI, PAGED, PAGE, IEEE)
        for start_k in range(b_, hi, BLOCK_K):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_k, k_ptr, v_ptr, stride_ks, stride_vs, kpos0,
                                      BlockTable, req, stride_bt, kv_ptr, lay_rows, lay_ok, lay_k0, lay_bk,
                                      qi, kbeg, kend, offs_d, offs_dv, Lk, off, causal, window, qk_scale, cap_scale,
                                      cap_log2, slope2, D, DV, BLOCK_K, BLOCK_D, BLOCK_DV, True, HAS_CAUSAL,
                                      HAS_WINDOW, HAS_KEY_VALID, LAYOUT, SOFTCAP, HAS_ALIBI, PAGED, PAGE, IEEE)
    return acc, l_i, m_i


@triton.jit
def _layout_rows(Layout, b, h, q_tok, row_ok, lay_q0, lay_bq, stride_yb, stride_yh, stride_yq,
                 LAYOUT: tl.constexpr):
    """Pointers to each query row's layout row (element-wise block-sparse masks), or the bare pointer."""
    if LAYOUT:
        base = Layout + b.to(tl.int64) * stride_yb + h.to(tl.int64) * stride_yh
        r = (tl.where(row_ok, q_tok, 0) + lay_q0) // lay_bq
        return base + r.to(tl.int64) * stride_yq
    else:
        return Layout + q_tok * 0


@triton.jit(do_not_specialize=["lay_q0", "lay_k0", "lay_bq", "lay_bk"])
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Table, KeyValid, Alibi, Sinks, BlockTable, KvNum, KvIdx, Layout,
    # Q [B, Sq, Hq, D], K [B, Sk, Hkv, D] / [slots, Hkv, D] (paged), V likewise with DV, Out [B, Sq, Hq, DV]
    # Lse float32 [B, Hq, Sq]; Table int32: groups at 0, query work items (group, q0) at work_off
    # KeyValid int8 [B, Sk]; Alibi float32 [B?, Hq] (slope per head); Sinks float32 [Hq]
    # BlockTable int32 [R, max_pages]; KvNum int32 [B?, H?, nQt], KvIdx int32 [B?, H?, nQt, nKt] (listed key
    # tiles, ascending); Layout int8 [B?, H?, nQ, nK] (element-wise block-sparse rule)
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_mb, stride_ab, stride_bt,
    stride_nb, stride_nh, stride_nq,
    stride_ib, stride_ih, stride_iq,
    stride_yb, stride_yh, stride_yq,
    work_off, lay_q0, lay_k0, lay_bq, lay_bk,
    qk_scale, cap_scale, cap_log2,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, R: tl.constexpr, GW: tl.constexpr,
    HAS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KEY_VALID: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
    SPARSE: tl.constexpr, LAYOUT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr,
):
    # grid: (query work items, Hq, B); the work list runs the heaviest query tiles first
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
    k_ptr = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_ptr = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    kv_ptr = KeyValid + b.to(tl.int64) * stride_mb
    lay_rows = _layout_rows(Layout, b, h, q_tok, row_ok, lay_q0, lay_bq, stride_yb, stride_yh, stride_yq, LAYOUT)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b * stride_ab + h) * _LOG2E
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    if HAS_SINKS:   # the sink is one more logit with no value: it starts the running max and sum
        m_i = tl.zeros([BLOCK_Q], dtype=tl.float32) + tl.load(Sinks + h) * _LOG2E
        l_i = l_i + 1.0
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], dtype=tl.float32)
    nrows = tl.minimum(Lq - q0, BLOCK_Q)
    qt = q0 // BLOCK_Q
    for r in tl.static_range(R):
        k_start, Lk, off, causal, window = _run(Table, g, r, GW)
        kpos0 = k_start
        if PAGED:
            kpos0 = k_start - req_base
        acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, q0, nrows, Lq, qt, h, b, k_ptr, v_ptr, stride_ks, stride_vs,
                                 kpos0, BlockTable, req, stride_bt, kv_ptr, lay_rows, row_ok, k_start + lay_k0,
                                 lay_bk, KvNum, KvIdx, stride_nb, stride_nh, stride_nq, stride_ib, stride_ih,
                                 stride_iq, 0, Lk, offs_q[:, None], offs_d, offs_dv, Lk, off, causal, window,
                                 qk_scale, cap_scale, cap_log2, slope2, D, DV, BLOCK_K, BLOCK_D, BLOCK_DV,
                                 HAS_CAUSAL, HAS_WINDOW, HAS_KEY_VALID, SPARSE, LAYOUT, SOFTCAP, HAS_ALIBI, PAGED,
                                 PAGE, IEEE)

    # rows that saw no key (and no sink): l = 0 -> output 0 and LSE -inf (never 0/0)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    tl.store(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + q_row0 * stride_os
             + rel_q[:, None] * stride_os + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_row0 + rel_q, lse, mask=row_ok)


# ------------------------------------------------------------------------------------------------------
# split-K decode: few query rows per group, long key runs. A program takes one key chunk of one run for
# every query head of a kv head (the GQA group's heads and the group's queries share the rows of one tile,
# so K/V are read once per kv head); partial (out, lse) per chunk merge by the LSE rule in a second kernel.
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_split_kernel(
    Q, K, V, OutPart, LsePart, Table, KeyValid, Alibi, BlockTable,
    # OutPart float32 [items, B, Hkv, ROWS, DV], LsePart float32 [items, B, Hkv, ROWS] (log2 units), contiguous
    # Table: items (group, run, k_lo, k_hi) at item_off
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_pi, stride_pb, stride_ph,
    stride_mb, stride_ab, stride_bt,
    item_off,
    qk_scale, cap_scale, cap_log2,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, GW: tl.constexpr,
    HAS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KEY_VALID: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (items, Hkv, B); tile row rho = i * GROUP + head-in-group
    it = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    g = tl.load(Table + item_off + 4 * it)
    r = tl.load(Table + item_off + 4 * it + 1)
    k_lo = tl.load(Table + item_off + 4 * it + 2)
    k_hi = tl.load(Table + item_off + 4 * it + 3)
    q_start, Lq, req, req_base = _group(Table, g, GW)
    k_start, Lk, off, causal, window = _run(Table, g, r, GW)

    rho = tl.arange(0, ROWS)
    qi = rho // GROUP
    h = hk * GROUP + rho % GROUP
    row_ok = qi < Lq
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + (q_start + qi).to(tl.int64)[:, None] * stride_qs
                + h.to(tl.int64)[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_ptr = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_ptr = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    kv_ptr = KeyValid + b.to(tl.int64) * stride_mb
    slope2 = tl.zeros([ROWS, 1], dtype=tl.float32)
    if HAS_ALIBI:
        slope2 = (tl.load(Alibi + b * stride_ab + h) * _LOG2E)[:, None]
    kpos0 = k_start
    if PAGED:
        kpos0 = k_start - req_base
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], dtype=tl.float32)
    # rows = the group's Lq queries (each row's keys follow from qi; nrows covers all of them)
    acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, 0, Lq, Lq, 0, hk, b, k_ptr, v_ptr, stride_ks, stride_vs, kpos0,
                             BlockTable, req, stride_bt, kv_ptr, kv_ptr, row_ok, 0, 1, kv_ptr, kv_ptr, 0, 0, 0,
                             0, 0, 0, k_lo, k_hi, qi[:, None], offs_d, offs_dv, Lk, off, causal, window, qk_scale,
                             cap_scale, cap_log2, slope2, D, DV, BLOCK_K, BLOCK_D, BLOCK_DV, HAS_CAUSAL, HAS_WINDOW,
                             HAS_KEY_VALID, False, False, SOFTCAP, HAS_ALIBI, PAGED, PAGE, IEEE)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    base = it.to(tl.int64) * stride_pi + b.to(tl.int64) * stride_pb + hk.to(tl.int64) * stride_ph + rho.to(tl.int64)
    tl.store(OutPart + base[:, None] * DV + offs_dv[None, :], out, mask=offs_dv[None, :] < DV)
    tl.store(LsePart + base, lse2)


@triton.jit
def _attn_split_merge_kernel(
    OutPart, LsePart, Out, Lse, Table, Sinks,
    # OutPart / LsePart as written by _attn_fwd_split_kernel; Table: per group (first item, item count) at
    # gitem_off, per query row its group at rowg_off
    stride_pi, stride_pb, stride_ph,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    gitem_off, rowg_off,
    GROUP: tl.constexpr, DV: tl.constexpr, GW: tl.constexpr, HAS_SINKS: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # grid: (Sq, Hq, B): one output row of one head, the LSE rule over its group's key chunks (and the sink)
    row = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    g = tl.load(Table + rowg_off + row)
    i = row - tl.load(Table + g * GW)
    first = tl.load(Table + gitem_off + 2 * g)
    count = tl.load(Table + gitem_off + 2 * g + 1)
    rho = i * GROUP + h % GROUP
    base = b.to(tl.int64) * stride_pb + (h // GROUP).to(tl.int64) * stride_ph + rho.to(tl.int64)
    one = tl.arange(0, 1)
    top = tl.zeros([1], dtype=tl.float32) - float("inf")
    if HAS_SINKS:
        top = tl.zeros([1], dtype=tl.float32) + tl.load(Sinks + h) * _LOG2E
    for c in range(0, count):
        top = tl.maximum(top, tl.load(LsePart + (first + c).to(tl.int64) * stride_pi + base + one))
    use = tl.where(top == float("-inf"), 0.0, top)
    offs_dv = tl.arange(0, BLOCK_DV)
    total = tl.zeros([1], dtype=tl.float32)
    if HAS_SINKS:
        total = tl.exp2(tl.load(Sinks + h) * _LOG2E - use)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for c in range(0, count):
        item = (first + c).to(tl.int64) * stride_pi + base
        wgt = tl.exp2(tl.load(LsePart + item + one) - use)
        total = total + wgt
        acc = acc + wgt * tl.load(OutPart + item * DV + offs_dv, mask=offs_dv < DV, other=0.0)
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)
    lse = tl.where(empty, float("-inf"), (use + tl.log2(tl.where(empty, 1.0, total))) * _LN2)
    tl.store(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + row.to(tl.int64) * stride_os + offs_dv,
             out.to(Out.dtype.element_ty), mask=offs_dv < DV)
    tl.store(Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + row + one, lse)
