"""Several weighted rewards (reward.fn=a,b reward.weights=...) and a sequence-classification reward model."""

import math

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForSequenceClassification

from forkrl.config import ConfigError, load_config
from forkrl.models.tiny import build_char_tokenizer
from forkrl.rewards import get_reward
from forkrl.rewards.combined import RewardModel, WeightedRewards
from forkrl.training.components import import_reward
from forkrl.training.metrics import read_metrics
from forkrl.training.trainer import train

from ..train.test_resume import _overrides


def parity(prompts, completions, **_):
    return [float(len(c) % 2) for c in completions]


def length(prompts, completions, **_):
    return [len(c) / 10 for c in completions]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    Qwen3ForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_weighted_rewards_sum_their_parts_and_record_each():
    fn = WeightedRewards([("parity", 1.0, parity), ("length", 0.5, length), ("parity", -2.0, parity)])
    assert fn.names == ["parity", "length", "parity_2"]
    out = fn(["p", "p"], ["ab", "abc"])
    assert out == [0.0 + 0.5 * 0.2 - 0.0, 1.0 + 0.5 * 0.3 - 2.0]
    assert fn.last_sums == [1.0, 0.5, 1.0]


def test_reward_weights_must_match_the_rewards():
    with pytest.raises(ConfigError, match="2 finite weights for 3 rewards"):
        import_reward("pick,math,dapo", "1,2")
    with pytest.raises(ConfigError, match="comma-separated numbers"):
        import_reward("pick,math", "1,x")
    assert import_reward("pick") is get_reward("pick")  # one reward, weight 1: itself


def test_a_reward_model_scores_the_first_label_batched_as_one_row_at_a_time(reward_model_dir):
    rm = RewardModel(reward_model_dir, batch_size=4)
    prompts, completions = ["1+2=", "7:", "12+?=40 in 28,3,9:"], ["3", "a much longer completion", "28"]
    batched = rm(prompts, completions)
    tok, model = rm.tokenizer, rm.model
    with torch.no_grad():
        one = [
            model(**tok([p + c], return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
            for p, c in zip(prompts, completions)
        ]
    assert batched == pytest.approx(one, abs=1e-5) and len(set(batched)) == 3  # padding does not leak in
    assert get_reward(f"model:{reward_model_dir}")(prompts, completions) == pytest.approx(batched, abs=1e-6)


@pytest.mark.slow  # end to end, > 5 s
def test_training_on_weighted_rewards_logs_each(tiny_model_dir, reward_model_dir, tmp_path):
    out = tmp_path / "run"
    spec = f"tests.rewards.test_combined:parity,model:{reward_model_dir}"
    cfg = load_config(
        None,
        [
            *_overrides(tiny_model_dir, out, 2),
            f"reward.fn={spec}",
            "reward.weights=1.0,0.5",
            "reward.overlong_buffer=0",
        ],
    )
    train(cfg)  # parity in a worker pool, the reward model in this process
    rows = [r for r in read_metrics(out) if r["step"] >= 1]
    assert len(rows) == 2
    for r in rows:
        assert math.isclose(r["reward_mean"], r["reward/parity"] + 0.5 * r["reward/model"], abs_tol=1e-5), r
        assert 0.0 <= r["reward/parity"] <= 1.0 and r["reward/model"] != 0.0
