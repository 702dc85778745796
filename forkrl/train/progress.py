"""Live progress: a rich bar with the step's reward, accuracy, selection threshold and kept fraction."""

from __future__ import annotations

import math

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _f(v, fmt=".3f"):
    return "  -  " if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


class TrainProgress:
    def __init__(self, total: int, *, enabled: bool = True, eval0: float = float("nan")):
        self.enabled = enabled
        self._p = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self._task = self._p.add_task("rl", total=total, info=f"eval {_f(eval0)}")

    def __enter__(self):
        self._p.__enter__()
        return self

    def __exit__(self, *exc):
        return self._p.__exit__(*exc)

    def update(self, step: int, m: dict, eval_acc: float) -> None:
        info = (
            f"reward {_f(m.get('reward_mean'))} acc {_f(m.get('accuracy'))} τ {_f(m.get('tau'))} "
            f"kept {_f(m.get('kept_frac'), '.2f')} eval {_f(eval_acc)}"
        )
        self._p.update(self._task, completed=step, info=info)
