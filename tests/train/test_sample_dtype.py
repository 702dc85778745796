"""rollout.dtype=bfloat16: the HF backend samples from a bfloat16 copy of the policy, refreshed after
every optimizer step; with one optimizer step per RL step the update's old log-probs are its own
(the ratio is exactly 1), with more the scoring pass gives them (docs/DESIGN.md, Precision)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import forkrl
from forkrl.config import ConfigError, load_config
from forkrl.rollout.cast import CastSampler
from forkrl.training.components import settings_from
from forkrl.training.metrics import read_metrics
from forkrl.training.step import sync_sampler
from forkrl.training.trainer import train


def _overrides(out, steps=2, *extra):
    return [
        f"train.out_dir={out}",
        f"train.steps={steps}",
        "train.progress=false",
        "train.tensorboard=false",
        "train.threads=1",
        "train.eval_n=8",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "reward.isolate=false",
        "rollout.dtype=bfloat16",
        *extra,
    ]


def test_the_copy_follows_the_policy_and_the_update_is_on_policy(tmp_path):
    with forkrl.Trainer(_overrides(tmp_path / "r")) as trainer:
        run = trainer.run
        sampler = run.rollout_backend
        assert isinstance(sampler, CastSampler) and run.settings.old_from_update
        assert run.settings.reuse_sampler_logprobs  # the copy's entropies select (batch scope)
        with sampler.weights() as copy:
            before = {k: v.clone() for k, v in copy.named_parameters()}
        assert all(p.numel() == 0 for p in sampler.model.parameters())  # held only while sampling
        m = trainer.step()
        # a ratio of exactly 1: nothing clipped, no KL between old and current
        assert m["clip_frac_low"] == m["clip_frac_high"] == m["approx_kl"] == 0 and m["selected_tokens"] > 0
        assert all(p.grad is None for p in run.model.parameters())  # freed for the next rollouts
        sync_sampler(run)  # as the next step's collect does
        policy = dict(run.model.named_parameters())
        moved = 0
        with sampler.weights() as copy:
            for name, p in copy.named_parameters():
                assert p.dtype == torch.bfloat16
                assert torch.equal(p, policy[name].detach().to(torch.bfloat16)), name
                moved += not torch.equal(p, before[name])
        assert moved > 0  # the step changed the policy, and the copy with it


def test_a_bf16_sampled_run_resumes_bit_exactly(tmp_path):
    every = "train.eval_every=1"  # the stopped run evaluates at its last step: so does the whole one
    full, _ = train(load_config(None, _overrides(tmp_path / "full", 3, every)))
    half = tmp_path / "half"
    train(load_config(None, _overrides(half, 2, every)))
    train(load_config(None, _overrides(half, 3, every)), resume=True)
    a, b = (load_file(d / "final" / "model.safetensors") for d in (full, half))
    assert all(torch.equal(a[k], b[k]) for k in a)
    untimed = [
        [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in read_metrics(d)]
        for d in (full, half)
    ]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 4


def test_old_log_probs_come_from_the_scoring_pass_with_several_optimizer_steps():
    cfg = load_config(None, ["rollout.dtype=bfloat16", "optim.mini_batches=2"])
    s = settings_from(cfg, max_len=8)
    assert not s.old_from_update and not s.reuse_sampler_logprobs
    s = settings_from(load_config(None, ["rollout.dtype=bfloat16"]), max_len=8)
    assert s.old_from_update and s.reuse_sampler_logprobs
    s = settings_from(load_config(None, []), max_len=8)
    assert not s.old_from_update and s.reuse_sampler_logprobs


@pytest.mark.parametrize(
    "extra", [["model.lora_rank=8"], ["rollout.backend=vllm"], ["algorithm.advantage=gae"]]
)
def test_where_a_copy_cannot_sample_is_refused(extra):
    with pytest.raises(ConfigError, match="rollout.dtype=bfloat16"):
        load_config(None, ["rollout.dtype=bfloat16", *extra])
