"""Rewards by name, the one way to call a reward, and what counts as a correct answer.

A reward is a plain callable in TRL's convention, `fn(prompts, completions, **row_fields) -> list[float]`,
one float per completion; the row fields are `answer` and every field of the rows (lists as long as
`prompts`). `forkrl train` (`reward.fn=...`) and `forkrl eval` (`--reward ...`) take the same names:

- a registered name: `math` (final answer, math-verify, 1 / 0), `dapo` (DAPO's `Answer:` rule,
  +1 / -1), `pick` (the built-in task's grader, 1 / 0), or one added with `register_reward`;
- `package.module:function`, imported on use.

Built-in entries are `module:function` strings, so `import forkrl.rewards` stays light (reward worker
processes import it) and the reward is importable by name in a worker.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from forkrl.tasks.base import Example

RewardFn = Callable[..., list[float]]

#: A reward at or above this is a correct answer. The built-in graders give 1 / 0 (`pick`, `math`:
#: math-verify's equivalence) or +1 / -1 (`dapo`), so any threshold in (0, 1] splits them the same way;
#: 0.5, halfway between wrong (0) and right (1), also counts a partial-credit 0.5 as right.
CORRECT = 0.5

#: reward name -> the reward, or where to import it from ('package.module:function')
REWARDS: dict[str, str | RewardFn] = {
    "math": "forkrl.rewards.math:math_reward",
    "dapo": "forkrl.rewards.math:dapo_reward",
    "pick": "forkrl.tasks.pick:pick_reward",
    "arith": "forkrl.tasks.arith:arith_reward",
    "math_lenient": "forkrl.rewards.math:lenient_math_reward",
}


def is_correct(reward: Any) -> Any:
    """Whether a reward counts as a correct answer (`reward >= CORRECT`); elementwise on tensors and arrays.

    Training's accuracy, periodic evaluation and `forkrl eval` (avg@k, pass@k) all count this way.

    >>> is_correct(1.0), is_correct(0.0), is_correct(-1.0), is_correct(0.5)
    (True, False, False, True)
    """
    return reward >= CORRECT


def register_reward(name: str, fn: str | RewardFn, *, overwrite: bool = False) -> None:
    """Make `fn` (a module-level callable, or 'package.module:function') selectable as `name`.

    A reward that runs in worker processes (`reward.isolate`, `forkrl eval`) must be importable there:
    a module-level function, or a string, not a lambda or closure.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward name {name!r} must be a non-empty string without ':'")
    if not (callable(fn) or (isinstance(fn, str) and ":" in fn)):
        raise ValueError(f"reward {name!r}: {fn!r} is neither a callable nor 'package.module:function'")
    if name in REWARDS and not overwrite and REWARDS[name] is not fn:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    REWARDS[name] = fn


def get_reward(spec: str | RewardFn) -> RewardFn:
    """The reward callable for a registered name, a 'package.module:function' string, or a callable.

    >>> get_reward("math").__name__
    'math_reward'
    """
    if callable(spec):
        return spec
    if isinstance(spec, str) and spec in REWARDS:
        entry = REWARDS[spec]
        return entry if callable(entry) else get_reward(entry)
    if isinstance(spec, str) and spec.startswith("model:"):  # a sequence-classification reward model
        from forkrl.rewards.combined import RewardModel

        return RewardModel(spec.removeprefix("model:"))
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"reward {spec!r} is neither a registered name ({', '.join(sorted(REWARDS))}) nor "
            "'package.module:function'"
        )
    module, _, name = spec.partition(":")
    try:
        fn = getattr(_import(module), name)
    except (ImportError, AttributeError) as e:
        top = module.split(".")[0]
        raise ValueError(
            f"reward {spec!r} cannot be imported: {e}; looked in the working directory ({os.getcwd()}) "
            f"and on sys.path: run from the folder that holds {top}.py (or the package {top}/), or add "
            "that folder to PYTHONPATH"
        ) from None
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable")
    return fn


