"""RewardPool: per-row timeouts from outside, crashes and exceptions give the default, the pool keeps working.

The reward functions below live at module level so that spawned workers can import them.
"""

import logging
import os
import sys
import time
import types

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
    return [float(c == answer[0]) * fields.get("scale", 1.0)]


def weighted_reward(prompts, completions, answer, weight, scale=1.0, **_):
    return [float(completions[0] == answer[0]) * weight[0] * scale]


@pytest.fixture(scope="module")
def pool():
    with RewardPool(flaky_reward, workers=2, timeout=1.0) as p:
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
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="forkrl.rewards.pool"):
        out = pool(["p"] * len(completions), completions, answer=["1"] * len(completions))
    elapsed = time.monotonic() - t0
    assert out == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    # errors: ValueError, _Interrupt (a BaseException), wrong number of rewards
    assert _delta(before, pool.stats) == {"timeouts": 1, "errors": 3, "crashes": 1}
    assert elapsed < 1.0 + 6.0  # one timeout; replacements start in parallel
    text = caplog.text
    assert "ValueError: bad row" in text and "timeout" in text and "crash" in text
    # the pool keeps working, with replaced workers
    assert pool(["p"] * 3, ["1", "0", "1"], answer=["1"] * 3) == [1.0, 0.0, 1.0]


def test_traceback_logged_once_per_exception_type(pool, caplog):
    with caplog.at_level(logging.WARNING, logger="forkrl.rewards.pool"):
        pool(["p"] * 4, ["raise"] * 4, answer=["1"] * 4)
        pool(["p"] * 2, ["raise"] * 2, answer=["1"] * 2)
    assert sum("ValueError" in r.getMessage() for r in caplog.records) <= 1


def test_per_row_fields_and_shared_kwargs():
    with RewardPool(weighted_reward, workers=1, timeout=5.0) as p:
        out = p(["p", "q"], ["1", "1"], answer=["1", "1"], weight=[2.0, 3.0], scale=10.0)
        assert out == [20.0, 30.0]
        assert p.stats["rows"] == 2 and p.stats["calls"] == 1


def test_pathological_math_input_is_bounded_by_the_pool_timeout():
    """`9^{9^{9^{9}}}`: math-verify alone spends its full 5 s alarm on it (a naive verifier hangs)."""
    with RewardPool("forkrl.rewards.math:math_reward", workers=1, timeout=1.5) as p:
        # warm: the worker has imported math-verify and paid its ~1 s first-parse initialisation
        assert p(["p"], ["\\boxed{1}"], answer=["1"]) == [1.0]
        completions = ["so \\boxed{\\frac{1}{2}}", "Answer: 0.5", "\\boxed{9^{9^{9^{9}}}}"]
        t0 = time.monotonic()
        out = p(["p"] * 3, completions, answer=["0.5", "1/2", "5"])
        elapsed = time.monotonic() - t0
        assert out == [1.0, 1.0, 0.0]
        assert p.stats["timeouts"] == 1
        assert elapsed < 1.5 + 1.5
        # the replacement worker (a cold start) takes over
        assert p(["p"], ["\\boxed{\\sqrt{8}}"], answer=["2\\sqrt{2}"]) == [1.0]


def test_on_error_raise_and_configurable_default():
    with RewardPool(flaky_reward, workers=1, timeout=0.5, default=-1.0, on_error="raise") as p:
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
