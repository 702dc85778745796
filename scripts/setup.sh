#!/usr/bin/env bash
# Set up forkrl in the current Python environment (a venv, or the machine's Python).
# torch first: a bare `torch` requirement would pull a multi-GB CUDA build, while
# torch==2.13.0 is the CPU wheel these machines keep on local disk. An existing torch is kept.
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --test   # runtime + test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
extra=""
if [ "${1:-}" = "--test" ]; then extra="[test]"; fi
"$PY" -m pip install --quiet -e ".${extra}"
