"""Differential fuzzing: every backend that runs here against an independent float64 reference.

Each example is one random call: lengths biased towards 1, multiples of 8 and 16 and their neighbours;
head dims 8..256 (non-powers of two included) and ``Dv != D``; GQA ratios 1/2/4; every mask kind and
option (alignment, windows, per-block caches, empty blocks, fully masked rows, holes in the padding,
additive masks); fp32 and bf16; the LSE always and gradients where the backend differentiates. Examples
run one after another in this process, so they also catch caches that go stale across shapes.

The oracle is ``tests/reference64.py`` (not the ``math`` backend); the tolerance is attnlib's one policy
(``attnlib.testing``). A backend that refuses a call it must serve fails the test: the strategies leave
out only what a backend documents it cannot do here (DenseMask on ``triton``, gradients on CPU ``flex``).

CI runs a fixed, derandomized budget per backend; ``pytest --fuzz-long`` runs 20x as many random ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import attnlib
from attnlib import BlockDiagonal, Causal, DenseMask, KeyPadding
from attnlib.inputs import validate_call
from attnlib.registry import get_backend
from attnlib.testing import compare, gradient_magnitudes

from reference64 import attention64

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Limits:
    """What one backend's examples may contain on this machine."""

    examples: int
    max_len: int = 130
    max_head_dim: int = 256
    dense_masks: bool = True
    grads: bool = True


#: per backend: the CI budget and shape limits (flex compiles per shape, triton runs interpreted on CPU)
LIMITS = {
    "math": Limits(40),
    "sdpa": Limits(40),
    "flex": Limits(12, grads=DEVICE != "cpu"),
    "triton": Limits(10, max_len=24 if DEVICE == "cpu" else 130, dense_masks=False),
    "flash": Limits(40, dense_masks=False),
    "xformers": Limits(40),
}
LONG_FACTOR = 20

#: lengths where tiled kernels change behaviour: tile multiples and their neighbours
RISKY_LENGTHS = sorted({n + e for n in (8, 16, 24, 32, 40, 48, 64, 128) for e in (-1, 0, 1)} | {1, 2, 3})
HEAD_DIMS = (8, 12, 16, 24, 32, 40, 48, 64, 72, 80, 96, 128, 160, 192, 256)


def _lengths(lim: Limits, minimum: int = 1):
    risky = [n for n in RISKY_LENGTHS if minimum <= n <= lim.max_len]
    return st.one_of(st.just(max(1, minimum)), st.sampled_from(risky), st.integers(minimum, lim.max_len))


def _head_dims(lim: Limits):
    fixed = [d for d in HEAD_DIMS if d <= lim.max_head_dim]
    return st.one_of(st.sampled_from(fixed), st.integers(8, lim.max_head_dim))


@dataclass(repr=False)
class Example:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: object
    scale: float | None
    grad: bool

    def __repr__(self):  # what hypothesis prints for a failing example
        shapes = " ".join(f"{n}={tuple(t.shape)}" for n, t in (("q", self.q), ("k", self.k), ("v", self.v)))
        m = self.mask
        if isinstance(m, KeyPadding):
            m = f"KeyPadding(valid={m.valid.int().tolist()}, causal={m.causal}, window={m.window})"
        elif isinstance(m, DenseMask):
            m = f"DenseMask({tuple(m.mask.shape)}, {m.mask.dtype})"
        return f"Example({shapes} {self.q.dtype} mask={m} scale={self.scale} grad={self.grad})"


