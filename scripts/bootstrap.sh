#!/usr/bin/env bash
# Create (or reuse) a virtual environment with attnlib and its test extras. Idempotent; safe to run before
# every command.
#
#   bash scripts/bootstrap.sh            .venv: test oracles and tools at the versions in scripts/constraints.txt
#                                        (known to pass); what the README's commands and CI use
#   bash scripts/bootstrap.sh --latest   .venv-latest: today's newest releases of everything but torch, to find
#                                        upstream breakage on purpose (.venv-latest/bin/python -m pytest -q)
#
# torch==2.13.0 is pinned first: on the project's CPU machines pip takes a local CPU wheel in seconds, where
# an unpinned torch would pull a multi-GB CUDA build (ATTNLIB_TORCH_VERSION overrides it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=.venv
constraints=(-c scripts/constraints.txt)
upgrade=()
if [ "${1:-}" = "--latest" ]; then
    venv=.venv-latest
    constraints=()
    upgrade=(--upgrade --upgrade-strategy eager)
elif [ -n "${1:-}" ]; then
    echo "usage: bash scripts/bootstrap.sh [--latest]" >&2
    exit 2
fi
if [ ! -x "$venv/bin/python" ]; then
    "$PY" -m venv "$venv"
fi
stamp=$venv/.attnlib-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/constraints.txt -nt "$stamp" ] \
        || [ ${#upgrade[@]} -gt 0 ]; then
    torch_pin="torch==${ATTNLIB_TORCH_VERSION:-2.13.0}"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$torch_pin"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check ${upgrade[@]+"${upgrade[@]}"} \
        ${constraints[@]+"${constraints[@]}"} -e ".[test,triton,hf,plot]" "$torch_pin"
    "$venv/bin/python" -c "import torch, attnlib" && touch "$stamp"
fi
