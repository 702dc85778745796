"""Training and evaluation name rewards alike and count a correct answer alike (`forkrl.rewards`)."""

import json

import pytest

from forkrl.config import ConfigError, load_config
from forkrl.evaluate import Benchmark, evaluate_benchmarks, reward_scorer
from forkrl.models.loading import load_model_and_tokenizer
from forkrl.rewards.math import dapo_reward, math_reward
from forkrl.tasks.base import Example
from forkrl.tasks.pick import pick_reward
from forkrl.training.components import data_and_reward, evaluate_held_out
from forkrl.training.rollouts import PromptSampler, collect


def _data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    return path


@pytest.mark.parametrize(
    "overrides, want",
    [
        (["reward.fn=math"], math_reward),  # as `forkrl eval --reward math`
        (["reward.fn=dapo"], dapo_reward),
        (["reward.fn=forkrl.rewards.math:dapo_reward"], dapo_reward),
        ([], math_reward),  # file data: math by default
    ],
)
def test_reward_fn_names_resolve_for_file_data(tmp_path, overrides, want):
    cfg = load_config(None, [f"data.path={_data(tmp_path)}", "reward.isolate=false", *overrides])
    _, _, fn, task, _ = data_and_reward(cfg, None)
    assert fn is want and task is None


@pytest.mark.parametrize("overrides, want", [([], pick_reward), (["reward.fn=pick"], pick_reward)])
def test_reward_fn_names_resolve_for_the_built_in_task(overrides, want):
    _, _, fn, task, _ = data_and_reward(load_config(None, overrides), None)
    assert fn is want and task.name == "pick"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", "reward.fn='nope' is neither a registered name .*math.* nor 'package.module:function'"),
        ("forkrl.rewards.nope:reward", "reward.fn='forkrl.rewards.nope:reward' cannot be imported"),
    ],
)
def test_an_unknown_reward_is_a_config_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        data_and_reward(load_config(None, [f"reward.fn={spec}"]), None)


def half_credit_reward(prompts, completions, **_):
    """By position: 0.5 (correct), 0.4 (not), 1.0 (correct), -1.0 (not): half of any 4k completions."""
    return [(0.5, 0.4, 1.0, -1.0)[i % 4] for i in range(len(completions))]


def _sections(*overrides):
    """The rollout, sampling and reward sections `collect` reads (temperature 1, top-p 1, one round)."""
    cfg = load_config(
        None,
        [
            "rollout.temperature=1.0",
            "rollout.top_p=1.0",
            "sampling.max_rounds=1",
            "reward.overlong_buffer=0",
            *overrides,
        ],
    )
    return cfg.rollout, cfg.sampling, cfg.reward


def test_training_and_evaluation_count_the_same_answers_as_correct(tiny_model_dir):
    # A reward of exactly 0.5 counts as correct everywhere: were it `> 0.5` anywhere, that path gives 1/4.
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    examples = [Example(f"{i}+?={i + 3} in 3,4:", "3") for i in range(4)]
    exp = collect(
        model,
        tok,
        PromptSampler(examples),
        half_credit_reward,
        *_sections("rollout.prompts_per_step=2", "rollout.group_size=4", "sampling.dynamic=false"),
        max_new_tokens=4,
    )
    assert exp.stats["accuracy"] == 0.5  # training's logged accuracy
    assert evaluate_held_out(model, tok, None, examples, half_credit_reward, 4) == 0.5  # periodic eval
    summary, results = evaluate_benchmarks(
        model,
        tok,
        [Benchmark("b", examples)],
        reward_scorer(half_credit_reward),
        greedy=True,
        max_new_tokens=4,
    )  # `forkrl eval`
    assert summary["accuracy"] == 0.5 and [r.n_correct for r in results] == [1, 0, 1, 0]
