"""SIGINT/SIGTERM: stop at the next safe point, and say where the run stands.

A signal sets a flag that the loop checks at each step boundary (after the update, the evaluation and
the log line of a step), where it writes a checkpoint. In the parts of a run where nothing that a
checkpoint holds has changed yet (start-up, the first evaluation, and a step's rollouts and rewards,
which may wait on a slow reward for minutes), a signal in a single process stops at once instead: the
trainer gives up that work and keeps the state as it was before it. Under torchrun every rank stops at
the same step boundary (they agree through an all-reduce), so there a signal always waits for it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path


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
    """Raised by the signal handler inside `StopFlag.abortable()`: the work there is given up.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it.
    """


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
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

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
