"""Training with the vLLM rollout backend (`rollout.backend=vllm`): the command a user runs, with a probe
that checks each rollout was sampled from the policy as the last optimizer step left it (plain, LoRA,
and one engine per rank under torchrun). Needs the engine (tests/vllm_engine.py)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vllm_engine import ENGINE, ENGINE_DTYPE, LOGP_TOL, needs_engine

PROBE = """
import copy, json, os
import torch
from forkrl.rollout.vllm import VLLMRollout
from forkrl.training.forward import scoring_pass

_call, _sync = VLLMRollout.__call__, VLLMRollout.sync_weights


def _max_diff(model, ro, temperature):
    with torch.no_grad():
        logp, _ = scoring_pass(
            model, ro.input_ids, ro.attention_mask, ro.prompt_len, ro.response_ids,
            temperature=temperature, selective_head=True,
        )
    m = ro.response_mask
    return (logp[m] - ro.sampler_logp[m]).abs().max().item()


def _local(self, state):  # under FSDP2 the trainer syncs a full state dict: score it with a local copy
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(self.llm.llm_engine.model_config.model, dtype=torch.float32)
    model.load_state_dict(state)
    return model.eval()


def sync_weights(self, model):
    probe = _local(self, model) if isinstance(model, dict) else model
    if not hasattr(self, "probe_first"):
        self.probe_first = copy.deepcopy(probe)
    self.probe_model = probe
    _sync(self, model)


def _out():  # one file per rank under torchrun
    return os.environ["FORKRL_VLLM_PROBE"] + (f".rank{os.environ['RANK']}" if "RANK" in os.environ else "")


def call(self, prompts, **kw):
    ro = _call(self, prompts, **kw)
    if kw.get("greedy"):  # a held-out evaluation: no sampler log-probs to compare
        with open(_out(), "a") as fh:
            fh.write(json.dumps({"greedy": True}) + "\\n")
        return ro
    t = kw.get("temperature", 1.0)
    row = {"current": _max_diff(self.probe_model, ro, t), "first": _max_diff(self.probe_first, ro, t)}
    with open(_out(), "a") as fh:
        fh.write(json.dumps(row) + "\\n")
    return ro


VLLMRollout.__call__, VLLMRollout.sync_weights = call, sync_weights
"""


def _train_with_probe(tmp_path, launcher: list[str], *extra: str) -> tuple[Path, list[Path]]:
    """`forkrl train` with rollout.backend=vllm for 2 steps, the probe above imported first."""
    (tmp_path / "forkrl_vllm_probe.py").write_text(PROBE)
    probe = tmp_path / "probe.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env.update(FORKRL_VLLM_PROBE=str(probe), OMP_WAIT_POLICY="PASSIVE")
    run_dir = tmp_path / "run"
    overrides = [
        "rollout.backend=vllm",
        f"model.dtype={ENGINE_DTYPE}",
        f"model.device={ENGINE}",
        f"train.out_dir={run_dir}",
        "train.steps=2",
        "train.eval_n=4",
        "train.eval_every=0",
        "train.progress=false",
        "train.tensorboard=false",
        "rollout.prompts_per_step=4",
        "rollout.max_new_tokens=24",
        "rollout.vllm_gpu_memory_utilization=0.2",
        "optim.lr=2e-3",  # a first update large enough that sampling from stale weights would show
        "optim.warmup_steps=0",
        *extra,
    ]
    cmd = [*launcher, "-m", "forkrl", "train", "--import", "forkrl_vllm_probe", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (run_dir / "final").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]  # step 0: the held-out evaluation before training
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["kept_groups"] > 0 and all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
    return run_dir, sorted(tmp_path.glob("probe.jsonl*"))


def _assert_sampled_from_the_trained_policy(probe: Path, evaluations: bool) -> None:
    calls = [json.loads(line) for line in probe.read_text().splitlines()]
    evals, calls = [c for c in calls if c.get("greedy")], [c for c in calls if not c.get("greedy")]
    assert len(evals) >= (2 if evaluations else 0)  # the held-out evaluations (start, end) went through vLLM
    assert len(calls) >= 2 and all(c["current"] < LOGP_TOL for c in calls), calls  # from the policy ...
    assert calls[-1]["first"] > 10 * LOGP_TOL, calls  # ... as step 1 updated it, not the initial one


@needs_engine
@pytest.mark.slow
def test_two_rl_steps_with_the_vllm_backend(tmp_path):
    # The command a user runs, in a process of its own, with the probe above imported first.
    _, probes = _train_with_probe(tmp_path, [sys.executable])
    assert [p.name for p in probes] == ["probe.jsonl"]
    _assert_sampled_from_the_trained_policy(probes[0], evaluations=True)


@needs_engine
@pytest.mark.slow
def test_a_lora_policy_syncs_its_merged_weights_into_vllm(tmp_path):
    pytest.importorskip("peft")
    # The engine holds plain weights: W + ΔW of every adapted layer, checked against the policy.
    run_dir, probes = _train_with_probe(tmp_path, [sys.executable], "model.lora_rank=8", "optim.lr=5e-2")
    _assert_sampled_from_the_trained_policy(probes[0], evaluations=True)
    assert (run_dir / "final-adapter" / "adapter_model.safetensors").exists()


@needs_engine
@pytest.mark.slow
@pytest.mark.skipif(ENGINE != "cpu", reason="2 ranks on one CPU; on CUDA this needs 2 GPUs")
def test_vllm_under_torchrun_one_engine_per_rank_synced_from_fsdp(tmp_path):
    # One colocated engine per rank (tensor parallel 1), each sampling its own groups, weights gathered
    # from the FSDP2-sharded policy before each rollout; rank 0 alone runs the held-out evaluation.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_dir, probes = _train_with_probe(tmp_path, launcher, "train.parallel=fsdp")
    assert [p.name for p in probes] == ["probe.jsonl.rank0", "probe.jsonl.rank1"]
    for rank, probe in enumerate(probes):
        _assert_sampled_from_the_trained_policy(probe, evaluations=rank == 0)
    assert (run_dir / "summary.json").exists()
