"""The first attention call of a process: attnlib (import + first call, served by sdpa) vs plain SDPA's first
call (not pytest-benchmark: a first call needs a fresh interpreter per sample; not run by CI).

    python bench/bench_first_call.py [--runs 10] > bench/results/first_call_cpu.md

Each sample is one fresh ``python -c`` process: ``import torch`` (timed: the yardstick), SDPA's own first call
(the baseline), then ``import attnlib`` and the first ``attnlib.attention`` on the same small BSHD tensors:
what attnlib adds on top of plain SDPA. Medians over ``--runs`` processes. Also reported: how many compiler
modules (``torch._dynamo``, ``torch._inductor``) attnlib's import and first call loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
q = torch.randn(1, 16, 2, 32)
torch.nn.functional.scaled_dot_product_attention(*(q.transpose(1, 2),) * 3)
t2 = time.perf_counter()
before = set(sys.modules)
import attnlib
t3 = time.perf_counter()
attnlib.attention(q, q, q)
t4 = time.perf_counter()
attnlib.attention(q, q, q)
t5 = time.perf_counter()
compiler = sorted(m for m in set(sys.modules) - before if m.startswith(("torch._dynamo", "torch._inductor")))
print(json.dumps({"torch_import": t1 - t0, "sdpa_first": t2 - t1, "attnlib_import": t3 - t2,
                  "attnlib_first_call": t4 - t3, "attnlib_second_call": t5 - t4,
                  "backend": attnlib.resolve_backend(q, q, q), "compiler_modules": len(compiler)}))
"""


def sample() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("DIFFUSION_ATTENTION_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args(argv)
    import torch

    load0 = os.getloadavg()[0]
    samples = [sample() for _ in range(args.runs)]
    load1 = os.getloadavg()[0]
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0] if k != "backend"}
    extra = med["attnlib_import"] + med["attnlib_first_call"]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print("# First attention call of a process (CPU)\n")
    print(f"machine: {cpu}, {os.cpu_count()} cores, python {platform.python_version()}, torch {torch.__version__}; "
          f"date {time.strftime('%Y-%m-%d')}; load average {load0:.1f} before, {load1:.1f} after; "
          f"{args.runs} fresh processes, medians; served by {samples[0]['backend']}\n")
    print("| step | median (s) |\n|---|---:|")
    rows = [("import torch (yardstick)", med["torch_import"]), ("plain SDPA first call (baseline)", med["sdpa_first"]),
            ("import attnlib", med["attnlib_import"]), ("attnlib first call", med["attnlib_first_call"]),
            ("attnlib second call", med["attnlib_second_call"]),
            ("attnlib import + first call, over plain SDPA's first call", extra)]
    for name, v in rows:
        print(f"| {name} | {v:.4f} |")
    print(f"\nattnlib import + first call / import torch: {extra / med['torch_import']:.3f} "
          f"(tests/test_first_call.py requires <= 0.3); compiler modules loaded by attnlib: "
          f"{med['compiler_modules']:.0f}")


if __name__ == "__main__":
    main()
