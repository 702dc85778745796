"""Metrics sinks: Weights & Biases (train.wandb) logs every metrics row, offline here, and a resumed run
continues the same wandb run; a missing wandb package is a clear error."""

import glob
import json
import struct
import sys
import time

import pytest

from forkrl.errors import ConfigError
from forkrl.training.metrics import WANDB_ID, MetricsLog, read_metrics, wandb_project


def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # no capture of the test process's output
    (tmp_path / "wb").mkdir(exist_ok=True)


def _run_dir(tmp_path, wandb="proj", name="run"):
    run = tmp_path / name
    run.mkdir()
    (run / "config.yaml").write_text(f"train:\n  wandb: {wandb}\n  steps: 3\n")
    return run


def _records(path):
    """The protobuf records of a wandb transaction log (`run-ID.wandb`): a 7-byte header, then 32 KiB
    blocks of records with a 7-byte header (crc32, length, kind: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, hdr, pos, buf, out = 32768, 7, 7, b"", []
    while pos + hdr <= len(data):
        left = block - pos % block
        if left < hdr:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + hdr])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + hdr + length > len(data):  # still being written
            break
        payload = data[pos + hdr : pos + hdr + length]
        pos += hdr + length
        buf = payload if kind in (1, 2) else buf + payload
        if kind in (1, 4):
            r = wandb_internal_pb2.Record()
            r.ParseFromString(buf)
            out.append(r)
            buf = b""
    return out


def _offline_runs(tmp_path, run_id):
    """[(run record, [history rows])] of each offline wandb run with id `run_id`, oldest first."""
    out = []
    for path in sorted(glob.glob(str(tmp_path / "wb" / "wandb" / f"offline-run-*-{run_id}" / "*.wandb"))):
        run, rows = None, []
        records, deadline = _records(path), time.monotonic() + 60
        # wandb's service process writes the log on its own: wait for the run's exit record
        while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
            time.sleep(0.2)
            records = _records(path)
        for r in records:
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run = r.run
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                rows.append({k: v for k, v in row.items() if not k.startswith("_") or k == "_step"})
        out.append((run, rows))
    return out


def test_wandb_project_values():
    assert wandb_project(None) is None and wandb_project("False") is None
    assert wandb_project("True") == "forkrl" and wandb_project("team-x") == "team-x"


def test_wandb_offline_run_holds_every_logged_row(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    _offline(monkeypatch, tmp_path)
    run = _run_dir(tmp_path)
    log = MetricsLog(run, tensorboard=False)
    log.log(0, {"eval_accuracy": 0.5})
    log.log(1, {"loss": 0.25, "lr": 1e-3, "tokens": 3, "tau": float("nan"), "eval_accuracy": None})
    log.close()
    run_id = (run / WANDB_ID).read_text().strip()
    [(rec, rows)] = _offline_runs(tmp_path, run_id)
    assert (rec.run_id, rec.display_name, rec.project) == (run_id, "run", "proj")
    config = {u.key: json.loads(u.value_json) for u in rec.config.update}
    assert config["train"] == {"wandb": "proj", "steps": 3}  # RUN_DIR/config.yaml
    assert rows == [
        {"_step": 0, "eval_accuracy": 0.5},
        {"_step": 1, "loss": 0.25, "lr": 1e-3, "tokens": 3},  # NaN and null are not logged
    ]
    assert [r["step"] for r in read_metrics(run)] == [0, 1]  # metrics.jsonl as before


def test_a_resumed_run_logs_to_the_same_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    _offline(monkeypatch, tmp_path)
    run = _run_dir(tmp_path)
    log = MetricsLog(run, tensorboard=False)
    log.log(0, {"eval_accuracy": 0.5})
    log.log(1, {"loss": 1.0})
    log.close()
    run_id = (run / WANDB_ID).read_text().strip()
    time.sleep(1.1)  # offline run folders are named by the second they start in
    log = MetricsLog(run, tensorboard=False)  # metrics.jsonl has rows: a resume
    log.log(2, {"loss": 2.0})
    log.close()
    assert (run / WANDB_ID).read_text().strip() == run_id
    runs = _offline_runs(tmp_path, run_id)
    assert len(runs) == 2 and all(r.run_id == run_id for r, _ in runs)
    assert runs[1][1][-1]["loss"] == 2.0


def test_a_fresh_run_in_a_folder_with_an_old_wandb_id_gets_a_new_one(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    _offline(monkeypatch, tmp_path)
    run = _run_dir(tmp_path)
    (run / WANDB_ID).write_text("oldrun12\n")  # left by an overwritten run; metrics.jsonl is gone
    MetricsLog(run, tensorboard=False).close()
    assert (run / WANDB_ID).read_text().strip() != "oldrun12"


def test_wandb_is_off_by_default(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  steps: 3\n")
    log = MetricsLog(run, tensorboard=False)
    log.log(0, {"eval_accuracy": 0.5})
    log.close()
    assert not (run / WANDB_ID).exists() and not (run / "wandb").exists()


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    run = _run_dir(tmp_path, wandb="true")
    with pytest.raises(
        ConfigError, match=r"train.wandb='forkrl' needs the wandb package: pip install 'forkrl\[wandb\]'"
    ):
        MetricsLog(run, tensorboard=False)
    assert not (run / "metrics.jsonl").exists()  # refused before anything is written


@pytest.mark.slow  # end to end, > 5 s
def test_training_logs_to_wandb_offline(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from forkrl.config import load_config
    from forkrl.training.trainer import train
    from tests.train.test_resume import _overrides, length_reward

    _offline(monkeypatch, tmp_path)
    out = tmp_path / "wandb-run"
    cfg = load_config(None, [*_overrides(tiny_model_dir, out, 2), "train.wandb=forkrl-test"])
    train(cfg, reward_fn=length_reward)
    run_id = (out / WANDB_ID).read_text().strip()
    [(rec, rows)] = _offline_runs(tmp_path, run_id)
    assert rec.project == "forkrl-test" and rec.display_name == "wandb-run"
    config = {u.key: json.loads(u.value_json) for u in rec.config.update}
    assert config["train"]["steps"] == 2 and config["model"]["path"] == str(tiny_model_dir)
    logged = read_metrics(out)
    assert [r["_step"] for r in rows] == [r["step"] for r in logged] == [0, 1, 2]
    for row, want in zip(rows, logged):
        numbers = {
            k: v for k, v in want.items() if k != "step" and isinstance(v, (int, float)) and v is not None
        }
        assert {k: v for k, v in row.items() if k != "_step"} == pytest.approx(numbers)
