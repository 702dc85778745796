"""Archer (loss.mode=archer) and the entropy-shaped advantage (algorithm.entropy_adv_alpha) from the
config to a short `forkrl train` run: the keys are listed and checked, the metrics appear, the
weights move; and the shaping composes with every loss mode."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from forkrl.config import ConfigError, describe, load_config
from forkrl.core.losses import POLICY_LOSSES
from forkrl.training.components import kl_coef_of, settings_from
from forkrl.training.metrics import describe_key, read_metrics
from forkrl.training.trainer import train
from tests.train.test_loss_modes_wiring import _one_update
from tests.train.test_resume import _overrides, length_reward

KEYS = (
    "loss.archer_quantile = 0.8",
    "loss.archer_tokens = 'selected'",
    "loss.archer_low_eps_low = 0.2",
    "loss.archer_low_eps_high = 0.2",
    "loss.archer_high_eps_low = 0.5",
    "loss.archer_high_eps_high = 0.5",
    "loss.archer_kl_coef_low = 0.001",
    "loss.archer_kl_coef_high = 0.0",
    "algorithm.entropy_adv_alpha = 0.0",
    "algorithm.entropy_adv_kappa = 2.0",
)


def test_keys_are_listed_with_archers_defaults_and_checked():
    text = describe()
    for key in KEYS:
        assert key in text, key
    cfg = load_config(None, ["loss.mode=archer"])
    s = settings_from(cfg, max_len=10)
    low, high = (
        (s.loss.archer_low_eps_low, s.loss.archer_low_eps_high),
        (s.loss.archer_high_eps_low, s.loss.archer_high_eps_high),
    )
    assert (low, high, s.loss.archer_quantile) == ((0.2, 0.2), (0.5, 0.5), 0.8)
    assert kl_coef_of(cfg) == s.kl_coef == 0.001  # Archer's KL needs the reference model
    assert kl_coef_of(load_config(None, ["loss.mode=archer", "loss.archer_kl_coef_low=0"])) == 0.0
    assert kl_coef_of(load_config(None, [])) == 0.0
    with pytest.raises(ConfigError, match="loss.archer_kl_coef_low / loss.archer_kl_coef_high"):
        load_config(None, ["loss.mode=archer", "loss.kl_coef=0.01"])
    with pytest.raises(ConfigError, match="loss.archer_quantile"):
        load_config(None, ["loss.archer_quantile=1.5"])
    with pytest.raises(ConfigError, match="algorithm.entropy_adv_kappa"):
        load_config(None, ["algorithm.entropy_adv_kappa=0"])


@pytest.mark.parametrize("mode", sorted(POLICY_LOSSES))
def test_entropy_shaping_composes_with_every_mode(tiny_model_dir, mode):
    shaping = ["algorithm.entropy_adv_alpha=0.4", "selection.rule=top", "selection.rho=0.5"]
    m, _ = _one_update(tiny_model_dir, [f"loss.mode={mode}", "loss.cov_ratio=0.2", *shaping])
    assert m["entropy_adv_mean"] > 0 and 0 <= m["entropy_adv_capped_frac"] <= 1
    assert torch.isfinite(torch.tensor(m["loss"])) and torch.isfinite(torch.tensor(m["grad_norm"]))


def _run(tiny_model_dir, tmp_path, extra):
    out = tmp_path / "run"
    cfg = load_config(None, [*_overrides(tiny_model_dir, out, 2), "train.eval_every=0", *extra])
    train(cfg, reward_fn=length_reward)
    rows = [r for r in read_metrics(out) if "loss" in r]
    before = load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
    after = load_file(str(next((out / "final").glob("*.safetensors"))))
    moved = any(not torch.equal(before[k], after[k]) for k in before)
    return rows, moved


@pytest.mark.slow  # end to end, > 5 s
def test_archer_trains_end_to_end(tiny_model_dir, tmp_path):
    # selection.rule=all: Archer's own setting (every token, the quantile over each response)
    rows, moved = _run(
        tiny_model_dir,
        tmp_path,
        ["loss.mode=archer", "selection.rule=all", "loss.archer_kl_coef_high=0.0005"],
    )
    assert rows and moved
    for key in (
        "archer_clip_frac_high_entropy",
        "archer_clip_frac_low_entropy",
        "archer_high_entropy_frac",
        "archer_kl_high_entropy",
        "archer_kl_low_entropy",
        "kl_loss",
    ):
        assert all(key in r for r in rows), key
        assert describe_key(key) is not None, key
    assert all(0.05 < r["archer_high_entropy_frac"] < 0.5 for r in rows)  # about 1 - 0.8 of each row
    assert any(r["archer_kl_low_entropy"] > 0 for r in rows)  # the reference was loaded and used


@pytest.mark.slow  # end to end, > 5 s
def test_entropy_shaped_advantage_trains_end_to_end(tiny_model_dir, tmp_path):
    rows, moved = _run(tiny_model_dir, tmp_path, ["algorithm.entropy_adv_alpha=0.4"])
    assert rows and moved
    for key in ("entropy_adv_mean", "entropy_adv_capped_frac"):
        assert all(key in r for r in rows) and describe_key(key) is not None, key
    assert all(r["entropy_adv_mean"] > 0 for r in rows)
