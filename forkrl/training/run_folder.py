"""The run folder: one run per folder, locked while a trainer runs in it, and the config of every step.

    RUN_DIR/
      .lock                 fcntl.flock-ed by the trainer running here; holds its PID
      config.yaml           the resolved config the run runs under now (a record: edits are not read back)
      config_history.yaml   every config the run has run under: [{start_step, sha256, changed, config}]
      metrics.jsonl  train.log  checkpoints/  final/  summary.json  tb/  rollouts/

A new run refuses a folder that holds another run's outputs (a second run would mix its log and
checkpoints with the first one's) unless told to overwrite them; `--resume` continues the run there,
and may change only the settings in `SAFE_ON_RESUME` (how the run is executed or watched, not what it
learns).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
from pathlib import Path

import yaml

from forkrl.errors import ConfigError

LOCK = ".lock"
HISTORY = "config_history.yaml"
# What forkrl writes in a run folder: `--overwrite` removes these and nothing else.
OUTPUTS = (
    "config.yaml",
    HISTORY,
    "metrics.jsonl",
    "train.log",
    "summary.json",
    "checkpoints",
    "final",
    "final-adapter",
    "final-critic",
    "tb",
    "rollouts",
    "wandb",
    "wandb_id",
)

# Keys a resumed run may change: how long it runs, how it is watched, checkpointed and executed.
# Everything else (the objective, the data, the model, the optimizer) is what the steps so far trained
# under, so changing it mid-run would make one run out of two different ones.
SAFE_ON_RESUME = frozenset(
    {
        "train.steps",
        "train.eval_every",
        "train.save_every",
        "train.keep_checkpoints",
        "train.progress",
        "train.threads",
        "train.tensorboard",
        "train.dump_every",
        "train.max_skipped_steps",
        "train.out_dir",
        "train.parallel",
        "model.device",
        "rollout.threads",
        "rollout.lean_decode",
        "rollout.vllm_gpu_memory_utilization",
        "rollout.vllm_sleep",
        "reward.fn",
        "reward.isolate",
        "reward.workers",
        "reward.timeout",
        "reward.on_error",
        "reward.max_failed_calls",
        "reward.worker_max_rows",
        "reward.worker_max_rss_mb",
        "reward.batch_size",
        "train.wandb",
        "train.log_completions",
        "train.mmap_threshold_mib",
        "train.update_mmap_threshold_mib",
    }
)


class RunLock:
    """An exclusive `flock` on RUN_DIR/.lock for as long as a trainer runs there (released by the OS
    if the process dies, so a `kill -9` never leaves a folder locked)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:  # before anything is loaded: a folder the run cannot write is the user's to fix
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(
                f"{self.path.parent} cannot be written ({e.strerror}): a run folder must be writable (the run "
                "writes its log, metrics and checkpoints there); give a writable train.out_dir, or copy the run "
                "folder somewhere writable and resume it there"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{self.path.parent} is in use by another forkrl train (PID {pid}): one run folder holds "
                "one run at a time; wait for it to end, stop it, or give another train.out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:  # the file stays: removing it would race a trainer that just opened it
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def prepare_new(run_dir: Path, overwrite: bool) -> None:
    """A new run's folder: refuse one that holds another run's outputs, unless `overwrite` (then remove
    them; files forkrl did not write, such as a study's notes, are left alone either way)."""
    found = [name for name in OUTPUTS if (Path(run_dir) / name).exists()]
    if found and not overwrite:
        from forkrl.training.checkpoint import usable_checkpoint

        stopped_early = not (Path(run_dir) / "summary.json").exists()
        if stopped_early and usable_checkpoint(run_dir)[0] is None:  # --resume would have nothing to load
            raise ConfigError(
                f"train.out_dir={run_dir} holds a run that stopped before its first checkpoint "
                f"({', '.join(found)}), so there is nothing to continue: replace it with `--overwrite` "
                "(Python: overwrite=True), or give another train.out_dir"
            )
        raise ConfigError(
            f"train.out_dir={run_dir} holds a run already ({', '.join(found)}), and a run folder holds one "
            f"run: continue it with `forkrl train --resume {run_dir}`, replace it with `--overwrite` "
            "(Python: resume=True / overwrite=True), or give another train.out_dir"
        )
    for name in found:
        p = Path(run_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def remove_stale_writes(run_dir: Path) -> list[Path]:
    """Remove the `.tmp-step-*` folders of checkpoint writes a kill interrupted (the lock is held, so
    no live trainer is writing them)."""
    root = Path(run_dir) / "checkpoints"
    stale = sorted(root.glob(".tmp-step-*")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


# ------------------------------------------------------------------------------------------- configs


def _dump(values: dict) -> str:
    return yaml.safe_dump(values, sort_keys=False)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        return []
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e}); it is written by forkrl, restore it") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "config" in e for e in entries):
        raise ConfigError(f"{path}: not a list of {{start_step, config}} entries; it is written by forkrl")
    return entries


def ran_config(run_dir: Path) -> dict:
    """The config the run last ran under: the newest entry of config_history.yaml (what forkrl wrote),
    or config.yaml in a folder from before the history existed."""
    history = read_history(run_dir)
    if history:
        return history[-1]["config"]
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a forkrl run folder?")
    try:
        values = yaml.safe_load(path.read_text())  # safe_load: a config must not run code
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(values).__name__}")
    return values


