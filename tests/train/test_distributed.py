"""Two gloo ranks under torchrun train exactly as one process: same groups, tokens, loss and parameters.

Each test launches `python -m torch.distributed.run --nproc_per_node 2 -m forkrl train ...` (the
documented command) on this CPU and compares with `forkrl.train` in this process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forkrl.config import load_config
from forkrl.models.loading import DEFAULT_MODEL
from forkrl.training.dist import DistEnv, shard
from forkrl.training.metrics import read_metrics
from forkrl.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]


def _overrides(out, steps, *extra):
    return [
        f"model.path={DEFAULT_MODEL}",  # the warm start: groups with mixed rewards to learn from
        f"train.out_dir={out}",
        f"train.steps={steps}",
        "train.eval_n=8",
        "train.eval_every=0",
        "train.progress=false",
        "train.tensorboard=false",
        "train.threads=1",
        "rollout.prompts_per_step=6",
        "rollout.group_size=4",
        "optim.micro_batch_size=12",  # one process: 2 micro-batches of 12 rows; 2 ranks: 1 each
        "reward.isolate=false",
        *extra,
    ]


def _torchrun(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "forkrl", "train", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    steps_a = [m for m in ma if m["step"] >= 1]
    steps_b = [m for m in mb if m["step"] >= 1]
    assert len(steps_a) == len(steps_b) >= 1
    for x, y in zip(steps_a, steps_b):
        for key in ("kept_groups", "ds_rounds", "selected_tokens", "valid_tokens", "tokens"):
            assert x[key] == y[key], (key, x[key], y[key])
        for key in ("reward_mean", "accuracy", "entropy_mean", "tau", "loss", "kept_frac"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    moved = 0.0
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    init = load_file(str(Path(DEFAULT_MODEL) / "model.safetensors"))
    moved = max((wa[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-5  # the runs trained


def test_shard_splits_groups_into_contiguous_blocks():
    blocks = [list(shard(7, DistEnv(r, 3))) for r in range(3)]
    assert blocks == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(shard(1, DistEnv(r, 2))) for r in range(2)] == [[0], []]


@pytest.mark.slow  # torchrun: 2 processes
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(tmp_path, parallel):
    single = tmp_path / "single"
    train(load_config(None, _overrides(single, 2)))
    ranks = tmp_path / "ranks"
    _torchrun(_overrides(ranks, 2, f"train.parallel={parallel}"))
    _assert_same_run(single, ranks)
    ckpts = sorted(p.name for p in (ranks / "checkpoints").iterdir())
    assert ckpts == ["step-000002"]  # written once, by rank 0
    assert {"model.safetensors", "state.pt"} <= {p.name for p in (ranks / "checkpoints" / ckpts[0]).iterdir()}


@pytest.mark.slow  # torchrun: 2 processes
@pytest.mark.parametrize("preset", ["paper", "ppo"])
def test_a_rank_with_nothing_to_train_does_not_hang(tmp_path, preset):
    # One prompt per step: rank 1 has no group at all; with overlong filtering and a 2-token budget
    # every response of rank 0 is truncated and masked. Both must still step together.
    out = tmp_path / "idle"
    _torchrun(
        _overrides(
            out,
            2,
            f"preset={preset}",
            "rollout.prompts_per_step=1",
            "sampling.dynamic=false",
            "rollout.max_new_tokens=2",
            "sampling.overlong_filter=true",
        ),
        timeout=180,
    )
    rows = [m for m in read_metrics(out) if m["step"] >= 1]
    assert [m["step"] for m in rows] == [1, 2]
    assert all(m["valid_tokens"] == 0 for m in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2


@pytest.mark.slow  # torchrun: 2 processes
def test_resume_a_two_rank_checkpoint_in_one_process(tmp_path):
    ranks = tmp_path / "ranks"
    _torchrun(_overrides(ranks, 2, "train.parallel=fsdp"))
    resumed = train(load_config(None, _overrides(ranks, 3)), resume=True)[0]
    single = tmp_path / "single"
    train(load_config(None, _overrides(single, 3)))
    _assert_same_run(single, resumed)


@pytest.mark.slow  # torchrun: 2 processes
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_ppo_two_ranks_equal_one_process(tmp_path, parallel):
    # ddp: the critic is replicated and its gradients averaged; fsdp: its decoder layers are sharded
    # like the policy's. GAE whitening and value-loss counts are global either way.
    single = tmp_path / "single"
    train(load_config(None, _overrides(single, 2, "preset=ppo")))
    ranks = tmp_path / "ranks"
    _torchrun(_overrides(ranks, 2, "preset=ppo", f"train.parallel={parallel}"))
    _assert_same_run(single, ranks)
    ca = load_file(str(single / "final-critic" / "model.safetensors"))
    cb = load_file(str(ranks / "final-critic" / "model.safetensors"))
    for k in ca:
        torch.testing.assert_close(ca[k], cb[k], rtol=1e-4, atol=1e-5)
    rows = [m for m in read_metrics(ranks) if m["step"] >= 1]
    assert all("value_loss" in m for m in rows)
    # Critic statistics are over every rank's tokens, as one process computes them.
    for x, y in zip([m for m in read_metrics(single) if m["step"] >= 1], rows):
        for key in (
            "value_explained_var",
            "values_mean",
            "values_std",
            "returns_max",
            "returns_min",
            "adv_std",
        ):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key
    saved = load_file(str(ranks / "checkpoints" / "step-000002" / "critic" / "model.safetensors"))
    assert saved.keys() == cb.keys() and all(torch.equal(saved[k], cb[k]) for k in cb)  # full, not shards
    if parallel == "fsdp":  # the checkpoint resumes in one process (full critic and optimizer state)
        resumed = train(load_config(None, _overrides(ranks, 3, "preset=ppo")), resume=True)[0]
        assert [m["step"] for m in read_metrics(resumed) if m["step"] >= 1] == [1, 2, 3]
