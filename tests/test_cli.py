"""``attnlib check`` and ``attnlib info`` as a user runs them: exit codes and one-line errors."""
import subprocess
import sys

import pytest
import torch

from attnlib import cli


def _check(*args):
    return cli.main(["check", "--no-models", "--fuzz", "0", *args])


@pytest.mark.parametrize("args,needle", [
    (["--backend", "bogus"], "--backend: unknown attention backend 'bogus'"),
    (["--case", "bogus"], "--case bogus: unknown; valid cases: full,"),
    (["--backend", "auto"], "--backend auto"),
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
