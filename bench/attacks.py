"""Attacks a careful user and an attacker would try on `forkrl train`, and whether each held.

Each attack runs the real CLI (`python -m forkrl ...`) in fresh processes on the built-in task with a
short run, synchronising on files (metrics lines, checkpoints), never on sleeps, and checks what a user
must be able to rely on: a resumed run equals an uninterrupted one, a signal to the process group
leaves a checkpoint and no orphaned worker, a used run folder is not silently mixed, a crafted file does
not run code, a bad value is refused or counted, a failing reward stops the run with a message.

    python bench/attacks.py            # every attack once (about 5 minutes on 2 CPUs)
    python bench/attacks.py --kills 5  # more kill -9 points

Prints a table: attacks tried per category, held, failed (with what was seen for a failure).
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attack_cases  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "train.steps=4",
    "train.eval_n=8",
    "train.eval_every=0",
    "train.progress=false",
    "train.tensorboard=false",
    "train.threads=1",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "train.save_every=1",
]
REWARDS = """
import math, time

def nan_sometimes(prompts, completions, **kw):  # NaN for about one completion in five
    return [float("nan") if len(c) % 5 == 0 else float(len(c) % 2) for c in completions]

def raises(prompts, completions, **kw):
    raise RuntimeError("this reward always fails")

def hangs(prompts, completions, **kw):
    time.sleep(3600)

def nan_on_rank_1(prompts, completions, **kw):  # under torchrun: a NaN on rank 1 only
    import os
    bad = os.environ.get("RANK") == "1"
    return [float("nan") if bad and i == 0 else float(len(c) % 2) for i, c in enumerate(completions)]
