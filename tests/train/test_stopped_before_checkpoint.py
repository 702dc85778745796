"""A run killed before its first checkpoint (issue 28, item 12): a plain rerun and `--resume` both point
to `--overwrite`, the one command that works, instead of sending the user from one to the other."""

import shutil

import pytest

from forkrl.cli import main

ARGS = [
    "train.steps=1",
    "train.progress=false",
    "train.tensorboard=false",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "sampling.dynamic=false",
    "train.eval_n=4",
]


@pytest.fixture
def killed_run(tmp_path):
    run = tmp_path / "run"
    assert main(["train", f"train.out_dir={run}", *ARGS]) == 0
    # what a kill -9 during the first step leaves: the config, the step-0 metrics, no checkpoint
    for name in ("checkpoints", "final", "summary.json"):
        p = run / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n")
    return run


def test_rerun_and_resume_point_to_overwrite(killed_run, capsys):
    capsys.readouterr()
    assert main(["train", f"train.out_dir={killed_run}", *ARGS]) == 2
    err = capsys.readouterr().err
    assert "stopped before its first checkpoint" in err and "--overwrite" in err and "--resume" not in err
    assert main(["train", "--resume", str(killed_run)]) == 2
    err = capsys.readouterr().err
    assert "nothing to continue" in err
    assert f"forkrl train --config {killed_run / 'config.yaml'} --overwrite" in err
    # and that command works
    assert main(["train", "--config", str(killed_run / "config.yaml"), "--overwrite"]) == 0
    assert (killed_run / "summary.json").is_file()
