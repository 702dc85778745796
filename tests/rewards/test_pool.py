"""RewardPool: per-row timeouts from outside, crashes and exceptions give the default, the pool keeps working.

The reward functions below live at module level so that spawned workers can import them.
"""

import logging
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest

from forkrl.rewards.pool import RewardError, RewardPool


class _Interrupt(BaseException):
    """Like math-verify's TimeoutException: not an Exception."""


def flaky_reward(prompts, completions, answer, **fields):
    """1.0 when the completion equals the answer; misbehaves on request."""
    c = completions[0]
    if c == "sleep":
        time.sleep(10_000)
    if c == "raise":
        raise ValueError("bad row")
    if c == "base":
        raise _Interrupt("not an Exception")
    if c == "exit":
        os._exit(3)
    if c == "two":
        return [1.0, 1.0]
    if c == "slow":
        time.sleep(0.3)
        return [1.0]
    if c == "nan":
        return [float("nan")]
    if c == "inf":
        return [float("-inf")]
    return [float(c == answer[0]) * fields.get("scale", 1.0)]


def pid_reward(prompts, completions, **_):
    """The worker's pid: which process scored the row."""
    return [float(os.getpid())]


_LEAK = []


def leaky_reward(prompts, completions, **_):
    """Keeps 32 MB per row (touched, so resident); returns the worker's resident MB after the row."""
    if completions[0] == "leak":
        _LEAK.append(b"x" * (32 << 20))
    with open("/proc/self/statm") as fh:
        return [int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20]


_READY = []


def _slow_init():
    time.sleep(2.0)  # longer than the row timeout of the test below: an import, a parser, a model
    _READY.append(True)


def lazy_reward(prompts, completions, **_):
    """Pays a slow initialisation on its first call unless `warmup` already did."""
    if not _READY:
        _slow_init()
    return [1.0]


lazy_reward.warmup = _slow_init


def spinning_reward(prompts, completions, flag, **_):
    """Writes its pid to `flag`, then spins inside the regex engine (C code that never releases the GIL)."""
    Path(flag[0]).write_text(str(os.getpid()))
    re.match(r"(a+)+$", "a" * 64 + "b")
    return [0.0]


def weighted_reward(prompts, completions, answer, weight, scale=1.0, **_):
    return [float(completions[0] == answer[0]) * weight[0] * scale]


# Timeouts here are far above what a normal row takes on a loaded machine (a row of `flaky_reward` takes
# microseconds); only the rows meant to hang reach them, and no test asserts on elapsed time.
@pytest.fixture(scope="module")
def pool():
    with RewardPool(flaky_reward, workers=2, timeout=3.0) as p:
        yield p


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in ("timeouts", "errors", "crashes")}


def test_matches_direct_call_in_order(pool):
    completions = [str(i % 3) for i in range(40)]
    answers = ["1"] * 40
    expected = [flaky_reward(["p"], [c], [a])[0] for c, a in zip(completions, answers)]
    assert pool(["p"] * 40, completions, answer=answers) == expected


def test_sleep_raise_base_exit_give_default_and_pool_recovers(pool, caplog):
    before = dict(pool.stats)
    completions = ["1", "sleep", "raise", "2", "exit", "base", "two", "1"]
    with caplog.at_level(logging.WARNING, logger="forkrl.rewards.pool"):
        out = pool(["p"] * len(completions), completions, answer=["1"] * len(completions))
    assert out == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    # errors: ValueError, _Interrupt (a BaseException), wrong number of rewards
    assert _delta(before, pool.stats) == {"timeouts": 1, "errors": 3, "crashes": 1}
    assert pool.stats["restarts"] - before["restarts"] == 2  # the timed-out and the crashed worker only
    text = caplog.text
    assert "ValueError: bad row" in text and "timeout" in text and "crash" in text
    # the pool keeps working, with replaced workers
    assert pool(["p"] * 3, ["1", "0", "1"], answer=["1"] * 3) == [1.0, 0.0, 1.0]