"""
DEADLINE_S = 300  # a hung attack is a failure, not a hang of the bench


class Env:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        (tmp / "attack_rewards.py").write_text(REWARDS)
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp)]),
            "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE",
        }
        self.n = 0

    def folder(self) -> Path:
        self.n += 1
        return self.tmp / f"run{self.n}"

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "forkrl", *args]

    def run(self, *args: str, timeout: float = DEADLINE_S) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.cmd(*args), env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=timeout
        )

    def start(self, *args: str, ranks: int = 0) -> subprocess.Popen:
        cmd = self.cmd(*args)
        if ranks:  # the same command under torchrun, gloo ranks on this CPU
            cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m"]
        return subprocess.Popen(
            cmd,
            env=self.env,
            cwd=self.tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, as under timeout/Slurm/systemd
        )

    def train(self, out: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
        return self.run("train", *BASE, f"train.out_dir={out}", *extra, **kw)


def _wait_for(cond: Callable[[], bool], proc: subprocess.Popen | None = None) -> bool:
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return cond()
        time.sleep(0.05)
    return False


def _steps_logged(out: Path) -> int:
    f = out / "metrics.jsonl"
    return sum(1 for line in f.read_text().splitlines() if '"step": 0' not in line) if f.exists() else 0


def _weights(out: Path) -> bytes:
    return (out / "final" / "model.safetensors").read_bytes()


def _traceback(p) -> bool:
    """forkrl crashed instead of ending on its own `forkrl: ...` message (a user's reward traceback,
    logged to help them, may come before it)."""
    lines = [line for line in (p.stderr or "").splitlines() if line.strip() and "it/s]" not in line]
    return not lines or not lines[-1].startswith("forkrl:")


def _pgroup_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


# --------------------------------------------------------------------------- attacks: (held, what was seen)


def _checkpointed(out: Path, step: int) -> bool:
    return (out / "checkpoints" / f"step-{step:06d}" / "state.pt").exists()


def kill9_and_resume(e: Env, at_step: int, reference: bytes) -> tuple[bool, str]:
    out = e.folder()
    p = e.start("train", *BASE, f"train.out_dir={out}")
    # after the step's checkpoint exists, so that there is something to resume (the next step may be
    # under way: the kill lands anywhere in it)
    if not _wait_for(lambda: _checkpointed(out, at_step), p):
        p.kill()
        return False, f"never reached step {at_step}: {p.communicate()[1][-300:]}"
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    r = e.run("train", "--resume", str(out))
    if r.returncode != 0:
        return False, f"resume exit {r.returncode}: {r.stderr[-300:]}"
    return _weights(out) == reference, "final weights equal the uninterrupted run's"


def _sigterm_group(p: subprocess.Popen) -> str | None:
    """SIGTERM to the process group, as timeout/Slurm/systemd send it; its stderr, or None if it hung."""
    os.killpg(p.pid, signal.SIGTERM)
    try:
        return p.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        return None


def sigterm_group(e: Env, at_step: int, ranks: int = 0) -> tuple[bool, str]:
    """SIGTERM to the whole process group once `at_step` steps are logged (under torchrun with `ranks`):
    every process stops with a checkpoint and says so, none is left, and the run resumes (in one process)."""
    out = e.folder()
    p = e.start("train", *BASE, f"train.out_dir={out}", ranks=ranks)
    if not _wait_for(lambda: _steps_logged(out) >= at_step, p):
        p.kill()
        return False, "never reached the step"
    err = _sigterm_group(p)
    if err is None:
        return False, "still running 120 s after SIGTERM"
    ckpts = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else []
    orphans = _wait_for(lambda: not _pgroup_alive(p.pid)) is False
    said = err.count("SIGTERM: stopped after writing")  # once per rank
    exited = p.returncode == 128 + signal.SIGTERM or ranks > 0  # torchrun's agent has its own exit code
    r = e.run("train", "--resume", str(out))
    ok = exited and said == max(1, ranks) and ckpts and "BrokenPipeError" not in err and not orphans
    ok = ok and r.returncode == 0
    seen = (
        f"exit {p.returncode}, {said} said where they stopped, {len(ckpts)} checkpoint(s), orphans={orphans}"
    )
    return bool(ok), f"{seen}, resume exit {r.returncode}"


def torchrun_reward_error(e: Env) -> tuple[bool, str]:
    out = e.folder()
    p = e.start(
        "train",
        *BASE,
        f"train.out_dir={out}",
        "reward.fn=attack_rewards:nan_on_rank_1",
        "reward.on_error=raise",
        ranks=2,
    )
    try:
        err = p.communicate(timeout=DEADLINE_S)[1]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        return False, f"still running after {DEADLINE_S} s (a rank waiting in a collective)"
    said = err.count("fix the reward, then resume")
    return p.returncode != 0 and said == 2, f"exit {p.returncode}; {said} ranks stopped with the message"


def sigterm_at_start(e: Env) -> tuple[bool, str]:
    out = e.folder()
    p = e.start("train", *BASE, f"train.out_dir={out}")
    _wait_for(lambda: out.exists(), p)  # during start-up (model load, first evaluation)
    err = _sigterm_group(p)
    if err is None:
        return False, "still running 120 s after SIGTERM"
    return p.returncode != 0 and "Traceback" not in err, f"exit {p.returncode}; {err.strip()[-160:]}"


def rerun_into_folder(e: Env) -> tuple[bool, str]:
    out = e.folder()
    first = e.train(out)
    second = e.train(out, "selection.rho=0.5")
    ok = first.returncode == 0 and second.returncode != 0 and not _traceback(second)
    return ok, f"second run: exit {second.returncode}; {second.stderr.strip()[-160:]}"


def unsafe_resume_override(e: Env) -> tuple[bool, str]:
    out = e.folder()
    e.train(out, "train.steps=2")
    r = e.run("train", "--resume", str(out), "train.steps=4", "selection.rho=0.9")
    return r.returncode != 0 and not _traceback(r), f"exit {r.returncode}; {r.stderr.strip()[-160:]}"


def concurrent_resume(e: Env) -> tuple[bool, str]:
    out = e.folder()
    e.train(out, "train.steps=1")
    # enough steps that `a` still runs (and holds the lock) while `b` starts up
    a = e.start("train", "--resume", str(out), "train.steps=30")
    # a holds the lock once it has logged a step of its own (`.lock` stays in the folder between runs)
    _wait_for(lambda: _steps_logged(out) >= 2, a)
    b = e.run("train", "--resume", str(out), "train.steps=30")
    still_running = a.poll() is None
    a.communicate(timeout=DEADLINE_S)
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"step": 0' not in line]
    ok = still_running and b.returncode != 0 and a.returncode == 0 and len(steps) == 30
    return ok, f"second: exit {b.returncode}; {len(steps)} step lines; {b.stderr.strip()[-120:]}"


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def pickle_state(e: Env) -> tuple[bool, str]:
    out = e.folder()
    e.train(out, "train.steps=2")
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    with open(newest / "state.pt", "wb") as fh:
        pickle.dump({"x": _Payload()}, fh)
    r = e.run("train", "--resume", str(out), "train.steps=3")
    ran = (e.tmp / "PWNED").exists()
    return not ran and not _traceback(r), f"payload ran={ran}; exit {r.returncode}; {r.stderr.strip()[-160:]}"


def yaml_tag(e: Env) -> tuple[bool, str]:
    bad = e.tmp / "bad.yaml"
    bad.write_text("train: !!python/object/apply:os.system ['touch PWNED_YAML']\n")
    r = e.run("train", "--config", str(bad))
    ran = (e.tmp / "PWNED_YAML").exists()
    return not ran and r.returncode != 0 and not _traceback(r), f"ran={ran}; exit {r.returncode}"


def crafted_dump(e: Env) -> tuple[bool, str]:
    import json

    inj = "</script><script>alert(1)</script>"
    dump = e.tmp / "dump.jsonl"
    meta = {"__meta__": {"rho": 0.2, inj: inj}}
    row = {
        "step": inj,
        "row": 0,
        "tokens": [inj, "a"],
        "token_ids": [1, 2],
        "entropy": [1.0, 0.5],
        "logp": [-1.0, -0.1],
        "sel": [True, False],
        "loss": [True, True],
        "adv": inj,
        "reward": 1.0,
        "prompt": inj,
        "text": inj,
    }
    dump.write_text(json.dumps(meta) + "\n" + json.dumps(row) + "\n")
    out = e.tmp / "view.html"
    r = e.run("analyze", "view", str(dump), "--out", str(out))
    page = out.read_text() if out.exists() else ""
    return "<script>alert(1)" not in page, f"exit {r.returncode}; page {len(page)} chars"


def short_metrics_log(e: Env) -> tuple[bool, str]:
    out = e.folder()
    e.train(out, "train.steps=2")
    log = out / "metrics.jsonl"
    log.write_text(log.read_text()[:20])
    r = e.run("train", "--resume", str(out), "train.steps=3")
    nul = b"\x00" in log.read_bytes()
    return not nul and not _traceback(r), f"NUL={nul}; exit {r.returncode}; {r.stderr.strip()[-120:]}"


def nan_config(e: Env) -> tuple[bool, str]:
    r = e.train(e.folder(), "rollout.temperature=nan")
    return r.returncode == 2 and "rollout.temperature" in r.stderr, f"exit {r.returncode}"


def nan_reward(e: Env) -> tuple[bool, str]:
    out = e.folder()
    r = e.train(out, "reward.fn=attack_rewards:nan_sometimes", "train.steps=2")
    import json

    counted = (
        sum(
            json.loads(line).get("reward_nonfinite", 0)
            for line in (out / "metrics.jsonl").read_text().splitlines()
        )
        if (out / "metrics.jsonl").exists()
        else 0
    )
    return r.returncode == 0 and counted > 0, f"exit {r.returncode}; {counted} non-finite rewards counted"


def huge_lr(e: Env) -> tuple[bool, str]:
    # the command, at the default batch (16 prompts x 8)
    r = e.train(
        e.folder(),
        "optim.lr=1e6",
        "train.max_skipped_steps=3",
        "train.steps=40",
        "rollout.prompts_per_step=16",
        "rollout.group_size=8",
    )
    return r.returncode != 0 and not _traceback(r), f"exit {r.returncode}; {r.stderr.strip()[-160:]}"


def failing_reward(e: Env, name: str) -> tuple[bool, str]:
    extra = ["reward.timeout=1"] if name == "hangs" else []
    r = e.train(e.folder(), f"reward.fn=attack_rewards:{name}", "train.steps=40", *extra)
    return r.returncode != 0 and not _traceback(r), f"exit {r.returncode}; {r.stderr.strip()[-160:]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=3, help="kill -9 points (steps 1..)")
    args = ap.parse_args()
    results: dict[str, list[tuple[str, bool, str]]] = {}
    with tempfile.TemporaryDirectory() as d:
        e = Env(Path(d))
        ref_dir = e.folder()
        ref = e.train(ref_dir)
        if ref.returncode != 0:
            sys.exit(f"the uninterrupted reference run failed:\n{ref.stderr[-2000:]}")
        reference = _weights(ref_dir)
        attacks: list[tuple[str, str, Callable[[], tuple[bool, str]]]] = []
        for i in range(args.kills):
            attacks.append(
                (
                    "kill -9, then --resume",
                    f"at step {1 + i % 3}",
                    lambda s=1 + i % 3: kill9_and_resume(e, s, reference),
                )
            )
        attacks += [
            ("signal to the process group", "SIGTERM at step 2", lambda: sigterm_group(e, 2)),
            ("signal to the process group", "SIGTERM during start-up", lambda: sigterm_at_start(e)),
            (
                "signal to the process group",
                "torchrun, 2 ranks: SIGTERM at step 2",
                lambda: sigterm_group(e, 2, ranks=2),
            ),
            (
                "failing rewards",
                "torchrun: a NaN reward on rank 1 (on_error=raise)",
                lambda: torchrun_reward_error(e),
            ),
            ("rerun into a folder", "a second run into a used folder", lambda: rerun_into_folder(e)),
            ("rerun into a folder", "--resume with selection.rho changed", lambda: unsafe_resume_override(e)),
            ("concurrent resume", "two --resume of one folder", lambda: concurrent_resume(e)),
            ("crafted files", "pickle payload as state.pt", lambda: pickle_state(e)),
            ("crafted files", "!!python tag in a --config YAML", lambda: yaml_tag(e)),
            ("crafted files", "script in a dump for analyze view", lambda: crafted_dump(e)),
            ("crafted files", "metrics.jsonl cut short", lambda: short_metrics_log(e)),
            ("NaN values", "rollout.temperature=nan", lambda: nan_config(e)),
            ("NaN values", "a NaN reward", lambda: nan_reward(e)),
            ("NaN values", "optim.lr=1e6 (non-finite steps)", lambda: huge_lr(e)),
            ("failing rewards", "a reward that raises on every row", lambda: failing_reward(e, "raises")),
            ("failing rewards", "a reward that hangs on every row", lambda: failing_reward(e, "hangs")),
        ]
        attacks += attack_cases.cases(e)  # issue 28's cases (bench/attack_cases.py)
        for category, what, attack in attacks:
            t = time.perf_counter()
            try:
                held, seen = attack()
            except Exception as exc:  # the bench reports, it does not stop
                held, seen = False, f"{type(exc).__name__}: {exc}"
            print(
                f"{'held' if held else 'FAILED':6s} {category}: {what} ({time.perf_counter() - t:.0f} s) - {seen}",
                flush=True,
            )
            results.setdefault(category, []).append((what, held, seen))
    print()
    print(f"{'category':32s} {'tried':>5s} {'held':>5s} {'failed':>6s}")
    for category, rows in results.items():
        held = sum(h for _, h, _ in rows)
        print(f"{category:32s} {len(rows):5d} {held:5d} {len(rows) - held:6d}")
    total = sum(len(r) for r in results.values())
    held = sum(h for rows in results.values() for _, h, _ in rows)
    print(f"{'all':32s} {total:5d} {held:5d} {total - held:6d}")
    for category, rows in results.items():
        for what, h, seen in rows:
            if not h:
                print(f"failed: {category}: {what}: {seen}")


if __name__ == "__main__":
    main()
