"""RewardPool(batch_rows=N) (reward.batch_size): the reward is called with N rows at once, as TRL calls it,
and a batch that raises or hangs is scored again row by row, so only the bad row gets the default."""

import os
import time
from pathlib import Path

from forkrl.rewards.pool import RewardPool


def logged_lengths(prompts, completions, **fields):
    """len(completion) / 10; appends the call's size to $FORKRL_TEST_CALLS (one line per call)."""
    with open(os.environ["FORKRL_TEST_CALLS"], "a") as fh:
        fh.write(f"{len(completions)}\n")
    if "hang" in completions:
        time.sleep(3600)
    if "boom" in completions:
        raise RuntimeError("boom")
    return [len(c) / 10 for c in completions]


def _calls(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_batched_calls_take_whole_chunks(tmp_path, monkeypatch):
    monkeypatch.setenv("FORKRL_TEST_CALLS", str(tmp_path / "calls"))
    completions = [f"c{'x' * (i % 7)}" for i in range(36)]
    with RewardPool(logged_lengths, workers=2, timeout=30.0, batch_rows=8) as pool:
        out = pool(["p"] * 36, completions)
    assert out == [len(c) / 10 for c in completions]
    calls = _calls(tmp_path / "calls")
    assert sorted(calls) == [1, 1, 1, 1, 8, 8, 8, 8]  # 4 single probe rows, then 32 rows in 4 calls
    assert sum(calls) == 36


def test_a_failing_or_hanging_batch_is_scored_row_by_row(tmp_path, monkeypatch):
    monkeypatch.setenv("FORKRL_TEST_CALLS", str(tmp_path / "calls"))
    completions = [f"ok{i}" for i in range(20)]
    completions[9], completions[15] = "boom", "hang"
    with RewardPool(logged_lengths, workers=1, timeout=2.0, batch_rows=5) as pool:
        out = pool(["p"] * 20, completions)
        stats = dict(pool.stats)
    expected = [len(c) / 10 for c in completions]
    expected[9] = expected[15] = 0.0  # the bad rows get the default
    # What the timeout must do, whatever the machine's load: the hanging row times out; a good row gets its
    # reward unless it timed out itself (a row takes microseconds, so on an idle machine none does).
    assert out[9] == out[15] == 0.0 and stats["errors"] == 1 and stats["timeouts"] >= 1
    assert all(o in (e, 0.0) for o, e in zip(out, expected))
    assert sum(o != e for o, e in zip(out, expected)) <= stats["timeouts"] - 1
