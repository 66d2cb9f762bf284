"""Rotary position embedding: apply a cos/sin table to query/key heads, and build the table.

Pairing conventions (``R = cos.shape[-1]`` rotary frequencies, head dim ``D >= 2 * R``):

* ``interleaved=False`` -- rotate-half (GPT-NeoX, Llama, Qwen, transformers ``rotate_half``):
  dim ``i`` is paired with dim ``i + R`` for ``i < R``.
* ``interleaved=True`` -- adjacent pairs (GPT-J, complex multiplication, QwenImage / Flux):
  dim ``2i`` is paired with dim ``2i + 1``.

For a pair ``(a, b)`` rotated by frequency ``f``::

    a' = a * cos[f] - b * sin[f]
    b' = b * cos[f] + a * sin[f]

Dims ``>= 2 * R`` pass through unchanged (partial rotary). The math runs in float32 (float64 for float64
input) and the result has x's dtype.

On CUDA tensors, :func:`apply_rotary` and :func:`apply_rotary_qk` use the Triton kernels of
``attnlib_kernels.rotary`` when Triton is installed; everywhere else (and as the reference the
kernels are tested against) they run :func:`apply_rotary_torch`. Set ``ATTNLIB_ROTARY_KERNEL=0`` to
force the torch path.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from ..settings import ROTARY_KERNEL

__all__ = ["apply_rotary", "apply_rotary_qk", "apply_rotary_torch", "RotaryEmbedding", "rotary_inv_freq"]

_UNSET: Any = object()
_kernel_module: Any = _UNSET


def _rotary_kernels():
    """``attnlib_kernels.rotary`` if Triton and the kernels import, else None (looked up once)."""
    global _kernel_module
    if _kernel_module is _UNSET:
        try:
            import triton  # noqa: F401  (the kernels need it; never imported at module import time)
            import attnlib_kernels.rotary as kernels
        except ImportError:
            kernels = None
        _kernel_module = kernels
    return _kernel_module


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_for(x: torch.Tensor, cos: torch.Tensor, *others: torch.Tensor):
    """The kernel module when it can take this call: CUDA, a kernel dtype, a float32 or x-dtype table."""
    if not x.is_cuda or os.environ.get(ROTARY_KERNEL, "1") == "0":
        return None
    if any(not t.is_cuda or t.dtype != x.dtype for t in others) or x.dtype not in _KERNEL_DTYPES:
        return None
    if cos.dtype not in (torch.float32, x.dtype):
        return None
    return _rotary_kernels()


def _check_rotary_args(x, cos, sin, name: str = "x") -> int:
    """Validate shapes; return R, the number of rotary frequencies."""
    for arg, value in ((name, x), ("cos", cos), ("sin", sin)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(value).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"{name} must be [B, S, H, D] or packed [T, H, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.device != x.device or sin.device != x.device:
        raise ValueError(f"cos/sin are on {cos.device}, {name} on {x.device}: move the table to {name}'s device")
    R, D = cos.shape[-1], x.shape[-1]
    if R == 0 or 2 * R > D:
        raise ValueError(f"cos/sin last dim R={R} must satisfy 1 <= 2 * R <= head dim {D} (got {name} {tuple(x.shape)})")
    if x.dim() == 4:
        B, S = x.shape[:2]
        ok = (cos.dim() == 2 and cos.shape[0] == S) or (cos.dim() == 3 and cos.shape[1] == S and cos.shape[0] in (1, B))
        if not ok:
            raise ValueError(f"for {name} [B={B}, S={S}, H, D], cos/sin must be [S, R] or [B, S, R] "
                             f"(or [1, S, R]), got {tuple(cos.shape)}")
    else:
        T = x.shape[0]
        if not (cos.dim() == 2 and cos.shape[0] == T):
            raise ValueError(f"for packed {name} [T={T}, H, D], cos/sin must be [T, R], got {tuple(cos.shape)}")
    return R


def apply_rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                       interleaved: bool = False) -> torch.Tensor:
    """The plain-PyTorch rotary: same contract as :func:`apply_rotary`, never dispatches to a kernel."""
    R = _check_rotary_args(x, cos, sin)
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = cos.to(math_dtype).unsqueeze(-2)  # broadcast over heads: [..., S, 1, R]
    s = sin.to(math_dtype).unsqueeze(-2)
    inference = not (torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad))
    if inference and not torch.compiler.is_compiling():   # compiled: the plain formula, which inductor fuses
        # inference: four fused passes straight into the float32 output, no temporaries or cat
        out = torch.empty(x.shape, dtype=math_dtype, device=x.device)
        a, b = (x[..., 0: 2 * R: 2], x[..., 1: 2 * R: 2]) if interleaved else (x[..., :R], x[..., R: 2 * R])
        oa, ob = (out[..., 0: 2 * R: 2], out[..., 1: 2 * R: 2]) if interleaved else (out[..., :R], out[..., R: 2 * R])
        torch.mul(a, c, out=oa)
        oa.addcmul_(b, s, value=-1)
        torch.mul(b, c, out=ob)
        ob.addcmul_(a, s)
        if 2 * R < x.shape[-1]:
            out[..., 2 * R:] = x[..., 2 * R:]
        return out.to(x.dtype)
    xr = x[..., : 2 * R].to(math_dtype)
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        a, b = xr[..., :R], xr[..., R:]
        rotated = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    rotated = rotated.to(x.dtype)
    if 2 * R == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., 2 * R:]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """Rotary position embedding of ``x`` with a precomputed cos/sin table.

    Args:
        x: ``[B, S, H, D]`` (BSHD) or packed ``[T, H, D]``, any floating dtype.
        cos, sin: ``[S, R]`` (shared by the batch), ``[B, S, R]`` / ``[1, S, R]`` for BSHD x, or
            ``[T, R]`` for packed x, with ``1 <= R <= D // 2`` (e.g. from
            :meth:`RotaryEmbedding.cos_sin` or :meth:`attnlib.rope.MRotaryEmbedding.cos_sin`). Entry
            ``[..., s, f]`` is ``cos``/``sin`` of the angle of token ``s`` at frequency ``f``.
        interleaved: False: rotate-half (NeoX) pairing, dim ``i`` with ``i + R``; True: adjacent
            (GPT-J / complex) pairing, dim ``2i`` with ``2i + 1``.

    Returns a new tensor of x's shape and dtype: the first ``2 * R`` dims rotated (float32 math),
    the rest copied. Differentiable in x, cos and sin. On CUDA with Triton installed this runs the
    ``attnlib_kernels.rotary`` kernel; otherwise :func:`apply_rotary_torch`.
    """
    _check_rotary_args(x, cos, sin)
    kernels = kernel_for(x, cos)
    if kernels is not None:
        return kernels.apply_rotary(x, cos, sin, interleaved=interleaved)
    return apply_rotary_torch(x, cos, sin, interleaved=interleaved)


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                    interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_rotary` on query and key with one table; returns ``(q_rot, k_rot)``.

    q ``[B, S, Hq, D]`` / ``[T, Hq, D]`` and k ``[B, S, Hkv, D]`` / ``[T, Hkv, D]`` share every dim
    but the head count (GQA is fine). On CUDA with Triton both are rotated in one kernel launch.
    """
    _check_rotary_args(q, cos, sin, "q")
    _check_rotary_args(k, cos, sin, "k")
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on all dims except the head count")
    kernels = kernel_for(q, cos, k)
    if kernels is not None:
        return kernels.apply_rotary_qk(q, k, cos, sin, interleaved=interleaved)
    return (apply_rotary_torch(q, cos, sin, interleaved=interleaved),
            apply_rotary_torch(k, cos, sin, interleaved=interleaved))


