"""A reward called in the training process (`reward.isolate=false`, a reward model, a notebook closure),
held to the same stop as an isolated one (forkrl.rewards.pool): a call whose every value is unusable
(NaN, inf, beyond ±REWARD_LIMIT) is a failed call, and `max_failed_calls` of them in a row stop the run
with a `RewardError` that names the reward and a value it returned. The values themselves go through
unchanged: collect scores the unusable ones 0 and counts them (`reward_nonfinite`)."""

from __future__ import annotations

from forkrl.rewards.registry import REWARD_LIMIT, FailedCalls, usable_reward


class InProcessReward:
    """`fn` with a count of failed calls in a row; other attributes (`names`, `last_sums` of combined
    rewards) are `fn`'s."""

    def __init__(self, fn, max_failed_calls: int):
        self.fn, self.failed = fn, FailedCalls(max_failed_calls)
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __getattr__(self, name):
        if "fn" not in self.__dict__:  # copy/pickle probe before __init__
            raise AttributeError(name)
        return getattr(self.__dict__["fn"], name)

    def __call__(self, prompts, completions, **fields):
        out = self.fn(prompts, completions, **fields)
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError):
            return out  # call_reward names the wrong type
        self.failed.note(
            not values or any(usable_reward(v) for v in values), lambda n: self._message(n, values)
        )
        return out

    def _message(self, in_row: int, values: list[float]) -> str:
        return (
            f"reward function {self.__name__!r} returned no usable reward in {in_row} calls in "
            f"a row (every value NaN, infinite or beyond ±{REWARD_LIMIT:g}, e.g. {values[0]!r}); training on "
            "them learns nothing. Fix the reward, or set reward.max_failed_calls=0 to go on anyway"
        )
