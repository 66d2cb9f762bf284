"""Every environment variable attnlib reads, in one table: name, default, meaning, valid values.

Modules read the environment through the name constants below (never a repeated string literal);
``attnlib info`` prints the table with the values set in this process, ``attnlib info --env`` prints it
as markdown (docs/configuration.md embeds it). This module imports nothing from attnlib.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

#: the backend for calls that name none (after ``backend=`` and ``use_backend``)
BACKEND = "DIFFUSION_ATTENTION_BACKEND"
#: what happens when the chosen backend cannot serve a call
FALLBACK = "ATTNLIB_FALLBACK"
#: pins the implementation behind the ``flash`` backend
FLASH_IMPL = "ATTNLIB_FLASH_IMPL"
#: the ``flex`` CPU shape guard
FLEX_CPU_GUARD = "ATTNLIB_FLEX_CPU_GUARD"
#: batch-invariant (bitwise deterministic) Triton attention kernels
DETERMINISTIC = "ATTNLIB_DETERMINISTIC"
#: extra checks of tensor contents on the device (page ids in range): a debugging aid
DEBUG_CHECKS = "ATTNLIB_DEBUG_CHECKS"
#: rows with a non-finite query, or that see a non-finite key, are marked NaN after kernels that drop them
NONFINITE_GUARD = "ATTNLIB_NONFINITE_GUARD"
#: the Triton rotary / mRoPE kernels on CUDA
ROTARY_KERNEL = "ATTNLIB_ROTARY_KERNEL"
#: triton's own switch for its CPU interpreter (attnlib reads it, triton defines it)
TRITON_INTERPRET = "TRITON_INTERPRET"
#: the C++ compiler (the toolchain's convention); ``flex`` on CPU needs one for inductor's kernels
CXX = "CXX"
#: torch inductor's compile worker count, passed to the known-defect reproductions ``attnlib check`` runs
INDUCTOR_COMPILE_THREADS = "TORCHINDUCTOR_COMPILE_THREADS"

#: values of ``$ATTNLIB_FALLBACK``: warn (default) falls back to auto with one warning, error raises
FALLBACK_POLICIES = ("warn", "error")
#: values of ``$ATTNLIB_FLASH_IMPL``, in the order the ``flash`` backend tries them when it is unset
FLASH_IMPLS = ("fa3", "fa2", "fa4", "torch")
#: values of ``$ATTNLIB_FLEX_CPU_GUARD`` that switch the guard off (after strip + lower-case)
FLEX_CPU_GUARD_OFF = ("0", "false", "off", "no")


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    meaning: str
    values: str
    defined_by: str = "attnlib"


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar(BACKEND, "unset (auto)",
           "the backend for calls that name none: after `backend=` and `use_backend(...)`, before auto "
           "selection; an unknown name raises ValueError naming the variable",
           "`auto`, a backend name or an alias (`attnlib info --aliases`), case-insensitive"),
    EnvVar(FALLBACK, f"`{FALLBACK_POLICIES[0]}`",
           "what happens when the chosen backend cannot serve a call: fall back to auto with one warning, "
           "or raise BackendUnavailableError",
           ", ".join(f"`{p}`" for p in FALLBACK_POLICIES) + "; anything else raises ValueError"),
    EnvVar(FLASH_IMPL, "unset (the first importable of " + ", ".join(FLASH_IMPLS) + ")",
           "pins the implementation behind the `flash` backend",
           ", ".join(f"`{p}`" for p in FLASH_IMPLS)),
    EnvVar(FLEX_CPU_GUARD, "`1` (on)",
           "`flex` on CPU compiles static shapes padded to buckets, routing around the "
           "`flex-cpu-dynamic-shapes` defect; off only to check whether a torch build still needs it",
           ", ".join(f"`{v}`" for v in FLEX_CPU_GUARD_OFF) + " switch it off; anything else keeps it on"),
    EnvVar(DETERMINISTIC, "`0` (off)",
           "the `triton` backend's kernels run in deterministic mode (outputs batch-invariant bitwise); "
           "`torch.use_deterministic_algorithms(True)` does the same",
           "`1` on, anything else off"),
    EnvVar(DEBUG_CHECKS, "`0` (off)",
           "checks that need tensor contents run on the device without a host read (`block_table` page ids "
           "inside the pool, via `torch._assert_async`); costs a little per call",
           "`1` on, anything else off"),
    EnvVar(NONFINITE_GUARD, "`1` (on)",
           "garbage isolation for kernels that lack it: padded key slots are zeroed before kernels that would "
           "read them (one copy of K and V per call with `KeyPadding` on sdpa), and after a kernel that returns "
           "a row as 0 when every one of its scores is NaN (SDPA, flex, flash-attn, xformers) the rows with a "
           "non-finite query or first visible key are set to NaN. A few small ops per call: on the 2-core CPU a "
           "tiny decode step costs +35 us with `Causal()` and +76 us with `KeyPadding` (bench/bench_overhead.py)",
           "`0` off (inputs known finite and padding known clean), `strict` also zeroes non-finite keys hidden "
           "by causality, windows or sparsity (one more pass over K and V), anything else on"),
    EnvVar(ROTARY_KERNEL, "`1` (on)",
           "CUDA rotary / mRoPE calls use attnlib's Triton kernels; `0` runs the torch implementation",
           "`0` off, anything else on"),
    EnvVar(TRITON_INTERPRET, "`0` (off)",
           "Triton kernels run in triton's CPU interpreter (slow; tests): the `triton` backend becomes "
           "available on CPU. Must be set before triton is imported",
           "`1` on, anything else off", defined_by="triton"),
    EnvVar(CXX, "unset (the first of g++, clang++, c++ on PATH)",
           "the C++ compiler `flex` on CPU looks for (inductor builds its CPU kernels with one)",
           "a compiler command", defined_by="toolchain"),
    EnvVar(INDUCTOR_COMPILE_THREADS, "`1` for the reproductions `attnlib check` runs",
           "inductor's compile workers in the known-defect reproduction scripts run by `attnlib check`",
           "a positive integer", defined_by="torch"),
)

#: the names, for ``name in NAMES`` checks
NAMES = frozenset(v.name for v in ENV_VARS)


def markdown_table() -> str:
    """The table as markdown (docs/configuration.md embeds this output verbatim)."""
    lines = ["| variable | default | meaning | valid values | defined by |", "|---|---|---|---|---|"]
    for v in ENV_VARS:
        lines.append(f"| `{v.name}` | {v.default} | {v.meaning} | {v.values} | {v.defined_by} |")
    return "\n".join(lines)


def current_values() -> list[tuple[str, str | None]]:
    """``(name, value or None)`` for each variable, as this process sees it now."""
    return [(v.name, os.environ.get(v.name)) for v in ENV_VARS]
