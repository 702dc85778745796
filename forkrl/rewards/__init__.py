"""forkrl.rewards: verifiers, the reward registry and the one reward-calling convention.

- `registry`: `REWARDS` / `register_reward` / `get_reward` (names, 'package.module:function'),
  `call_reward` (TRL's `fn(prompts, completions, **row_fields) -> list[float]`), `task_reward`, and
  `is_correct` (a reward >= `CORRECT` = 0.5 is a correct answer).
- `math`: `math_reward` (final answer, math-verify) and `dapo_reward` (DAPO's rule).
- `pool`: `RewardPool`, a reward in worker processes with a per-row timeout; `worker`: the worker
  process itself.
"""

from forkrl.rewards.registry import (
    CORRECT,
    REWARDS,
    RewardFn,
    call_reward,
    get_reward,
    is_correct,
    register_reward,
    task_reward,
)

__all__ = [
    "CORRECT",
    "REWARDS",
    "RewardFn",
    "call_reward",
    "get_reward",
    "is_correct",
    "register_reward",
    "task_reward",
]
