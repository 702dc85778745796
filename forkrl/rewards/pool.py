"""Run a reward function in worker processes, with a per-item timeout enforced from outside.

Why: math-verify's own timeouts use `signal.alarm` (main thread only) and a computation inside C
(`9^{9^{9^{9}}}`) cannot be interrupted from within; a reward that hangs, raises or kills its process
must not stop training. `RewardPool` wraps any TRL-style reward function `(prompts, completions,
**fields) -> list[float]` and scores each (prompt, completion, fields) row in a worker process:

- a row that runs past `timeout` seconds: its worker is killed (SIGKILL) and replaced, the row gets
  `default`, `stats["timeouts"]` counts it;
- a worker that dies on a row (`os._exit`, segfault, out of memory): the row gets `default`,
  `stats["crashes"]`, the worker is replaced;
- an exception raised by the reward (any `BaseException`, e.g. math-verify's `TimeoutException`): the row
  gets `default`, `stats["errors"]`, the traceback is logged once per exception type; with
  `on_error="raise"` the batch finishes and then `RewardError` is raised with the worker's traceback.

Workers are started once and reused; each call splits its batch into chunks sent to idle workers, and a
worker reports after every row, so a timeout names one row and the rest of its chunk is re-queued.

    >>> from forkrl.rewards.pool import RewardPool
    >>> with RewardPool("forkrl.rewards.math:math_reward", workers=2, timeout=5.0) as pool:  # doctest: +SKIP
    ...     pool(["p", "p"], [r"\\boxed{1/2}", r"\\boxed{9^{9^{9^{9}}}}"], answer=["0.5", "5"])
    [1.0, 0.0]
"""

from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from forkrl.rewards.registry import get_reward

log = logging.getLogger(__name__)

ON_ERROR = ("default", "raise")
CONTEXTS = ("spawn", "forkserver")
_SINGULAR = {"timeouts": "timeout", "errors": "error", "crashes": "crash"}


class RewardError(RuntimeError):
    """The reward function raised inside a worker (or could not be loaded there); the message has its traceback."""


# ---------------------------------------------------------------------------------------------- worker


def _score_row(fn: Callable, prompt: Any, completion: Any, row: dict, shared: dict) -> float:
    out = fn([prompt], [completion], **{k: [v] for k, v in row.items()}, **shared)
    if len(out) != 1:
        raise ValueError(f"reward function returned {len(out)} rewards for 1 completion")
    return float(out[0])


def _worker_main(conn: Connection, fn_bytes: bytes) -> None:
    # Ctrl-C goes to the whole process group; the parent handles it and closes the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        fn = pickle.loads(fn_bytes)
    except BaseException:
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent went away
            return
        if msg is None:
            return
        shared, rows = msg
        for idx, prompt, completion, row in rows:
            try:
                conn.send((idx, "ok", _score_row(fn, prompt, completion, row, shared)))
            except BaseException:  # noqa: BLE001 - any failure of the reward is a reported row error
                conn.send((idx, "error", traceback.format_exc()))


# ---------------------------------------------------------------------------------------------- parent


@dataclass
class _Worker:
    proc: Any  # multiprocessing Process of the chosen context
    conn: Connection
    born: float
    ready: bool = False
    chunk: list[int] = field(default_factory=list)  # row indices sent, in order
    pos: int = 0  # index into chunk of the row being scored
    started: float = 0.0  # when the current row started (its predecessor's result arrived)

    @property
    def busy(self) -> bool:
        return self.pos < len(self.chunk)


@dataclass
class _Batch:
    """One call's rows and results."""

    rows: list[tuple]
    completions: list
    shared: dict
    rewards: list[float]
    queue: collections.deque = field(default_factory=collections.deque)  # chunks of row indices
    first_error: str | None = None
    failed_starts: int = 0


