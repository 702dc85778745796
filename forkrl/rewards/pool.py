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
  `on_error="raise"` the batch finishes and then `RewardError` is raised with the worker's traceback;
- a NaN, infinite or absurd (beyond ±REWARD_LIMIT, 1e6) reward: the row gets `default`, `stats["nonfinite"]`; with `on_error="raise"`,
  `RewardError` after the batch.

Workers are started once and reused; each call splits its batch into chunks sent to idle workers, and a
worker reports after every row, so a timeout names one row and the rest of its chunk is re-queued.
With `batch_rows` > 1 (`reward.batch_size`) a worker calls the reward once per chunk of that many rows,
as TRL calls it with the batch (a batched judge or reward model), under a deadline of `timeout` per
row of the chunk; a chunk whose call raises, crashes its worker or runs out of time is scored again
row by row (and so is the rest of that call), so the failure is counted on the row that causes it.

A reward that fails everywhere must not cost minutes per call nor run forever:

- each call first scores a few single rows spread over the batch (`PROBE_ROWS`, or one per worker), and
  sends the others once one of them has a reward or all have failed; when every one of them timed out
  or crashed its worker, the other rows get `default` without running (`stats["skipped"]`), so such a
  call costs a few timeouts, not one per row;
- after `max_failed_calls` calls in a row in which every row failed (any of the kinds above), the call
  raises `RewardError`: training on rewards that are all `default` learns nothing.

Workers die with the parent and ignore the signals the parent handles (`forkrl.rewards.processes`); they
are recycled after `worker_max_rows` rows or past `worker_max_rss_mb` of resident memory. A worker found
dead when rows are sent to it is replaced and the rows go to another worker.

A reward may define `fn.warmup()` (e.g. `math_reward`: import math-verify, build its parser): each worker
calls it once before it takes rows, so its cost counts against `startup_timeout`, not a row's `timeout`.

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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from forkrl.rewards.processes import Worker as _Worker
from forkrl.rewards.processes import kill_worker, start_worker, stop_workers
from forkrl.rewards.registry import FailedCalls, RewardError, get_reward

log = logging.getLogger(__name__)

ON_ERROR = ("default", "raise")
CONTEXTS = ("spawn", "forkserver")
_SINGULAR = {
    "timeouts": "timeout",
    "errors": "error",
    "crashes": "crash",
    "nonfinite": "non-finite or absurd value (beyond ±1e6)",
    "skipped": "skip",
}
FAILURES = ("timeouts", "errors", "crashes", "nonfinite", "skipped")  # a row that got `default`
PROBE_ROWS = 4  # at least this many spread single rows start each call (see the module docstring)


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
    later: list[list[int]] = field(default_factory=list)  # chunks held back until the probe rows are done
    probe: set[int] = field(default_factory=set)  # the spread single rows scored first, until each is done
    probe_rows: int = 0
    probe_failed: int = 0  # of them, rows that timed out or crashed their worker
    ok: int = 0  # rows with a reward
    singly: bool = False  # a batched call failed: the rest of the call is scored row by row


