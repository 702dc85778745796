"""Every key of metrics.jsonl is explained once: `forkrl.training.metrics.GLOSSARY`, docs/metrics.md and
`forkrl metrics`; a training that writes a key the glossary lacks fails here."""

from pathlib import Path

import pytest
import torch

from forkrl.cli import main
from forkrl.config import load_config
from forkrl.core.losses import POLICY_LOSSES, policy_loss
from forkrl.training.metrics import GLOSSARY, GLOSSARY_PATTERNS, describe_key, glossary_markdown, read_metrics
from forkrl.training.trainer import train
from tests.train.test_resume import _overrides, length_reward

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def _keys(run_dir) -> set[str]:
    return {k for row in read_metrics(run_dir) for k in row}


@pytest.mark.parametrize(
    "extra",
    [
        [],  # the paper's GRPO: rollout, reward, selection and update keys
        ["preset=ppo", "loss.kl_coef=0.05", "algorithm.kl_in_reward=0.1"],  # critic, KL, KL in reward
    ],
    ids=["grpo", "ppo-kl"],
)
def test_every_key_a_training_writes_is_in_the_glossary(tiny_model_dir, tmp_path, extra):
    # reward.isolate=true (the default): the reward pool's failure counts are written too
    cfg = load_config(
        None, [*_overrides(tiny_model_dir, tmp_path / "run", 2), "rollout.prompts_per_step=2", *extra]
    )
    train(cfg, reward_fn=length_reward)
    keys = _keys(tmp_path / "run")
    missing = sorted(k for k in keys if describe_key(k) is None)
    assert not missing, (
        f"metrics.jsonl keys without a glossary entry in forkrl/training/metrics.py: {missing}"
    )
    assert {"step", "eval_accuracy", "loss", "kept_frac", "reward_timeouts"} <= keys
    if extra:
        assert {"value_loss", "kl", "kl_loss", "kl_in_reward"} <= keys


def test_every_loss_modes_metrics_are_in_the_glossary():
    # each registered mode on 2 rows x 3 tokens, off-policy so that clips and penalties can bind
    g = torch.Generator().manual_seed(0)
    logp, old_logp = -torch.rand(2, 3, generator=g), -torch.rand(2, 3, generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    for name in POLICY_LOSSES:
        _, m = policy_loss(logp, old_logp, torch.tensor([1.0, -1.0]), mask, mask, mode=name, entropy=-logp)
        missing = sorted(k for k in m if describe_key(k) is None)
        assert not missing, (
            f"loss.mode={name} writes keys without a glossary entry (forkrl/training/metrics.py): {missing}"
        )


def test_docs_table_is_the_glossary():
    text = DOC.read_text()
    assert glossary_markdown() in text, "docs/metrics.md is stale: paste `forkrl metrics --markdown` into it"
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    shown = [r.split("`")[1] for r in rows]
    assert shown == [*GLOSSARY, *(key for _, key in GLOSSARY_PATTERNS)]  # each key once


def test_named_keys():
    assert describe_key("reward/math") == describe_key("reward/NAME") is not None
    assert describe_key("reward/") is None and describe_key("no_such_key") is None


def test_glossary_entries_are_complete():
    for key, (meaning, unit) in GLOSSARY.items():
        assert meaning.strip() and unit.strip(), key


def test_cli_prints_the_glossary_and_a_runs_last_row(tmp_path, capsys):
    assert main(["metrics"]) == 0
    out = capsys.readouterr().out
    assert all(k in out for k in GLOSSARY)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 0, "eval_accuracy": 0.25}\n{"step": 1, "loss": 0.5, "new_key": 1}\n'
    )
    assert main(["metrics", str(run)]) == 0
    out = capsys.readouterr().out
    assert (
        "step 1" in out and GLOSSARY["loss"][0] in out and "new_key" in out and "(not in the glossary)" in out
    )
    assert "last evaluation: step 0, eval_accuracy 0.25" in out
    assert main(["metrics", str(tmp_path / "nope")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
