"""A run folder holds one run: refused reruns, the lock, the config of every step, bad logs and checkpoints."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from forkrl.cli import main
from forkrl.config import Config, ConfigError, load_config
from forkrl.training.checkpoint import list_checkpoints, usable_checkpoint
from forkrl.training.metrics import read_metrics
from forkrl.training.run_folder import HISTORY, RunLock, record_config, resume_config
from forkrl.training.trainer import train

from .test_resume import _overrides, length_reward


def _cfg(model, out, steps, *extra):
    return load_config(None, [*_overrides(model, out, steps), "train.save_every=1", *extra])


@pytest.fixture(scope="module")
def two_steps(tiny_model_dir, tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2 (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("run") / "two"
    train(_cfg(tiny_model_dir, out, 2), reward_fn=length_reward)
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _files(run):  # every file but the lock (which holds the PID of the last trainer)
    return {
        p.relative_to(run): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_a_second_run_into_a_used_folder_is_refused_unless_overwritten(tiny_model_dir, two_steps, tmp_path):
    run = _copy(two_steps, tmp_path)
    before = _files(run)
    with pytest.raises(
        ConfigError,
        match=r"holds a run already \(config.yaml, config_history.yaml, metrics.jsonl.*--resume .*run.*--overwrite",
    ):
        train(_cfg(tiny_model_dir, run, 1), reward_fn=length_reward)
    assert _files(run) == before  # nothing was touched
    (run / "notes.txt").write_text("mine")
    train(_cfg(tiny_model_dir, run, 1), reward_fn=length_reward, overwrite=True)
    assert [r["step"] for r in read_metrics(run)] == [0, 1]
    assert (run / "notes.txt").read_text() == "mine"  # only forkrl's outputs are replaced
    assert [p.name for p in list_checkpoints(run)] == ["step-000001"]


def test_the_cli_refuses_a_used_folder_and_names_both_options(two_steps, tmp_path, capsys):
    run = _copy(two_steps, tmp_path)
    assert main(["train", f"train.out_dir={run}", "train.progress=false"]) == 2
    err = capsys.readouterr().err
    assert f"forkrl: config error: train.out_dir={run} holds a run already" in err
    assert f"forkrl train --resume {run}" in err and "--overwrite" in err


def test_a_locked_folder_fails_at_once_naming_the_pid(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(  # another trainer: holds the lock until its stdin closes
        [
            sys.executable,
            "-c",
            "import sys; from forkrl.training.run_folder import RunLock; "
            f"RunLock({str(run)!r}).acquire(); print('locked', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by another forkrl train \(PID {holder.pid}\)"):
            train(_cfg(tiny_model_dir, run, 1), reward_fn=length_reward)
        with pytest.raises(ConfigError, match=rf"PID {holder.pid}"):
            train(_cfg(tiny_model_dir, run, 1), reward_fn=length_reward, resume=True)
    finally:
        holder.stdin.close()
        holder.wait()
    assert os.listdir(run) == [".lock"]  # neither wrote anything
    RunLock(run).acquire().release()  # free again once the holder is gone


def test_resume_refuses_an_unsafe_change_and_records_a_safe_one(tiny_model_dir, two_steps, tmp_path, capsys):
    run = _copy(two_steps, tmp_path)
    before = _files(run)
    with pytest.raises(ConfigError, match=r"selection.rho cannot change mid-run \(0.2 -> 0.9"):
        train(_cfg(tiny_model_dir, run, 4, "selection.rho=0.9"), reward_fn=length_reward, resume=True)
    with pytest.raises(ConfigError, match=r"model.path cannot change mid-run"):
        train(_cfg(tiny_model_dir, run, 4, f"model.path={run}"), reward_fn=length_reward, resume=True)
    assert _files(run) == before
    capsys.readouterr()
    train(_cfg(tiny_model_dir, run, 3, "train.eval_every=1"), reward_fn=length_reward, resume=True)
    err = capsys.readouterr().err  # (train.out_dir changed too: the folder was copied)
    assert f"resuming {run} at step 3 with train.eval_every: 2 -> 1;" in err and "train.steps: 2 -> 3" in err
    history = yaml.safe_load((run / HISTORY).read_text())
    assert [e["start_step"] for e in history] == [1, 3]
    assert history[0]["config"]["train"]["steps"] == 2 and history[1]["config"]["train"]["steps"] == 3
    assert history[1]["changed"]["train.eval_every"] == {"from": 2, "to": 1}
    assert yaml.safe_load((run / "config.yaml").read_text()) == history[1]["config"]


def test_resume_with_fewer_steps_than_done_is_refused(tiny_model_dir, two_steps, tmp_path):
    run = _copy(two_steps, tmp_path)
    before = _files(run)
    with pytest.raises(ConfigError, match=r"train.steps=1 is fewer than the 2 steps the run has trained"):
        train(_cfg(tiny_model_dir, run, 1), reward_fn=length_reward, resume=True)
    assert _files(run) == before  # summary.json and final/ still agree (step 2)


def test_a_short_or_missing_metrics_log_is_an_error_not_padded(tiny_model_dir, two_steps, tmp_path):
    run = _copy(two_steps, tmp_path)
    log = run / "metrics.jsonl"
    log.write_bytes(log.read_bytes()[:10])
    with pytest.raises(
        ConfigError, match=rf"{log} has 10 bytes, fewer than the \d+ that checkpoint step-000002"
    ):
        train(_cfg(tiny_model_dir, run, 3), reward_fn=length_reward, resume=True)
    assert log.read_bytes().count(b"\0") == 0 and log.stat().st_size == 10
    log.unlink()
    with pytest.raises(ConfigError, match=rf"{log} is missing"):
        train(_cfg(tiny_model_dir, run, 3), reward_fn=length_reward, resume=True)


@pytest.mark.parametrize("broken", ["state.pt", "model.safetensors"])
@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous(
    tiny_model_dir, two_steps, tmp_path, capsys, broken, how
):
    run = _copy(two_steps, tmp_path)
    f = run / "checkpoints" / "step-000002" / broken
    f.write_bytes(b"" if how == "empty" else f.read_bytes()[: f.stat().st_size // 2])
    train(_cfg(tiny_model_dir, run, 2), reward_fn=length_reward, resume=True)  # redoes step 2 from step 1
    assert f"skipping unreadable checkpoint {f.parent}: {broken}" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2]
    a, b = (
        load_file(two_steps / "final" / "model.safetensors"),
        load_file(run / "final" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_hand_edit_of_config_yaml_is_reported_and_not_read(tmp_path, capsys):
    record_config(tmp_path, Config().to_dict(), 1)
    text = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(text.replace("rho: 0.2", "rho: 0.9"))
    cfg = resume_config(tmp_path, ["train.steps=80"])
    err = capsys.readouterr().err
    assert "config.yaml was edited since forkrl wrote it (selection.rho)" in err
    assert cfg.selection.rho == 0.2 and cfg.train.steps == 80


def test_resume_imports_a_runs_reward_module_only_when_the_command_names_it(tmp_path, capsys, monkeypatch):
    (tmp_path / "evil.py").write_text(
        f"open({str(tmp_path / 'ran')!r}, 'w').close()\ndef fn(p, c): return []\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python -m forkrl` run from inside the folder
    values = Config().to_dict()
    values["reward"]["fn"] = "evil:fn"
    record_config(tmp_path, values, 1)
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "reward.fn='evil:fn' is a module to import" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists()
    assert resume_config(tmp_path, ["reward.fn=evil:fn"]).reward.fn == "evil:fn"  # named: the user's choice
    assert resume_config(tmp_path, ["reward.fn=math"]).reward.fn == "math"
    assert not (tmp_path / "ran").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


def test_a_state_pt_that_would_run_code_is_refused_unread_without_torchs_advice(tmp_path):
    for step in (1, 2):  # the newest holds code: the folder was tampered with, so no fallback either
        (tmp_path / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    ckpt = tmp_path / "checkpoints" / "step-000002"
    torch.save({"step": 2, "x": _Payload(str(tmp_path / "ran"))}, ckpt / "state.pt")
    torch.save({"step": 1}, tmp_path / "checkpoints" / "step-000001" / "state.pt")
    with pytest.raises(ConfigError, match=rf"{ckpt / 'state.pt'} is not a forkrl checkpoint") as e:
        usable_checkpoint(tmp_path)
    assert not (tmp_path / "ran").exists() and "weights_only=False" not in str(e.value)


def test_a_checkpoint_that_lost_a_tensor_falls_back_to_the_one_before(tmp_path):
    from safetensors.torch import load_file, save_file

    from forkrl.models.loading import DEFAULT_MODEL, load_model_and_tokenizer
    from forkrl.training.checkpoint import save_checkpoint

    model, tok = load_model_and_tokenizer(DEFAULT_MODEL)
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model=model, tokenizer=tok, state={"step": step})
    weights = tmp_path / "checkpoints" / "step-000002" / "model.safetensors"
    tensors = load_file(weights)
    gone = sorted(tensors)[0]
    del tensors[gone]
    save_file(tensors, weights, metadata={"format": "pt"})  # a readable file, one tensor short
    ckpt, skipped = usable_checkpoint(tmp_path)
    assert ckpt == tmp_path / "checkpoints" / "step-000001"
    assert len(skipped) == 1 and f"model.safetensors:{gone}" in skipped[0] and "missing" in skipped[0]


def test_a_run_folder_on_a_read_only_file_system_is_named_before_anything_loads(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    import errno

    import forkrl.training.run_folder as run_folder
    import forkrl.training.setup as setup_mod

    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).startswith(str(tmp_path)) and flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_folder.os, "open", read_only)
    monkeypatch.setattr(setup_mod, "load_policy", no_load)
    out = tmp_path / "run"
    out.mkdir()
    code = main(["train", *_overrides(tiny_model_dir, out, 2)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"{out} cannot be written (Read-only file system)" in err and "writable train.out_dir" in err, err
