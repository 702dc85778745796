"""The config reads its choices from the core's registries and refuses, when it is read, every value
the core would refuse at the first update (exclusive bounds, NaN, inf), naming the key and the range."""

import re

import pytest

from forkrl.cli import main
from forkrl.config import Config, ConfigError, describe, load_config
from forkrl.core.advantages import ADVANTAGES, TOKEN_ADVANTAGES, register_advantage, register_token_advantage
from forkrl.core.losses import (
    KL_ESTIMATORS,
    NORMALIZERS,
    POLICY_LOSSES,
    register_kl_estimator,
    register_normalizer,
    register_policy_loss,
)
from forkrl.core.selection import COUNTS, RULES, register_rule


def _noop(*args, **kwargs):
    raise AssertionError("only the name is used here")


# (key, registry, its register function) for each registry-backed field.
REGISTRIES = {
    "rule": ("selection.rule", RULES, register_rule),
    "normalizer": ("loss.normalizer", NORMALIZERS, register_normalizer),
    "kl_estimator": ("loss.kl_estimator", KL_ESTIMATORS, register_kl_estimator),
    "policy_loss": ("loss.mode", POLICY_LOSSES, register_policy_loss),
    "advantage": ("algorithm.advantage", ADVANTAGES, register_advantage),
    "token_advantage": ("algorithm.advantage", TOKEN_ADVANTAGES, register_token_advantage),
}


@pytest.fixture
def registered(request):
    """Register `_noop` as `my_<registry>` in the parametrised registry; pop it afterwards."""
    key, registry, register = REGISTRIES[request.param]
    name = f"my_{request.param}"
    assert name not in registry
    register(name)(_noop)
    yield key, name
    registry.pop(name)


@pytest.mark.parametrize("registered", list(REGISTRIES), indirect=True)
def test_a_registered_name_is_selectable_and_listed(registered, capsys):
    key, name = registered
    section, fld = key.split(".")
    cfg = load_config(overrides=[f"{key}={name}"])
    assert getattr(getattr(cfg, section), fld) == name
    assert f"| {name}" in next(line for line in describe().splitlines() if f"{key} =" in line)
    assert main(["config", f"{key}={name}"]) == 0  # the command line, as `forkrl train` parses it
    assert f"{key} = {name!r}" in capsys.readouterr().out


@pytest.mark.parametrize("registered", ["normalizer"], indirect=True)
def test_a_registered_normalizer_also_aggregates_the_kl(registered):
    _, name = registered
    assert load_config(overrides=[f"loss.kl_normalizer={name}"]).loss.kl_normalizer == name
    assert f"| {name}]" in next(line for line in describe().splitlines() if "loss.kl_normalizer =" in line)


@pytest.mark.parametrize(
    "key,known",
    [
        ("selection.rule", RULES),
        ("selection.count", COUNTS),
        ("loss.normalizer", NORMALIZERS),
        ("loss.kl_estimator", KL_ESTIMATORS),
        ("loss.mode", POLICY_LOSSES),
        ("algorithm.advantage", {**ADVANTAGES, **TOKEN_ADVANTAGES}),
        ("loss.kl_normalizer", {"policy": None, **NORMALIZERS}),
    ],
)
def test_an_unknown_name_is_refused_with_the_known_ones(key, known):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"{key}=nope"])
    assert str(e.value) == f"{key}='nope' is not allowed; choose one of {', '.join(known)}"


def test_a_name_unregistered_again_is_refused():
    register_rule("my_gone")(_noop)
    assert load_config(overrides=["selection.rule=my_gone"]).selection.rule == "my_gone"
    RULES.pop("my_gone")
    with pytest.raises(ConfigError, match="selection.rule='my_gone' is not allowed"):
        load_config(overrides=["selection.rule=my_gone"])