def test_traceback_logged_once_per_exception_type(caplog):
    # A pool of its own: the module's shared pool may have logged its ValueError in an earlier test.
    with RewardPool(flaky_reward, workers=2, timeout=3.0) as pool:
        with caplog.at_level(logging.WARNING, logger="forkrl.rewards.pool"):
            pool(["p"] * 4, ["raise"] * 4, answer=["1"] * 4)
            pool(["p"] * 2, ["raise"] * 2, answer=["1"] * 2)
    assert sum("ValueError" in r.getMessage() for r in caplog.records) == 1  # logged, and only once


def test_per_row_fields_and_shared_kwargs():
    with RewardPool(weighted_reward, workers=1, timeout=5.0) as p:
        out = p(["p", "q"], ["1", "1"], answer=["1", "1"], weight=[2.0, 3.0], scale=10.0)
        assert out == [20.0, 30.0]
        assert p.stats["rows"] == 2 and p.stats["calls"] == 1


def test_pathological_math_input_is_bounded_by_the_pool_timeout():
    """`9^{9^{9^{9}}}`: math-verify alone spends its full 5 s alarm on it (a naive verifier hangs).

    Each worker runs `math_reward.warmup` (math-verify's 1-2 s first parse) before it takes rows, so the
    row timeout (2.5 s, under math-verify's 5 s alarm) only has to cover the rows themselves (ms).
    """
    with RewardPool("forkrl.rewards.math:math_reward", workers=1, timeout=2.5) as p:
        completions = ["so \\boxed{\\frac{1}{2}}", "Answer: 0.5", "\\boxed{9^{9^{9^{9}}}}"]
        out = p(["p"] * 3, completions, answer=["0.5", "1/2", "5"])
        assert out == [1.0, 1.0, 0.0]
        # the mechanism: the pool killed the worker at its timeout and replaced it
        assert (p.stats["timeouts"], p.stats["restarts"], p.stats["errors"]) == (1, 1, 0)
        # the replacement worker (warmed up in its turn) takes over
        assert p(["p"], ["\\boxed{\\sqrt{8}}"], answer=["2\\sqrt{2}"]) == [1.0]


def test_warmup_runs_before_the_row_timeout_starts():
    """A reward's one-off initialisation (`fn.warmup`) counts against `startup_timeout`, not a row."""
    with RewardPool(lazy_reward, workers=1, timeout=1.0) as p:
        assert p(["p"] * 2, ["c"] * 2) == [1.0, 1.0]
        assert p.stats["timeouts"] == 0


def test_on_error_raise_and_configurable_default():
    with RewardPool(flaky_reward, workers=1, timeout=2.0, default=-1.0, on_error="raise") as p:
        with pytest.raises(RewardError, match="ValueError: bad row"):
            p(["p"] * 2, ["raise", "1"], answer=["1"] * 2)
        # timeouts and crashes never raise: they get the default
        assert p(["p"] * 3, ["sleep", "1", "exit"], answer=["1"] * 3) == [-1.0, 1.0, -1.0]
        assert p.stats["errors"] == 1 and p.stats["timeouts"] == 1 and p.stats["crashes"] == 1


def test_interrupted_call_leaves_no_stale_rows(monkeypatch):
    """Ctrl-C mid-batch: the rows still in flight must not land in the next call."""
    with RewardPool(flaky_reward, workers=1, timeout=5.0, chunk_size=2) as p:
        assert p(["p"], ["1"], answer=["1"]) == [1.0]
        real_wait = p._wait_any

        def interrupted():
            monkeypatch.setattr(p, "_wait_any", real_wait)
            raise KeyboardInterrupt

        monkeypatch.setattr(p, "_wait_any", interrupted)
        with pytest.raises(KeyboardInterrupt):
            p(["p"] * 2, ["slow", "slow"], answer=["1"] * 2)
        assert p(["p"], ["0"], answer=["1"]) == [0.0]  # not row 1 of the interrupted call


def test_forkserver_context_detects_crashes():
    with RewardPool(flaky_reward, workers=1, timeout=2.0, context="forkserver") as p:
        assert p(["p"] * 3, ["exit", "1", "1"], answer=["1"] * 3) == [0.0, 1.0, 1.0]
        assert p.stats["crashes"] == 1


