"""What a task is: rows with a prompt and a ground truth, a grader, and (for built-in tasks) traces."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Example:
    """One verifiable problem. `fields` travel to user reward functions as keyword arguments."""

    prompt: str
    answer: str
    fields: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """A verifiable task: seeded, disjoint splits and a deterministic grader."""

    name: str

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]: ...

    def grade(self, completion: str, example: Example) -> float: ...


class TraceTask(Task, Protocol):
    """A built-in task that can also write solution traces for the warm start (SFT)."""

    #: completion length budget (tokens) under which the task is meant to be solved
    default_max_new_tokens: int

    def trace(self, example: Example, rng: random.Random) -> str: ...
