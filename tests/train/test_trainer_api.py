"""`forkrl.Trainer`: objects in (a model, a dataset, weighted rewards, callbacks), a run stepped from
Python, and the same run as `forkrl train` gives (it is a thin wrapper over the Trainer)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import forkrl
from forkrl.config import ConfigError, load_config
from forkrl.errors import TrainingError
from forkrl.tasks.files import DataError
from forkrl.tasks.registry import get_task
from forkrl.training.metrics import read_metrics
from forkrl.training.trainer import train

REPO = Path(__file__).resolve().parents[2]
TIMING = ("time", "tokens_per_s", "wall")


def _rows(split: str, n: int) -> list[dict]:
    return [{"prompt": e.prompt, "answer": e.answer} for e in get_task("pick").examples(split, n)]


def correct(prompts, completions, answer, **_):
    found = [re.search(r"#(\d+)", c) for c in completions]
    return [float(m is not None and m.group(1) == a) for m, a in zip(found, answer)]


def brief(prompts, completions, **_):
    return [-min(len(c), 64) / 64 for c in completions]


def _overrides(out: Path, steps: int = 3) -> list[str]:
    return [
        f"train.out_dir={out}",
        f"train.steps={steps}",
        "train.progress=false",
        "train.tensorboard=false",
        "train.threads=1",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "reward.isolate=false",
    ]


def _metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_metrics(run_dir)]


def _tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forkrl.models.loading import resolve_model_path

    path = resolve_model_path(None)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_stepping_a_trainer_is_the_run_forkrl_train_gives(tmp_path):
    # Two .step() calls and .train() for the rest: the metrics and weights of one `forkrl.train` call.
    data = [f"data.path={tmp_path / 'train.jsonl'}", f"data.eval_path={tmp_path / 'test.jsonl'}"]
    for name, rows in (("train", _rows("train", 200)), ("test", _rows("test", 16))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    with forkrl.Trainer(
        _overrides(tmp_path / "stepped") + ["reward.fn=pick"],
        train_dataset=_rows("train", 200),  # in memory: the same rows as the files
        eval_dataset=_rows("test", 16),
        callbacks=[lambda step, m: seen.append((step, m["reward_mean"]))],
    ) as trainer:
        first = [trainer.step(), trainer.step()]
        assert trainer.global_step == 2 and [s for s, _ in seen] == [1, 2]
        summary = trainer.train()
        with pytest.raises(TrainingError, match="has ended"):
            trainer.step()
    assert [s for s, _ in seen] == [1, 2, 3] and seen[0][1] == first[0]["reward_mean"]
    logged = (trainer.run_dir / "train.log").read_text()
    assert [logged.count(f"step {i}/3 ") for i in (1, 2, 3)] == [1, 1, 1]  # stepped or trained: each logged
    run_dir, whole = train(load_config(None, _overrides(tmp_path / "whole") + ["reward.fn=pick", *data]))
    assert _metrics(trainer.run_dir) == _metrics(run_dir)
    assert summary["eval_accuracy_end"] == whole["eval_accuracy_end"]
    from safetensors.torch import load_file

    a, b = (load_file(d / "final" / "model.safetensors") for d in (trainer.run_dir, run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_object_two_weighted_rewards_and_a_resume(tmp_path):
    model, tok = _tiny()
    kw = dict(
        tokenizer=tok,
        train_dataset=_rows("train", 200),
        eval_dataset=_rows("test", 16),
        reward_funcs=[correct, brief],
        reward_weights=[1.0, 0.1],
    )
    every = ["train.eval_every=2"]  # step 2 is evaluated in every run below, as the last step of the first
    with forkrl.Trainer(_overrides(tmp_path / "r", steps=2) + every, model=model, **kw) as trainer:
        assert trainer.model is model  # trained in place
        m = trainer.step()
        assert {"reward/correct", "reward/brief"} <= set(m)
        # the combined reward: 1.0 x correct + 0.1 x brief, per row; the means add up the same way
        assert m["reward_mean"] == pytest.approx(m["reward/correct"] + 0.1 * m["reward/brief"], abs=1e-6)
        trainer.train()
        acc = trainer.evaluate()
        assert acc == json.loads((trainer.run_dir / "summary.json").read_text())["eval_accuracy_end"]
        saved = trainer.save(tmp_path / "export")
    assert (saved / "model.safetensors").is_file() and (saved / "tokenizer_config.json").is_file()
    cfg = (tmp_path / "r" / "config.yaml").read_text()
    assert "(object) list of 200 rows" in cfg and "(object) " in cfg.split("path:")[1]  # recorded as labels
    # Resume with a fresh copy of the initial model: the checkpoint's weights are loaded into it.
    again, _ = _tiny()
    with forkrl.Trainer(
        _overrides(tmp_path / "r", steps=3) + every, model=again, resume=True, **kw
    ) as trainer:
        trainer.train()
    straight, _ = _tiny()
    with forkrl.Trainer(_overrides(tmp_path / "s", steps=3) + every, model=straight, **kw) as trainer:
        trainer.train()
    assert _metrics(tmp_path / "r") == _metrics(tmp_path / "s")
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), straight.parameters()))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(tokenizer=object()), ConfigError, "tokenizer= goes with a model object"),
        (dict(reward_funcs=[correct], reward_weights=[1, 2]), ConfigError, "2 weights for 1 reward"),
        (dict(reward_weights=[1.0]), ConfigError, "reward_weights= needs reward_funcs="),
        (dict(reward_funcs=[3]), ConfigError, r"reward_funcs\[0\] is a int"),
        (dict(eval_dataset=[{"prompt": "1+1", "answer": "2"}]), ConfigError, "goes with train_dataset"),
        (dict(train_dataset={"train": []}), DataError, "a dataset must be a path"),
        (dict(train_dataset=[{"prompt": "1+1"}]), DataError, "the list of 1 rows: row 1: field 'answer'"),
    ],
)
def test_what_a_caller_passes_wrong_is_named_before_anything_loads(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        forkrl.Trainer(_overrides(tmp_path / "bad"), **kwargs)
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


@pytest.mark.slow  # a subprocess: 20 steps of the shipped model and its reward workers
def test_the_readme_trainer_script_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    [script] = [b for b in blocks if "forkrl.Trainer(" in b]
    (tmp_path / "trainer_api.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "trainer_api.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["1", "2"] and "'reward/correct'" in lines[0]
    start, end = (float(x) for x in lines[-1].removeprefix("held-out accuracy ").split(" -> "))
    assert end > start  # 20 steps teach the shipped model (0.625 -> 0.906 when written)
    rows = read_metrics(tmp_path / "runs" / "api")
    assert [r["step"] for r in rows] == list(range(21)) and "reward/brief" in rows[1]
    assert (tmp_path / "runs" / "api" / "final" / "model.safetensors").is_file()
