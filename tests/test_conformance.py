"""Every available backend against the float64 ``math`` reference, per mask kind, dtype and GQA ratio.

The cases live in ``attnlib.conformance`` (shared with ``attnlib check``); the tolerance policy in
``attnlib.testing``. ``math`` itself is checked against the independent oracle (``tests/reference64.py``),
not against itself. Only a backend that is not installed is skipped: a backend that refuses a case its
capability table says it serves fails, except for the documented exceptions below.
"""
import os

import pytest
import torch

import attnlib
from attnlib.conformance import CASES, DTYPES, HEADS, SLOW_ON_CPU, gqa_ratios, lse_dtype, run_case
from attnlib.inputs import validate_call
from attnlib.registry import get_backend
from attnlib.testing import compare

from reference64 import attention64

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: ``pytest --full-grid``: every case in every dtype on the backends that are slow on a CPU (compiled flex,
#: interpreted triton). By default each case runs there in one (dtype, GQA ratio) pair, rotating from case to
#: case, so every dtype and every ratio still meets every backend at a third of the compile time.
FULL_GRID = os.environ.get("ATTNLIB_TESTS_FULL_GRID") == "1"

#: refusals a backend documents beyond its capability table: (backend, device type, what) -> why. Empty:
#: what used to be here (flex has no backward on CPU) is now in the table (``autograd`` per device).
DOCUMENTED_EXCEPTIONS: dict = {}


def _must_serve(backend: str, case, dtype, grad: bool) -> bool:
    """Whether ``backend`` has to serve this case here: its capability table covers it and no
    documented exception applies."""
    caps = get_backend(backend).capabilities
    if dtype not in caps.dtypes or DEVICE not in caps.devices:
        return False
    if grad and (not caps.autograd_on(DEVICE) or (backend, DEVICE, "grad") in DOCUMENTED_EXCEPTIONS):
        return False
    built = case.build(dtype, torch.device(DEVICE), 4, 2, torch.Generator().manual_seed(0))
    opts = built[4] if len(built) > 4 else {}
    return validate_call(*built[:4], **opts).features <= caps.served()


def _grid(backend, i):
    grid = [(d, g) for d in DTYPES for g in gqa_ratios(backend, d, DEVICE)]
    if FULL_GRID or DEVICE != "cpu" or backend not in SLOW_ON_CPU:
        return grid
    return [grid[i % len(grid)]]


def _params():
    out = []
    for row in attnlib.list_backends():
        name = row["name"]
        if name == "math":      # the reference of the others: checked against the independent oracle below
            continue
        marks = [] if row["available"] else [pytest.mark.skip(reason=f"{name}: {row['reason']}")]
        for i, case in enumerate(CASES):
            for dtype, gqa in _grid(name, i):
                out.append(pytest.param(name, case, dtype, gqa, marks=marks,
                                        id=f"{name}-{case.name}-{str(dtype)[6:]}-gqa{gqa}"))
    return out


def _run(backend, case, dtype, gqa, grad=False):
    result = run_case(backend, case, dtype, gqa, device=DEVICE, grad=grad)
    if result.skipped:
        if _must_serve(backend, case, dtype, grad):
            pytest.fail(f"{backend} refused {case.name} ({dtype}, grad={grad}), which its capabilities promise: "
                        f"{result.skipped}")
        pytest.skip(f"{backend} cannot serve {case.name} (capability table): {result.skipped}")
    bad = [c for c in result.comparisons if not c.passed]
    assert not bad, "; ".join(f"{c.what}: error {c.error:.3g} > tol {c.tol:.3g} (naive {c.naive:.3g})" for c in bad)
    return result


@pytest.mark.parametrize("backend,case,dtype,gqa", _params())
def test_output_and_lse_match_float64_reference(backend, case, dtype, gqa):
    _run(backend, case, dtype, gqa)


def _grad_params():
    out = []
    for row in attnlib.list_backends():
        name = row["name"]
        if name == "math":
            continue
        ok = row["available"] and get_backend(name).capabilities.autograd_on(DEVICE)
        marks = [] if ok else [pytest.mark.skip(reason=f"{name}: {row['reason'] or f'no autograd on {DEVICE}'}")]
        grid = [(torch.float32, 2), (torch.bfloat16, 1)]
        if DEVICE == "cpu" and name in SLOW_ON_CPU:
            grid = grid[:1]
        for case in CASES:
            for dtype, gqa in grid:
                out.append(pytest.param(name, case, dtype, gqa, marks=marks,
                                        id=f"{name}-{case.name}-{str(dtype)[6:]}-gqa{gqa}"))
    return out


@pytest.mark.parametrize("backend,case,dtype,gqa", _grad_params())
def test_gradients_match_float64_reference(backend, case, dtype, gqa):
    _run(backend, case, dtype, gqa, grad=True)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_math_matches_the_independent_oracle(case, dtype):
    """``math`` is every other backend's reference: it answers to ``tests/reference64.py``, forward,
    LSE and gradients, in every dtype it takes."""
    hq, hkv = HEADS[2]
    built = case.build(dtype, torch.device(DEVICE), hq, hkv, torch.Generator().manual_seed(0))
    q, k, v, mask = built[:4]
    opts = built[4] if len(built) > 4 else {}
    grad = dtype != torch.float16 and "block_table" not in opts and case.name != "garbage_in_padding"
    leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
    call = validate_call(*leaves, mask, None, True, **opts)
    out, lse = attnlib.attention(*leaves, mask, backend="math", return_lse=True, **opts)
    ref_in = [t.detach().double().requires_grad_(grad) for t in leaves]
    naive_in = [t.detach().cpu().clone().requires_grad_(grad) for t in leaves]
    cpu_opts = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in opts.items()}
    ref, ref_lse = attention64(*ref_in, mask, call.scale, **cpu_opts)
    naive, naive_lse = attention64(*naive_in, mask, call.scale, dtype=dtype, **cpu_opts)
    checks = [compare(out.cpu(), ref, naive, dtype), compare(lse.cpu(), ref_lse, naive_lse.float(), lse_dtype(dtype), "lse")]
    if grad:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        got = torch.autograd.grad(out, leaves, dout.to(out.device))
        want = torch.autograd.grad(ref, ref_in, dout.double())
        naive_g = torch.autograd.grad(naive, naive_in, dout)
        checks += [compare(g.cpu(), w, n, dtype, name) for g, w, n, name in zip(got, want, naive_g, ("dq", "dk", "dv"))]
    bad = [c for c in checks if not c.passed]
    assert not bad, "; ".join(f"{c.what}: error {c.error:.3g} > tol {c.tol:.3g} (naive {c.naive:.3g})" for c in bad)
