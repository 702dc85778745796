"""Under torchrun the ranks stop together: a SIGTERM to the process group (as GNU `timeout`, Slurm and
systemd send it) during a step's rewards, or a reward that fails on one rank, stops every rank at the
same point of the step, with a checkpoint of the step before. Waits are on files, never on time."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forkrl.training.checkpoint import latest_checkpoint, list_checkpoints, load_state
from forkrl.training.metrics import read_metrics

from .test_distributed import ROOT, _overrides


def waiting_reward(prompts, completions, **_):
    """On the call number $FORKRL_TEST_WAIT_AT of this rank: touch marker-RANK, wait for the file `go`;
    on $FORKRL_TEST_NAN_AT on rank 1: NaN (with reward.on_error=raise, a RewardError on that rank)."""
    calls = int(os.environ.get("FORKRL_TEST_CALLS", "0")) + 1
    os.environ["FORKRL_TEST_CALLS"] = str(calls)
    folder, rank = Path(os.environ["FORKRL_TEST_DIR"]), os.environ.get("RANK", "0")
    if str(calls) == os.environ.get("FORKRL_TEST_WAIT_AT"):
        (folder / f"marker-{rank}").touch()
        while not (folder / "go").exists():
            time.sleep(0.05)
    scores = [1.0 if len(c) % 2 else 0.0 for c in completions]
    if str(calls) == os.environ.get("FORKRL_TEST_NAN_AT") and rank == "1":
        scores[0] = float("nan")
    return scores


def _launch(tmp_path, out, *extra, **env):
    args = [
        *_overrides(out, 3),
        "sampling.dynamic=false",
        "reward.fn=tests.train.test_distributed_stop:waiting_reward",
        *extra,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONPATH": str(ROOT),
        "FORKRL_TEST_DIR": str(tmp_path),
        **env,
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.Popen(
        [*cmd, "-m", "forkrl", "train", *args],
        env=env,
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _assert_stopped_after_step_1(out: Path):
    assert [p.name for p in list_checkpoints(out)] == ["step-000001"]
    assert load_state(latest_checkpoint(out))["step"] == 1
    assert [r["step"] for r in read_metrics(out)] == [0, 1]


@pytest.mark.slow  # torchrun: 2 processes
def test_sigterm_to_the_group_during_rewards_stops_every_rank_with_the_step_before(tmp_path):
    out = tmp_path / "run"
    proc = _launch(tmp_path, out, FORKRL_TEST_WAIT_AT="2")  # call 2 = step 2's rewards on each rank
    try:
        while proc.poll() is None and not all((tmp_path / f"marker-{r}").exists() for r in (0, 1)):
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        os.killpg(proc.pid, signal.SIGTERM)  # the agent and both ranks, as `timeout` or `scancel` do
        (tmp_path / "go").touch()
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert f"SIGTERM: stopped after writing {out / 'checkpoints' / 'step-000001'}" in err, err[-4000:]
    _assert_stopped_after_step_1(out)


@pytest.mark.slow  # torchrun: 2 processes
def test_a_reward_error_on_one_rank_stops_every_rank_with_the_step_before(tmp_path):
    out = tmp_path / "run"
    proc = _launch(tmp_path, out, "reward.on_error=raise", FORKRL_TEST_NAN_AT="2")
    try:
        _, err = proc.communicate(timeout=300)  # before the fix rank 0 waited in a collective
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    ranks = err.split("torch/distributed/elastic")[0]  # what the ranks printed, before torchrun's report
    assert "the reward returned nan" in ranks and "the reward failed on another rank" in ranks, err[-4000:]
    assert ranks.count("fix the reward, then resume") == 2 and "Traceback" not in ranks, err[-4000:]
    _assert_stopped_after_step_1(out)
