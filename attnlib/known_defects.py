"""Defects of the libraries attnlib wraps, and how each is routed around: one table.

Each entry names the affected versions and devices, the symptom, what attnlib does about it, and a
standalone reproduction (for an upstream report, and to see whether an upgrade fixed it). ``attnlib
info`` prints the table; the tests run each reproduction and fail once it stops reproducing, so the
guard can be dropped.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .settings import FLEX_CPU_GUARD, INDUCTOR_COMPILE_THREADS


#: the repository's scripts/ folder (reproductions live there; absent in an installed wheel)
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@dataclass(frozen=True)
class KnownDefect:
    name: str
    backend: str                   # the attnlib backend it concerns
    device: str                    # the device type it concerns
    library: str
    affected: str                  # versions and devices, in words
    symptom: str
    handling: str
    reproduction: str              # script under scripts/
    applies: Callable[[], bool]    # does this process have the affected library/device?
    guard_active: Callable[[], bool]

    def run_reproduction(self, timeout: float = 300) -> tuple[bool, str]:
        """``(present, output)``: run the standalone script in a fresh process (exit 1 = present)."""
        script = SCRIPTS / self.reproduction
        if not script.exists():
            return False, f"{script} not found (reproductions ship with the repository, not the wheel)"
        env = dict(os.environ)
        env[INDUCTOR_COMPILE_THREADS] = os.environ.get(INDUCTOR_COMPILE_THREADS, "1")   # one worker unless set
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, env=env)
        return proc.returncode == 1, proc.stdout.strip()


def _cpu_flex_exists() -> bool:
    """Whether flex's CPU kernel runs here: flex serves a plain fp32 CPU call (asked through its public
    ``why_not``: flex importable, a C++ compiler, a CPU torch's flex kernel supports)."""
    import torch

    from .backends.flex import FlexBackend
    from .inputs import validate_call

    x = torch.zeros(1, 1, 1, 8)
    return not FlexBackend().why_not(validate_call(x, x, x))


def _cpu_flex_guard() -> bool:
    from .backends import flex
    return flex.cpu_guard_enabled()


FLEX_CPU_DYNAMIC_SHAPES = KnownDefect(
    name="flex-cpu-dynamic-shapes",
    backend="flex",
    device="cpu",
    library="torch (inductor's C++ flex_attention template)",
    affected="torch 2.13.0+cpu (seen); every torch whose CPU flex kernel compiles dynamic shapes until a "
             "reproduction run says otherwise",
    symptom="after a recompile for a second shape (automatic dynamic shapes) the compiled CPU kernel indexes "
            "the mask_mod's tensors with the wrong size: silently wrong outputs, NaN, or 'index out of bounds'",
    handling="flex on CPU compiles static shapes only, lengths padded to buckets (keys to 16/32/64, then "
             "multiples of 64) and head dims to >= 32; padded keys are hidden and padded rows sliced off "
             f"({FLEX_CPU_GUARD}=0 turns this off)",
    reproduction="repro_torch_flex_cpu_dynamic.py",
    applies=_cpu_flex_exists,
    guard_active=_cpu_flex_guard,
)

KNOWN_DEFECTS: tuple[KnownDefect, ...] = (FLEX_CPU_DYNAMIC_SHAPES,)
