import inspect

import pytest

from forkrl.config.presets import PRESET_DOCS, PRESETS, get_preset
from forkrl.core.advantages import ADVANTAGES, TOKEN_ADVANTAGES
from forkrl.core.losses import KL_ESTIMATORS, NORMALIZERS, policy_loss

KEYS = {
    "selection.rho",
    "selection.rule",
    "selection.count",
    "selection.scope",
    "selection.entropy_source",
    "loss.eps_low",
    "loss.eps_high",
    "loss.dual_clip",
    "loss.normalizer",
    "loss.kl_coef",
    "loss.kl_estimator",
    "sampling.dynamic",
    "sampling.max_rounds",
    "sampling.overlong_filter",
    "rollout.temperature",
    "algorithm.advantage",
    # the conventions the parity comparison found (tests/core/test_parity_trl.py, tests/train/test_preset_parity.py)
    "selection.across_ranks",
    "loss.aggregate",
    "loss.log_ratio_clamp",
    "loss.kl_normalizer",
    "algorithm.std_eps",
    "optim.micro_batch_packing",
}
# ppo (PPO with a value model on the paper's conventions) also sets the critic and the batch shape.
PPO_KEYS = {
    "algorithm.gamma",
    "algorithm.lam",
    "algorithm.whiten_advantages",
    "algorithm.value_clip",
    "algorithm.critic_lr",
    "rollout.prompts_per_step",
    "rollout.group_size",
    "optim.lr",
}

# The conventions table of DESIGN.md, one row per preset.
TABLE = {
    "paper": {"scope": "batch", "entropy_source": "old", "count": "exact", "normalizer": "all_tokens"},
    "official": {
        "scope": "micro_batch",
        "entropy_source": "current",
        "count": "fork",
        "normalizer": "selected_tokens",
    },
    "trl": {
        "scope": "micro_batch",
        "entropy_source": "current",
        "count": "quantile",
        "normalizer": "all_tokens",
    },
}


def test_presets_with_docs():
    assert set(PRESETS) == {"paper", "official", "trl", "ppo"} == set(PRESET_DOCS)
    assert all(isinstance(doc, str) and doc for doc in PRESET_DOCS.values())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_sets_exactly_the_known_keys(name):
    assert set(PRESETS[name]) == (KEYS | PPO_KEYS if name == "ppo" else KEYS)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_presets_follow_the_design_table(name):
    preset, row = PRESETS[name], TABLE[name]
    assert preset["selection.scope"] == row["scope"]
    assert preset["selection.entropy_source"] == row["entropy_source"]
    assert preset["selection.count"] == row["count"]
    assert preset["loss.normalizer"] == row["normalizer"]
    assert preset["selection.rho"] == 0.2 and preset["selection.rule"] == "top"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_values_name_registered_functions(name):
    preset = PRESETS[name]
    assert preset["loss.normalizer"] in NORMALIZERS
    assert preset["loss.kl_estimator"] in KL_ESTIMATORS
    assert preset["algorithm.advantage"] in {**ADVANTAGES, **TOKEN_ADVANTAGES}
    assert preset["loss.dual_clip"] is None or preset["loss.dual_clip"] > 1
    assert preset["sampling.max_rounds"] >= 1
    # overlong shaping is scale-dependent (tokens of a budget): no preset sets it
    assert not any(k.startswith("reward.") for k in preset)


def test_dapo_values_verified_in_the_run_scripts():
    # clip 0.2 / 0.28, dual clip c = 10, no KL, dynamic sampling with 10 rounds, buffer 4096 with
    # factor 1.0, T = 1.0 (official run_only_top20_high_entropy_tokens_dapo_qwen3_14b.sh)
    for name in ("paper", "official"):
        p = PRESETS[name]
        assert (p["loss.eps_low"], p["loss.eps_high"], p["loss.dual_clip"]) == (0.2, 0.28, 10.0)
        assert p["loss.kl_coef"] == 0.0
        assert (p["sampling.dynamic"], p["sampling.max_rounds"], p["sampling.overlong_filter"]) == (
            True,
            10,
            False,
        )
        assert p["rollout.temperature"] == 1.0


def test_official_and_trl_rows_of_the_parity_comparison():
    official, trl = PRESETS["official"], PRESETS["trl"]
    # the fork: per rank, per micro-batch, each normalised alone; KL a mean over all response tokens
    assert official["selection.across_ranks"] is False and official["loss.aggregate"] == "micro_batch"
    assert official["loss.kl_normalizer"] == "all_tokens" and official["loss.log_ratio_clamp"] == 20.0
    assert official["loss.kl_estimator"] == "low_var_kl" and official["algorithm.std_eps"] == 1e-6
    # TRL: gathered across processes, one global denominator, no clamp, unclamped k3, std + 1e-4
    assert trl["selection.across_ranks"] is True and trl["loss.aggregate"] == "batch"
    assert trl["loss.log_ratio_clamp"] is None and trl["loss.kl_estimator"] == "k3_unclamped"
    assert trl["loss.kl_normalizer"] == "policy" and trl["algorithm.std_eps"] == 1e-4


def test_trl_preset_is_trls_recipe():
    # TRL paper index: mask_truncated_completions=True, no dynamic sampling, no dual clip, beta = 0
    p = PRESETS["trl"]
    assert p["sampling.overlong_filter"] is True and p["sampling.dynamic"] is False
    assert p["loss.dual_clip"] is None and p["loss.kl_coef"] == 0.0
    assert (p["loss.eps_low"], p["loss.eps_high"]) == (0.2, 0.28)


def test_policy_loss_defaults_are_the_paper_clip_range():
    params = inspect.signature(policy_loss).parameters
    paper = PRESETS["paper"]
    assert params["eps_low"].default == paper["loss.eps_low"]
    assert params["eps_high"].default == paper["loss.eps_high"]
    assert params["normalizer"].default == paper["loss.normalizer"]


def test_get_preset_returns_a_copy():
    p = get_preset("paper")
    p["loss.eps_high"] = 99.0
    assert PRESETS["paper"]["loss.eps_high"] == 0.28


def test_unknown_preset_lists_names():
    with pytest.raises(
        ValueError, match=r"unknown preset 'verl'; known: \['official', 'paper', 'ppo', 'trl'\]"
    ):
        get_preset("verl")
