"""loss.mode from the config to the update: every mode runs one update, logs its own metrics, and
gspo over valid tokens gets every valid token's log-prob from the selective head."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.config import ConfigError, describe, load_config
from forkrl.core.losses import POLICY_LOSSES
from forkrl.rollout.hf import generate
from forkrl.training.step import select_and_train
from forkrl.training.trainer import settings_from
from forkrl.training.update import group_advantages, score_rollout

OWN_METRIC = {
    "clip": "clip_frac_high",
    "gspo": "seq_clip_frac",
    "cispo": "cispo_clip_frac",
    "clip_cov": "cov_band_frac",
    "kl_cov": "cov_kth",
    "archer": "archer_high_entropy_frac",
}


def test_loss_mode_is_listed_and_checked():
    line = next(x for x in describe().splitlines() if "loss.mode =" in x)
    assert all(f"{name}" in line for name in POLICY_LOSSES)
    assert load_config(overrides=["loss.mode=gspo"]).loss.mode == "gspo"
    with pytest.raises(ConfigError, match="loss.mode='nope' is not allowed"):
        load_config(overrides=["loss.mode=nope"])
    with pytest.raises(ConfigError, match="loss.clip_cov_lb=5.0 must be below loss.clip_cov_ub=1.0"):
        load_config(overrides=["loss.clip_cov_lb=5", "loss.clip_cov_ub=1"])


def _one_update(tiny_model_dir, overrides):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ro = generate(base, tok, ["3+?=9 in 6,2:", "14+?=20 in 1,6,9:"], n=4, max_new_tokens=10, generator_seed=0)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    cfg = load_config(None, ["optim.micro_batch_size=3", "rollout.reuse_logprobs=false", *overrides])
    s = settings_from(cfg, max_len=10)
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    batch = score_rollout(model, None, ro, s, overlong_filter=False)
    adv = group_advantages(rewards, ro.group_size, s)
    torch.manual_seed(0)
    m = select_and_train(model, opt, sched, batch, adv, s, generator=torch.Generator().manual_seed(0))[0]
    return m, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", sorted(POLICY_LOSSES))
def test_every_mode_updates_and_logs_its_metrics(tiny_model_dir, mode):
    m, _ = _one_update(tiny_model_dir, [f"loss.mode={mode}", "loss.cov_ratio=0.2", "loss.clip_cov_lb=-100"])
    assert OWN_METRIC[mode] in m
    assert torch.isfinite(torch.tensor(m["loss"])) and torch.isfinite(torch.tensor(m["grad_norm"]))


def test_gspo_valid_tokens_same_with_the_selective_head(tiny_model_dir):
    runs = [
        _one_update(
            tiny_model_dir, ["loss.mode=gspo", "loss.gspo_tokens=valid", f"model.selective_head={on}"]
        )
        for on in (True, False)
    ]
    (m1, p1), (m0, p0) = runs
    assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-5, abs=1e-7)
    assert m1["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-4)
    for k in p1:
        torch.testing.assert_close(p1[k], p0[k], rtol=1e-4, atol=1e-6)
