"""Nothing lost: checkpoints, bit-identical resume, SIGTERM, and a crash in the middle of a checkpoint write."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from forkrl.config import load_config
from forkrl.training.checkpoint import latest_checkpoint, list_checkpoints, load_state
from forkrl.training.metrics import read_metrics
from forkrl.training.trainer import train

TIMING = ("time", "tokens_per_s", "wall")


def length_reward(prompts, completions, **_):
    return [len(c) / 20.0 for c in completions]


def _overrides(model_dir, out, steps):
    return [
        f"model.path={model_dir}",
        f"train.out_dir={out}",
        f"train.steps={steps}",
        "train.eval_n=4",
        "train.eval_every=2",
        "train.progress=false",
        "train.tensorboard=false",
        "rollout.prompts_per_step=3",
        "rollout.group_size=4",
        "rollout.max_new_tokens=10",
        "optim.lr=1e-2",
        "sampling.dynamic=false",
        "optim.mini_batches=2",
        "selection.rule=random",
    ]  # random: the selection RNG must resume too


def _untimed(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.mark.slow  # end to end, > 5 s
def test_stop_and_resume_is_bit_identical(tiny_model_dir, tmp_path):
    full, _ = train(
        load_config(None, _overrides(tiny_model_dir, tmp_path / "full", 4)), reward_fn=length_reward
    )
    half = tmp_path / "half"
    train(load_config(None, _overrides(tiny_model_dir, half, 2)), reward_fn=length_reward)
    assert [p.name for p in list_checkpoints(half)] == ["step-000002"]
    train(load_config(None, _overrides(tiny_model_dir, half, 4)), reward_fn=length_reward, resume=True)
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(half / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _untimed(read_metrics(full)) == _untimed(read_metrics(half))
    assert [r["step"] for r in read_metrics(half)] == [0, 1, 2, 3, 4]


def test_resume_without_checkpoint_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(load_config(None, _overrides(tiny_model_dir, tmp_path / "none", 2)), resume=True)


SCRIPT = """
import os, sys
from forkrl.config import load_config
from forkrl.training.trainer import train
sys.path.insert(0, {tests!r})
from train.test_resume import length_reward, _overrides
calls = []
def hook(tmp):
    calls.append(tmp)
    if len(calls) == 2:
        os._exit(9)  # die like kill -9 after writing the files, before the rename
train(load_config(None, _overrides({model!r}, {out!r}, 5) + ["train.save_every=1"]), reward_fn=length_reward,
      checkpoint_hook=hook)
"""


@pytest.mark.slow  # end to end, > 5 s
def test_crash_during_checkpoint_write_keeps_the_previous_one(tiny_model_dir, tmp_path):
    out = tmp_path / "crash"
    tests = os.path.dirname(os.path.dirname(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(tests=tests, model=str(tiny_model_dir), out=str(out))],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 9, proc.stderr
    assert [p.name for p in list_checkpoints(out)] == ["step-000001"]
    assert any(p.name.startswith(".tmp-step-000002") for p in (out / "checkpoints").iterdir())
    assert load_state(latest_checkpoint(out))["step"] == 1
    _, summary = train(
        load_config(None, _overrides(tiny_model_dir, out, 3)), reward_fn=length_reward, resume=True
    )
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3]
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the killed write's folder is removed


@pytest.mark.slow  # end to end, > 5 s
def test_sigterm_stops_at_a_safe_point_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "sig"
    cmd = [
        sys.executable,
        "-m",
        "forkrl",
        "train",
        *_overrides(tiny_model_dir, out, 500),
        "reward.fn=tests.train.test_resume:length_reward",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    }
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    # Synchronised on the log (step 1 is written, so the handler is in place), not on a time budget.
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: stopped after writing" in err and f"forkrl train --resume {out}" in err
    step = load_state(latest_checkpoint(out))["step"]
    assert 1 <= step < 500
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows[-1]["step"] == step
    # A resume imports a user's reward only when the command names it (tests/train/test_run_folder.py).
    reward = "reward.fn=tests.train.test_resume:length_reward"
    proc = subprocess.run(
        [sys.executable, "-m", "forkrl", "train", "--resume", str(out), f"train.steps={step + 1}", reward],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert [r["step"] for r in read_metrics(out)][-2:] == [step, step + 1]


def hangs(prompts, completions, **_):
    # The first call anywhere hangs forever (a marker file makes it exactly one, across worker restarts).
    marker = os.environ.get("FORKRL_TEST_HANG_MARKER")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(3600)
    return [1.0 if len(c) % 2 else 0.0 for c in completions]


_calls = []


def raises(prompts, completions, **_):
    _calls.append(1)
    if len(_calls) == 1:  # the first call in each worker process raises
        raise ZeroDivisionError("a reward bug")
    return [1.0 if len(c) % 2 else 0.0 for c in completions]


@pytest.mark.slow  # end to end, > 5 s
@pytest.mark.parametrize("fn,counter", [("hangs", "reward_timeouts"), ("raises", "reward_errors")])
def test_a_hanging_or_raising_reward_does_not_stop_training(
    tiny_model_dir, tmp_path, fn, counter, monkeypatch
):
    monkeypatch.setenv("FORKRL_TEST_HANG_MARKER", str(tmp_path / "hung"))
    cfg = load_config(
        None,
        [
            *_overrides(tiny_model_dir, tmp_path / fn, 2),
            f"reward.fn=tests.train.test_resume:{fn}",
            "reward.timeout=2",
            "reward.workers=1",
        ],
    )
    run_dir, _ = train(cfg)
    rows = read_metrics(run_dir)[1:]
    assert [r["step"] for r in rows] == [1, 2]
    assert sum(r[counter] for r in rows) > 0  # counted, and the run went on


def test_reward_on_error_raise_stops_the_run(tiny_model_dir, tmp_path):
    cfg = load_config(
        None,
        [
            *_overrides(tiny_model_dir, tmp_path / "r", 2),
            "reward.fn=tests.train.test_resume:raises",
            "reward.on_error=raise",
            "reward.workers=1",
        ],
    )
    with pytest.raises(Exception, match="ZeroDivisionError"):
        train(cfg)
