"""Every available backend against the float64 ``math`` reference, per mask kind, dtype and GQA ratio.

The cases live in ``attnlib.conformance`` (shared with ``attnlib check``); the tolerance policy in
``attnlib.testing``. Unavailable backends are skipped with their reason.
"""
import pytest
import torch

import attnlib
from attnlib.conformance import CASES, DTYPES, SLOW_ON_CPU, gqa_ratios, run_case
from attnlib.registry import get_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _grid(backend):
    return [(d, g) for d in DTYPES for g in gqa_ratios(backend, d, DEVICE)]


def _params():
    out = []
    for row in attnlib.list_backends():
        name = row["name"]
        marks = [] if row["available"] else [pytest.mark.skip(reason=f"{name}: {row['reason']}")]
        for case in CASES:
            for dtype, gqa in _grid(name):
                out.append(pytest.param(name, case, dtype, gqa, marks=marks,
                                        id=f"{name}-{case.name}-{str(dtype)[6:]}-gqa{gqa}"))
    return out


def _run(backend, case, dtype, gqa, grad=False):
    result = run_case(backend, case, dtype, gqa, device=DEVICE, grad=grad)
    if result.skipped:
        pytest.skip(f"{backend} cannot serve {case.name}: {result.skipped}")
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
        ok = row["available"] and get_backend(name).capabilities.autograd
        marks = [] if ok else [pytest.mark.skip(reason=f"{name}: {row['reason'] or 'no autograd'}")]
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