def test_worker_that_cannot_load_the_reward_raises_clearly():
    mod = types.ModuleType("forkrl_vanishing_module")

    def reward(prompts, completions, **_):
        return [1.0]

    reward.__module__, reward.__qualname__ = mod.__name__, "reward"
    mod.reward = reward
    sys.modules[mod.__name__] = mod  # picklable here, not importable in a fresh process
    try:
        with RewardPool(reward, workers=1, timeout=5.0) as p:
            with pytest.raises(RewardError, match="could not be loaded in a worker"):
                p(["p"], ["x"])
    finally:
        del sys.modules[mod.__name__]


def test_invalid_construction_fails_before_starting_processes():
    with pytest.raises(TypeError, match="top level of an importable module"):
        RewardPool(lambda prompts, completions, **_: [0.0])
    with pytest.raises(ValueError, match="on_error='ignore'; allowed: default, raise"):
        RewardPool(flaky_reward, on_error="ignore")
    with pytest.raises(ValueError, match="context='fork'; allowed: spawn, forkserver"):
        RewardPool(flaky_reward, context="fork")
    with pytest.raises(ValueError, match="must be > 0 seconds"):
        RewardPool(flaky_reward, timeout=0)
    with pytest.raises(ValueError, match="cannot be imported"):
        RewardPool("forkrl.rewards.nope:reward")


def test_close_is_idempotent_and_stops_workers():
    p = RewardPool(flaky_reward, workers=1, timeout=5.0)
    procs = [w.proc for w in p._workers]
    assert p(["p"], ["1"], answer=["1"]) == [1.0]
    p.close()
    p.close()
    assert not any(proc.is_alive() for proc in procs)
    with pytest.raises(RuntimeError, match="closed"):
        p(["p"], ["1"], answer=["1"])


def test_length_mismatch_and_empty_batch(pool):
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        pool(["p", "q"], ["1"], answer=["1"])
    assert pool([], [], answer=[]) == []


# -- signals, dead workers, parent death (issue 16, items 7 and 9) -----------------------------------

ROOT = Path(__file__).resolve().parents[2]

_GROUP_SIGTERM = """
import os, signal, sys
from forkrl.rewards.pool import RewardPool
from tests.rewards.test_pool import pid_reward

if __name__ == "__main__":
    got = []
    signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))  # the trainer's stop flag
    with RewardPool(pid_reward, workers=2, timeout=30.0) as pool:
        pids = {w.proc.pid for w in pool._workers}
        pool(["p"] * 4, ["c"] * 4)  # both workers are up and have installed their signal handlers
        print("ready", flush=True)
        sys.stdin.readline()  # the test signals the process group, then writes a line
        assert got == [signal.SIGTERM], got
        out = pool(["p"] * 8, ["c"] * 8)  # the step goes on after the signal
        print({int(r) for r in out} <= pids, pool.stats["crashes"], pool.stats["restarts"], flush=True)
"""


