"""What a user sees of a run when standard output is not a terminal (nohup, Slurm, CI), and train.log."""

import io
import json

import pytest
from rich.console import Console

from forkrl.config import load_config
from forkrl.training.progress import LOG_FILE, TrainProgress, step_line
from forkrl.training.trainer import train

from .test_resume import _overrides, length_reward

STEP = {
    "reward_mean": 0.5,
    "accuracy": 0.25,
    "tau": 1.5,
    "kept_frac": 0.2,
    "entropy_mean": 0.8,
    "time_step": 2.0,
}


def test_without_a_terminal_plain_lines_every_n_steps_and_every_step_in_train_log(tmp_path, capsys):
    pipe = Console(file=io.StringIO(), force_terminal=False)
    with TrainProgress(10, run_dir=tmp_path, every=4, console=pipe) as bar:
        bar.update(0, {}, 0.5)
        for step in range(1, 11):
            bar.update(step, STEP, 0.5)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"forkrl: training 10 steps in {tmp_path} (every step: {tmp_path / LOG_FILE})"
    assert [line.split()[1] for line in out[1:]] == ["4/10", "8/10", "10/10"]  # every 4, and the last
    assert out[1].startswith(step_line(4, 10, STEP, 0.5))
    logged = (tmp_path / LOG_FILE).read_text().splitlines()
    assert len(logged) == 10 and logged[-1].endswith(step_line(10, 10, STEP, 0.5))


def test_on_a_terminal_the_bar_prints_no_plain_lines(tmp_path, capsys):
    tty = Console(file=io.StringIO(), force_terminal=True)
    with TrainProgress(3, run_dir=tmp_path, console=tty) as bar:
        for step in range(1, 4):
            bar.update(step, STEP, 0.5)
    assert capsys.readouterr().out == ""
    assert len((tmp_path / LOG_FILE).read_text().splitlines()) == 3  # the log file either way


@pytest.mark.slow  # end to end: a run and its resume
def test_a_run_prints_its_folder_and_steps_and_a_resume_marks_the_log(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(
        load_config(None, [*_overrides(tiny_model_dir, out, 2), "train.progress=true"]),
        reward_fn=length_reward,
    )
    printed = capsys.readouterr().out
    assert f"forkrl: training 2 steps in {out}" in printed and "step 2/2  reward" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = (out / LOG_FILE).read_text().splitlines()
    assert len(logged) == 2 and f"reward {rows[-1]['reward_mean']:.3f}" in logged[-1]
    train(
        load_config(None, [*_overrides(tiny_model_dir, out, 3), "train.progress=true"]),
        reward_fn=length_reward,
        resume=True,
    )
    logged = (out / LOG_FILE).read_text().splitlines()
    assert "resumed after step 2" in logged[2] and "step 3/3" in logged[3]


@pytest.mark.slow  # end to end
def test_log_completions_prints_samples_with_their_selected_tokens(tiny_model_dir, tmp_path, capsys):
    import re

    from forkrl.analysis.dump import read_dump

    out = tmp_path / "run"
    args = [*_overrides(tiny_model_dir, out, 1), "train.dump_every=1", "train.log_completions=2"]
    train(load_config(None, args), reward_fn=length_reward)
    printed = capsys.readouterr().out
    heads = re.findall(r"step 1 sample (\d): reward (\S+) .* selected (\d+)/(\d+)", printed)
    assert [h[0] for h in heads] == ["0", "1"]
    logged = (out / LOG_FILE).read_text()
    assert "step 1 sample 1:" in logged
    rows = read_dump(out / "rollouts" / "step_000001.jsonl").rows  # the dump's own selection
    for (_, reward, k, n), row in zip(heads, rows):
        assert int(k) == sum(row["sel"]) and int(n) == len(row["tokens"])
        assert float(reward) == round(row["reward"], 3)
