"""Triton rotary / mRoPE kernels.

One kernel family rotates query and key heads in a single launch. The rotation angle of a token comes
from one of three sources, chosen at compile time:

* a cos/sin table (``apply_rotary``, ``apply_rotary_qk``),
* 1-D positions per token and ``inv_freq`` (``apply_rotary_pos_qk``: packed / varlen sequences),
* three rows of positions per token (temporal, height, width) and ``inv_freq`` (``apply_mrope_qk``:
  Qwen2/2.5-VL sectioned mRoPE, Qwen3-VL / Qwen3-Omni interleaved mRoPE).

Semantics (shared with the torch reference in ``attnlib.rope``): with ``R`` rotary frequencies, the
first ``2 * R`` dims of the head dim ``D`` are rotated, dims ``>= 2 * R`` pass through unchanged.
``interleaved=False`` is the rotate-half (NeoX) pairing, dim ``i`` with ``i + R``;
``interleaved=True`` is the adjacent-pair (GPT-J) pairing, dim ``2i`` with ``2i + 1``. For pair
``(a, b)`` with frequency ``f``::

    out_a = a * cos[f] - b * sin[f]
    out_b = b * cos[f] + a * sin[f]

computed in float32 and returned in the input's dtype. The backward pass is the same kernel with
``sin`` negated (a rotation by ``-theta``), so every function here is differentiable in ``q``/``k``
(and ``apply_rotary*`` also in ``cos``/``sin``, computed in torch when requested).

Importing this module needs Triton. The kernels run on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` was set before Triton was imported.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__ = [
    "apply_rotary",
    "apply_rotary_qk",
    "apply_rotary_pos_qk",
    "apply_mrope_qk",
    "mrope_freq_rows",
    "kernels_can_run",
]

# How the kernel gets cos/sin (a constexpr).
_ANGLE_TABLE = 0  # cos/sin tables [NBc, S, R]
_ANGLE_POS = 1  # 1-D positions [NB, S] x inv_freq [R]
_ANGLE_MROPE_SECTIONED = 2  # positions [3, NB, S]; f < s0 -> row 0, f < s0 + s1 -> row 1, else row 2
_ANGLE_MROPE_INTERLEAVED = 3  # positions [3, NB, S]; f % 3 == 1 and f < 3*s1 -> row 1, == 2 and f < 3*s2 -> row 2

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    """Whether our kernels were built for Triton's CPU interpreter (decided when triton.jit ran)."""
    return _INTERPRETED