def hand_edits(run_dir: Path) -> list[str]:
    """Keys of config.yaml that differ from what forkrl wrote there (its hash in config_history.yaml)."""
    history, path = read_history(run_dir), Path(run_dir) / "config.yaml"
    if not history or not path.is_file():
        return []
    text = path.read_text()
    if _sha(text) == history[-1].get("sha256"):
        return []
    try:
        edited = _flat(yaml.safe_load(text) or {})
    except yaml.YAMLError:
        return ["(not valid YAML)"]
    ran = _flat(history[-1]["config"])
    return sorted(k for k in edited.keys() | ran.keys() if edited.get(k, "?") != ran.get(k, "?")) or [
        "(formatting only)"
    ]


def changes(run_dir: Path, values: dict) -> dict[str, tuple]:
    """{key: (what the run ran under, what `values` says)}; a key outside SAFE_ON_RESUME is refused."""
    ran, now = _flat(ran_config(run_dir)), _flat(yaml.safe_load(_dump(values)))
    # A key one side lacks was added to (or dropped from) forkrl since the run began: not a change.
    diff = {k: (ran[k], now[k]) for k in sorted(ran.keys() & now.keys()) if ran[k] != now[k]}
    # The preset's name alone changes nothing: what it sets is compared value by value.
    unsafe = [k for k in diff if k not in SAFE_ON_RESUME and k != "preset"]
    if unsafe:
        k = unsafe[0]
        raise ConfigError(
            f"--resume {run_dir}: {k} cannot change mid-run ({diff[k][0]!r} -> {diff[k][1]!r}"
            + (f"; also {', '.join(unsafe[1:])}" if len(unsafe) > 1 else "")
            + "): the steps so far trained under the first value. Start a new run to change it (another "
            "train.out_dir, or --overwrite); a resume may change " + ", ".join(sorted(SAFE_ON_RESUME))
        )
    diff.pop("preset", None)
    return diff


def record_config(run_dir: Path, values: dict, start_step: int, changed: dict | None = None) -> None:
    """Write config.yaml and add `values` to the history as the config of the steps from `start_step`
    (entries of steps a resume from an older checkpoint redoes are dropped)."""
    text = _dump(values)
    history = [e for e in read_history(run_dir) if e.get("start_step", 0) < start_step]
    if history and history[-1]["config"] == yaml.safe_load(text):
        history[-1]["sha256"] = _sha(text)  # nothing changed: the steps from here run under it too
    else:
        entry = {"start_step": start_step, "sha256": _sha(text)}
        if changed:
            entry["changed"] = {k: {"from": a, "to": b} for k, (a, b) in changed.items()}
        history.append({**entry, "config": yaml.safe_load(text)})
    _write(Path(run_dir) / "config.yaml", text)
    _write(Path(run_dir) / HISTORY, _dump(history))


def on_main(fn, env):
    """fn() on rank 0, its result (or its ConfigError) on every rank."""
    from forkrl.training.dist import broadcast_object

    out, err = None, None
    if env.main:
        try:
            out = fn()
        except ConfigError as e:  # its class too (CheckpointError, ...): the CLI names the kind
            err = e
    out, err = broadcast_object((out, err), env)
    if err is not None:
        raise err
    return out


