"""A checkpoint that does not fit on the disk: one line that says what was kept, never a traceback."""

import errno
import shutil
from collections import namedtuple

import pytest

import forkrl.training.checkpoint as checkpoint
from forkrl.cli import main
from forkrl.models.loading import DEFAULT_MODEL, load_model_and_tokenizer
from forkrl.training.checkpoint import DiskFullError, list_checkpoints, save_checkpoint

from .test_resume import _overrides

Usage = namedtuple("Usage", "total used free")


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    model, tok = load_model_and_tokenizer(DEFAULT_MODEL)
    save_checkpoint(tmp_path, 1, model=model, tokenizer=tok, state={"step": 1})
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: Usage(1 << 30, 1 << 30, 1 << 20))
    with pytest.raises(
        DiskFullError, match=r"disk full at step 2's checkpoint .*1 MiB free, it needs about"
    ) as e:
        save_checkpoint(tmp_path, 2, model=model, tokenizer=tok, state={"step": 2})
    assert f"{tmp_path / 'checkpoints' / 'step-000001'} is intact" in str(e.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]  # no partial folder


def test_a_full_disk_mid_write_stops_the_run_with_one_line_and_resumes(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    real_save = checkpoint.torch.save
    calls = []

    def full_on_second(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", full_on_second)
    code = main(["train", *_overrides(tiny_model_dir, out, 3), "train.save_every=1"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert "forkrl: training error: disk full at step 2's checkpoint" in err, err
    assert f"{out / 'checkpoints' / 'step-000001'} is intact" in err and "--resume" in err
    assert [p.name for p in list_checkpoints(out)] == ["step-000001"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert main(["train", "--resume", str(out)]) == 0
    assert [p.name for p in list_checkpoints(out)][-1] == "step-000003"


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    model, tok = load_model_and_tokenizer(DEFAULT_MODEL)

    def broken(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint.torch, "save", broken)
    with pytest.raises(OSError, match="Input/output error"):
        save_checkpoint(tmp_path, 1, model=model, tokenizer=tok, state={"step": 1})
    assert shutil.disk_usage(tmp_path).free > 0
