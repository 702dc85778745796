"""Whether the vLLM engine tests can run here, shared by tests/test_rollout_vllm.py and
tests/test_train_vllm.py (CI's vLLM stage sets FORKRL_REQUIRE_VLLM=1: then they must)."""

import importlib.util
import os

import pytest
import torch

HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_CUDA = torch.cuda.is_available()
ENGINE = None  # the device the installed vLLM samples on, when it can here: "cpu" or "cuda"
if HAS_VLLM:
    from forkrl.rollout.vllm import engine_device

    ENGINE = engine_device()
    if ENGINE == "cuda" and not HAS_CUDA:
        ENGINE = None
NO_ENGINE = (
    "needs vllm: its CPU build (bash scripts/setup.sh --vllm), or pip install 'forkrl[vllm]' and a CUDA GPU"
)
if ENGINE is None and os.environ.get("FORKRL_REQUIRE_VLLM") == "1":  # CI's vLLM stage: never skip silently
    pytest.fail(f"FORKRL_REQUIRE_VLLM=1 but the engine tests cannot run here: {NO_ENGINE}", pytrace=False)
needs_engine = pytest.mark.skipif(ENGINE is None, reason=NO_ENGINE)
# float32 on the CPU (vLLM's CPU kernels take it); bfloat16 on CUDA, as a GPU run would use.
ENGINE_DTYPE = "float32" if ENGINE == "cpu" else "bfloat16"
# Largest |vLLM log-prob - scoring pass| per token. float32: the same numbers through other kernels
# (oneDNN GEMMs, vLLM's attention); up to 2e-5 seen on this CPU. bf16: vLLM's activations are rounded.
LOGP_TOL = 2e-4 if ENGINE_DTYPE == "float32" else 0.15
