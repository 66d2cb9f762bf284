"""The tolerance policy, in one place, for tests, ``attnlib check`` and anyone testing a backend.

A backend passes when its max error against the float64 reference is at most
``ERROR_RATIO`` times the error of a naive implementation in the same dtype (the plain formula
computed in that dtype), plus a small floor — the policy of flash-attn's own tests. The error budget
thus comes from the data, not from a constant per test.

The floor is the dtype's rounding at the magnitude of the values a quantity is computed from. Usually
that is the result's own magnitude; gradients can cancel to exactly 0 in the naive implementation (one
visible key: ``dK = 0``) while a fused kernel's ``dS = P * (dP - rowsum(dO * O))`` keeps a rounding error of
``dP``'s size, so their floor is scaled by ``gradient_magnitudes`` (``dP``'s bound times the other factor).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import reference_for

#: a backend may be this many times less accurate than the naive same-dtype implementation
ERROR_RATIO = 2.0
#: absolute floor per dtype (relative to the reference's magnitude, at least 1)
ERROR_FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2.0 ** -11,     # fp16 unit roundoff (half an ulp at 1.0)
    torch.bfloat16: 2.0 ** -8,     # bf16 unit roundoff
}


def max_abs_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max ``|x - ref|`` in float64; equal infinities (LSE ``-inf`` rows) count as 0, NaN as inf."""
    x = x.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    if x.shape != ref.shape:
        raise ValueError(f"shape {tuple(x.shape)} differs from reference {tuple(ref.shape)}")
    if x.numel() == 0:
        return 0.0
    same_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    diff = (x - ref).abs().masked_fill(same_inf, 0.0)
    diff = torch.nan_to_num(diff, nan=float("inf"), posinf=float("inf"))
    return float(diff.max())


def tolerance(naive_error: float, dtype: torch.dtype, ref: torch.Tensor | None = None,
              magnitude: float = 0.0) -> float:
    """The allowed error: ``ERROR_RATIO * naive_error + floor(dtype) * max(1, max|ref|, magnitude)``."""
    scale = max(1.0, magnitude)
    if ref is not None and ref.numel():
        finite = ref.detach()[torch.isfinite(ref.detach())]
        if finite.numel():
            scale = max(scale, float(finite.abs().max()))
    return ERROR_RATIO * naive_error + ERROR_FLOOR.get(dtype, 1e-3) * scale


def gradient_magnitudes(q, k, v, dout, scale: float) -> dict[str, float]:
    """The magnitudes the gradients are computed from, for their tolerance floor (keys ``dq dk dv``):
    ``|dP| <= max ||dO_i|| * max ||V_j||`` (Cauchy-Schwarz over the value dim), ``dQ ~ scale |dP| |K|``,
    ``dK ~ scale |dP| |Q|``, ``dV ~ |dO|``."""
    def row_norm(t):
        return float(t.detach().double().norm(dim=-1).max()) if t.numel() else 0.0

    def top(t):
        return float(t.detach().double().abs().max()) if t.numel() else 0.0

    dp = row_norm(dout) * row_norm(v)
    return {"dq": scale * dp * top(k), "dk": scale * dp * top(q), "dv": top(dout)}


@dataclass
class Comparison:
    """One quantity of one call: ``error`` vs ``tol`` (``naive`` = the same-dtype naive error)."""

    what: str
    error: float
    naive: float
    tol: float

    @property
    def passed(self) -> bool:
        return self.error <= self.tol


def compare(actual: torch.Tensor, reference: torch.Tensor, naive: torch.Tensor, dtype: torch.dtype,
            what: str = "out", magnitude: float = 0.0) -> Comparison:
    naive_err = max_abs_error(naive, reference)
    return Comparison(what, max_abs_error(actual, reference), naive_err,
                      tolerance(naive_err, dtype, reference, magnitude))


def assert_close_to_reference(actual, reference, naive, dtype, what: str = "out") -> Comparison:
    """Assert the policy; the message gives the numbers."""
    c = compare(actual, reference, naive, dtype, what)
    assert c.passed, (f"{what}: max error {c.error:.3g} > tolerance {c.tol:.3g} "
                      f"(naive {dtype} error {c.naive:.3g} x {ERROR_RATIO} + floor)")
    return c


def reference_and_naive(q, k, v, mask, scale: float, *, packed: bool | None = None, **modifiers):
    """``(ref64, naive)``: each an ``(out, lse)`` pair; ref in float64, naive in q's dtype. ``modifiers``:
    ``softcap``, ``alibi_slopes``, ``sinks``, ``block_table`` as for ``attnlib.attention``."""
    f64 = [t.detach().to(torch.float64) for t in (q, k, v)]
    mods = {n: (t.detach() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for n, t in modifiers.items()}
    ref = reference_for(*f64, mask, scale, compute_dtype=torch.float64, **mods)
    naive = reference_for(q.detach(), k.detach(), v.detach(), mask, scale, compute_dtype=q.dtype, **mods)
    return ref, naive