def _import(module: str):
    """`importlib.import_module`, also from the working directory, as `python -m` finds modules there
    (the `forkrl` console script's sys.path does not hold it). The folder is added to sys.path, so
    reward worker processes, which start with this process's sys.path, find the module too."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != module.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.insert(0, cwd)
        return importlib.import_module(module)


REWARD_LIMIT = 1e6  # a reward beyond ±this is absurd: no verifier scores that, and it swamps the batch


def usable_reward(value: float) -> bool:
    """A finite reward within ±REWARD_LIMIT (1e300 is finite in Python and inf once stored as float32)."""
    return math.isfinite(value) and abs(value) <= REWARD_LIMIT


class RewardError(RuntimeError):
    """The reward function failed: raised (in a worker, or in this process with reward.isolate=false),
    returned the wrong number of rewards, or could not be loaded; the message says where and what."""


class FailedCalls:
    """Calls in a row in which no row got a usable reward, shared by the reward pool and the in-process
    wrapper (`forkrl.rewards.inprocess`): `note` raises `RewardError` once `limit` are in a row (0 = never)."""

    def __init__(self, limit: int):
        self.limit, self.in_row = int(limit), 0

    def note(self, ok: bool, message) -> None:
        """Count one call (`ok`: some row got a usable reward); `message(in_row)` is the error's text."""
        self.in_row = 0 if ok else self.in_row + 1
        if self.limit and self.in_row >= self.limit:
            raise RewardError(message(self.in_row))


def _raised(reward_fn, e: Exception) -> RewardError:
    """`e`, raised by the reward function in this process, as a RewardError naming the function and the
    line it came from (the message an isolated reward's failure gives, without a traceback)."""
    import traceback

    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    frames = traceback.extract_tb(e.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if len(frames) > 1 else ""
    return RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}{where}")


def call_reward(
    reward_fn: RewardFn, examples: Sequence[Example], completions: Sequence, group_size: int
) -> list[float]:
    """`reward_fn(prompts, completions, answer=[...], **fields)` on `group_size` completions per example.

    Completion `i` answers `examples[i // group_size]`; returns one float per completion.

    >>> call_reward(lambda p, c, answer: [float(x == a) for x, a in zip(c, answer)], [Example("q", "4")], ["4", "5"], 2)
    [1.0, 0.0]
    """
    rows = [e for e in examples for _ in range(group_size)]
    kwargs: dict[str, list] = {"answer": [e.answer for e in rows]}
    for key in {k for e in rows for k in e.fields}:
        kwargs[key] = [e.fields.get(key) for e in rows]
    try:
        out = reward_fn([e.prompt for e in rows], list(completions), **kwargs)
    except RewardError:  # an isolated reward's failure (forkrl.rewards.pool), already named
        raise
    except Exception as e:  # the reward ran in this process (reward.isolate=false, forkrl eval)
        raise _raised(reward_fn, e) from e
    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    try:
        values = [float(r) for r in out]
    except (TypeError, ValueError) as e:
        raise RewardError(
            f"reward function {name!r} must return a list of numbers, one per completion; it returned "
            f"{type(out).__name__} ({e})"
        ) from None
    if len(values) != len(completions):
        raise RewardError(
            f"reward function {name!r} returned {len(values)} rewards for {len(completions)} completions "
            "(one per completion, in order)"
        )
    return values


def task_reward(task) -> RewardFn:
    """A task's grader `task.grade(completion, example)` as a reward in the convention above.

    Only per-row keyword arguments (lists as long as `prompts`) are row fields; callers such as TRL
    also pass objects like `trainer_state`, which are ignored.
    """

    def reward(prompts, completions, answer, **kwargs):
        fields = {k: v for k, v in kwargs.items() if isinstance(v, list) and len(v) == len(prompts)}
        return [
            task.grade(c, Example(p, a, {k: v[i] for k, v in fields.items()}))
            for i, (p, c, a) in enumerate(zip(prompts, completions, answer))
        ]

    reward.__name__ = f"{task.name}_reward"
    return reward
