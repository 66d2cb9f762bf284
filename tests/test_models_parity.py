"""The ``models`` table of ``attnlib check``: one row per (block, backend), honest about what ran.

The per-backend numbers themselves are asserted in the block tests (test_models_qwen_image.py,
test_models_bagel.py, test_models_qwen3_omni.py); here: the table's shape, that fast backends pass,
and that a backend which cannot serve is reported, never silently replaced by another.
"""
import os

import torch

import attnlib
from attnlib.backends.base import Backend, Capabilities
from models_ref.parity import CASES, bagel_case, model_parity_rows, no_fallback

KEYS = {"model", "backend", "max_diff", "tol", "passed", "note"}


def test_rows_cover_every_block_and_backend_and_pass_on_math_and_sdpa():
    rows = model_parity_rows(["math", "sdpa"])
    assert len(rows) == 2 * len(CASES)
    assert {r["model"] for r in rows} == {"qwen_image", "bagel", "qwen3_omni.code_predictor",
                                          "qwen3_omni.thinker_attention"}
    for r in rows:
        assert KEYS <= set(r)
        if r["note"].startswith("skipped"):       # host library missing: reported, not failed
            assert r["passed"] is None
            continue
        assert r["passed"] is True, r
        assert 0 <= r["max_diff"] <= r["tol"]
        assert r["tol"] < 1e-3                     # float32 policy: ratio x naive error + floor


def test_unknown_or_unavailable_backend_gets_a_reasoned_row_not_a_failure():
    unavailable = [r["name"] for r in attnlib.list_backends() if not r["available"]]
    names = ["no_such_backend"] + unavailable[:1]
    rows = model_parity_rows(names, cases=[bagel_case])
    assert [r["backend"] for r in rows] == names
    for r in rows:
        assert r["passed"] is None and r["max_diff"] is None
        assert r["note"].startswith("backend unavailable")


class _NoBlockDiagonal(Backend):
    """A registered backend that serves everything but packed masks."""

    name = "test_models_no_packed"
    capabilities = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32, torch.float64}),
                                features=frozenset({"causal", "key_padding"}))
    implementation = "math, minus BlockDiagonal"

    def forward(self, call):
        return attnlib.get_backend("math").forward(call)


def test_a_backend_that_cannot_serve_a_block_is_reported_not_replaced(monkeypatch):
    from attnlib import registry
    registry._backends()                           # load the built-ins first
    monkeypatch.setitem(registry._registry, _NoBlockDiagonal.name, _NoBlockDiagonal())   # undone after the test
    rows = model_parity_rows([_NoBlockDiagonal.name], cases=[bagel_case])
    assert rows[0]["passed"] is None
    assert "cannot serve" in rows[0]["note"] and rows[0]["max_diff"] is None


def test_no_fallback_restores_the_environment(monkeypatch):
    monkeypatch.setenv("ATTNLIB_FALLBACK", "warn")
    with no_fallback():
        assert os.environ["ATTNLIB_FALLBACK"] == "error"
    assert os.environ["ATTNLIB_FALLBACK"] == "warn"
