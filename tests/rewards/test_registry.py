"""The reward registry: names and 'package.module:function' resolve alike; one definition of correct."""

import pytest

import forkrl.rewards as rewards
from forkrl.rewards import REWARDS, call_reward, get_reward, is_correct, register_reward, task_reward
from forkrl.rewards.math import dapo_reward, math_reward
from forkrl.rewards.registry import RewardError
from forkrl.tasks.base import Example
from forkrl.tasks.pick import PickTask, pick_reward


def test_built_in_names_resolve_to_the_functions_their_specs_name():
    assert get_reward("math") is math_reward is get_reward("forkrl.rewards.math:math_reward")
    assert get_reward("dapo") is dapo_reward and get_reward("pick") is pick_reward
    assert get_reward(pick_reward) is pick_reward  # a callable is its own reward
    assert set(REWARDS) >= {"math", "dapo", "pick"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", "neither a registered name"),
        ("forkrl.rewards.nope:reward", "cannot be imported"),
        ("forkrl.rewards.math:CORRECT_NOT_THERE", "cannot be imported"),
        ("forkrl.rewards.registry:CORRECT", "is not callable"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        get_reward(spec)


def test_register_reward(monkeypatch):
    monkeypatch.setattr(rewards.registry, "REWARDS", dict(REWARDS))  # leave the real registry alone
    register_reward("exact", "tests.eval_rewards:exact_match_reward")
    assert get_reward("exact").__name__ == "exact_match_reward"
    with pytest.raises(ValueError, match="already registered"):
        register_reward("exact", pick_reward)
    register_reward("exact", pick_reward, overwrite=True)
    assert get_reward("exact") is pick_reward
    with pytest.raises(ValueError, match="without ':'"):
        register_reward("a:b", pick_reward)


def test_correct_is_at_least_one_half_for_every_built_in_grader():
    # The built-in graders give 1 / 0 (pick, math) or +1 / -1 (dapo): right is correct, wrong is not.
    task, ex = PickTask(), Example("3+?=8 in 4,5:", "5")
    grades = [task.grade("8-3=5;3+5=8!#5", ex), task.grade("8-3=5;3+4=7x;3+4=7#4", ex)]
    grades += math_reward(["p", "p"], [r"\boxed{\frac{1}{2}}", r"\boxed{2}"], ["0.5", "0.5"])
    grades += dapo_reward(["p", "p"], ["Answer: 12", "Answer: 13"], ["12", "12"])
    assert grades == [1.0, 0.0, 1.0, 0.0, 1.0, -1.0]
    assert [is_correct(g) for g in grades] == [True, False] * 3
    assert is_correct(0.5) and not is_correct(0.4999) and not is_correct(float("nan"))


def test_call_reward_passes_answer_and_row_fields_per_completion():
    seen = {}

    def reward(prompts, completions, answer, level):
        seen.update(prompts=prompts, answer=answer, level=level)
        return [1] * len(completions)

    examples = [Example("a", "1", {"level": 1}), Example("b", "2", {"level": 2})]
    assert call_reward(reward, examples, ["x", "y", "z", "w"], 2) == [1.0] * 4
    assert seen == {"prompts": ["a", "a", "b", "b"], "answer": ["1", "1", "2", "2"], "level": [1, 1, 2, 2]}
    with pytest.raises(RewardError, match="returned 3 rewards for 2 completions"):
        call_reward(lambda prompts, completions, **_: [1.0, 0.0, 1.0], examples, ["x", "y"], 1)
    grade = task_reward(PickTask())
    assert call_reward(grade, [Example("3+?=8 in 4,5:", "5")], ["#5", "#4"], 2) == [1.0, 0.0]