def _probe_rows(n: int, k: int) -> list[int]:
    """`k` row indices spread evenly over `n` rows, so that one bad group of rows cannot fill them all.

    >>> _probe_rows(64, 4), _probe_rows(3, 4)
    ([0, 16, 32, 48], [0, 1, 2])
    """
    k = min(n, k)
    return sorted({i * n // k for i in range(k)})


class RewardPool:
    """A TRL-style reward function evaluated row by row in worker processes with a per-row timeout.

    Args:
        reward_fn: the reward, a module-level function (picklable, importable by module path), a
            `"package.module:function"` string or a name of `forkrl.rewards.REWARDS` (`"math"`).
        workers: worker processes (default: half the CPUs, at most 8).
        timeout: seconds one row may take, measured from outside the worker.
        default: reward of a row that timed out, crashed its worker, raised or was not finite.
        on_error: `"default"` (exceptions and non-finite rewards give `default`) or `"raise"`
            (`RewardError` after the batch).
        context: multiprocessing start method, `"spawn"` or `"forkserver"` (never `fork`: the parent
            holds CUDA and torch threads).
        startup_timeout: seconds a new worker may take to import the reward's module (and run its
            `warmup`).
        chunk_size: rows sent to a worker at once (default: about 4 chunks per worker per call).
        max_failed_calls: raise `RewardError` after this many calls in a row where every row failed
            (0 = never).
        worker_max_rows: a worker is replaced by a fresh one after scoring this many rows (0 = never).
        worker_max_rss_mb: a worker is replaced after a row that left it above this resident memory
            (0 = no cap; Linux only).
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
        max_failed_calls: int = 3,
        worker_max_rows: int = 0,
        worker_max_rss_mb: float = 4096.0,
        batch_rows: int = 1,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}; allowed: {', '.join(ON_ERROR)}")
        if context not in CONTEXTS:
            raise ValueError(f"context={context!r}; allowed: {', '.join(CONTEXTS)}")
        if not timeout > 0 or not startup_timeout > 0:
            raise ValueError(f"timeout={timeout} and startup_timeout={startup_timeout} must be > 0 seconds")
        if not (max_failed_calls >= 0 and worker_max_rows >= 0 and worker_max_rss_mb >= 0):
            raise ValueError(
                f"max_failed_calls={max_failed_calls}, worker_max_rows={worker_max_rows} and "
                f"worker_max_rss_mb={worker_max_rss_mb} must be >= 0 (0 = off)"
            )
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
        # A reward imported from a module (not defined in the script being run) reaches a worker by
        # importing that module: the script itself is not run again there (`_main_not_rerun`).
        self._fn_in_main = getattr(fn, "__module__", None) in ("__main__", "__mp_main__")
        self.n_workers = workers if workers is not None else max(1, min(8, (os.cpu_count() or 2) // 2))
        if self.n_workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        self.timeout, self.default, self.on_error = float(timeout), float(default), on_error
        self.startup_timeout, self.chunk_size = float(startup_timeout), chunk_size
        if batch_rows < 1:
            raise ValueError(f"batch_rows={batch_rows} must be >= 1")
        self.batch_rows = int(batch_rows)
        self.max_failed_calls = int(max_failed_calls)
        self._failed_calls = FailedCalls(self.max_failed_calls)
        self._limits = (int(worker_max_rows), int(worker_max_rss_mb * 2**20))
        self.stats: dict[str, float] = dict(
            calls=0,
            rows=0,
            timeouts=0,
            errors=0,
            crashes=0,
            nonfinite=0,
            skipped=0,
            restarts=0,
            recycled=0,
            failed_calls_in_row=0,
            seconds=0.0,
        )
        self._ctx = mp.get_context(context)
        self._logged: set[str] = set()
        self._closed = False
        self._workers: list[_Worker] = []
        for _ in range(self.n_workers):
            self._workers.append(self._start_worker())

    # -- lifecycle -----------------------------------------------------------------------------------

    def _start_worker(self) -> _Worker:
        return start_worker(
            self._ctx, self._fn_bytes, self._limits, f"reward-{self.__name__}", self._fn_in_main
        )

    def _replace(self, w: _Worker, counter: str = "restarts") -> _Worker:
        kill_worker(w)
        self.stats[counter] += 1
        new = self._start_worker()
        self._workers[self._workers.index(w)] = new
        return new

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        stop_workers(self._workers)
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
        batch = _Batch(rows, list(completions), shared, [self.default] * n)
        probe = _probe_rows(n, max(PROBE_ROWS, self.n_workers))
        batch.probe, batch.probe_rows = set(probe), len(probe)
        rest = [i for i in range(n) if i not in batch.probe]
        size = self.chunk_size or max(1, min(64, -(-len(rest) // (4 * self.n_workers))))
        if self.batch_rows > 1:  # batched calls: chunks of batch_rows rows, each one call
            size = self.batch_rows
        batch.queue.extend([i] for i in probe)
        batch.later = [rest[s : s + size] for s in range(0, len(rest), size)]
        try:
            while True:
                self._release_later(batch)
                if not (batch.queue or any(w.busy for w in self._workers)):
                    break
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
            raise RewardError(f"reward function {self.__name__!r} {batch.first_error}")
        self._count_failed_call(batch, n)
        return batch.rewards

    def _count_failed_call(self, batch: _Batch, n: int) -> None:
        """Stop a run whose reward fails on every row, call after call (`max_failed_calls`)."""
        if n == 0:
            return
        try:
            self._failed_calls.note(batch.ok > 0, self._failed_calls_message)
        finally:
            self.stats["failed_calls_in_row"] = self._failed_calls.in_row

    def _failed_calls_message(self, in_row: int) -> str:
        what = {"nonfinite": "nonfinite (NaN, inf or beyond ±1e6)"}
        counts = ", ".join(f"{what.get(k, k)} {int(self.stats[k])}" for k in FAILURES if self.stats[k])
        return (
            f"reward function {self.__name__!r} failed on every row of {in_row} calls in a row "
            f"(so far: {counts}); training on rewards that are all {self.default:g} learns nothing. "
            "The first failure of each kind is logged above: fix the reward, raise reward.timeout "
            "if it is only slow, or set reward.max_failed_calls=0 to go on anyway"
        )

    def _dispatch(self, batch: _Batch) -> None:
        for w in list(self._workers):
            if w.ready and not w.busy and batch.queue:
                chunk = batch.queue.popleft()
                batched = self.batch_rows > 1 and len(chunk) > 1 and not batch.singly
                try:
                    w.conn.send((batch.shared, [batch.rows[i] for i in chunk], batched))
                except (OSError, ValueError):  # BrokenPipeError: it died since its last message
                    batch.queue.appendleft(chunk)  # no row of it ran: another worker takes it
                    self._replace(w)
                    continue
                w.chunk, w.pos, w.started, w.batched = chunk, 0, time.monotonic(), batched

    def _budget(self, w: _Worker) -> float:
        """Seconds the worker's current call may take: `timeout` per row it scores."""
        return self.timeout * (len(w.chunk) - w.pos if w.batched else 1)

    def _singly(self, w: _Worker, batch: _Batch, why: str) -> None:
        """A batched call failed, crashed or ran out of time: its rows are scored again one by one, so
        that the failure is counted on the row that causes it (and the others keep their rewards)."""
        rows = w.chunk[w.pos :]
        batch.queue.extendleft([i] for i in reversed(rows))
        batch.singly = True  # the rest of this call too: one bad row would fail every batch again
        w.chunk, w.pos, w.batched = [], 0, False
        if "batch" not in self._logged:
            self._logged.add("batch")
            log.warning(
                "a batched call of reward %r %s: its %d rows are scored one by one",
                self.__name__,
                why,
                len(rows),
            )

    def _wait_any(self) -> set:
        """Block until a message, a worker death or the nearest deadline (row timeout or startup)."""
        deadlines = [
            w.started + self._budget(w) if w.ready else w.born + self.startup_timeout
            for w in self._workers
            if w.busy or not w.ready
        ]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        return set(wait([h for w in self._workers for h in (w.conn, w.proc.sentinel)], timeout=timeout))

    def _drain(self, w: _Worker, batch: _Batch) -> None:
        """Read every message a worker has sent; replace it if it died or retired."""
        dead = False
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready, batch.failed_starts = True, 0
                elif msg[0] == "retire":
                    w.retired = msg[1]
                elif msg[0] == "batch_error":
                    self._singly(w, batch, "raised")
                elif msg[0] == "init_error":
                    self.close()
                    raise RewardError(
                        f"reward function {self.__name__!r} could not be loaded in a worker process; "
                        f"define it in an importable module.\n{msg[1]}"
                    )
                else:
                    idx, status, value = msg
                    batch.probe.discard(idx)
                    if status == "ok":
                        batch.rewards[idx] = value
                        batch.ok += 1
                    elif status == "nonfinite":
                        self._note("nonfinite", f"the reward is {value}", idx, batch.completions[idx])
                        batch.first_error = batch.first_error or (
                            f"returned {value} for row {idx}; every reward must be a finite number"
                        )
                    else:
                        self._note("errors", value, idx, batch.completions[idx])
                        batch.first_error = batch.first_error or f"raised in a worker:\n{value}"
                    w.pos += 1
                    w.started = time.monotonic()
        except (EOFError, OSError):
            dead = True
        if w.retired is not None:
            self._retire(w, batch)
            return
        if not dead and w.proc.is_alive():
            return
        if not w.ready:
            batch.failed_starts += 1
            # A signal to the process group can kill every worker that is still starting at once.
            if batch.failed_starts > 3 + self.n_workers:
                self.close()
                raise RewardError(
                    f"reward workers for {self.__name__!r} keep dying at startup (exit code "
                    f"{w.proc.exitcode}; their stderr has the traceback). A script that creates a "
                    "RewardPool at import time needs the `if __name__ == '__main__':` guard, or a reward "
                    "defined in a module of its own (imported into the script), which workers import "
                    "without running the script"
                )
        elif w.busy and w.batched:
            w.proc.join(timeout=1)
            self._singly(w, batch, f"crashed its worker (exit code {w.proc.exitcode})")
        elif w.busy:
            w.proc.join(timeout=1)  # for its exit code
            self._fail_current_row(w, batch, "crashes", f"exit code {w.proc.exitcode}")
        self._replace(w)

    def _retire(self, w: _Worker, batch: _Batch) -> None:
        """A worker over its row count or memory cap stopped between rows: the rest of its chunk goes
        back to the queue and a fresh worker takes its place."""
        if w.busy:
            batch.queue.appendleft(w.chunk[w.pos :])
        if "recycled" not in self._logged:
            self._logged.add("recycled")
            log.info(
                "reward worker for %r recycled after %s (worker_max_rows / worker_max_rss_mb); later "
                "ones are counted in RewardPool.stats['recycled']",
                self.__name__,
                w.retired,
            )
        self._replace(w, "recycled")

    def _enforce_deadlines(self, batch: _Batch) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            if w.ready and w.busy and now > w.started + self._budget(w):
                if w.batched:
                    self._singly(w, batch, f"took over {self._budget(w):g} s")
                else:
                    self._fail_current_row(w, batch, "timeouts", f"over {self.timeout:g} s")
                self._replace(w)
            elif not w.ready and now > w.born + self.startup_timeout:
                self.close()
                raise RewardError(
                    f"a reward worker for {self.__name__!r} did not start within {self.startup_timeout:g} s"
                )

    def _release_later(self, batch: _Batch) -> None:
        """Send the rest of the call once a probe row has a reward or every probe row is done; when every
        one of them timed out or crashed, the reward fails everywhere: the rest gets `default` instead
        of a timeout (or a worker restart) per row."""
        if not batch.later or (not batch.ok and batch.probe):
            return
        if batch.ok or batch.probe_failed < batch.probe_rows:
            batch.queue.extend(batch.later)
            batch.later = []
            return
        skipped = sum(len(chunk) for chunk in batch.later)
        batch.later = []
        self.stats["skipped"] += skipped
        if "skipped" not in self._logged:
            self._logged.add("skipped")
            log.warning(
                "reward %r timed out or crashed on all %d rows it tried first (spread over the batch): the "
                "other %d rows of the call get %g without running. Later ones are only counted in "
                "RewardPool.stats['skipped'].",
                self.__name__,
                batch.probe_rows,
                skipped,
                self.default,
            )

    def _fail_current_row(self, w: _Worker, batch: _Batch, kind: str, detail: str) -> None:
        """The row a worker was on keeps the default; the rest of its chunk goes back to the queue."""
        idx = w.chunk[w.pos]
        self._note(kind, detail, idx, batch.completions[idx])
        if idx in batch.probe:
            batch.probe.discard(idx)
            batch.probe_failed += 1
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