class RewardPool:
    """A TRL-style reward function evaluated row by row in worker processes with a per-row timeout.

    Args:
        reward_fn: the reward, a module-level function (picklable, importable by module path), a
            `"package.module:function"` string or a name of `forkrl.rewards.REWARDS` (`"math"`).
        workers: worker processes (default: half the CPUs, at most 8).
        timeout: seconds one row may take, measured from outside the worker.
        default: reward of a row that timed out, crashed its worker or raised.
        on_error: `"default"` (exceptions give `default`) or `"raise"` (`RewardError` after the batch).
        context: multiprocessing start method, `"spawn"` or `"forkserver"` (never `fork`: the parent
            holds CUDA and torch threads).
        startup_timeout: seconds a new worker may take to import the reward's module.
        chunk_size: rows sent to a worker at once (default: about 4 chunks per worker per call).
    """

    def __init__(
        self,
        reward_fn: str | Callable,
        *,
        workers: int | None = None,
        timeout: float = 10.0,
        default: float = 0.0,
        on_error: str = "default",
        context: str = "spawn",
        startup_timeout: float = 120.0,
        chunk_size: int | None = None,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}; allowed: {', '.join(ON_ERROR)}")
        if context not in CONTEXTS:
            raise ValueError(f"context={context!r}; allowed: {', '.join(CONTEXTS)}")
        if not timeout > 0 or not startup_timeout > 0:
            raise ValueError(f"timeout={timeout} and startup_timeout={startup_timeout} must be > 0 seconds")
        fn = get_reward(reward_fn)
        try:
            self._fn_bytes = pickle.dumps(fn)
        except Exception as e:
            raise TypeError(
                f"reward function {fn!r} cannot be sent to worker processes ({e}); define it at the "
                "top level of an importable module (not a lambda, closure or method of a local "
                "object), or pass 'package.module:function'"
            ) from None
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.n_workers = workers if workers is not None else max(1, min(8, (os.cpu_count() or 2) // 2))
        if self.n_workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        self.timeout, self.default, self.on_error = float(timeout), float(default), on_error
        self.startup_timeout, self.chunk_size = float(startup_timeout), chunk_size
        self.stats: dict[str, float] = dict(
            calls=0, rows=0, timeouts=0, errors=0, crashes=0, restarts=0, seconds=0.0
        )
        self._ctx = mp.get_context(context)
        self._logged: set[str] = set()
        self._closed = False
        self._workers: list[_Worker] = []
        for _ in range(self.n_workers):
            self._workers.append(self._start_worker())

    # -- lifecycle -----------------------------------------------------------------------------------

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self._fn_bytes),
            daemon=True,
            name=f"reward-{self.__name__}",
        )
        proc.start()
        child_conn.close()  # so the parent sees EOF when the child dies
        return _Worker(proc=proc, conn=parent_conn, born=time.monotonic())

    def _kill(self, w: _Worker) -> None:
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=5)
        w.conn.close()

    def _replace(self, w: _Worker) -> _Worker:
        self._kill(w)
        self.stats["restarts"] += 1
        new = self._start_worker()
        self._workers[self._workers.index(w)] = new
        return new

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            self._kill(w)
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- scoring -------------------------------------------------------------------------------------

    def __call__(self, prompts: list, completions: list, **fields: Any) -> list[float]:
        """Rewards for a batch, in order; each row's `fields` are the i-th items of list-valued kwargs."""
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        t0 = time.monotonic()
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        per_row = {k: v for k, v in fields.items() if isinstance(v, (list, tuple)) and len(v) == n}
        shared = {k: v for k, v in fields.items() if k not in per_row}  # e.g. TRL's trainer_state
        rows = [(i, prompts[i], completions[i], {k: v[i] for k, v in per_row.items()}) for i in range(n)]
        size = self.chunk_size or max(1, min(64, -(-n // (4 * self.n_workers))))
        batch = _Batch(rows, list(completions), shared, [self.default] * n)
        batch.queue.extend(list(range(s, min(s + size, n))) for s in range(0, n, size))
        try:
            while batch.queue or any(w.busy for w in self._workers):
                self._dispatch(batch)
                ready = self._wait_any()
                for w in list(self._workers):
                    if w.conn in ready or w.proc.sentinel in ready:
                        self._drain(w, batch)
                self._enforce_deadlines(batch)
        except BaseException:
            # Ctrl-C or a load failure mid-batch: workers still holding rows of this call are replaced,
            # so that none of their results can land in a later call.
            if not self._closed:
                for w in [w for w in self._workers if w.busy]:
                    self._replace(w)
            raise
        self.stats["calls"] += 1
        self.stats["rows"] += n
        self.stats["seconds"] += time.monotonic() - t0
        if batch.first_error is not None and self.on_error == "raise":
            raise RewardError(f"reward function {self.__name__!r} raised in a worker:\n{batch.first_error}")
        return batch.rewards

    def _dispatch(self, batch: _Batch) -> None:
        now = time.monotonic()
        for w in self._workers:
            if w.ready and not w.busy and batch.queue:
                w.chunk, w.pos, w.started = batch.queue.popleft(), 0, now
                w.conn.send((batch.shared, [batch.rows[i] for i in w.chunk]))

    def _wait_any(self) -> set:
        """Block until a message, a worker death or the nearest deadline (row timeout or startup)."""
        deadlines = [
            w.started + self.timeout if w.ready else w.born + self.startup_timeout
            for w in self._workers
            if w.busy or not w.ready
        ]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        return set(wait([h for w in self._workers for h in (w.conn, w.proc.sentinel)], timeout=timeout))

    def _drain(self, w: _Worker, batch: _Batch) -> None:
        """Read every message a worker has sent; replace it if it died."""
        dead = False
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready, batch.failed_starts = True, 0
                elif msg[0] == "init_error":
                    self.close()
                    raise RewardError(
                        f"reward function {self.__name__!r} could not be loaded in a worker process; "
                        f"define it in an importable module.\n{msg[1]}"
                    )
                else:
                    idx, status, value = msg
                    if status == "ok":
                        batch.rewards[idx] = value
                    else:
                        self._note("errors", value, idx, batch.completions[idx])
                        batch.first_error = batch.first_error or value
                    w.pos += 1
                    w.started = time.monotonic()
        except (EOFError, OSError):
            dead = True
        if not dead and w.proc.is_alive():
            return
        if not w.ready:
            batch.failed_starts += 1
            if batch.failed_starts > 3:
                self.close()
                raise RewardError(
                    f"reward workers for {self.__name__!r} keep dying at startup (exit code "
                    f"{w.proc.exitcode}; their stderr has the traceback). A script that creates a "
                    "RewardPool at import time needs the `if __name__ == '__main__':` guard"
                )
        elif w.busy:
            w.proc.join(timeout=1)  # for its exit code
            self._fail_current_row(w, batch, "crashes", f"exit code {w.proc.exitcode}")
        self._replace(w)

    def _enforce_deadlines(self, batch: _Batch) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            if w.ready and w.busy and now > w.started + self.timeout:
                self._fail_current_row(w, batch, "timeouts", f"over {self.timeout:g} s")
                self._replace(w)
            elif not w.ready and now > w.born + self.startup_timeout:
                self.close()
                raise RewardError(
                    f"a reward worker for {self.__name__!r} did not start within {self.startup_timeout:g} s"
                )

    def _fail_current_row(self, w: _Worker, batch: _Batch, kind: str, detail: str) -> None:
        """The row a worker was on keeps the default; the rest of its chunk goes back to the queue."""
        idx = w.chunk[w.pos]
        self._note(kind, detail, idx, batch.completions[idx])
        if w.pos + 1 < len(w.chunk):
            batch.queue.appendleft(w.chunk[w.pos + 1 :])

    def _note(self, kind: str, detail: str, idx: int, completion: Any) -> None:
        """Count a failed row; log the first of each kind (per exception type for errors) in full."""
        self.stats[kind] += 1
        key = kind
        if kind == "errors":
            lines = [ln for ln in detail.strip().splitlines() if ln.strip()]
            key = f"errors:{lines[-1].split(':')[0] if lines else '?'}"
        if key in self._logged:
            log.debug("reward %s on row %d (%s)", _SINGULAR[kind], idx, detail.strip().splitlines()[-1:])
            return
        self._logged.add(key)
        excerpt = str(completion)[-200:]
        log.warning(
            "reward %s: row %d got %g (%s); completion tail %r. Later ones are only counted in "
            "RewardPool.stats.",
            _SINGULAR[kind],
            idx,
            self.default,
            detail.strip(),
            excerpt,
        )
