#!/usr/bin/env bash
# Creates .venv with the pinned stack. torch goes first, pinned, so pip takes the CPU build
# instead of pulling several GB of CUDA packages through a dependency.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test]"
echo "lrc_dist: environment ready in .venv"
