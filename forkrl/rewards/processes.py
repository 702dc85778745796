"""The reward pool's worker processes, from the parent's side: start one (without re-running the
parent's main script in it), and kill one with everything it started. The child's side is
`forkrl.rewards.worker`; the scheduling of rows onto workers is `forkrl.rewards.pool`.

Workers ignore SIGINT and SIGTERM (Ctrl-C, `timeout`, Slurm and systemd signal the whole process group;
the parent decides what to do), die with the parent (a watcher thread; on Linux, for a pool used from
the main thread, also SIGKILL from the kernel, which ends even a worker stuck in C code that holds the
GIL), and are recycled, between rows, after `worker_max_rows` rows or once their resident memory passes
`worker_max_rss_mb` (a leaking reward).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from forkrl.rewards.worker import kill_group, worker_main


@contextlib.contextmanager
def _main_not_rerun(fn_in_main: bool):
    """Start worker processes without re-running the parent's main script in them.

    `spawn` and `forkserver` children import the parent's `__main__` first (by its file or module
    name, as `__mp_main__`), so a plain script that calls `forkrl.train(...)` at module level, without
    the `if __name__ == "__main__":` guard, would train again in every reward worker. A worker needs the
    main module only when the reward was defined there; otherwise its module is imported by name
    (pickle), so `__main__`'s file and spec are hidden while the process starts (multiprocessing reads
    them in `spawn.get_preparation_data`, at `Process.start`).
    """
    main = sys.modules.get("__main__")
    if fn_in_main or main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


@dataclass
class Worker:
    proc: Any  # multiprocessing Process of the chosen context
    conn: Connection
    born: float
    ready: bool = False
    chunk: list[int] = field(default_factory=list)  # row indices sent, in order
    pos: int = 0  # index into chunk of the row being scored
    started: float = 0.0  # when the current row started (its predecessor's result arrived)
    retired: str | None = None  # why it stopped taking rows (row count or memory), when it did
    batched: bool = False  # the chunk is scored in one call (its deadline: timeout x its rows)

    @property
    def busy(self) -> bool:
        return self.pos < len(self.chunk)


def start_worker(ctx, fn_bytes: bytes, limits: tuple[int, int], name: str, fn_in_main: bool) -> Worker:
    """A worker process of multiprocessing context `ctx` for the pickled reward `fn_bytes`, recycled at
    `limits` (rows, resident bytes)."""
    with _main_not_rerun(fn_in_main):
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        main_thread = threading.current_thread() is threading.main_thread()
        proc = ctx.Process(
            target=worker_main, args=(child_conn, fn_bytes, *limits, main_thread), daemon=True, name=name
        )
        proc.start()
        child_conn.close()  # so the parent sees EOF when the child dies
    return Worker(proc=proc, conn=parent_conn, born=time.monotonic())


def kill_worker(w: Worker) -> None:
    kill_group(w.proc.pid)  # before is_alive() reaps the worker: its pid names the group until then
    if w.proc.is_alive():
        w.proc.kill()
    w.proc.join(timeout=5)
    w.conn.close()


def stop_workers(workers: list[Worker]) -> None:
    """Ask each worker to exit, give the idle ones 2 s, then kill whatever is left."""
    for w in workers:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 2.0
    for w in workers:
        if w.ready and not w.busy:  # the others (starting, or on a row) would not read it soon
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        kill_worker(w)
