"""The reward worker process of `forkrl.rewards.pool.RewardPool`: score rows sent over a pipe, one report
per row; ignore the process group's signals, die with the parent, retire when over a row or memory cap.

The protocol, worker to parent: `("ready", pid)` once the reward is loaded (and warmed up), then
`(idx, "ok" | "nonfinite" | "error", value)` per row, `("retire", why)` before it exits on its own, or
`("init_error", traceback)`. Parent to worker: `(shared_kwargs, rows)` per chunk, `None` to stop.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from forkrl.rewards.registry import usable_reward


def _score_row(fn: Callable, prompt: Any, completion: Any, row: dict, shared: dict) -> float:
    out = fn([prompt], [completion], **{k: [v] for k, v in row.items()}, **shared)
    if len(out) != 1:
        raise ValueError(f"reward function returned {len(out)} rewards for 1 completion")
    return float(out[0])


def _score_rows(fn: Callable, rows: list, shared: dict) -> list[float]:
    """One call of `fn` on a chunk's rows (`RewardPool(batch_rows=...)`): a batched judge or model."""
    keys = {k for _, _, _, row in rows for k in row}
    fields = {k: [row.get(k) for _, _, _, row in rows] for k in keys}
    out = fn([r[1] for r in rows], [r[2] for r in rows], **fields, **shared)
    if len(out) != len(rows):
        raise ValueError(f"reward function returned {len(out)} rewards for {len(rows)} completions")
    return [float(v) for v in out]


def _rss_bytes() -> int | None:
    """This process's resident set size (Linux `/proc/self/statm`), None elsewhere."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _die_with_parent(kernel: bool) -> None:
    """End this worker when the process that started it dies (`kill -9` of the trainer).

    A daemon thread waits for EOF on multiprocessing's parent sentinel (a pipe the parent holds open)
    or a change of parent pid, and exits. With `kernel` (Linux), the kernel also sends SIGKILL
    (`prctl(PR_SET_PDEATHSIG)`), which stops a reward stuck in C code that holds the GIL (the thread
    never runs then). The kernel acts when the parent *thread* ends, so the pool asks for it only from
    the main thread: a pool started in a thread that exits must keep its workers.
    """
    if kernel and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    parent, ppid = mp.parent_process(), os.getppid()

    def watch() -> None:
        while True:
            if parent is not None and wait([parent.sentinel], timeout=1.0):
                break
            if parent is None:
                time.sleep(1.0)
            if os.getppid() != ppid:
                break
        if os.getpgrp() == os.getpid():  # the group this worker leads: the reward's children too
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, name="reward-parent-watch", daemon=True).start()


def kill_group(pid: int | None) -> None:
    """SIGKILL the process group a worker leads (pid = its group id): the worker and any process its
    reward started. Nothing if there is no such group, and never the caller's own group."""
    if pid is None or pid == os.getpgrp():
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def worker_main(conn: Connection, fn_bytes: bytes, max_rows: int, max_rss: int, pdeathsig: bool) -> None:
    # Its own process group: Ctrl-C and a SIGTERM to the trainer's group reach the trainer only (it
    # closes the pool), and the pool ends the worker by its group, with any process the reward started.
    # Default dispositions, which the reward's own child processes inherit.
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(pdeathsig)
    try:
        fn = pickle.loads(fn_bytes)
        warmup = getattr(fn, "warmup", None)
        if callable(warmup):
            warmup()
    except BaseException:
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    scored = 0
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent went away
            return
        if msg is None:
            return
        shared, rows, batched = msg
        if batched:  # one call for the chunk; a failure sends it back to be scored row by row
            try:
                values = _score_rows(fn, rows, shared)
            except BaseException:  # noqa: BLE001
                conn.send(("batch_error", traceback.format_exc()))
                continue
            for (idx, *_), value in zip(rows, values):
                conn.send((idx, "ok", value) if usable_reward(value) else (idx, "nonfinite", repr(value)))
            scored += len(rows)
            rss = _rss_bytes() if max_rss else None
            if (max_rows and scored >= max_rows) or (rss is not None and rss > max_rss):
                conn.send(("retire", f"{scored} rows, {(rss or 0) / 2**20:.0f} MB resident"))
                return
            continue
        for idx, prompt, completion, row in rows:
            try:
                value = _score_row(fn, prompt, completion, row, shared)
                conn.send((idx, "ok", value) if usable_reward(value) else (idx, "nonfinite", repr(value)))
            except BaseException:  # noqa: BLE001 - any failure of the reward is a reported row error
                conn.send((idx, "error", traceback.format_exc()))
            scored += 1
            rss = _rss_bytes() if max_rss else None
            if (max_rows and scored >= max_rows) or (rss is not None and rss > max_rss):
                conn.send(("retire", f"{scored} rows, {(rss or 0) / 2**20:.0f} MB resident"))
                return  # the parent re-queues the rest of this chunk and starts a fresh worker