@st.composite
def examples(draw, lim: Limits):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    d = draw(_head_dims(lim))
    dv = d if draw(st.booleans()) else draw(_head_dims(lim))
    hkv = draw(st.sampled_from([1, 2]))
    hq = hkv * draw(st.sampled_from([1, 2, 4]))
    kinds = ["none", "causal", "block_diagonal", "key_padding"] + (["dense_bool", "dense_additive"]
                                                                   if lim.dense_masks else [])
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    packed = kind == "block_diagonal"
    if packed:
        n = draw(st.integers(1, 4))
        per = max(1, lim.max_len // n)
        q_lens = draw(st.lists(st.integers(0, per), min_size=n, max_size=n).filter(lambda xs: sum(xs) > 0))
        kv_lens = q_lens if draw(st.booleans()) else draw(
            st.lists(st.integers(0, per), min_size=n, max_size=n).filter(lambda xs: sum(xs) > 0))
        causal = draw(st.booleans())
        window = draw(st.one_of(st.none(), st.integers(1, per))) if causal else None
        mask = BlockDiagonal(q_lens, kv_lens, causal=causal, window=window)
        shape_q, shape_k = (mask.total_q, hq), (mask.total_k, hkv)
        batch = 1
    else:
        batch = draw(st.integers(1, 3))
        sq, sk = draw(_lengths(lim)), draw(_lengths(lim))
        shape_q, shape_k = (batch, sq, hq), (batch, sk, hkv)
        if kind == "none":
            mask = None
        elif kind == "causal":
            window = draw(st.one_of(st.none(), st.integers(1, lim.max_len)))
            mask = Causal(align=draw(st.sampled_from(["bottom_right", "top_left"])), window=window)
        elif kind == "key_padding":
            valid = torch.rand(batch, sk, generator=g) < draw(st.floats(0.05, 1.0))
            if draw(st.booleans()):
                valid[draw(st.integers(0, batch - 1))] = False          # a sequence with no key at all
            causal = draw(st.booleans())
            window = draw(st.one_of(st.none(), st.integers(1, lim.max_len))) if causal else None
            mask = KeyPadding(valid, causal=causal, window=window)
        elif kind == "dense_bool":
            m = torch.rand(batch, draw(st.sampled_from([1, hq])), sq, sk, generator=g) < draw(st.floats(0.1, 1.0))
            mask = DenseMask(m)
        else:
            bias = torch.randn(1, hq, sq, sk, generator=g, dtype=torch.float32)
            bias = bias.masked_fill(torch.rand(1, hq, sq, sk, generator=g) < draw(st.floats(0.0, 0.9)), float("-inf"))
            mask = DenseMask(bias)
    scale = draw(st.one_of(st.none(), st.floats(0.05, 1.0)))
    grad = lim.grads and draw(st.booleans())

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = rand(*shape_q, d), rand(*shape_k, d), rand(*shape_k, dv)
    return Example(q, k, v, mask, scale, grad)


def _to_device(ex: Example) -> Example:
    if DEVICE == "cpu":
        return ex
    mask = ex.mask
    if isinstance(mask, KeyPadding):
        mask = KeyPadding(mask.valid.to(DEVICE), causal=mask.causal, window=mask.window)
    elif isinstance(mask, DenseMask):
        mask = DenseMask(mask.mask.to(DEVICE))
    return Example(ex.q.to(DEVICE), ex.k.to(DEVICE), ex.v.to(DEVICE), mask, ex.scale, ex.grad)


def check_example(backend: str, ex: Example) -> None:
    """One call on ``backend`` vs the float64 oracle: out, LSE and (if asked) dq/dk/dv."""
    ex = _to_device(ex)
    leaves = [t.detach().clone().requires_grad_(ex.grad) for t in (ex.q, ex.k, ex.v)]
    call = validate_call(*leaves, ex.mask, ex.scale, True)
    why = get_backend(backend).why_not(call)
    assert not why, f"{backend} refused a call it must serve: {why}"
    out, lse = attnlib.attention(*leaves, ex.mask, scale=ex.scale, backend=backend, return_lse=True)
    packed = call.packed
    ref64 = [t.detach().double().requires_grad_(ex.grad) for t in leaves]
    naive_in = [t.detach().cpu().clone().requires_grad_(ex.grad) for t in leaves]
    ref_out, ref_lse = attention64(*ref64, ex.mask, call.scale, packed=packed)
    naive_out, naive_lse = attention64(*naive_in, ex.mask, call.scale, packed=packed, dtype=ex.q.dtype)
    results = [compare(out.cpu(), ref_out, naive_out, ex.q.dtype, "out"),
               compare(lse.cpu(), ref_lse, naive_lse.float(), ex.q.dtype, "lse")]
    if ex.grad:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        got = torch.autograd.grad(out, leaves, dout.to(out.device))
        ref = torch.autograd.grad(ref_out, ref64, dout.double())
        naive = torch.autograd.grad(naive_out, naive_in, dout)
        mags = gradient_magnitudes(*ref64, dout.double(), call.scale)
        results += [compare(gt.cpu(), r, n, ex.q.dtype, name, mags[name])
                    for gt, r, n, name in zip(got, ref, naive, ("dq", "dk", "dv"))]
    bad = [c for c in results if not c.passed]
    assert not bad, "; ".join(f"{c.what}: max error {c.error:.3g} > tolerance {c.tol:.3g} (naive {c.naive:.3g})"
                              for c in bad)


def _backends():
    out = []
    for row in attnlib.list_backends():
        if row["name"] not in LIMITS:
            continue
        marks = [] if row["available"] else [pytest.mark.skip(reason=f"{row['name']} not installed here: {row['reason']}")]
        out.append(pytest.param(row["name"], marks=marks, id=row["name"]))
    return out


@pytest.mark.parametrize("backend", _backends())
def test_backend_agrees_with_float64_reference(backend, fuzz_long):
    lim = LIMITS[backend]
    n = lim.examples * (LONG_FACTOR if fuzz_long else 1)

    @settings(max_examples=n, derandomize=not fuzz_long, database=None, deadline=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(ex=examples(lim))
    def run(ex):
        check_example(backend, ex)

    run()


def test_the_oracle_is_not_the_math_backend():
    """The oracle itself against hand-computed values, so the fuzzer cannot pass against a wrong oracle."""
    q = torch.tensor([[[[1.0]], [[0.0]]]])                      # B=1, Sq=2, H=1, D=1
    k = torch.tensor([[[[1.0]], [[2.0]], [[0.0]]]])             # Sk=3
    v = torch.tensor([[[[10.0]], [[20.0]], [[30.0]]]])
    out, lse = attention64(q, k, v, Causal(), scale=1.0)          # bottom-right: row 0 sees keys 0-1, row 1 all
    e1, e2 = torch.exp(torch.tensor(1.0, dtype=torch.float64)), torch.exp(torch.tensor(2.0, dtype=torch.float64))
    assert out[0, 0, 0, 0].item() == pytest.approx(float((10 * e1 + 20 * e2) / (e1 + e2)))
    assert out[0, 1, 0, 0].item() == pytest.approx(20.0)       # equal scores: the mean
    assert lse[0, 0, 1].item() == pytest.approx(float(torch.log(torch.tensor(3.0))))
    out, lse = attention64(q, k, v, Causal(align="top_left", window=1), scale=1.0)
    assert out[0, :, 0, 0].tolist() == [10.0, 20.0]             # each row sees only its diagonal key
    empty = KeyPadding(torch.zeros(1, 3, dtype=torch.bool))
    out, lse = attention64(q, k, v, empty)
    assert out.abs().max().item() == 0 and torch.isinf(lse).all()
