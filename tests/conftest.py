"""Shared test settings: deterministic seeds, the Triton interpreter on machines without a GPU."""
import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# one inductor compile worker: a worker pool only competes for the 2 cores of a CI machine (flex compiles)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

# tests pick backends explicitly; a developer's environment must not redirect them
os.environ.pop("DIFFUSION_ATTENTION_BACKEND", None)
os.environ.pop("ATTNLIB_FALLBACK", None)

try:  # hypothesis is a test extra; keep property tests small and without deadlines on a 2-core CI box
    from hypothesis import settings

    # derandomized: CI draws the same examples every run (a red run is reproducible, a green one stays green);
    # the fuzzer's --fuzz-long draws new random ones
    settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
    settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="differential fuzzer: 20x the CI budget, random (not derandomized) examples")
    parser.addoption("--full-grid", action="store_true", default=False,
                     help="conformance: every case in every dtype on flex and triton on a CPU (3x their "
                          "cases; by default each case runs in one dtype there, rotating)")


def pytest_configure(config):
    if config.getoption("--full-grid"):      # read when the test modules build their parameters
        os.environ["ATTNLIB_TESTS_FULL_GRID"] = "1"


@pytest.fixture
def fuzz_long(request) -> bool:
    return request.config.getoption("--fuzz-long")


def pytest_report_header(config):
    import attnlib

    rows = attnlib.list_backends()
    lines = [f"torch {torch.__version__}, cuda={torch.cuda.is_available()}"]
    lines += [f"  backend {r['name']:9s} {'available' if r['available'] else 'unavailable: ' + r['reason']}" for r in rows]
    return lines


@pytest.fixture(autouse=True)
def _isolated_selection_state():
    """No test sees another's fallback warnings or backend override (registry state is process-global)."""
    from attnlib import registry

    registry.reset_warnings()
    token = registry._override.set(None)
    yield
    registry._override.reset(token)
    registry.reset_warnings()


@pytest.fixture
def isolated_registry(monkeypatch):
    """The registry as it is, restored after the test: backends, aliases and auto order registered inside
    the test do not outlive it."""
    from attnlib import registry

    registry._backends()
    for attr in ("_registry", "_aliases", "_extra_auto"):
        monkeypatch.setattr(registry, attr, dict(getattr(registry, attr)))
    monkeypatch.setattr(registry, "_probed", set(registry._probed))
    return registry
