"""The attack cases of issue 28 (what an outside attack on the CLI still found), for bench/attacks.py.

Each function takes attacks.py's `Env` and returns (held, what was seen), synchronised on files and
process exits, never on sleeps. Cases that need a file system of their own (read-only, full) mount a
small tmpfs, and say "not run" where this machine does not allow mounting.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

REWARDS = """
import subprocess, sys


def absurd(prompts, completions, **kw):
    return [1e300] * len(completions)


def raises_in_process(prompts, completions, **kw):
    raise ValueError("bad row")


def one_short(prompts, completions, **kw):
    return [1.0] * (len(completions) - 1)


def spawns(prompts, completions, **kw):
    subprocess.Popen(["sleep", "600", "forkrl-attack-child"])  # the marker names the leftovers
    return [float(len(c) % 2) for c in completions]
"""


def _no_traceback(r) -> bool:
    lines = [line for line in (r.stderr or "").splitlines() if line.strip() and "it/s]" not in line]
    return bool(lines) and lines[-1].startswith("forkrl:") and "Traceback" not in (r.stderr or "")


def _last(r, n: int = 160) -> str:
    return f"exit {r.returncode}; {(r.stderr or '').strip()[-n:]}"


def setup(e) -> None:
    (e.tmp / "attack_cases_rewards.py").write_text(REWARDS)


def collapse(e):  # item 1
    r = e.train(e.folder(), "optim.lr=1e6", "train.steps=6", "train.eval_n=64", "train.save_every=0")
    return r.returncode == 1 and "collapsed" in r.stderr and _no_traceback(r), _last(r)


def no_held_out(e):  # item 2
    data = e.tmp / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(16))
    )
    out = e.folder()
    r = e.train(out, f"data.path={data}", "reward.fn=math", "train.steps=1")
    try:
        json.loads((out / "summary.json").read_text())  # strict JSON: no NaN
        valid = True
    except (OSError, ValueError):
        valid = False
    return (
        r.returncode == 0 and valid and "not measured" in r.stdout,
        f"exit {r.returncode}; JSON valid {valid}",
    )


def absurd_reward(e, isolate: str):  # item 3
    r = e.train(
        e.folder(), "reward.fn=attack_cases_rewards:absurd", f"reward.isolate={isolate}", "train.steps=6"
    )
    return r.returncode == 1 and "reward error" in r.stderr and _no_traceback(r), _last(r)


def module_in_run_folder(e):  # item 4
    out = e.folder()
    r = e.train(out, "train.steps=1")
    marker = e.tmp / "imported"
    (out / "tensorboard.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    r = subprocess.run(
        [*e.cmd("train", "--resume", ".", "train.steps=2")],
        env=e.env,
        cwd=out,
        capture_output=True,
        text=True,
    )
    return r.returncode == 0 and not marker.exists(), f"exit {r.returncode}; imported {marker.exists()}"


def in_process_reward_fails(e, fn: str):  # item 6
    r = e.train(e.folder(), f"reward.fn=attack_cases_rewards:{fn}", "reward.isolate=false")
    return r.returncode == 1 and "reward error" in r.stderr and _no_traceback(r), _last(r)


def ctrl_c_eval(e):  # item 7
    out = e.tmp / f"eval{e.n}"
    p = subprocess.Popen(
        e.cmd(
            "eval", "--task", "pick", "--n", "500", "--batch-size", "2", "--no-progress", "--out", str(out)
        ),
        env=e.env,
        cwd=e.tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(
            signal.SIGINT, signal.SIG_DFL
        ),  # a bench started with `&` ignores it
    )
    results = out / "results.jsonl"
    while p.poll() is None and not (results.exists() and results.read_text().count("\n") >= 2):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    ok = p.returncode == 130 and "Traceback" not in err and (out / "summary.json").exists()
    return ok, f"exit {p.returncode}; {err.strip()[-160:]}"


@contextlib.contextmanager
def _tmpfs(e, size: str, *options: str):
    """A fresh tmpfs of `size` (None when this machine does not allow mounting)."""
    where = e.tmp / f"fs{e.n}"
    where.mkdir(exist_ok=True)
    opts = ",".join([f"size={size}", *options])
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True
    ).returncode:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def read_only_folder(e):  # item 8
    with _tmpfs(e, "64m") as fs:
        if fs is None:
            return (
                True,
                "not run: mounting a file system is not allowed here (tests/train/test_run_folder.py covers it)",
            )
        out = fs / "run"
        r = e.train(out, "train.steps=1")
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        r = e.run("train", "--resume", str(out), "train.steps=2")
        fresh = e.train(fs / "new")
        ok = all(
            x.returncode == 2 and "cannot be written" in x.stderr and _no_traceback(x) for x in (r, fresh)
        )
        return ok, f"{_last(r, 120)} | {_last(fresh, 80)}"


def disk_full(e):  # item 9
    with _tmpfs(e, "28m") as fs:  # the tiny model: 2 checkpoints of ~10 MB kept, a third does not fit
        if fs is None:
            return (
                True,
                "not run: mounting a file system is not allowed here (tests/train/test_disk_full.py covers it)",
            )
        out = fs / "run"
        r = e.train(out, "train.steps=6")
        said = (
            r.returncode == 1
            and "disk full at step" in r.stderr
            and "is intact" in r.stderr
            and _no_traceback(r)
        )
        subprocess.run(["mount", "-o", "remount,size=256m", str(fs)], check=True)
        resumed = e.run("train", "--resume", str(out))
        return said and resumed.returncode == 0, f"{_last(r, 160)} | resume exit {resumed.returncode}"


def child_processes(e):  # item 11
    r = e.train(e.folder(), "reward.fn=attack_cases_rewards:spawns", "train.steps=2")
    left = subprocess.run(
        ["pgrep", "-f", "forkrl-attack-child"], capture_output=True, text=True
    ).stdout.split()
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    return r.returncode == 0 and not left, f"exit {r.returncode}; {len(left)} reward children left running"


def missing_tensor(e):  # item 13
    from safetensors.torch import load_file, save_file

    out = e.folder()
    r = e.train(out, "train.steps=3")
    newest = out / "checkpoints" / "step-000003" / "model.safetensors"
    tensors = load_file(newest)
    del tensors[sorted(tensors)[0]]
    save_file(tensors, newest, metadata={"format": "pt"})
    r = e.run("train", "--resume", str(out), "train.steps=4")
    ok = r.returncode == 0 and "skipping unreadable checkpoint" in r.stderr and "missing" in r.stderr
    return ok, _last(r)


def default_budget(e):  # the default max_new_tokens against the shipped model's 256-token context
    data = e.tmp / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(16))
    )
    r = e.train(e.folder(), f"data.path={data}", f"data.eval_path={data}", "reward.fn=math", "train.steps=1")
    return r.returncode == 0 and "sampling up to" in r.stderr, _last(r)


def cases(e) -> list[tuple[str, str, object]]:
    setup(e)
    return [
        ("issue 28", "1: optim.lr=1e6 collapses the model", lambda: collapse(e)),
        ("issue 28", "2: data.path without data.eval_path", lambda: no_held_out(e)),
        ("issue 28", "3: a reward of 1e300, isolated", lambda: absurd_reward(e, "true")),
        ("issue 28", "3: a reward of 1e300, reward.isolate=false", lambda: absurd_reward(e, "false")),
        (
            "issue 28",
            "4: tensorboard.py in the run folder, python -m from it",
            lambda: module_in_run_folder(e),
        ),
        (
            "issue 28",
            "6: reward.isolate=false, the reward raises",
            lambda: in_process_reward_fails(e, "raises_in_process"),
        ),
        (
            "issue 28",
            "6: reward.isolate=false, one reward short",
            lambda: in_process_reward_fails(e, "one_short"),
        ),
        ("issue 28", "7: Ctrl-C during forkrl eval", lambda: ctrl_c_eval(e)),
        ("issue 28", "8: a read-only run folder (tmpfs remounted ro)", lambda: read_only_folder(e)),
        ("issue 28", "9: the disk fills at a checkpoint (28 MB tmpfs)", lambda: disk_full(e)),
        ("issue 28", "11: a reward that starts child processes", lambda: child_processes(e)),
        ("issue 28", "13: the newest checkpoint lost a tensor", lambda: missing_tensor(e)),
        ("issue 28", "default max_new_tokens, a data file, the 256-token model", lambda: default_budget(e)),
    ]
