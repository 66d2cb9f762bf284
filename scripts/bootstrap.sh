#!/usr/bin/env bash
# Create (or reuse) .venv with attnlib and its test extras. Idempotent; safe to run before every command.
# torch==2.13.0 is pinned first: on the project's CPU machines pip takes a local CPU wheel in seconds,
# where an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.attnlib-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check "torch==${ATTNLIB_TORCH_VERSION:-2.13.0}"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,triton,hf]"
    .venv/bin/python -c "import torch, attnlib" && touch "$stamp"
fi
