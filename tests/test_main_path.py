"""`python -m forkrl` in a folder holding files named like modules forkrl imports (issue 28, item 4)."""

import subprocess
import sys


def test_python_m_forkrl_ignores_modules_in_the_working_folder(tmp_path):
    for name in ("yaml", "tensorboard", "rich"):
        (tmp_path / f"{name}.py").write_text(
            f'raise SystemExit("imported {name}.py from the working folder")\n'
        )
    done = subprocess.run(
        [sys.executable, "-m", "forkrl", "config"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "from the working folder" not in done.stdout + done.stderr
    assert "selection.rho" in done.stdout


def test_a_reward_module_in_the_working_folder_is_still_found(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def score(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
    )
    code = (  # the working folder off sys.path, as forkrl/__main__.py leaves it
        "import os, sys; sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]; "
        "from forkrl.rewards.registry import get_reward; print(get_reward('my_rewards:score')([], ['a']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "[1.0]" in done.stdout, done.stderr
