"""A run never ends with a non-finite model as its result, and a diverged run reaches its skip limit."""

import json
import math

import pytest
import torch

import forkrl.training.trainer as trainer
from forkrl.cli import main
from forkrl.config import load_config
from forkrl.errors import TrainingError
from forkrl.rewards.pool import RewardError
from forkrl.training.checkpoint import list_checkpoints
from forkrl.training.health import EMPTY_STEPS_WARN, count_streaks
from forkrl.training.metrics import read_metrics

from .test_resume import _overrides, length_reward

SKIPPED, EMPTY, TRAINED = (
    {"kept_groups": 2, "skipped_steps": 1},
    {"kept_groups": 0},
    {"kept_groups": 2, "skipped_steps": 0},
)


def _streaks(steps):
    skipped = empty = 0
    for i, m in enumerate(steps, 1):
        skipped, empty = count_streaks(m, i, skipped, empty)
    return skipped, empty


def test_steps_that_keep_no_group_do_not_reset_the_skip_count():
    # lr=1e6 (issue 16): skipped, skipped, nothing kept, skipped, ... must reach 3 in a row.
    assert _streaks([SKIPPED, SKIPPED, EMPTY, SKIPPED]) == (3, 0)
    assert _streaks([SKIPPED, SKIPPED, TRAINED, SKIPPED]) == (1, 0)  # a step that trained ends the run
    assert _streaks([SKIPPED, EMPTY]) == (1, 1)


def test_steps_in_a_row_that_keep_no_group_warn_once():
    with pytest.warns(UserWarning, match=r"steps 2-4 kept no group: every group's rewards were equal"):
        assert _streaks([TRAINED] + [{"kept_groups": 0, "reward_mean": 0.0}] * EMPTY_STEPS_WARN) == (0, 3)


def test_non_finite_weights_stop_the_run_and_keep_the_last_finite_checkpoint(
    tiny_model_dir, tmp_path, monkeypatch
):
    rl_step, calls = trainer._rl_step, []

    def poisoned(run, dump=None):  # step 2 leaves a NaN in the weights, as lr=inf or float16 overflow do
        m = rl_step(run, dump)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(run.model.parameters()).view(-1)[0] = math.nan
        return m

    monkeypatch.setattr(trainer, "_rl_step", poisoned)
    out = tmp_path / "nan"
    cfg = load_config(None, [*_overrides(tiny_model_dir, out, 4), "train.save_every=1"])
    with pytest.raises(
        TrainingError, match=r"step 2 left non-finite \(NaN/inf\) weights.*step-000001, is finite"
    ):
        trainer.train(cfg, reward_fn=length_reward)
    assert [p.name for p in list_checkpoints(out)] == ["step-000001"]
    assert not (out / "final").exists() and not (out / "summary.json").exists()


