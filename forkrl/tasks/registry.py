"""Built-in tasks by name (`task.name`), built from the `task` config section or keyword arguments."""

from __future__ import annotations

import inspect

from forkrl.tasks.arith import ArithTask
from forkrl.tasks.pick import PickTask

TASKS = {
    "pick": PickTask,
    "arith": ArithTask,
}  # each task's reward is registered by name in forkrl.rewards.REWARDS


def get_task(name: str, **kwargs):
    """A built-in task by name; keyword arguments the task does not take (another task's settings, as
    the `task` config section holds them all) are ignored.

    >>> get_task("arith", level="mul1", max_value=30).level
    'mul1'
    """
    if name not in TASKS:
        raise ValueError(f"task.name={name!r} is not a built-in task; choose one of {sorted(TASKS)}")
    cls = TASKS[name]
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


def task_from_config(task_cfg):
    """The task that a run's `task` section describes."""
    return get_task(
        task_cfg.name, max_value=task_cfg.max_value, n_candidates=task_cfg.n_candidates, level=task_cfg.level
    )
