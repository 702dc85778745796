"""The shipped `forkrl/configs/*.yaml`: each loads by path and by name, and keeps the paper's hyperparameters."""

from pathlib import Path

import pytest

from forkrl.config import ConfigError, load_config, shipped_configs

ALL_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "forkrl" / "configs").glob("*.yaml"))
CONFIGS = [p for p in ALL_CONFIGS if p.name.startswith("qwen3-")]  # the paper's recipe at GPU scale
DUMMY = ["model.path=/tmp/some-model", "data.path=/tmp/some-data.parquet"]


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"qwen3-math-1gpu.yaml", "qwen3-math-node.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_has_the_paper_values(path):
    placeholders = load_config(path)
    assert placeholders.model.path.startswith("/path/to/") and placeholders.data.path.startswith("/path/to/")
    cfg = load_config(path, DUMMY)
    assert (cfg.model.path, cfg.data.path) == ("/tmp/some-model", "/tmp/some-data.parquet")
    assert cfg.preset == "paper"
    assert (cfg.selection.rho, cfg.selection.rule, cfg.selection.scope) == (0.2, "top", "batch")
    loss, optim = cfg.loss, cfg.optim
    assert (loss.eps_low, loss.eps_high, loss.dual_clip, loss.kl_coef) == (0.2, 0.28, 10.0, 0.0)
    assert (cfg.rollout.group_size, cfg.rollout.temperature, cfg.rollout.top_p) == (16, 1.0, 1.0)
    assert cfg.sampling.dynamic and cfg.sampling.max_rounds == 10 and not cfg.sampling.overlong_filter
    assert (optim.lr, optim.weight_decay, optim.warmup_steps, optim.grad_clip) == (1e-6, 0.1, 10, 1.0)
    assert (optim.beta1, optim.beta2) == (0.9, 0.999)
    assert cfg.reward.fn == "forkrl.rewards.math:dapo_reward" and cfg.reward.overlong_factor == 1.0
    assert 0 < cfg.reward.overlong_buffer < cfg.rollout.max_new_tokens
    assert cfg.model.dtype == "float32"  # lr 1e-6 steps vanish in bf16 weights without a master copy


def test_node_config_keeps_the_paper_lengths():
    cfg = load_config(next(p for p in CONFIGS if p.name == "qwen3-math-node.yaml"), DUMMY)
    assert (cfg.rollout.max_new_tokens, cfg.reward.overlong_buffer) == (20480, 4096)


def test_shipped_configs_load_by_name_and_unknown_names_are_listed(tmp_path, monkeypatch):
    assert shipped_configs() == [p.stem for p in ALL_CONFIGS]
    for p in CONFIGS:
        assert load_config(p.stem, DUMMY) == load_config(p, DUMMY) == load_config(p.name, DUMMY)
    with pytest.raises(ConfigError, match="--config qwen3-nope: no such file.*qwen3-math-1gpu"):
        load_config("qwen3-nope")
    with pytest.raises(ConfigError, match="no such file"):  # a path that does not exist is not a name
        load_config(tmp_path / "qwen3-math-1gpu.yaml")
    own = tmp_path / "qwen3-math-1gpu.yaml"  # a file of the same name in the working folder wins
    own.write_text("selection:\n  rho: 0.1\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("qwen3-math-1gpu.yaml").selection.rho == 0.1


def test_smollm2_recipe_is_the_paper_method_on_the_real_model():
    cfg = load_config("smollm2")
    assert (cfg.model.path, cfg.model.chat_template, cfg.task.name, cfg.task.level) == (
        "smollm2-135m-instruct",
        True,
        "arith",
        "add1",
    )
    assert cfg.preset == "paper" and (cfg.selection.rho, cfg.selection.rule, cfg.selection.scope) == (
        0.2,
        "top",
        "batch",
    )
    assert (cfg.loss.eps_low, cfg.loss.eps_high, cfg.loss.kl_coef) == (0.2, 0.28, 0.0)
    assert cfg.optim.lr == 5e-6 and cfg.rollout.temperature == 0.7  # measured: see the file's comments
    assert cfg.data.path is None and cfg.train.out_dir == "runs/smollm2"