def kernels_can_run(t: torch.Tensor) -> bool:
    """True when the rotary kernels can run on ``t``'s device (CUDA, or any device under the interpreter)."""
    return t.is_cuda or (_interpreting() and t.device.type == "cpu")


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rotate_heads(
    X, XO,  # in/out of one tensor (q or k); see _rotary_qk_kernel for shapes and strides
    stride_xb, stride_xs, stride_xh,
    stride_ob, stride_os, stride_oh,
    pid_b, t, t_mask, D, R,
    c, s,  # [BLOCK_TOKENS, BLOCK_FREQS] float32; s already carries the sign of the direction
    h_start, h_end,
    INTERLEAVED: tl.constexpr,
    HAS_PASS: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_FREQS: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    x_row = X + pid_b.to(tl.int64) * stride_xb + t.to(tl.int64)[:, None] * stride_xs
    o_row = XO + pid_b.to(tl.int64) * stride_ob + t.to(tl.int64)[:, None] * stride_os
    f = tl.arange(0, BLOCK_FREQS)
    f_mask = t_mask[:, None] & (f < R)[None, :]
    e = tl.arange(0, 2 * BLOCK_FREQS)  # interleaved: the 2R rotated dims as one contiguous tile
    e_mask = t_mask[:, None] & (e < 2 * R)[None, :]
    p = tl.arange(0, BLOCK_PASS)  # dims [2R, D) pass through
    p_mask = t_mask[:, None] & (p < D - 2 * R)[None, :]
    for h in range(h_start, h_end):
        xh = x_row + h * stride_xh
        oh = o_row + h * stride_oh
        if INTERLEAVED:
            xe = tl.load(xh + e[None, :], mask=e_mask, other=0.0).to(tl.float32)
            a, b = tl.split(tl.reshape(xe, [BLOCK_TOKENS, BLOCK_FREQS, 2]))
        else:
            a = tl.load(xh + f[None, :], mask=f_mask, other=0.0).to(tl.float32)
            b = tl.load(xh + R + f[None, :], mask=f_mask, other=0.0).to(tl.float32)
        out_a = a * c - b * s
        out_b = b * c + a * s
        if INTERLEAVED:
            oe = tl.reshape(tl.join(out_a, out_b), [BLOCK_TOKENS, 2 * BLOCK_FREQS])
            tl.store(oh + e[None, :], oe.to(XO.dtype.element_ty), mask=e_mask)
        else:
            tl.store(oh + f[None, :], out_a.to(XO.dtype.element_ty), mask=f_mask)
            tl.store(oh + R + f[None, :], out_b.to(XO.dtype.element_ty), mask=f_mask)
        if HAS_PASS:
            xp = tl.load(xh + 2 * R + p[None, :], mask=p_mask, other=0.0)
            tl.store(oh + 2 * R + p[None, :], xp.to(XO.dtype.element_ty), mask=p_mask)


@triton.jit
def _rotary_qk_kernel(
    Q, K, QO, KO,
    # q  [NB, S, Hq, D]   strides (stride_qb, stride_qs, stride_qh, 1)    packed THD: NB = 1, S = T
    # k  [NB, S, Hkv, D]  strides (stride_kb, stride_ks, stride_kh, 1)    (ignored when Hkv == 0)
    # qo [NB, S, Hq, D]   strides (stride_qob, stride_qos, stride_qoh, 1)
    # ko [NB, S, Hkv, D]  strides (stride_kob, stride_kos, stride_koh, 1)
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_qob, stride_qos, stride_qoh,
    stride_kob, stride_kos, stride_koh,
    COS, SIN,
    # ANGLE == TABLE: cos, sin [NBc, S, R] strides (stride_cb, stride_cs, stride_cr); stride_cb = 0
    #                 broadcasts one table over the batch.
    stride_cb, stride_cs, stride_cr,
    POS, INV_FREQ,
    # ANGLE == POS:    pos [NB, S]     strides (stride_pb, stride_ps); stride_pb = 0 broadcasts
    # ANGLE == MROPE_*: pos [3, NB, S] strides (stride_prow, stride_pb, stride_ps)
    # inv_freq [R] contiguous float32
    stride_prow, stride_pb, stride_ps,
    S, Hq, Hkv, D, R,
    SEC1, SEC2,  # mRoPE sections: sectioned uses s0 = SEC1 (boundary 1) and s0 + s1 = SEC2 (boundary 2);
                 # interleaved uses SEC1 = s1 and SEC2 = s2
    HEADS_PER_PROG, N_Q_GROUPS,
    ANGLE: tl.constexpr,
    INTERLEAVED: tl.constexpr,  # False: pairs (i, i + R); True: pairs (2i, 2i + 1)
    CONJ: tl.constexpr,  # True: rotate by -theta (the backward pass)
    PRECISE_TRIG: tl.constexpr,  # libdevice sin/cos (full range reduction) instead of tl.sin/tl.cos
    HAS_PASS: tl.constexpr,  # D > 2R: copy the untouched tail of each head
    BLOCK_TOKENS: tl.constexpr,  # tokens per program
    BLOCK_FREQS: tl.constexpr,  # next power of two >= R: one tile row holds every frequency
    BLOCK_PASS: tl.constexpr,  # next power of two >= D - 2R (1 when there is no tail)
):
    # grid = (cdiv(S, BLOCK_TOKENS), NB, N_Q_GROUPS + N_K_GROUPS); a program rotates BLOCK_TOKENS tokens
    # of HEADS_PER_PROG heads, of q (group < N_Q_GROUPS) or of k, computing cos/sin once for them all.
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_g = tl.program_id(2)

    t = pid_t * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    f = tl.arange(0, BLOCK_FREQS)
    t_mask = t < S
    cs_mask = t_mask[:, None] & (f < R)[None, :]

    if ANGLE == 0:
        c_off = pid_b.to(tl.int64) * stride_cb + t.to(tl.int64)[:, None] * stride_cs + f[None, :] * stride_cr
        c = tl.load(COS + c_off, mask=cs_mask, other=1.0).to(tl.float32)
        s = tl.load(SIN + c_off, mask=cs_mask, other=0.0).to(tl.float32)
    else:
        p_off = pid_b.to(tl.int64) * stride_pb + t.to(tl.int64) * stride_ps
        if ANGLE == 1:
            pos = tl.load(POS + p_off, mask=t_mask, other=0).to(tl.float32)[:, None]
        else:
            p0 = tl.load(POS + p_off, mask=t_mask, other=0).to(tl.float32)[:, None]
            p1 = tl.load(POS + stride_prow + p_off, mask=t_mask, other=0).to(tl.float32)[:, None]
            p2 = tl.load(POS + 2 * stride_prow + p_off, mask=t_mask, other=0).to(tl.float32)[:, None]
            if ANGLE == 2:
                row = tl.where(f < SEC1, 0, tl.where(f < SEC2, 1, 2))
            else:
                m3 = f % 3
                row = tl.where((m3 == 1) & (f < 3 * SEC1), 1, tl.where((m3 == 2) & (f < 3 * SEC2), 2, 0))
            pos = tl.where(row[None, :] == 0, p0, tl.where(row[None, :] == 1, p1, p2))
        inv_freq = tl.load(INV_FREQ + f, mask=f < R, other=0.0).to(tl.float32)
        angle = pos * inv_freq[None, :]
        if PRECISE_TRIG:
            c = libdevice.cos(angle)
            s = libdevice.sin(angle)
        else:
            c = tl.cos(angle)
            s = tl.sin(angle)
    if CONJ:
        s = -s

    if pid_g < N_Q_GROUPS:
        h_start = pid_g * HEADS_PER_PROG
        h_end = tl.minimum(h_start + HEADS_PER_PROG, Hq)
        _rotate_heads(Q, QO, stride_qb, stride_qs, stride_qh, stride_qob, stride_qos, stride_qoh,
                      pid_b, t, t_mask, D, R, c, s, h_start, h_end,
                      INTERLEAVED, HAS_PASS, BLOCK_TOKENS, BLOCK_FREQS, BLOCK_PASS)
    else:
        h_start = (pid_g - N_Q_GROUPS) * HEADS_PER_PROG
        h_end = tl.minimum(h_start + HEADS_PER_PROG, Hkv)
        _rotate_heads(K, KO, stride_kb, stride_ks, stride_kh, stride_kob, stride_kos, stride_koh,
                      pid_b, t, t_mask, D, R, c, s, h_start, h_end,
                      INTERLEAVED, HAS_PASS, BLOCK_TOKENS, BLOCK_FREQS, BLOCK_PASS)


# triton.jit picks the interpreter from TRITON_INTERPRET at decoration time; follow what it chose.
_INTERPRETED = type(_rotary_qk_kernel).__name__ == "InterpretedFunction"


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def _as_nbshd(x: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] stays, packed [T, H, D] becomes a [1, T, H, D] view; last dim made unit-stride."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x if x.dim() == 4 else x.unsqueeze(0)


def _launch(q, k, *, angle, interleaved, conj, cos=None, sin=None, pos=None, inv_freq=None,
            sec1=0, sec2=0, R):
    """Rotate q (and k, if given) in one launch; returns new tensors with q's / k's shapes and dtypes.

    cos/sin must already be 3-D [NBc, S, R] (NBc in {1, NB}); pos [NB, S] (1-D mode) or
    [3, NB, S] (mRoPE), NB broadcast by stride 0 when its size is 1.
    """
    q4 = _as_nbshd(q)
    NB, S, Hq, D = q4.shape
    qo = torch.empty(q4.shape, dtype=q.dtype, device=q.device)
    if k is not None:
        k4 = _as_nbshd(k)
        Hkv = k4.shape[2]
        ko = torch.empty(k4.shape, dtype=k.dtype, device=k.device)
    else:
        k4, ko, Hkv = q4, qo, 0

    block_freqs = triton.next_power_of_2(R)
    block_pass = triton.next_power_of_2(max(D - 2 * R, 1))
    if _interpreting():
        # The interpreter pays per program and per op: few, large programs.
        block_tokens = min(triton.next_power_of_2(max(S, 1)), 64)
        heads_per_prog = max(Hq, Hkv, 1)
    else:
        # ~2K elements of one head per tile (16 tokens at D = 128), up to 8 heads per program so
        # cos/sin are loaded or computed once per 8 heads while the grid still fills the GPU.
        block_tokens = max(1, min(64, 2048 // triton.next_power_of_2(D)))
        heads_per_prog = 8 if triton.cdiv(S, block_tokens) * NB >= 512 else 4
    n_q_groups = triton.cdiv(Hq, heads_per_prog)
    n_k_groups = triton.cdiv(Hkv, heads_per_prog)
    if S == 0 or NB == 0 or (n_q_groups + n_k_groups) == 0:
        return qo.reshape(q.shape), (ko.reshape(k.shape) if k is not None else None)

    if angle == _ANGLE_TABLE:
        stride_c = (0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1), cos.stride(2))
        pos_arg, inv_arg, stride_p = cos, cos, (0, 0, 0)
    else:
        cos = sin = inv_freq
        stride_c = (0, 0, 0)
        pos_arg, inv_arg = pos, inv_freq
        if angle == _ANGLE_POS:
            stride_p = (0, 0 if pos.shape[0] == 1 else pos.stride(0), pos.stride(1))
        else:
            stride_p = (pos.stride(0), 0 if pos.shape[1] == 1 else pos.stride(1), pos.stride(2))

    grid = (triton.cdiv(S, block_tokens), NB, n_q_groups + n_k_groups)
    # Triton launches on the current CUDA device: make it the tensors' one (cuda:1 while cuda:0 is current).
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _launch_kernel(grid, q4, k4, qo, ko, cos, sin, stride_c, pos_arg, inv_arg, stride_p,
                       S, Hq, Hkv, D, R, sec1, sec2, heads_per_prog, n_q_groups,
                       angle, interleaved, conj, block_tokens, block_freqs, block_pass)
    return qo.reshape(q.shape), (ko.reshape(k.shape) if k is not None else None)


def _launch_kernel(grid, q4, k4, qo, ko, cos, sin, stride_c, pos_arg, inv_arg, stride_p,
                   S, Hq, Hkv, D, R, sec1, sec2, heads_per_prog, n_q_groups,
                   angle, interleaved, conj, block_tokens, block_freqs, block_pass):
    _rotary_qk_kernel[grid](
        q4, k4, qo, ko,
        q4.stride(0), q4.stride(1), q4.stride(2),
        k4.stride(0), k4.stride(1), k4.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2),
        ko.stride(0), ko.stride(1), ko.stride(2),
        cos, sin, *stride_c,
        pos_arg, inv_arg, *stride_p,
        S, Hq, Hkv, D, R,
        sec1, sec2,
        heads_per_prog, n_q_groups,
        ANGLE=angle,
        INTERLEAVED=bool(interleaved),
        CONJ=bool(conj),
        PRECISE_TRIG=not _interpreting(),
        HAS_PASS=D > 2 * R,
        BLOCK_TOKENS=block_tokens,
        BLOCK_FREQS=block_freqs,
        BLOCK_PASS=block_pass,
        num_warps=4,
    )


# --------------------------------------------------------------------------------------------------
# Validation (all of it runs before any kernel)
# --------------------------------------------------------------------------------------------------


def _check_x(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}; cast it first")
    if x.dim() not in (3, 4):
        raise ValueError(
            f"{name} must be [B, S, H, D] or packed [T, H, D], got shape {tuple(x.shape)}"
        )
    if not kernels_can_run(x):
        raise ValueError(
            f"{name} is on {x.device}: the Triton rotary kernels need a CUDA tensor (or "
            "TRITON_INTERPRET=1 set before importing triton, for CPU tensors); use the torch "
            "implementation in attnlib.rope otherwise"
        )


def _check_qk(q, k) -> None:
    _check_x("q", q)
    _check_x("k", k)
    if q.device != k.device:
        raise ValueError(f"q is on {q.device} but k is on {k.device}; move them to one device")
    if q.dim() != k.dim() or q.shape[:-2] != k.shape[:-2]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share the token dims ([B, S] or [T]); "
            "only the head count may differ"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head dim {q.shape[-1]} != k head dim {k.shape[-1]}; they must be equal")


def _check_rotary_dim(R: int, D: int, what: str) -> None:
    if R < 1 or 2 * R > D:
        raise ValueError(
            f"{what} has {R} rotary frequencies but the head dim is {D}: need 1 <= R <= D // 2 = {D // 2} "
            "(if your table repeats its frequencies as cat(freqs, freqs), pass only its first half)"
        )


def _check_table(x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate cos/sin against x and return them as [NBc, S, R] views."""
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"{name} must be float32 or x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move it to x's device")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    R = cos.shape[-1] if cos.dim() > 0 else 0
    _check_rotary_dim(R, x.shape[-1], f"cos {tuple(cos.shape)}")
    if x.dim() == 4:
        B, S = x.shape[:2]
        if cos.dim() == 2 and cos.shape[0] == S:
            return cos.unsqueeze(0), sin.unsqueeze(0)
        if cos.dim() == 3 and cos.shape[1] == S and cos.shape[0] in (1, B):
            return cos, sin
        raise ValueError(
            f"cos/sin {tuple(cos.shape)} do not fit x [B={B}, S={S}, H, D]: expected [S, R] or [B, S, R]"
        )
    T = x.shape[0]
    if cos.dim() == 2 and cos.shape[0] == T:
        return cos.unsqueeze(0), sin.unsqueeze(0)
    raise ValueError(f"cos/sin {tuple(cos.shape)} do not fit packed x [T={T}, H, D]: expected [T, R]")


def _check_inv_freq(inv_freq, q) -> int:
    if not isinstance(inv_freq, torch.Tensor):
        raise TypeError(f"inv_freq must be a torch.Tensor, got {type(inv_freq).__name__}")
    if inv_freq.dim() != 1:
        raise ValueError(f"inv_freq must be 1-D [R], got shape {tuple(inv_freq.shape)}")
    if not inv_freq.is_floating_point():
        raise TypeError(f"inv_freq must be a float tensor, got {inv_freq.dtype}")
    if inv_freq.device != q.device:
        raise ValueError(f"inv_freq is on {inv_freq.device} but q is on {q.device}; move it to q's device")
    R = inv_freq.shape[0]
    _check_rotary_dim(R, q.shape[-1], f"inv_freq [{R}]")
    if inv_freq.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "inv_freq requires grad, but the position kernels treat it as a constant; build cos/sin "
            "in torch and call apply_rotary_qk, which differentiates the table (or detach inv_freq)"
        )
    return R


def _check_positions(name: str, pos, q, rows: int) -> torch.Tensor:
    """Validate positions and return them as [NB, S] (rows=0) or [3, NB, S] (rows=3)."""
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(pos).__name__}")
    if pos.dtype == torch.bool or pos.is_complex():
        raise TypeError(f"{name} must be an integer or float tensor, got {pos.dtype}")
    if pos.device != q.device:
        raise ValueError(f"{name} is on {pos.device} but q is on {q.device}; move it to q's device")
    lead = (rows,) if rows else ()
    if q.dim() == 4:
        B, S = q.shape[:2]
        full = lead + (B, S)
        ok = pos.dim() == len(full) and pos.shape[-1] == S and pos.shape[-2] in (1, B) and pos.shape[:-2] == lead
        if rows == 0 and pos.dim() == 1 and pos.shape[0] == S:
            return pos.unsqueeze(0)
        if not ok:
            want = "[3, B, S]" if rows else "[B, S] or [S]"
            raise ValueError(f"{name} {tuple(pos.shape)} does not fit q [B={B}, S={S}, H, D]: expected {want}")
        return pos
    T = q.shape[0]
    if pos.shape != lead + (T,):
        want = "[3, T]" if rows else "[T]"
        raise ValueError(f"{name} {tuple(pos.shape)} does not fit packed q [T={T}, H, D]: expected {want}")
    return pos.unsqueeze(-2)


def _check_sections(mrope_section, R: int) -> tuple[int, int, int]:
    try:
        sec = tuple(int(s) for s in mrope_section)
    except TypeError:
        raise TypeError(f"mrope_section must be a sequence of 3 ints, got {mrope_section!r}") from None
    if len(sec) != 3 or any(s < 0 for s in sec):
        raise ValueError(f"mrope_section must be 3 non-negative ints (t, h, w), got {mrope_section!r}")
    if sum(sec) != R:
        raise ValueError(
            f"mrope_section {sec} sums to {sum(sec)} but inv_freq has R={R} frequencies; they must be equal"
        )
    return sec


def _check_interleaved_sections(sec: tuple[int, int, int], R: int) -> None:
    # Interleaved layout: height takes f = 1, 4, 7, ... < 3 * s1 and width f = 2, 5, 8, ... < 3 * s2;
    # a section that asks for more of them than fit below R would silently get fewer.
    got_h = len(range(1, min(3 * sec[1], R), 3))
    got_w = len(range(2, min(3 * sec[2], R), 3))
    if (got_h, got_w) != (sec[1], sec[2]):
        raise ValueError(
            f"interleaved mrope_section {sec} does not fit R={R} frequencies: height/width would get "
            f"{got_h}/{got_w} frequencies, not {sec[1]}/{sec[2]} (needs 3 * section[1|2] <= R + 2)"
        )


def mrope_freq_rows(R: int, mrope_section: Sequence[int], interleaved_sections: bool) -> list[int]:
    """The position row (0 = temporal, 1 = height, 2 = width) each frequency ``f < R`` reads.

    Sectioned (Qwen2/2.5-VL): ``[0] * s0 + [1] * s1 + [2] * s2``. Interleaved (Qwen3-VL / Qwen3-Omni,
    transformers' ``recomposition_frequencies``): ``f % 3 == 1 and f < 3 * s1`` -> 1,
    ``f % 3 == 2 and f < 3 * s2`` -> 2, every other ``f`` -> 0.
    """
    s0, s1, s2 = _check_sections(mrope_section, R)
    if not interleaved_sections:
        return [0] * s0 + [1] * s1 + [2] * s2
    _check_interleaved_sections((s0, s1, s2), R)
    return [1 if (f % 3 == 1 and f < 3 * s1) else 2 if (f % 3 == 2 and f < 3 * s2) else 0 for f in range(R)]


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


def _table_grads(x, dy, cos, sin, interleaved, cos_shape):
    """d(loss)/d(cos), d(loss)/d(sin) in torch (only when cos/sin require grad)."""
    R = cos.shape[-1]
    xf, dyf = x.float(), dy.float()
    if interleaved:
        x1, x2 = xf[..., 0:2 * R:2], xf[..., 1:2 * R:2]
        g1, g2 = dyf[..., 0:2 * R:2], dyf[..., 1:2 * R:2]
    else:
        x1, x2 = xf[..., :R], xf[..., R:2 * R]
        g1, g2 = dyf[..., :R], dyf[..., R:2 * R]
    dcos = (g1 * x1 + g2 * x2).sum(-2)  # sum over heads
    dsin = (g2 * x1 - g1 * x2).sum(-2)
    if dcos.dim() > len(cos_shape):  # [B, S, R] summed to a broadcast [S, R] table
        dcos, dsin = dcos.sum(0), dsin.sum(0)
    elif dcos.dim() == 3 and cos_shape[0] == 1:
        dcos, dsin = dcos.sum(0, keepdim=True), dsin.sum(0, keepdim=True)
    return dcos, dsin


class _RotaryTableFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, interleaved):
        cos3, sin3 = _check_table(q, cos, sin)
        qo, ko = _launch(q, k, angle=_ANGLE_TABLE, interleaved=interleaved, conj=False,
                         cos=cos3, sin=sin3, R=cos.shape[-1])
        ctx.interleaved = interleaved
        ctx.has_k = k is not None
        ctx.cos_shape = tuple(cos.shape)
        ctx.cos_dtypes = (cos.dtype, sin.dtype)
        need_table_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        saved = (cos3, sin3) + ((q, k) if need_table_grad else (None, None))
        ctx.save_for_backward(*saved)
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        cos3, sin3, q, k = ctx.saved_tensors
        R = cos3.shape[-1]
        if not ctx.has_k:
            dko = None
        dq, dk = _launch(dqo, dko, angle=_ANGLE_TABLE, interleaved=ctx.interleaved, conj=True,
                         cos=cos3, sin=sin3, R=R)
        dcos = dsin = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dcos, dsin = _table_grads(q, dqo, cos3, sin3, ctx.interleaved, ctx.cos_shape)
            if ctx.has_k:
                dck, dsk = _table_grads(k, dko, cos3, sin3, ctx.interleaved, ctx.cos_shape)
                dcos, dsin = dcos + dck, dsin + dsk
            dcos = dcos.reshape(ctx.cos_shape).to(ctx.cos_dtypes[0])
            dsin = dsin.reshape(ctx.cos_shape).to(ctx.cos_dtypes[1])
        return dq, dk, dcos, dsin, None


class _RotaryPosFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, pos, inv_freq, angle, sec1, sec2, interleaved):
        R = inv_freq.shape[0]
        qo, ko = _launch(q, k, angle=angle, interleaved=interleaved, conj=False, pos=pos,
                         inv_freq=inv_freq, sec1=sec1, sec2=sec2, R=R)
        ctx.save_for_backward(pos, inv_freq)
        ctx.args = (angle, sec1, sec2, interleaved)
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        pos, inv_freq = ctx.saved_tensors
        angle, sec1, sec2, interleaved = ctx.args
        dq, dk = _launch(dqo, dko, angle=angle, interleaved=interleaved, conj=True, pos=pos,
                         inv_freq=inv_freq, sec1=sec1, sec2=sec2, R=inv_freq.shape[0])
        return dq, dk, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """Rotary embedding of ``x`` from cos/sin tables, in one Triton launch.

    Args:
        x: ``[B, S, H, D]`` or packed ``[T, H, D]``, float16/bfloat16/float32. Any strides on the
            token and head dims (e.g. a slice of a fused qkv projection); the head dim is made
            unit-stride if it is not.
        cos, sin: ``[S, R]`` (shared by the batch), ``[B, S, R]`` / ``[1, S, R]``, or ``[T, R]`` for
            packed x; float32 or x's dtype; ``R <= D // 2``. Only the first ``2 * R`` dims of x are
            rotated.
        interleaved: False pairs dim ``i`` with ``i + R`` (rotate-half, NeoX / Llama / Qwen);
            True pairs ``2i`` with ``2i + 1`` (GPT-J / complex).

    Returns a new tensor with x's shape and dtype (contiguous). Differentiable in x (one kernel
    launch rotating the gradient by ``-theta``) and in cos/sin (torch).
    """
    _check_x("x", x)
    _check_table(x, cos, sin)
    return _RotaryTableFn.apply(x, None, cos, sin, bool(interleaved))[0]


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                    interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary`` on q and k (any head counts, e.g. GQA) in ONE kernel launch.

    q ``[B, S, Hq, D]`` / ``[T, Hq, D]`` and k ``[B, S, Hkv, D]`` / ``[T, Hkv, D]`` share the token
    dims and the head dim; cos/sin as in :func:`apply_rotary`. Returns ``(q_out, k_out)``.
    """
    _check_qk(q, k)
    _check_table(q, cos, sin)
    return _RotaryTableFn.apply(q, k, cos, sin, bool(interleaved))


def apply_rotary_pos_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *,
                        interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k from per-token positions, cos/sin computed in-kernel.

    ``angle[token, f] = float32(positions[token]) * inv_freq[f]`` (the product transformers and
    diffusers compute in float32), then the rotation of :func:`apply_rotary`.

    Args:
        positions: ``[B, S]`` or ``[S]`` for dense q/k, ``[T]`` for packed q/k (e.g. positions that
            restart at 0 in every packed sequence); any integer or float dtype.
        inv_freq: ``[R]`` float, ``R <= D // 2``.
    """
    _check_qk(q, k)
    R = _check_inv_freq(inv_freq, q)
    pos = _check_positions("positions", positions, q, rows=0)
    inv = inv_freq.float().contiguous()
    return _RotaryPosFn.apply(q, k, pos, inv, _ANGLE_POS, 0, 0, bool(interleaved))


def apply_mrope_qk(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                   mrope_section: Sequence[int], *, interleaved_sections: bool = False,
                   rotary_interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimodal rotary (mRoPE) of q and k with 3-row positions, cos/sin computed in-kernel.

    Frequency ``f`` (``0 <= f < R``) reads the position of row ``mrope_freq_rows(...)[f]``
    (0 = temporal, 1 = height, 2 = width):

    * ``interleaved_sections=False`` (Qwen2-VL, Qwen2.5-VL, Qwen2.5-Omni): contiguous chunks,
      ``f < s0`` temporal, ``s0 <= f < s0 + s1`` height, the rest width.
    * ``interleaved_sections=True`` (Qwen3-VL, Qwen3-Omni): ``f % 3 == 1 and f < 3 * s1`` height,
      ``f % 3 == 2 and f < 3 * s2`` width, every other frequency temporal; e.g. (24, 20, 20) for
      R = 64 gives THWTHW...THW then TTTT for f >= 60.

    Args:
        position_ids: ``[3, B, S]`` for dense q/k (``[3, 1, S]`` broadcasts), ``[3, T]`` packed.
        inv_freq: ``[R]`` float; ``mrope_section``: 3 ints summing to R.
        rotary_interleaved: the pairing within the head dim; the Qwen models use rotate-half (False).
    """
    _check_qk(q, k)
    R = _check_inv_freq(inv_freq, q)
    s0, s1, s2 = _check_sections(mrope_section, R)
    pos = _check_positions("position_ids", position_ids, q, rows=3)
    inv = inv_freq.float().contiguous()
    if interleaved_sections:
        _check_interleaved_sections((s0, s1, s2), R)
        angle, sec1, sec2 = _ANGLE_MROPE_INTERLEAVED, s1, s2
    else:
        angle, sec1, sec2 = _ANGLE_MROPE_SECTIONED, s0, s0 + s1
    return _RotaryPosFn.apply(q, k, pos, inv, angle, sec1, sec2, bool(rotary_interleaved))
