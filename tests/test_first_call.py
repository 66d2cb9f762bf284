"""The first attention call of a process costs what SDPA's does when ``sdpa`` serves it: backends are probed
lazily (only when selection asks them), so the compiler machinery that ``flex``'s probes import never loads.

Measured in a fresh interpreter (the cost is a first-call cost), as modules imported (exact) and as a ratio
to the process's own ``import torch`` time (no absolute timing: a loaded machine slows both alike).
bench/bench_first_call.py records the absolute numbers (bench/results/first_call_cpu.md).
"""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: attnlib's import + first call, minus nothing (SDPA's own first call ran before it in the same process),
#: over ``import torch`` in that process: ~0.07 measured (2.1 before lazy probing: bench/results/first_call_cpu.md)
MAX_RATIO_TO_TORCH_IMPORT = 0.3
COMPILER_MODULES = ("torch._dynamo", "torch._inductor")

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
q = torch.randn(1, 16, 2, 32)
torch.nn.functional.scaled_dot_product_attention(*(q.transpose(1, 2),) * 3)   # SDPA's own first call
t2 = time.perf_counter()
before = set(sys.modules)
import attnlib
attnlib.attention(q, q, q)
t3 = time.perf_counter()
compiler = sorted(m for m in set(sys.modules) - before if m.startswith(%r))     # loaded by attnlib
print(json.dumps({"torch_import": t1 - t0, "sdpa_first": t2 - t1, "attnlib_first": t3 - t2,
                  "backend": attnlib.resolve_backend(q, q, q), "compiler_modules": compiler[:5]}))
""" % (COMPILER_MODULES,)


def _first_call() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("DIFFUSION_ATTENTION_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_first_sdpa_call_imports_no_compiler_and_costs_a_fraction_of_import_torch():
    got = _first_call()
    assert got["backend"] == "sdpa"
    assert got["compiler_modules"] == [], got      # flex's probes (and so dynamo/inductor) never ran
    ratio = got["attnlib_first"] / got["torch_import"]
    assert ratio <= MAX_RATIO_TO_TORCH_IMPORT, got
