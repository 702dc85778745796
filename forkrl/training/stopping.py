"""SIGINT/SIGTERM: stop at the next safe point, and say where the run stands.

A signal sets a flag that the loop checks at each step boundary (after the update, the evaluation and
the log line of a step), where it writes a checkpoint. In the parts of a run where nothing that a
checkpoint holds has changed yet (start-up, the first evaluation, and a step's rollouts and rewards,
which may wait on a slow reward for minutes), a signal in a single process stops at once instead: the
trainer gives up that work and keeps the state as it was before it. The update is given up the same
way between micro-batches until its first optimizer step (the weights are still those of the step
before); after that the step finishes and is checkpointed.

Under torchrun the ranks must stop at the same point, so they agree (an all-reduce of the flag,
`StopFlag.requested`) after each rollout round's rewards, between the update's micro-batches until
its first optimizer step, and at each step boundary; a rank that waits on a hung reward reaches the
next agreement when the reward pool's timeout gives up on it. A repeated SIGTERM (torchrun's agent,
Slurm and systemd forward the signal to processes that already had it) changes nothing; a second
SIGINT (Ctrl-C twice) stops at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

from forkrl.training.dist import SINGLE, DistEnv, all_max


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run at a safe point (after writing a checkpoint, when there was one to write)."""

    def __init__(self, signum: int, checkpoint: Path | None, run_dir: Path, *, resumable: bool = True):
        self.signum, self.checkpoint, self.run_dir = signum, checkpoint, run_dir
        name = signal.Signals(signum).name
        if checkpoint is not None:
            what = f"stopped after writing {checkpoint}"
        else:
            what = "stopped during start-up, before the first step" + (
                "; the run folder is as it was" if resumable else "; nothing was kept, start the run again"
            )
        again = f"; resume with `forkrl train --resume {run_dir}`" if resumable else ""
        super().__init__(f"{name}: {what}{again}")


class Abort(BaseException):
    """Raised by the signal handler inside `StopFlag.abortable()`, or where the ranks agreed to stop
    (`signum`: the signal, when this rank did not receive it): the work there is given up.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it.
    """

    def __init__(self, signum: int | None = None):
        super().__init__()
        self.signum = signum


class StopFlag:
    """Turns SIGINT/SIGTERM into `signum`, which the loop checks between steps; inside `abortable()`
    (when `can_abort`) the handler raises `Abort` so that the trainer stops now."""

    def __init__(self, can_abort: bool = True):
        self.signum: int | None = None
        self.can_abort = can_abort
        self._abortable = False
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self._abortable:
            self._abortable = False
            self.signum = signum
            raise Abort
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def requested(self, env: DistEnv = SINGLE) -> bool:
        """Whether a signal asked to stop, on any rank: under torchrun an all-reduce, so every rank
        must call it at the same point (and then all of them know the signal)."""
        if env.enabled:
            agreed = all_max(self.signum or 0, env)  # on every rank, whatever its own flag
            self.signum = self.signum or agreed or None
        return self.signum is not None

    @contextlib.contextmanager
    def abortable(self):
        """A region whose work may be given up: a signal inside it (or before it) raises `Abort`."""
        if not self.can_abort:
            yield
            return
        if self.signum is not None:
            raise Abort
        self._abortable = True
        try:
            yield
        finally:
            self._abortable = False

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
