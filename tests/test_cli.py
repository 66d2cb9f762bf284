"""``attnlib check`` and ``attnlib info`` as a user runs them: exit codes and one-line errors."""
import pathlib
import subprocess
import sys

import pytest
import torch

import attnlib.backends as attnlib_backends
from attnlib import cli


def _check(*args):
    return cli.main(["check", "--no-models", "--fuzz", "0", *args])


@pytest.mark.parametrize("args,needle", [
    (["--backend", "bogus"], "--backend: unknown attention backend 'bogus'"),
    (["--case", "bogus"], "--case bogus: unknown; valid cases: full,"),
    (["--backend", "auto"], "--backend auto"),
    (["--skip-section", "bogus"], "--skip-section bogus: unknown; sections here:"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, needle, capsys):
    assert _check(*args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_a_usage_error(capsys):
    assert _check("--device", "cuda") == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_an_unavailable_backend_asked_for_fails(capsys):
    rows = {r["name"]: r for r in cli.list_backends()}
    missing = next((n for n, r in rows.items() if not r["available"]), None)
    if missing is None:
        pytest.skip("every backend is available here")
    assert _check("--backend", missing, "--case", "full") == 1
    out = capsys.readouterr().out
    assert f"FAIL: {missing} was asked for and cannot run here" in out


def test_nothing_ran_is_a_failure(capsys):
    # math and sdpa both take fp64; flex cannot: asking only flex in fp64 runs no comparison
    assert _check("--backend", "flex", "--dtype", "fp64", "--case", "full") == 1
    assert "no comparison ran" in capsys.readouterr().out


def test_fp64_passes_on_the_backends_that_take_it(capsys):
    assert _check("--backend", "sdpa", "--backend", "math", "--dtype", "fp64") == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "--full" not in out.split("cells:")[0]


def test_check_with_fuzz_cases_runs_them(capsys):
    assert cli.main(["check", "--no-models", "--backend", "sdpa", "--dtype", "fp32", "--fuzz", "3", "--seed", "7",
                     "--case", "fuzz0", "--case", "fuzz1", "--case", "fuzz2"]) == 0
    out = capsys.readouterr().out
    assert "fuzz2" in out and "3 cells checked" in out


def test_the_console_script_runs_info():
    proc = subprocess.run([sys.executable, "-m", "attnlib", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "sdpa" in proc.stdout


class _Refuses(attnlib_backends.Backend):
    name = "fake_first"

    def unavailable_reason(self):
        return "a test backend that never serves"


def test_info_shows_the_auto_order_in_effect(isolated_registry, capsys):
    isolated_registry.register_backend(_Refuses(), aliases=["FAKE_1ST"], auto_before="sdpa")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"auto order  {' > '.join(isolated_registry.auto_order(dev))} ({dev})" in out
    if dev == "cpu":
        assert "auto order  fake_first > sdpa > flex > math (cpu)" in out
    assert cli.main(["info", "--aliases"]) == 0
    assert "| `fake_first` | `fake_1st` |" in capsys.readouterr().out


def test_check_runs_registered_sections_and_skips_them_on_request(monkeypatch, capsys):
    from attnlib import conformance

    calls = []

    def section(backends, device):
        calls.append((tuple(backends), device))
        print("\nfake section ran")
        return 0

    monkeypatch.setattr(conformance, "_sections", {"fake": section, "models": lambda b, d: 1 / 0})
    monkeypatch.setattr(conformance, "_entry_points_loaded", True)
    assert cli.main(["check", "--no-models", "--fuzz", "0", "--backend", "math", "--dtype", "fp32",
                     "--case", "full"]) == 0
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    assert "fake section ran" in capsys.readouterr().out and calls == [(("math",), dev)]     # --no-models skipped 1/0
    assert _check("--backend", "math", "--dtype", "fp32", "--case", "full", "--skip-section", "fake") == 0
    assert "fake section ran" not in capsys.readouterr().out


def test_the_models_section_is_a_plugin_the_core_never_imports():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="attnlib.check_sections")}
    assert eps.get("models") == "models_ref.parity:check_section", (
        "entry point missing: run scripts/bootstrap.sh (pip install -e .) after changing pyproject.toml")
    root = pathlib.Path(cli.__file__).resolve().parent
    importers = [str(p.relative_to(root)) for p in root.rglob("*.py") if "models_ref" in
                 "".join(line for line in p.read_text().splitlines(True) if "import" in line)]
    assert not importers, f"attnlib must not import models_ref: {importers}"


def test_check_prints_the_models_section_through_the_entry_point():
    proc = subprocess.run([sys.executable, "-m", "attnlib", "check", "--backend", "math", "--dtype", "fp32",
                           "--case", "full", "--fuzz", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "\nmodels (reference blocks" in proc.stdout and "qwen_image" in proc.stdout


def test_check_parallel_runs_the_sequence_parallel_cases(capsys):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    assert cli.main(["check", "--parallel", "2", "--device", "cpu", "--case", "causal_uneven_sdpa_lse",
                     "--case", "ring_blockdiag_cfg_kv_sdpa_lse"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("causal_uneven_sdpa_lse", "ring_blockdiag_cfg"))]
    assert len(rows) == 2 and all(line.count(" ok") == 2 for line in rows), out
    assert "ulysses=2" in rows[0] and "ring=2" in rows[1]
    assert "PASSED: 0 failing case(s) of 2 on 2 processes" in out


@pytest.mark.parametrize("args,needle", [
    (["--parallel", "1"], "--parallel 1: sequence parallelism needs at least 2 processes"),
    (["--parallel", "2", "--case", "bogus"], "--case bogus: unknown with --parallel 2; valid cases: none_even_math"),
    (["--parallel", "2", "--dtype", "fp32"], "--dtype does not apply with --parallel"),
])
def test_check_parallel_usage_errors(args, needle, capsys):
    assert cli.main(["check", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_check_ends_with_a_one_line_summary_to_paste(capsys):
    assert _check("--backend", "sdpa", "--backend", "math", "--dtype", "fp32", "--case", "full", "--case",
                  "causal") == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith("summary: attnlib check PASSED: 4 ok, 0 failed, 0 n/a, 0 need --full; sections 0 failed")
    assert f"torch {torch.__version__}" in last and "| backends sdpa,math | fp32 |" in last
    assert f"| {'cuda' if torch.cuda.is_available() else 'cpu'}: " in last


def test_check_progress_on_stderr_only_when_long_or_on_a_terminal(monkeypatch, capsys):
    assert _check("--backend", "sdpa", "--dtype", "fp32", "--case", "full", "--case", "causal") == 0
    assert capsys.readouterr().err == ""                       # a short run into a pipe: no progress lines
    monkeypatch.setattr(cli, "PROGRESS_INTERVAL", 0.0)         # as if every cell took longer than the interval
    assert _check("--backend", "sdpa", "--dtype", "fp32", "--case", "full", "--case", "causal") == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("attnlib check: 0/2 full fp32 sdpa (") and err[-1].startswith("attnlib check: 2/2 ")


def test_full_reruns_itself_under_the_triton_interpreter(monkeypatch, capsys):
    import importlib.util

    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        pytest.skip("needs triton installed and no CUDA device")
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = ["check", "--full", "--backend", "triton", "--case", "full", "--fuzz", "0", "--no-models"]
    assert cli.main(argv) == 3                                 # the child's exit status
    (cmd, env), = calls
    assert cmd[1:] == ["-m", "attnlib", *argv] and env["TRITON_INTERPRET"] == "1"
    assert "rerunning under TRITON_INTERPRET=1" in capsys.readouterr().out
    calls.clear()
    assert _check("--backend", "sdpa", "--dtype", "fp32", "--case", "full", "--full") == 0   # triton not asked for
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _check("--backend", "triton", "--dtype", "fp32", "--case", "full", "--full") == 0  # already interpreted
    assert calls == []