@pytest.mark.parametrize(
    "override,message",
    [
        # exclusive lower bound: the core's dual_clip > 1 (verl's clip_ratio_c)
        ("loss.dual_clip=1.0", "loss.dual_clip=1.0 is out of range (1.0, inf)"),
        # inclusive lower, exclusive upper: 0 <= eps_low < 1
        ("loss.eps_low=1.5", "loss.eps_low=1.5 is out of range [0.0, 1.0)"),
        ("loss.eps_low=1.0", "loss.eps_low=1.0 is out of range [0.0, 1.0)"),
        ("loss.eps_low=-0.1", "loss.eps_low=-0.1 is out of range [0.0, 1.0)"),
        ("rollout.temperature=0", "rollout.temperature=0.0 is out of range (0.0, inf)"),
        ("algorithm.value_clip=0", "algorithm.value_clip=0.0 is out of range (0.0, inf)"),
        ("loss.log_ratio_clamp=0", "loss.log_ratio_clamp=0.0 is out of range (0.0, inf)"),
        ("optim.beta2=1.0", "optim.beta2=1.0 is out of range [0.0, 1.0)"),
        ("rollout.top_p=0", "rollout.top_p=0.0 is out of range (0.0, 1.0]"),
        ("algorithm.std_eps=-1e-6", "algorithm.std_eps=-1e-06 is out of range [0.0, inf)"),
        ("optim.micro_batch_tokens=-1", "optim.micro_batch_tokens=-1 is out of range [0, inf)"),
        ("selection.rho=1.5", "selection.rho=1.5 is out of range [0.0, 1.0]"),
        # NaN passes every comparison, so it has its own check; so does inf
        (
            "rollout.temperature=nan",
            "rollout.temperature=nan is not allowed; give a finite number in (0.0, inf)",
        ),
        ("loss.kl_coef=.inf", "loss.kl_coef=inf is not allowed; give a finite number in [0.0, inf)"),
        ("loss.eps_high=-.inf", "loss.eps_high=-inf is not allowed; give a finite number in [0.0, inf)"),
        ("loss.dual_clip=.nan", "loss.dual_clip=nan is not allowed; give a finite number in (1.0, inf)"),
        ("train.steps=.inf", "train.steps=inf: expected int"),
        ("loss.aggregate=rows", "loss.aggregate='rows' is not allowed; choose one of batch, micro_batch"),
    ],
)
def test_a_bound_of_the_core_is_checked_when_the_config_is_read(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert str(e.value).startswith(message), str(e.value)


def test_every_float_field_refuses_nan_and_inf():
    import dataclasses
    import typing

    cfg = Config()
    checked = 0
    for sec in dataclasses.fields(cfg):
        if not dataclasses.is_dataclass(getattr(cfg, sec.name)):
            continue
        for name, hint in typing.get_type_hints(type(getattr(cfg, sec.name))).items():
            if float not in (hint, *typing.get_args(hint)):
                continue
            for bad in (".nan", ".inf", "-.inf", "nan", "inf"):
                with pytest.raises(ConfigError, match=f"^{sec.name}.{name}=.* not allowed; give a finite"):
                    load_config(overrides=[f"{sec.name}.{name}={bad}"])
            checked += 1
    assert checked >= 20


def test_the_edges_inside_the_bounds_are_accepted():
    cfg = load_config(
        overrides=[
            "loss.dual_clip=1.0001",
            "loss.eps_low=0.999",
            "loss.eps_low=0",
            "rollout.temperature=1e-4",
        ]
    )
    assert (cfg.loss.dual_clip, cfg.loss.eps_low, cfg.rollout.temperature) == (1.0001, 0.0, 1e-4)
    cfg = load_config(overrides=["loss.dual_clip=null", "loss.log_ratio_clamp=null", "algorithm.std_eps=0"])
    assert cfg.loss.dual_clip is None and cfg.loss.log_ratio_clamp is None and cfg.algorithm.std_eps == 0.0


def test_the_new_fields_keep_todays_behaviour_and_are_documented():
    cfg = load_config()
    assert cfg.selection.across_ranks is True and cfg.loss.log_ratio_clamp == 20.0
    assert (cfg.loss.aggregate, cfg.loss.kl_normalizer) == ("batch", "policy")
    assert cfg.algorithm.std_eps == 1e-6 and cfg.optim.micro_batch_tokens == 0
    text = describe(cfg)
    for line in (
        "selection.across_ranks = True  # under torchrun",
        "loss.log_ratio_clamp = 20.0  # clamp of log(pi/pi_old)",
        "loss.aggregate = 'batch'  # batch: the normalizer counts",
        "loss.kl_normalizer = 'policy'  # how the KL term",
        "algorithm.std_eps = 1e-06  # grpo: eps",
        "optim.micro_batch_tokens = 0  # token budget",
    ):
        assert line in text, line
    cfg = load_config(
        overrides=[
            "selection.across_ranks=false",
            "loss.aggregate=micro_batch",
            "loss.kl_normalizer=all_tokens",
            "optim.micro_batch_tokens=8192",
        ]
    )
    assert not cfg.selection.across_ranks and cfg.loss.aggregate == "micro_batch"
    assert cfg.loss.kl_normalizer == "all_tokens" and cfg.optim.micro_batch_tokens == 8192


def test_an_error_from_a_yaml_file_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    at = re.escape(str(path))
    path.write_text("loss:\n  dual_clip: 1.0\n")
    with pytest.raises(ConfigError, match=rf"^{at}: loss.dual_clip=1.0 is out of range \(1.0, inf\)"):
        load_config(path)
    path.write_text("rollout:\n  temperature: .nan\n")
    with pytest.raises(ConfigError, match=rf"^{at}: rollout.temperature=nan is not allowed"):
        load_config(path)
    path.write_text("preset: verl\n")
    with pytest.raises(ConfigError, match=rf"^{at}: preset='verl' is not allowed"):
        load_config(path)
    path.write_text("selection: top\n")  # a section given a value
    with pytest.raises(
        ConfigError,
        match=rf"^{at}: selection: a section, so a mapping of its fields \(rho,",
    ):
        load_config(path)
    path.write_text("selection:\n  rho:\n    low: 0.1\n")  # a field given a mapping
    with pytest.raises(ConfigError, match=rf"^{at}: selection.rho takes one value, not a mapping"):
        load_config(path)
    path.write_text("selection:\nloss:\n  eps_low: 0.1\n")  # a section with nothing under it is empty
    assert load_config(path).loss.eps_low == 0.1


def test_overlong_buffer_must_fit_in_the_budget():
    # forkrl.core.sampling.overlong_penalty: 0 <= buffer <= max_len
    with pytest.raises(ConfigError, match="reward.overlong_buffer=600 exceeds rollout.max_new_tokens=512"):
        load_config(overrides=["rollout.max_new_tokens=512", "reward.overlong_buffer=600"])
    cfg = load_config(overrides=["rollout.max_new_tokens=512", "reward.overlong_buffer=512"])
    assert cfg.reward.overlong_buffer == 512
    # max_new_tokens=0 is the task's budget, unknown here: the trainer's overlong_penalty checks it
    assert load_config(overrides=["reward.overlong_buffer=600"]).reward.overlong_buffer == 600
