"""PPO with a value model end to end on a random tiny model: both networks learn, the new metrics are
logged, every selection convention runs, and a resumed run restores the critic bit-identically."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from forkrl.config import load_config
from forkrl.config.presets import PRESETS
from forkrl.models.value import VALUE_HEAD_FILE, ValueModel
from forkrl.training.checkpoint import list_checkpoints, load_state
from forkrl.training.metrics import read_metrics
from forkrl.training.trainer import train

TIMING = ("time", "tokens_per_s", "wall")
NEW_KEYS = {
    "value_loss",
    "value_explained_var",
    "value_clip_frac",
    "value_grad_norm",
    "values_mean",
    "returns_mean",
    "returns_std",
    "returns_max",
    "returns_min",
    "adv_mean",
    "adv_std",
    "adv_max",
    "adv_min",
}


def length_reward(prompts, completions, **_):
    # Varies within a random model's samples, so the returns have variance for the critic to fit.
    return [len(c) / 12.0 for c in completions]


def _cfg(model_dir, out, steps, *overrides):
    return load_config(
        None,
        [
            "preset=ppo",
            f"model.path={model_dir}",
            f"train.out_dir={out}",
            f"train.steps={steps}",
            "train.eval_n=4",
            "train.eval_every=0",
            "train.progress=false",
            "train.tensorboard=false",
            "rollout.prompts_per_step=3",
            "rollout.group_size=2",
            "rollout.max_new_tokens=10",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
            "algorithm.critic_lr=1e-2",
            "reward.isolate=false",
            *overrides,
        ],
    )


def _state(path):
    return {k: v.clone() for k, v in load_file(path).items()}


def _changed(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_ppo_preset():
    p = PRESETS["ppo"]
    assert p["algorithm.advantage"] == "gae" and p["sampling.dynamic"] is False
    assert (p["algorithm.gamma"], p["algorithm.lam"]) == (1.0, 1.0)
    assert p["selection.rho"] == 0.2 and p["selection.scope"] == "batch"  # the paper's actor
    cfg = load_config(None, ["algorithm.advantage=gae"])  # PPO on any preset by one override
    assert cfg.algorithm.advantage == "gae" and cfg.preset == "paper"


def test_two_ppo_steps_train_actor_and_critic(tiny_model_dir, tmp_path):
    run_dir, _ = train(
        _cfg(tiny_model_dir, tmp_path / "run", 2, "train.save_every=1"), reward_fn=length_reward
    )
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])], "the actor did not move"

    # The critic's body starts as the policy's body; its head is fresh. Both must have trained.
    body0 = {k.removeprefix("model."): v for k, v in before.items() if k.startswith("model.")}
    critic = _state(run_dir / "final-critic" / "model.safetensors")
    assert _changed(body0, critic), "the critic's body did not move"
    step1, step2 = list_checkpoints(run_dir)
    assert (step1.name, step2.name) == ("step-000001", "step-000002")
    assert _changed(_state(step1 / "critic" / VALUE_HEAD_FILE), _state(step2 / "critic" / VALUE_HEAD_FILE))
    assert load_state(step2)["critic"]["steps"] == 2

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert NEW_KEYS <= r.keys(), NEW_KEYS - r.keys()
        assert r["value_loss"] > 0 and 0.0 <= r["value_clip_frac"] <= 1.0
        assert r["returns_min"] <= r["returns_mean"] <= r["returns_max"]
        assert 0.0 < r["kept_frac"] < 0.3  # the actor still trains on ceil(20%) of the tokens only


@pytest.mark.parametrize(
    "overrides",
    [
        ("preset=official",),  # micro_batch scope, current entropies, selected-token normalizer
        ("selection.scope=sequence", "selection.entropy_source=current", "loss.normalizer=seq_mean"),
        ("selection.count=quantile", "model.selective_head=false", "loss.normalizer=constant"),
        ("algorithm.critic_selection=true", "algorithm.lam=0.9", "algorithm.whiten_advantages=false"),
    ],
)
def test_every_selection_convention_runs(tiny_model_dir, tmp_path, overrides):
    cfg = _cfg(
        tiny_model_dir,
        tmp_path / "run",
        2,
        *overrides,
        "algorithm.advantage=gae",  # after a preset= override, which would reset it
        "sampling.dynamic=false",
        "optim.mini_batches=2",
        "optim.micro_batch_size=2",
    )
    run_dir, _ = train(cfg, reward_fn=length_reward)
    rows = read_metrics(run_dir)[1:]
    assert all(NEW_KEYS <= r.keys() for r in rows)
    assert all(r["grad_norm"] is not None and r["value_grad_norm"] is not None for r in rows)


@pytest.mark.slow  # end to end, > 5 s
def test_critic_selection_trains_the_critic_on_fewer_tokens(tiny_model_dir, tmp_path):
    # With one optimizer step from the same start, the first step's value loss differs only by mask.
    a, _ = train(_cfg(tiny_model_dir, tmp_path / "a", 1), reward_fn=length_reward)
    b, _ = train(
        _cfg(tiny_model_dir, tmp_path / "b", 1, "algorithm.critic_selection=true"), reward_fn=length_reward
    )
    ra, rb = read_metrics(a)[1], read_metrics(b)[1]
    assert ra["value_explained_var"] == rb["value_explained_var"]  # same rollout, same fresh critic
    assert ra["value_loss"] != rb["value_loss"]


def test_critic_warmup_holds_the_actor(tiny_model_dir, tmp_path):
    run_dir, _ = train(
        _cfg(tiny_model_dir, tmp_path / "run", 1, "algorithm.critic_warmup=1"), reward_fn=length_reward
    )
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    row = read_metrics(run_dir)[1]
    assert "value_loss" in row and "grad_norm" not in row


def test_kl_in_reward_loads_a_reference(tiny_model_dir, tmp_path):
    run_dir, _ = train(
        _cfg(tiny_model_dir, tmp_path / "run", 2, "algorithm.kl_in_reward=0.1"), reward_fn=length_reward
    )
    rows = read_metrics(run_dir)[1:]
    assert all("kl_in_reward" in r for r in rows)
    assert abs(rows[0]["kl_in_reward"]) < 1e-4  # step 1: the policy is still the reference


@pytest.mark.slow  # end to end, > 5 s
def test_resume_restores_the_critic(tiny_model_dir, tmp_path):
    extra = ("train.eval_every=2", "optim.mini_batches=2", "selection.rule=random")
    full, _ = train(_cfg(tiny_model_dir, tmp_path / "full", 4, *extra), reward_fn=length_reward)
    half = tmp_path / "half"
    train(_cfg(tiny_model_dir, half, 2, *extra), reward_fn=length_reward)
    assert (list_checkpoints(half)[-1] / "critic" / VALUE_HEAD_FILE).is_file()
    train(_cfg(tiny_model_dir, half, 4, *extra), reward_fn=length_reward, resume=True)
    for name in (
        "final/model.safetensors",
        "final-critic/model.safetensors",
        f"final-critic/{VALUE_HEAD_FILE}",
    ):
        assert not _changed(_state(full / name), _state(half / name)), name

    def untimed(rows):
        return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]

    assert untimed(read_metrics(full)) == untimed(read_metrics(half))


def test_value_model_save_load_and_alignment(tiny_model_dir, tmp_path):
    from forkrl.config import load_config as lc
    from forkrl.models.loading import load_model_and_tokenizer
    from forkrl.rollout.hf import generate
    from forkrl.training.critic import _values, build_critic
    from forkrl.training.forward import position_ids
    from forkrl.training.trainer import settings_from

    lm, tok = load_model_and_tokenizer(tiny_model_dir)
    vm = ValueModel.from_pretrained(tiny_model_dir)
    body = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
    assert not _changed(body, vm.model.state_dict())  # initialised from the policy checkpoint

    ro = generate(lm, tok, ["12+?=20 in 3,8:", "1+?=5 in 4,2:"], n=2, temperature=1.0, max_new_tokens=6)
    s = settings_from(lc(None, []), 6)
    with torch.no_grad():
        v = _values(vm, ro, slice(0, 4), s)  # (B, L): prompt run once per group
        full = vm(ro.input_ids, ro.attention_mask, position_ids=position_ids(ro.attention_mask))  # (B, T)
    P, L = ro.prompt_len, ro.response_ids.shape[1]
    assert v.shape == (4, L) and v.dtype == torch.float32
    assert torch.allclose(v, full[:, P - 1 : P - 1 + L], atol=1e-5)  # V(s_t): the state before token t

    vm.save_pretrained(tmp_path / "critic")
    cfg = lc(None, ["algorithm.advantage=gae", f"algorithm.critic_path={tmp_path / 'critic'}"])
    again = build_critic(cfg, policy_path=tiny_model_dir, device="cpu")
    with torch.no_grad():
        assert torch.equal(_values(again.model, ro, slice(0, 4), s), v)
    with pytest.raises(ValueError, match="algorithm.critic_path"):
        build_critic(
            lc(None, [f"algorithm.critic_path={tmp_path / 'nope'}"]), policy_path=tiny_model_dir, device="cpu"
        )
