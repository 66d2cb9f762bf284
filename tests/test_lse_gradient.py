"""Gradients through the returned LSE are exact on every backend (the kernels that return the LSE without
a gradient get it attached by the front door): out and LSE both in the loss, against the float64 oracle."""
import pytest
import torch

import attnlib
from attnlib import BlockDiagonal, Causal, DenseMask, KeyPadding
from attnlib.inputs import validate_call
from attnlib.testing import compare, gradient_magnitudes
from tests.reference64 import attention64

G = torch.Generator().manual_seed(0)
VALID = torch.rand(2, 13, generator=G) > 0.3
VALID[1] = False                                    # a batch row with no key at all
MASKS = {
    "none": (None, 9, 13),
    "causal_cache": (Causal(), 5, 13),
    "causal_q_longer": (Causal(), 13, 9),
    "window": (Causal(window=4), 13, 13),
    "key_padding_causal": (KeyPadding(VALID, causal=True), 13, 13),
    "dense_additive": (DenseMask(torch.randn(1, 4, 9, 13, generator=G)), 9, 13),
    "block_diagonal": (BlockDiagonal([4, 0, 6], [5, 3, 6], causal=True), None, None),
}


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("backend", ["math", "sdpa", "triton"])
def test_gradients_through_out_and_lse_match_float64(backend, name):
    mask, sq, sk = MASKS[name]
    if isinstance(mask, BlockDiagonal):
        shapes = [(mask.total_q, 4, 16), (mask.total_k, 2, 16), (mask.total_k, 2, 16)]
    else:
        shapes = [(2, sq, 4, 16), (2, sk, 2, 16), (2, sk, 2, 16)]
    leaves = [torch.randn(*s, generator=G).requires_grad_(True) for s in shapes]
    if attnlib.get_backend(backend).why_not(validate_call(*leaves, mask, None, True)):
        pytest.skip(f"{backend} does not serve {name} here")
    out, lse = attnlib.attention(*leaves, mask, backend=backend, return_lse=True)
    assert lse.requires_grad
    dout = torch.randn(out.shape, generator=G)
    dlse = torch.randn(lse.shape, generator=G).masked_fill(torch.isinf(lse), 0.0)
    got = torch.autograd.grad((out, lse), leaves, (dout, dlse), allow_unused=True)
    ref64 = [t.detach().double().requires_grad_(True) for t in leaves]
    naive_in = [t.detach().clone().requires_grad_(True) for t in leaves]
    scale = shapes[0][-1] ** -0.5

    def grads(inputs, dtype):
        o, l_ = attention64(*inputs, mask, scale, dtype=dtype)
        return torch.autograd.grad((o, l_.masked_fill(torch.isinf(l_), 0.0)), inputs,
                                   (dout.to(dtype), dlse.to(dtype)), allow_unused=True)

    ref, naive = grads(ref64, torch.float64), grads(naive_in, torch.float32)
    mags = gradient_magnitudes(*ref64, dout.double(), scale)
    lse_term = scale * float(dlse.detach().abs().max()) * max(float(t.detach().abs().max()) for t in leaves[:2])
    for g, r, n, what in zip(got, ref, naive, ("dq", "dk", "dv")):
        g = torch.zeros_like(leaves[0 if what == "dq" else 1]) if g is None else g
        r = torch.zeros_like(g, dtype=torch.float64) if r is None else r
        n = torch.zeros_like(g) if n is None else n
        c = compare(g, r, n, torch.float32, what, mags[what] + lse_term)
        assert c.passed, f"{backend} {name} {what}: error {c.error:.3g} > tolerance {c.tol:.3g}"
