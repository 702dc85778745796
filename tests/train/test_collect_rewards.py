"""`collect` with a reward called in this process: a NaN or inf reward is a counted failure, not a crash."""

import types

import pytest
import torch

from forkrl.config import load_config
from forkrl.core.advantages import ADVANTAGES
from forkrl.rewards.pool import RewardError
from forkrl.rollout.base import Rollout
from forkrl.tasks.base import Example
from forkrl.training.rollouts import PromptSampler, collect


def fake_generate(prompts, *, n, temperature, top_p, max_new_tokens):
    """Completions "0", "1", ... one token each: what the reward below keys on."""
    B = len(prompts) * n
    ids = torch.ones(B, 1, dtype=torch.long)
    return Rollout(
        input_ids=torch.cat([ids, ids], dim=1),
        attention_mask=torch.ones(B, 2, dtype=torch.long),
        prompt_len=1,
        response_ids=ids,
        response_mask=torch.ones(B, 1, dtype=torch.bool),
        truncated=torch.zeros(B, dtype=torch.bool),
        texts=[str(i) for i in range(B)],
        group_size=n,
    )


def nan_reward(prompts, completions, **_):
    """Row 1 is NaN, row 2 is inf, the others 1.0 / 0.0 alternately."""
    values = {1: float("nan"), 2: float("inf")}
    return [values.get(int(c), float(int(c) % 2 == 0)) for c in completions]


def _collect(on_error):
    cfg = load_config(
        None,
        [
            "rollout.prompts_per_step=2",
            "rollout.group_size=4",
            "rollout.temperature=1.0",
            "rollout.top_p=1.0",
            "sampling.dynamic=false",
            "sampling.max_rounds=1",
            "reward.overlong_buffer=0",
            f"reward.on_error={on_error}",
        ],
    )
    return collect(
        None,
        types.SimpleNamespace(pad_token_id=0),
        PromptSampler([Example("q", "a"), Example("r", "b")]),
        nan_reward,
        cfg.rollout,
        cfg.sampling,
        cfg.reward,
        max_new_tokens=1,
        generate_fn=fake_generate,
    )


def test_a_nonfinite_reward_scores_zero_and_is_counted():
    exp = _collect("default")
    assert exp.scores.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert exp.stats["reward_nonfinite"] == 2
    assert torch.isfinite(ADVANTAGES["grpo"](exp.rewards, 4)).all()  # the last guard is not reached


def test_a_nonfinite_reward_stops_with_a_clear_error_when_configured_to():
    with pytest.raises(RewardError, match=r"returned nan for completion 1 of 8 .* must be a finite number"):
        _collect("raise")
