"""Progress a user can see: a live rich bar on a terminal, plain lines otherwise, and `train.log`.

On a terminal the bar shows the step's reward, accuracy, selection threshold τ, kept fraction and the
last held-out accuracy. When standard output is not a terminal (nohup, Slurm, CI, a pipe) a bar would
print nothing until the end and cut its last line at 80 columns, so the trainer prints the run folder
at the start and then a plain line every `every` steps (default: about 20 lines per run, and the
last step). Every step's line is also appended to `RUN_DIR/train.log` (a resumed run appends), which
`tail -f` follows whatever the terminal.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LOG_FILE = "train.log"


def _f(v, fmt=".3f"):
    return "  -  " if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def step_line(step: int, total: int, m: dict, eval_acc: float) -> str:
    """One step as plain text.

    >>> step_line(3, 40, {"reward_mean": 0.5, "accuracy": 0.5, "tau": 1.25, "kept_frac": 0.2,
    ...                   "entropy_mean": 0.75, "time_step": 1.5}, 0.7)
    'step 3/40  reward 0.500  acc 0.500  τ 1.250  kept 0.20  H 0.750  eval 0.700  1.5 s/step'
    """
    return (
        f"step {step}/{total}  reward {_f(m.get('reward_mean'))}  acc {_f(m.get('accuracy'))}  "
        f"τ {_f(m.get('tau'))}  kept {_f(m.get('kept_frac'), '.2f')}  H {_f(m.get('entropy_mean'))}  "
        f"eval {_f(eval_acc)}  {_f(m.get('time_step'), '.1f')} s/step"
    )


class TrainProgress:
    """`enabled`: show progress at all (`train.progress`, main rank); `run_dir`: where `train.log` goes
    (None: no log file); `every`: plain lines when not on a terminal (None: about 20 per run)."""

    def __init__(
        self,
        total: int,
        *,
        enabled: bool = True,
        eval0: float = float("nan"),
        run_dir: Path | None = None,
        every: int | None = None,
        console: Console | None = None,
    ):
        self.total, self.enabled = total, enabled
        self.console = console or Console()
        self.live = enabled and self.console.is_terminal
        self.every = every or max(1, total // 20)
        self.log_path = Path(run_dir) / LOG_FILE if run_dir is not None else None
        self._t0 = time.monotonic()
        self._p = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not self.live,
            console=self.console,
        )
        self._task = self._p.add_task("rl", total=total, info=f"eval {_f(eval0)}")
        self._run_dir = run_dir

    def __enter__(self):
        if self.enabled and not self.live and self._run_dir is not None:
            print(
                f"forkrl: training {self.total} steps in {self._run_dir} (every step: {self.log_path})",
                flush=True,
            )
        self._p.__enter__()
        return self

    def _log(self, line: str) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line}\n")

    def __exit__(self, *exc):
        return self._p.__exit__(*exc)

    def update(self, step: int, m: dict, eval_acc: float) -> None:
        info = (
            f"reward {_f(m.get('reward_mean'))} acc {_f(m.get('accuracy'))} τ {_f(m.get('tau'))} "
            f"kept {_f(m.get('kept_frac'), '.2f')} eval {_f(eval_acc)}"
        )
        self._p.update(self._task, completed=step, info=info)
        if not m:  # the position a run starts (or resumes) from, before any step of this process
            if step > 0:  # lines after that step, if any, were logged by a run that did not checkpoint them
                self._log(f"resumed after step {step} (its checkpoint)")
            return
        line = step_line(step, self.total, m, eval_acc)
        self._log(line)
        if self.enabled and not self.live and (step % self.every == 0 or step == self.total):
            elapsed = time.monotonic() - self._t0
            print(f"{line}  ({elapsed:.0f} s)", file=sys.stdout, flush=True)