def _python(script: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_sigterm_to_the_process_group_leaves_the_workers_to_the_parent():
    """GNU timeout, Slurm and systemd signal the whole group: a worker that died of it broke the pipe."""
    proc = _python(_GROUP_SIGTERM, start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate("go\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert out.split() == ["True", "0", "0"]  # the workers from before scored every row; none died


def test_a_worker_that_died_while_idle_is_replaced_when_rows_are_sent():
    with RewardPool(flaky_reward, workers=2, timeout=5.0) as p:
        assert p(["p"] * 2, ["1", "0"], answer=["1"] * 2) == [1.0, 0.0]
        victim = p._workers[0].proc
        victim.kill()
        victim.join()  # dead before the next call sends it rows
        assert p(["p"] * 6, ["1", "0"] * 3, answer=["1"] * 6) == [1.0, 0.0] * 3
        assert p.stats["restarts"] == 1 and p.stats["crashes"] == 0


_ORPHAN = """
import sys
from forkrl.rewards.pool import RewardPool
from tests.rewards.test_pool import spinning_reward

if __name__ == "__main__":
    with RewardPool(spinning_reward, workers=1, timeout=1000.0) as pool:
        pool(["p"], ["c"], flag=[sys.argv[1]])
"""


def _wait_exit(pid: int, timeout: float) -> bool:
    """Whether process `pid` (not our child) exits within `timeout` s: an event (pidfd), not a poll."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfd_open")
def test_workers_die_with_their_parent_even_inside_c_code(tmp_path):
    """`kill -9` of the trainer while its reward spins in C: the worker must not be orphaned."""
    flag = tmp_path / "worker.pid"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_ORPHAN), str(flag)], cwd=ROOT, stdout=subprocess.DEVNULL
    )
    worker, give_up = None, time.monotonic() + 120  # the bound only ends a broken test
    try:
        while worker is None and proc.poll() is None and time.monotonic() < give_up:
            time.sleep(0.05)  # the row has started when the file is there
            if flag.exists() and flag.read_text():
                worker = int(flag.read_text())
        assert worker is not None, f"the reward never ran (trainer exit code {proc.returncode})"
        proc.kill()
        proc.wait()
        # The bound only ends a failing run: a worker that dies with its parent is gone in milliseconds.
        assert _wait_exit(worker, timeout=60.0), f"reward worker {worker} outlived its parent"
    finally:
        proc.kill()
        if worker is not None:
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_pool_started_in_a_thread_keeps_its_workers_when_the_thread_ends():
    """The kernel's parent-death signal follows the parent *thread*: it must not be asked for there."""
    box = {}

    def start():
        box["pool"] = RewardPool(pid_reward, workers=1, timeout=5.0)
        box["pid"] = box["pool"](["p"], ["c"])[0]  # the worker is up: its death signal would be set

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    with box["pool"] as p:
        assert p(["p"] * 3, ["c"] * 3) == [box["pid"]] * 3
        assert p.stats["restarts"] == 0 and p.stats["crashes"] == 0


# -- a reward that fails everywhere, leaks, or returns NaN (issue 16, items 9 and 10) ---------------


def test_a_reward_that_hangs_on_every_row_costs_a_few_timeouts_per_call_then_stops_the_run(caplog):
    with RewardPool(flaky_reward, workers=2, timeout=0.5, max_failed_calls=2) as p:
        with caplog.at_level(logging.WARNING, logger="forkrl.rewards.pool"):
            assert p(["p"] * 12, ["sleep"] * 12, answer=["1"] * 12) == [0.0] * 12
        # 4 spread rows timed out; the other 8 were never sent to a worker
        assert (p.stats["timeouts"], p.stats["skipped"]) == (4, 8)
        assert "the other 8 rows of the call get 0 without running" in caplog.text
        with pytest.raises(RewardError, match="failed on every row of 2 calls in a row"):
            p(["p"] * 6, ["exit"] * 6, answer=["1"] * 6)  # crashing rows: the same
        assert (p.stats["crashes"], p.stats["skipped"]) == (4, 10)


def test_one_bad_group_does_not_cut_a_call_short():
    """The rows tried first are spread over the batch: one group of hanging rows cannot fill them."""
    completions = ["sleep"] * 4 + ["1"] * 12
    with RewardPool(flaky_reward, workers=2, timeout=3.0) as p:
        out = p(["p"] * 16, completions, answer=["1"] * 16)
        # What the timeout must do, whatever the load: the 4 hanging rows time out, no row is skipped,
        # and a good row scores 1 unless it timed out itself (it takes microseconds: on an idle machine none)
        assert out[:4] == [0.0] * 4 and p.stats["skipped"] == 0 and p.stats["timeouts"] >= 4
        assert set(out[4:]) <= {0.0, 1.0} and out[4:].count(0.0) == p.stats["timeouts"] - 4


def test_calls_in_a_row_that_fail_everywhere_stop_only_when_consecutive():
    with RewardPool(flaky_reward, workers=1, timeout=5.0, max_failed_calls=2) as p:
        p(["p"] * 2, ["raise", "nan"], answer=["1"] * 2)  # every row failed: 1 in a row
        p(["p"] * 2, ["raise", "1"], answer=["1"] * 2)  # one row scored: the count restarts
        p(["p"] * 2, ["raise", "inf"], answer=["1"] * 2)
        with pytest.raises(RewardError, match=r"failed on every row of 2 calls in a row \(so far: errors 4"):
            p(["p"], ["raise"], answer=["1"])
    with RewardPool(flaky_reward, workers=1, timeout=5.0, max_failed_calls=0) as p:  # 0: never
        for _ in range(4):
            assert p(["p"], ["raise"], answer=["1"]) == [0.0]


def test_nonfinite_rewards_score_the_default_and_are_counted(caplog):
    with RewardPool(flaky_reward, workers=1, timeout=5.0, default=-1.0) as p:
        with caplog.at_level(logging.WARNING, logger="forkrl.rewards.pool"):
            assert p(["p"] * 3, ["nan", "1", "inf"], answer=["1"] * 3) == [-1.0, 1.0, -1.0]
        assert p.stats["nonfinite"] == 2 and p.stats["errors"] == 0
        assert "the reward is nan" in caplog.text
    with RewardPool(flaky_reward, workers=1, timeout=5.0, on_error="raise") as p:
        with pytest.raises(
            RewardError, match="returned -inf for row 1; every reward must be a finite number"
        ):
            p(["p"] * 2, ["1", "inf"], answer=["1"] * 2)


def test_workers_are_recycled_after_max_rows():
    with RewardPool(pid_reward, workers=1, timeout=5.0, worker_max_rows=2, chunk_size=8) as p:
        pids = [int(r) for r in p(["p"] * 5, ["c"] * 5)]
        a, b, c = pids[0], pids[2], pids[4]
        assert pids == [a, a, b, b, c] and len({a, b, c}) == 3
        assert p.stats["recycled"] == 2 and p.stats["restarts"] == 0 and p.stats["crashes"] == 0


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="resident memory from /proc")
def test_a_leaking_reward_is_recycled_over_the_memory_cap():
    with RewardPool(leaky_reward, workers=1, timeout=30.0) as probe:
        base = probe(["p"], ["measure"])[0]  # a fresh worker's resident MB
    cap = base + 100  # three leaking rows fit under it, the fourth passes it
    with RewardPool(leaky_reward, workers=1, timeout=30.0, worker_max_rss_mb=cap) as p:
        rss = p(["p"] * 10, ["leak"] * 10)
        assert max(rss) < cap + 32 + 16  # a worker stops after the row that took it over the cap
        assert p.stats["recycled"] >= 2 and p.stats["crashes"] == 0


def spawning_reward(prompts, completions, **_):
    """Starts a long child process per call and records its pid (the file named by the environment)."""
    child = subprocess.Popen(["sleep", "600"])
    with open(os.environ["FORKRL_TEST_CHILD_PIDS"], "a") as fh:
        fh.write(f"{child.pid}\n")
    return [1.0] * len(completions)


def _status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_processes_a_reward_starts_end_with_the_pool_and_take_signals(tmp_path, monkeypatch):
    pids_file = tmp_path / "pids"
    monkeypatch.setenv("FORKRL_TEST_CHILD_PIDS", str(pids_file))
    with RewardPool(spawning_reward, workers=2) as pool:
        assert pool(["p"] * 4, ["a", "b", "c", "d"]) == [1.0] * 4
        pids = [int(x) for x in pids_file.read_text().split()]
        assert len(pids) == 4
        for pid in pids:  # SIGINT and SIGTERM not ignored (bits 2 and 15 of the mask)
            ignored = int(_status(pid)["SigIgn"], 16)
            assert not ignored & (1 << (signal.SIGINT - 1)) and not ignored & (1 << (signal.SIGTERM - 1))

    def alive():
        return [pid for pid in pids if _status(pid).get("State", "Z").split()[0] not in ("Z", "X")]

    for _ in range(2000):  # SIGKILL lands at once; polls the processes (the bound only ends a failure)
        if not alive():
            break
        time.sleep(0.05)
    assert not alive(), f"still running after the pool closed: {alive()}"
