"""What the fake-library tests of the CUDA-only backends share (``test_lowering_flash.py``,
``test_lowering_xformers.py``): letting a backend believe in CUDA and take CPU tensors, the conformance
sweep through a fake, and the hypothesis strategies that draw the plans their lowerings must reproduce.
"""
import dataclasses
import sys

import torch
from hypothesis import strategies as st

from attnlib import Causal, KeyPadding
from attnlib.conformance import CASES, run_case
from attnlib.plan import plan_for


def pretend_cuda(monkeypatch, backend_module, backend_cls):
    """The backend in ``backend_module`` believes CUDA is there, and ``backend_cls`` accepts CPU tensors."""
    monkeypatch.setattr(backend_module, "_cuda_available", lambda: True)
    caps = dataclasses.replace(backend_cls.capabilities, devices=frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(backend_cls, "capabilities", caps)


def install_modules(monkeypatch, modules):
    """Put the fake modules ``{import name: module}`` into ``sys.modules`` for the test."""
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)


def sweep_conformance(backend, grid, grad=False, label=""):
    """Run every conformance case on ``backend`` for each ``(dtype, gqa)`` of ``grid``: every comparison
    of a served case must pass; returns ``{case name: reason}`` for the cases the backend skipped."""
    skipped = {}
    for case in CASES:
        for dtype, gqa in grid:
            res = run_case(backend, case, dtype, gqa, grad=grad)
            if res.skipped:
                skipped[case.name] = res.skipped
                continue
            bad = [c for c in res.comparisons if not c.passed]
            assert not bad, f"{label}{case.name} {dtype} gqa{gqa}: " + "; ".join(
                f"{c.what} err {c.error:.3g} > tol {c.tol:.3g}" for c in bad)
    return skipped


@st.composite
def ranges(draw, sq, sk):
    """None (the whole call) or a (q_range, k_range) restriction."""
    if not draw(st.booleans()) or sq == 0 or sk == 0:
        return None
    q0 = draw(st.integers(0, sq - 1))
    k0 = draw(st.integers(0, sk - 1))
    return (q0, draw(st.integers(q0 + 1, sq))), (k0, draw(st.integers(k0 + 1, sk)))


def _cut(draw, plan, sq, sk):
    cut = draw(ranges(sq, sk))
    return (plan if cut is None else plan.restrict(*cut)), cut


@st.composite
def causal_plans(draw):
    """``(mask, plan, cut)``: a ``Causal`` mask (either alignment, no window or 1..14) on 1..12 queries
    and 1..12 keys, and its plan, restricted to ``cut`` unless ``cut`` is None."""
    sq, sk = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    window = draw(st.one_of(st.none(), st.integers(1, 14)))
    mask = Causal(align="top_left" if draw(st.booleans()) else "bottom_right", window=window)
    return (mask, *_cut(draw, plan_for(mask, sq, sk), sq, sk))


@st.composite
def key_padding_plans(draw, restrict=True):
    """``(mask, plan, cut)``: a ``KeyPadding`` over 6 keys (1..3 rows of any pattern), causal or not (a
    causal one with no window or 1..7), for 1..8 queries; with ``restrict`` its plan may be restricted
    to ``cut`` (otherwise ``cut`` is None)."""
    rows = draw(st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=1, max_size=3))
    sq = draw(st.integers(1, 8))
    window = draw(st.one_of(st.none(), st.integers(1, 7)))
    causal = draw(st.booleans())
    mask = KeyPadding(torch.tensor(rows, dtype=torch.bool), causal=causal, window=window if causal else None)
    plan = plan_for(mask, sq, 6)
    return (mask, *_cut(draw, plan, sq, 6)) if restrict else (mask, plan, None)
