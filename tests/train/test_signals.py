"""SIGTERM stops at once where nothing is lost (start-up, the first evaluation, a step's rewards), with a
message and, mid-run, a checkpoint of the step before; the resumed run equals an uninterrupted one.

Every wait is on a file the trainer's child process writes, never on a time budget."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forkrl.config import load_config
from forkrl.training.checkpoint import list_checkpoints
from forkrl.training.metrics import read_metrics
from forkrl.training.trainer import train

from .test_resume import _overrides

REPO = Path(__file__).resolve().parents[2]


def parity_reward(prompts, completions, **_):
    """Hangs (until signalled) on the call number in $FORKRL_TEST_HANG_AT, after touching $FORKRL_TEST_MARKER."""
    calls = int(os.environ.get("FORKRL_TEST_CALLS", "0")) + 1
    os.environ["FORKRL_TEST_CALLS"] = str(calls)
    if str(calls) == os.environ.get("FORKRL_TEST_HANG_AT"):
        Path(os.environ["FORKRL_TEST_MARKER"]).touch()
        time.sleep(3600)
    return [1.0 if len(c) % 2 else 0.0 for c in completions]


def _start(args, tmp_path, **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tmp_path}:{REPO}", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "forkrl", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _signal_when(proc, marker: Path, sig=signal.SIGTERM) -> str:
    while proc.poll() is None and not marker.exists():
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err
    return err


def test_sigterm_during_start_up_stops_at_once_and_leaves_nothing(tmp_path):
    # The reward's module blocks while it is imported (before the model loads) until signalled.
    marker = tmp_path / "importing"
    (tmp_path / "slow_import.py").write_text(
        f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(3600)\n"
        "def fn(prompts, completions, **_):\n    return [0.0] * len(completions)\n"
    )
    out = tmp_path / "run"
    err = _signal_when(_start([f"train.out_dir={out}", "reward.fn=slow_import:fn"], tmp_path), marker)
    assert "forkrl: SIGTERM: stopped during start-up, before the first step; nothing was kept" in err
    assert "Traceback" not in err
    assert os.listdir(out) == [".lock"]  # a fresh run leaves the folder as it found it


@pytest.mark.slow  # end to end, > 5 s
def test_sigterm_during_the_first_evaluation_stops_at_once(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    out, marker = tmp_path / "run", tmp_path / "hung"
    args = [
        *_overrides(tiny_model_dir, out, 3),
        f"data.path={data}",
        f"data.eval_path={data}",
        "reward.fn=tests.train.test_signals:parity_reward",
        "reward.isolate=false",
    ]
    proc = _start(args, tmp_path, FORKRL_TEST_HANG_AT="1", FORKRL_TEST_MARKER=str(marker))
    err = _signal_when(proc, marker)  # the first call grades the held-out set
    assert "SIGTERM: stopped during start-up, before the first step" in err and "Traceback" not in err
    assert os.listdir(out) == [".lock"]


@pytest.mark.slow  # end to end, > 5 s
def test_sigterm_while_a_reward_hangs_checkpoints_the_step_before_and_resumes_identically(
    tiny_model_dir, tmp_path, monkeypatch
):
    args = [*_overrides(tiny_model_dir, tmp_path / "sig", 3), "reward.isolate=false"]
    reward = "reward.fn=tests.train.test_signals:parity_reward"
    out, marker = tmp_path / "sig", tmp_path / "hung"
    # Calls: 1 = step 1 (the built-in task's evaluation uses its own grader), 2 = step 2: hangs.
    proc = _start([*args, reward], tmp_path, FORKRL_TEST_HANG_AT="2", FORKRL_TEST_MARKER=str(marker))
    err = _signal_when(proc, marker)
    assert f"SIGTERM: stopped after writing {out / 'checkpoints' / 'step-000001'}" in err, err
    assert [p.name for p in list_checkpoints(out)] == ["step-000001"]
    assert [r["step"] for r in read_metrics(out)] == [0, 1]
    resumed = subprocess.run(
        [sys.executable, "-m", "forkrl", "train", "--resume", str(out), reward],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert resumed.returncode == 0, resumed.stderr
    monkeypatch.delenv("FORKRL_TEST_HANG_AT", raising=False)
    monkeypatch.setenv("FORKRL_TEST_CALLS", "0")
    full, _ = train(
        load_config(None, [*_overrides(tiny_model_dir, tmp_path / "full", 3), "reward.isolate=false", reward])
    )
    a, b = load_file(full / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    timing = ("time", "tokens_per_s", "wall")
    rows = [
        [{k: v for k, v in r.items() if not k.startswith(timing)} for r in read_metrics(d)]
        for d in (full, out)
    ]
    assert rows[0] == rows[1]


@pytest.mark.slow  # end to end, > 5 s
def test_sigterm_during_a_periodic_evaluation_checkpoints_the_step_without_it(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    out, marker = tmp_path / "run", tmp_path / "hung"
    args = [
        *_overrides(tiny_model_dir, out, 3),
        f"data.path={data}",
        f"data.eval_path={data}",
        "train.eval_every=1",
        "reward.fn=tests.train.test_signals:parity_reward",
        "reward.isolate=false",
    ]
    # Calls: 1 = the start's evaluation, 2 = step 1's rollouts, 3 = step 1's evaluation: hangs.
    proc = _start(args, tmp_path, FORKRL_TEST_HANG_AT="3", FORKRL_TEST_MARKER=str(marker))
    err = _signal_when(proc, marker)
    assert f"SIGTERM: stopped after writing {out / 'checkpoints' / 'step-000001'}" in err, err
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["eval_accuracy"] is None and "loss" in str(rows[1])


@pytest.mark.slow  # a forkrl eval process, about 7 s
def test_ctrl_c_during_forkrl_eval_keeps_what_was_graded(tmp_path):
    out = tmp_path / "eval"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "forkrl",
            "eval",
            "--task",
            "pick",
            "--n",
            "500",
            "--batch-size",
            "2",
            "--no-progress",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # pytest started with `&` ignores it
    )
    results = out / "results.jsonl"
    while proc.poll() is None and not (results.exists() and results.read_text().count("\n") >= 2):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err
    graded = len(results.read_text().splitlines())
    assert f"forkrl: interrupted after grading {graded} of 500 problems; their results are in {out}" in err, (
        err
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["problems_asked"] == 500 and summary["n"] == graded
