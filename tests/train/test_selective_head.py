"""The update with the selective LM head equals the update with full logits (issue: selective head)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.config import load_config
from forkrl.rollout.hf import generate
from forkrl.training.step import select_and_train
from forkrl.training.trainer import settings_from
from forkrl.training.update import group_advantages, score_rollout


@pytest.mark.parametrize("preset", ["paper", "official", "trl"])
def test_selective_head_on_off_same_selection_and_loss(tiny_model_dir, preset):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ro = generate(base, tok, ["3+?=9 in 6,2:", "14+?=20 in 1,6,9:"], n=4, max_new_tokens=12, generator_seed=0)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    results = {}
    for on in (True, False):
        cfg = load_config(
            None,
            [
                f"preset={preset}",
                f"model.selective_head={on}",
                "optim.micro_batch_size=3",
                "rollout.reuse_logprobs=false",
            ],
        )
        s = settings_from(cfg, max_len=12)
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        batch = score_rollout(model, None, ro, s, overlong_filter=False)
        adv = group_advantages(rewards, ro.group_size, s)
        m = select_and_train(model, opt, sched, batch, adv, s, generator=torch.Generator().manual_seed(0))[0]
        results[on] = (batch, m, {k: v.detach().clone() for k, v in model.state_dict().items()})
    (b1, m1, p1), (b0, m0, p0) = results[True], results[False]
    torch.testing.assert_close(b1.old_logp, b0.old_logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b1.entropy, b0.entropy, rtol=1e-5, atol=1e-6)
    for key in ("loss", "kept_frac", "selected_tokens", "entropy_kept", "tau"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key
    assert m1["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-4)
    for k in p1:
        torch.testing.assert_close(p1[k], p0[k], rtol=1e-4, atol=1e-6)