def test_float16_on_cpu_fails_with_a_message_instead_of_saving_nan(tiny_model_dir, tmp_path, capsys):
    # AdamW's eps underflows in float16: the first step's update is NaN (issue 16 #11)
    out = tmp_path / "f16"
    code = main(
        [
            "train",
            *_overrides(tiny_model_dir, out, 3),
            "model.dtype=float16",
            "optim.warmup_steps=0",
            "reward.fn=tests.train.test_resume:length_reward",
            "reward.isolate=false",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert (
        "forkrl: training error: step 1 left non-finite (NaN/inf) weights" in err and "Traceback" not in err
    )
    assert not (out / "final").exists()


def nan_on_second_call(prompts, completions, **_):
    nan_on_second_call.calls = getattr(nan_on_second_call, "calls", 0) + 1
    return [math.nan if nan_on_second_call.calls == 2 else float(len(c) % 2) for c in completions]


@pytest.mark.parametrize("on_error", ["default", "raise"])
def test_a_nan_reward_is_counted_or_stops_after_checkpointing_the_step_before(
    tiny_model_dir, tmp_path, on_error
):
    nan_on_second_call.calls = 0
    out = tmp_path / on_error
    cfg = load_config(
        None, [*_overrides(tiny_model_dir, out, 3), f"reward.on_error={on_error}", "reward.isolate=false"]
    )
    if on_error == "default":
        trainer.train(cfg, reward_fn=nan_on_second_call)
        assert [r.get("reward_nonfinite") for r in read_metrics(out)[1:]] == [0, 12, 0]
        return
    with pytest.raises(
        RewardError, match=rf"returned nan .*; stopped after writing {out / 'checkpoints' / 'step-000001'}"
    ):
        trainer.train(cfg, reward_fn=nan_on_second_call)
    assert [p.name for p in list_checkpoints(out)] == ["step-000001"]


def raises_on_second_call(prompts, completions, **_):
    raises_on_second_call.calls = getattr(raises_on_second_call, "calls", 0) + 1
    if raises_on_second_call.calls == 2:
        return 1 / 0
    return [float(len(c) % 2) for c in completions]


def one_reward_short(prompts, completions, **_):
    return [1.0] * (len(completions) - 1)


@pytest.mark.parametrize(
    "fn, says",
    [
        (
            "raises_on_second_call",
            "reward function 'raises_on_second_call' raised ZeroDivisionError: division by zero at ",
        ),
        ("one_reward_short", "reward function 'one_reward_short' returned 11 rewards for 12 completions"),
    ],
)
def test_a_failing_reward_in_process_is_a_message_not_a_traceback(tiny_model_dir, tmp_path, capsys, fn, says):
    raises_on_second_call.calls = 0
    out = tmp_path / fn
    code = main(
        [
            "train",
            *_overrides(tiny_model_dir, out, 3),
            f"reward.fn=tests.train.test_health:{fn}",
            "reward.isolate=false",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert f"forkrl: reward error: {says}" in err and "fix the reward, then resume" in err, err


def absurd_reward(prompts, completions, **_):
    return [1e300] * len(completions)  # finite for Python, inf once stored as float32


@pytest.mark.parametrize("isolate", ["false", "true"])
def test_absurd_rewards_are_failed_calls_that_stop_the_run(tiny_model_dir, tmp_path, capsys, isolate):
    out = tmp_path / isolate
    code = main(
        [
            "train",
            *_overrides(tiny_model_dir, out, 6),
            "reward.fn=tests.train.test_health:absurd_reward",
            f"reward.isolate={isolate}",
            "reward.max_failed_calls=2",
            "sampling.dynamic=false",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert (
        "forkrl: reward error: reward function 'absurd_reward'" in err
        and "fix the reward, then resume" in err
    )
    assert "1e+300" in err or "beyond ±1e6" in err, err
    assert len(read_metrics(out)) <= 3  # step 0 and at most the first step: stopped at the second call


def test_collapse_names_a_run_whose_accuracy_fell_to_zero():
    from forkrl.training.health import collapse

    assert collapse(0.568, 0.0, 1e6, 32).startswith(
        "held-out accuracy fell from 0.568 to 0.000 on 32 rows: the model collapsed"
    )
    assert "optim.lr (now 1e+06)" in collapse(0.568, 0.0, 1e6, 32)
    assert (
        collapse(0.568, 0.01, 1e6, 32) is None
        and collapse(0.0, 0.0, 1e-5, 32) is None
        and collapse(None, None, 1, 32) is None
    )
    # A zero that chance explains: 2 of 4 right, then 0 of 4 (probability 1/16 at the same accuracy);
    # 0.5 on 7 rows, then 0, has probability 1/128.
    assert collapse(0.5, 0.0, 2e-3, 4) is None and collapse(0.5, 0.0, 2e-3, 7) is not None


@pytest.mark.slow  # the command on the shipped model: about 15 s
def test_a_diverged_run_exits_non_zero(tmp_path, capsys):
    out = tmp_path / "lr"
    code = main(
        [
            "train",
            "optim.lr=1e6",
            "train.steps=6",
            "train.threads=1",
            "train.progress=false",
            f"train.out_dir={out}",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err, captured.err
    assert (
        "forkrl: training error: held-out accuracy fell from" in captured.err and "to 0.000" in captured.err
    )
    assert json.loads((out / "summary.json").read_text())["collapsed"]  # the outputs are kept
