"""LoRA adapters on the policy (model.lora_rank, forkrl.models.lora): only adapters train, the reference
is the base with adapters off, checkpoints hold adapters and resume bit-identically, final/ is merged."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from forkrl.config import ConfigError, load_config
from forkrl.models.lora import AdaptersOff, add_adapters, merged_state
from forkrl.rollout.hf import generate
from forkrl.training.checkpoint import list_checkpoints
from forkrl.training.metrics import read_metrics
from forkrl.training.trainer import settings_from, train
from forkrl.training.update import score

from ..train.test_resume import _overrides, _untimed, length_reward

pytest.importorskip("peft")
LORA = ["model.lora_rank=4", "model.lora_alpha=8", "optim.lr=5e-2"]


def _base(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_the_reference_is_the_base_with_adapters_off_and_merged_weights_are_the_policy(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = add_adapters(_base(tiny_model_dir), 4, 8.0, 0.0, "all-linear")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:  # PEFT starts B at 0 (policy == base); move it away
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ro = generate(policy, tok, ["1+?=3 in 2,5:", "7:"], n=3, max_new_tokens=8, generator_seed=0)
    s = settings_from(load_config(None, []), 8)
    base, lora = score(_base(tiny_model_dir).eval(), ro, s), score(policy.eval(), ro, s)
    off = score(AdaptersOff(policy), ro, s)
    m = ro.response_mask
    assert torch.equal(off[0][m], base[0][m]) and torch.equal(off[1][m], base[1][m])  # no second copy
    assert (lora[0][m] - base[0][m]).abs().max() > 1e-3  # the adapters do change the policy
    merged = _base(tiny_model_dir)
    merged.load_state_dict(merged_state(policy))
    assert torch.allclose(score(merged.eval(), ro, s)[0][m], lora[0][m], atol=1e-5)
    assert any("lora_B" in n for n, p in policy.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for n, p in policy.named_parameters() if "lora_" not in n)


@pytest.mark.slow  # end to end, > 5 s
def test_lora_training_changes_only_adapted_weights_and_resumes_bit_identically(tiny_model_dir, tmp_path):
    full, _ = train(
        load_config(None, [*_overrides(tiny_model_dir, tmp_path / "full", 4), *LORA]), length_reward
    )
    half = tmp_path / "half"
    train(load_config(None, [*_overrides(tiny_model_dir, half, 2), *LORA]), reward_fn=length_reward)
    ckpt = list_checkpoints(half)[-1]
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    train(
        load_config(None, [*_overrides(tiny_model_dir, half, 4), *LORA]), reward_fn=length_reward, resume=True
    )
    a = load_file(full / "final-adapter" / "adapter_model.safetensors")
    b = load_file(half / "final-adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _untimed(read_metrics(full)) == _untimed(read_metrics(half))
    # final/ is a plain checkpoint of the merged weights: adapted linears moved, nothing else did
    base = _base(tiny_model_dir).state_dict()
    final = load_file(full / "final" / "model.safetensors")
    assert {k for k in final} <= set(base) and not any("lora" in k for k in final)
    moved = {k for k in final if not torch.equal(final[k], base[k])}
    assert moved and all(k.endswith(("_proj.weight",)) for k in moved), sorted(moved)[:5]


@pytest.mark.slow  # end to end, one step per preset
@pytest.mark.parametrize("preset", ["paper", "official", "trl", "ppo"])
def test_every_preset_trains_with_lora(tiny_model_dir, tmp_path, preset):
    extra = ["loss.kl_coef=0.01"] if preset != "ppo" else []  # the reference: adapters off
    _, summary = train(
        load_config(
            None, [*_overrides(tiny_model_dir, tmp_path / preset, 1), *LORA, f"preset={preset}", *extra]
        ),
        reward_fn=length_reward,
    )
    rows = [r for r in read_metrics(tmp_path / preset) if r["step"] == 1]
    assert rows and torch.isfinite(torch.tensor(rows[0]["loss"])), rows


def test_lora_with_fsdp_is_refused_before_any_work(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.parallel=ddp"):
        load_config(None, [*_overrides(tiny_model_dir, tmp_path / "x", 1), *LORA, "train.parallel=fsdp"])