def say(message: str) -> None:
    print(f"forkrl: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- metrics


def cut_metrics(run_dir: Path, offset: int, checkpoint: Path) -> None:
    """Cut metrics.jsonl back to the checkpoint's offset (dropping the lines logged after it); a log that
    is missing or shorter than that is an error, never padded."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing: checkpoint {checkpoint.name} continues a log of {offset} bytes; restore "
            "the file, or start a new run"
        )
    size = path.stat().st_size
    if size < offset:
        raise ConfigError(
            f"{path} has {size} bytes, fewer than the {offset} that checkpoint {checkpoint.name} logged: "
            "it was cut or replaced; restore it, or start a new run"
        )
    with open(path, "r+b") as fh:
        fh.truncate(offset)


# --------------------------------------------------------------------------------------------- start


def open_run(run_dir: Path, values: dict, *, resume: bool, overwrite: bool) -> tuple[Path | None, dict]:
    """Ready the folder of a run (main rank, lock held): (checkpoint to resume from, config changes).

    A new run gets an empty folder (`prepare_new`). A resume gets the newest readable checkpoint (newer,
    unreadable ones are skipped with a warning), its metrics log cut back to it, and the config changes
    it asks for, refused unless safe; all checks come before anything in the folder changes.
    """
    from forkrl.training.checkpoint import load_state, usable_checkpoint

    if resume and overwrite:
        raise ConfigError("give --resume (continue the run) or --overwrite (replace it), not both")
    stale = remove_stale_writes(run_dir)
    if stale:
        say(f"removed {len(stale)} unfinished checkpoint write(s) of an earlier, killed trainer: {stale[0]}")
    if not resume:
        prepare_new(run_dir, overwrite)
        return None, {}
    ckpt, skipped = usable_checkpoint(run_dir)
    for line in skipped:
        say(f"skipping unreadable checkpoint {line}")
    if ckpt is None:
        why = f" ({'; '.join(skipped)})" if skipped else ""
        raise ConfigError(
            f"--resume {run_dir}: no complete checkpoint in {Path(run_dir) / 'checkpoints'}{why}, so there is "
            f"nothing to continue (the run stopped before its first one); start it again under the same "
            f"config with `forkrl train --config {Path(run_dir) / 'config.yaml'} --overwrite`"
        )
    state = load_state(ckpt)
    done, steps = state["step"], values["train"]["steps"]
    if steps < done:
        raise ConfigError(
            f"--resume {run_dir}: train.steps={steps} is fewer than the {done} steps the run has trained "
            f"(checkpoint {ckpt.name}); give train.steps={done} or more"
        )
    changed = changes(run_dir, values)
    cut_metrics(run_dir, state["metrics_offset"], ckpt)
    if changed:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        say(f"resuming {run_dir} at step {done + 1} with {shown}")
    return ckpt, changed


def resume_config(run_dir: str | Path, overrides: list[str]):
    """The config of `forkrl train --resume RUN_DIR overrides...`: the one the run last ran under (as
    forkrl recorded it; hand edits of config.yaml are reported, not read), then the overrides.

    The run's `reward.fn`, when it names a module to import rather than a registered reward, is used
    only if the command names it too: a run folder may come from someone else, and importing the
    module runs its code (even a module placed in the folder itself, on `python -m forkrl`'s path)."""
    from forkrl.config import load_config
    from forkrl.rewards import REWARDS

    run_dir = Path(run_dir)
    ran = ran_config(run_dir)
    edits = hand_edits(run_dir)
    if edits:
        say(
            f"{run_dir / 'config.yaml'} was edited since forkrl wrote it ({', '.join(edits)}); the edits are "
            f"not read: the run goes on under the config it ran with ({HISTORY}). Give a change on the "
            f"command line instead, e.g. `forkrl train --resume {run_dir} train.steps=200`"
        )
    spec = (ran.get("reward") or {}).get("fn")
    named = any(o.split("=", 1)[0].strip() == "reward.fn" for o in overrides)
    if isinstance(spec, str) and spec not in REWARDS and not named:
        raise ConfigError(
            f"--resume {run_dir}: the run's reward.fn={spec!r} is a module to import, and a resume imports "
            f"code only when the command names it (the run folder may come from someone else): add "
            f"reward.fn={spec} to the command to resume with it, or name another reward"
        )
    return load_config(values=ran, overrides=[*overrides, f"train.out_dir={run_dir}"])
