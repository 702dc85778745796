"""Config checks at load: settings that by themselves train nothing are warned of (issue 16, item 14); files
and values that cannot be used are refused by name (items 12, 19)."""

import pytest

from forkrl.config import ConfigError, load_config, warnings_for


def _warnings(*overrides):
    return warnings_for(load_config(None, list(overrides)))


@pytest.mark.parametrize("preset", ["paper", "official", "trl", "ppo"])
def test_the_presets_warn_of_nothing(preset):
    assert _warnings(f"preset={preset}") == []


@pytest.mark.parametrize("rule", ["top", "bottom", "random"])
def test_rho_zero_with_an_exact_count_selects_nothing(rule):
    (w,) = _warnings("selection.rho=0", f"selection.rule={rule}")
    assert w.startswith("selection.rho=0") and "k = ceil(0 * N) = 0" in w and "no token" in w
    assert _warnings("selection.rho=0", "selection.rule=all") == []  # all ignores rho
    assert _warnings("selection.rho=0", "selection.count=fork") == []  # the fork keeps at least 1


@pytest.mark.parametrize("adv", ["grpo", "dr_grpo", "rloo"])
def test_one_completion_per_group_gives_group_advantages_of_zero(adv):
    (w,) = _warnings("rollout.group_size=1", f"algorithm.advantage={adv}")
    assert (
        w.startswith(f"rollout.group_size=1 with algorithm.advantage={adv}") and "every advantage is 0" in w
    )
    assert _warnings("rollout.group_size=1", "algorithm.advantage=gae") == []  # the critic's baseline


def test_a_learning_rate_of_zero_and_a_critic_warmup_over_the_whole_run():
    (w,) = _warnings("optim.lr=0")
    assert w.startswith("optim.lr=0") and "never changes" in w
    (w,) = _warnings("preset=ppo", "train.steps=5", "algorithm.critic_warmup=5")
    assert w.startswith("algorithm.critic_warmup=5") and "train.steps=5" in w
    assert _warnings("preset=ppo", "train.steps=6", "algorithm.critic_warmup=5") == []
    assert _warnings("train.steps=5", "algorithm.critic_warmup=5") == []  # grpo: no critic


def test_several_at_once_and_what_is_still_refused():
    assert len(_warnings("selection.rho=0", "rollout.group_size=1", "optim.lr=0")) == 3
    with pytest.raises(ConfigError, match=r"rollout.top_p=0.0 is out of range \(0.0, 1.0\]"):
        load_config(None, ["rollout.top_p=0"])  # refused, not warned
    with pytest.raises(ConfigError, match="rollout.temperature=nan is not allowed"):
        load_config(None, ["rollout.temperature=nan"])  # issue 16, item 12


def test_pick_candidates_that_cannot_be_drawn_are_refused_at_load():
    with pytest.raises(ConfigError, match=r"^task.n_candidates=100 needs task.max_value > 100 \(got 30\)"):
        load_config(None, ["task.n_candidates=100"])
    load_config(None, ["task.n_candidates=5", "task.max_value=6"])


def test_yaml_that_is_not_plain_values_is_named(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("rollout:\n  temperature: [1\n")
    with pytest.raises(
        ConfigError,
        match=rf"^{broken}: not valid YAML \(.*line 3; while parsing a flow sequence that starts on line 2\)",
    ):
        load_config(broken)
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text('rollout: !!python/object/apply:os.system ["echo hi"]\n')
    with pytest.raises(
        ConfigError, match=rf"^{tagged}: line 1: the tag .*python/object/apply:os.system.* plain"
    ):
        load_config(tagged)
