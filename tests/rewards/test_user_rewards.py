"""A user's own reward as a TRL user writes it: the README's Python example run as a plain script, a
`reward.fn=module:function` from the working directory, and the math reward's dependency.

Waits are on processes ending, never on time budgets."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from forkrl.rewards import get_reward
from forkrl.rewards.math import math_reward
from forkrl.rewards.pool import RewardPool

REPO = Path(__file__).resolve().parents[2]
MY_REWARDS = "def my_reward(prompts, completions, **row_fields):\n    return [float(len(c) % 2) for c in completions]\n"


def _readme_script() -> str:
    """The README's Python example, exactly as printed there."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    [block] = [b for b in blocks if "forkrl.train(" in b and "from my_rewards import my_reward" in b]
    return block


def _python(args, cwd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env["PYTHONPATH"] = str(REPO)  # forkrl itself; the user's modules come from the script's folder
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow  # 20 RL steps of the default job
def test_the_readme_python_example_runs_as_a_plain_script(tmp_path):
    (tmp_path / "my_rewards.py").write_text(MY_REWARDS)
    (tmp_path / "train_mine.py").write_text(_readme_script())
    out = _python(["train_mine.py"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "runs" / "forkrl" / "final").is_dir()
    assert "keep dying" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow  # its workers die at start until the pool gives up (about 40 s)
def test_a_reward_defined_in_an_unguarded_script_says_what_to_do(tmp_path):
    # The reward's worker must import the script that defines it; the script trains at import.
    script = (
        "import forkrl\n"
        + MY_REWARDS
        + ('forkrl.train(["train.steps=1", "train.progress=false"], reward_fn=my_reward)\n')
    )
    (tmp_path / "unguarded.py").write_text(script)
    out = _python(["unguarded.py"], tmp_path)
    assert out.returncode != 0
    assert "forkrl.train() was called in a reward worker process" in out.stderr  # each worker's own error
    assert "a reward defined in a module of its own" in out.stderr  # the trainer's message


def test_a_reward_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    # The `forkrl` console script's sys.path has no working directory (`python -m` would have it).
    (tmp_path / "myreward_cwd_probe.py").write_text(MY_REWARDS.replace("my_reward", "first_try"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path), ".")])
    fn = get_reward("myreward_cwd_probe:first_try")
    assert fn(["p", "p"], ["ab", "abc"]) == [0.0, 1.0]
    assert str(tmp_path) in sys.path  # so that reward workers, started with this sys.path, find it too
    with RewardPool(fn, workers=1, timeout=30.0) as pool:
        assert pool(["p", "p"], ["ab", "abc"]) == [0.0, 1.0]
    with pytest.raises(ValueError, match="looked in the working directory") as err:
        get_reward("no_such_reward_module_here:fn")
    assert str(tmp_path) in str(err.value)


def test_the_math_reward_refuses_to_run_without_math_verify(monkeypatch):
    # Without math-verify, \frac{1}{2} vs 0.5 used to score 0 silently (a string comparison).
    assert math_reward(["p"], [r"\boxed{\frac{1}{2}}"], answer=["0.5"]) == [1.0]
    monkeypatch.setitem(sys.modules, "math_verify", None)  # an import of it now fails
    with pytest.raises(ImportError, match="dependency of forkrl"):
        math_reward(["p"], [r"\boxed{\frac{1}{2}}"], answer=["0.5"])