def rotary_inv_freq(dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """``1 / theta ** (arange(0, dim, 2) / dim)`` in float32: ``dim // 2`` inverse frequencies.

    Computed exactly as transformers and diffusers do (float32 ``pow``), so tables built from it
    match theirs bit for bit.
    """
    if not isinstance(dim, int) or dim <= 0 or dim % 2:
        raise ValueError(f"dim must be a positive even int, got {dim!r}")
    return 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


class RotaryEmbedding:
    """1-D rotary table: ``cos_sin(positions)`` -> ``(cos, sin)`` of ``positions * inv_freq``.

    Args:
        dim: rotary dims (even); the table has ``dim // 2`` frequencies. Use ``dim < head_dim``
            for partial rotary.
        theta: base of the frequencies, ``inv_freq[f] = theta ** (-2f / dim)``.

    ``inv_freq`` is cached per device; :meth:`table` additionally caches the ``arange(seq_len)``
    table per ``(seq_len, device)``.
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        self.dim = dim
        self.theta = float(theta)
        self._inv_freq = {torch.device("cpu"): rotary_inv_freq(dim, self.theta)}
        self._tables: dict = {}

    def __repr__(self) -> str:
        return f"RotaryEmbedding(dim={self.dim}, theta={self.theta})"

    def inv_freq(self, device=None) -> torch.Tensor:
        device = torch.device("cpu") if device is None else torch.device(device)
        cached = self._inv_freq.get(device)
        if cached is None:
            cached = self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        return cached

    def cos_sin(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each float32 of shape ``[*positions.shape, dim // 2]``.

        ``positions`` may be an int or float tensor of any shape (or a Python sequence); the angle
        is ``float32(position) * inv_freq`` (the float32 product transformers computes).
        """
        if not isinstance(positions, torch.Tensor):
            positions = torch.as_tensor(positions)
        if positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"positions must be an int or float tensor, got dtype {positions.dtype}")
        angles = positions.float().unsqueeze(-1) * self.inv_freq(positions.device)
        return angles.cos(), angles.sin()

    def table(self, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached ``cos_sin(arange(seq_len))``, each ``[seq_len, dim // 2]`` (treat as read-only)."""
        key = (int(seq_len), torch.device("cpu") if device is None else torch.device(device))
        hit = self._tables.get(key)
        if hit is None:
            if len(self._tables) >= 32:
                self._tables.pop(next(iter(self._tables)))
            hit = self._tables[key] = self.cos_sin(torch.arange(key[0], device=key[1]))
        return hit
