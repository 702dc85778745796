"""Two RL steps end to end on a random tiny model: the update moves the parameters, and only
through the selected tokens' gradients."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from forkrl.config import load_config
from forkrl.training.metrics import read_metrics
from forkrl.training.trainer import train


def length_reward(prompts, completions, **_):
    # Varies within every group of a random model, so every group has a non-zero advantage.
    return [len(c) / 20.0 for c in completions]


def _run(tiny_model_dir, tmp_path, *overrides):
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"train.out_dir={tmp_path / 'run'}",
            "train.steps=2",
            "train.eval_n=4",
            "train.eval_every=0",
            "train.progress=false",
            "train.tensorboard=false",
            "rollout.prompts_per_step=3",
            "rollout.group_size=4",
            "rollout.max_new_tokens=12",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
            "sampling.dynamic=false",
            *overrides,
        ],
    )
    run_dir, summary = train(cfg, reward_fn=length_reward)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    return run_dir, model


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("selective_head", [True, False])
def test_two_steps_change_the_parameters(tiny_model_dir, tmp_path, selective_head):
    before = _params(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    run_dir, model = _run(tiny_model_dir, tmp_path, f"model.selective_head={selective_head}")
    after = _params(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "two RL steps with non-zero advantages left every parameter unchanged"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert 0.0 < r["kept_frac"] <= 0.21  # rho = 0.2 of the valid tokens (exact count)
        assert r["entropy_kept"] >= r["entropy_dropped"]  # rule=top keeps the high-entropy tokens
    assert (run_dir / "config.yaml").exists() and (run_dir / "summary.json").exists()


@pytest.mark.slow  # end to end, > 5 s
@pytest.mark.parametrize("preset", ["paper", "official", "trl"])
def test_rho_zero_changes_nothing(tiny_model_dir, tmp_path, preset):
    # No selected token -> no gradient -> AdamW (no weight decay) leaves every weight bit-identical.
    # count=exact: TRL's quantile rule keeps H >= max(H) at rho = 0, i.e. still the top token(s).
    before = _params(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    _, model = _run(tiny_model_dir, tmp_path, f"preset={preset}", "selection.rho=0", "selection.count=exact")
    after = _params(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow  # four whole training runs (about 5 s each); the plans' own tests are fast
@pytest.mark.parametrize(
    "scope,source",
    [("sequence", "old"), ("sequence", "current"), ("batch", "current"), ("micro_batch", "old")],
)
def test_every_scope_and_entropy_source_runs(tiny_model_dir, tmp_path, scope, source):
    run_dir, _ = _run(
        tiny_model_dir,
        tmp_path,
        f"selection.scope={scope}",
        f"selection.entropy_source={source}",
        "optim.micro_batch_size=5",
        "optim.mini_batches=2",
    )
    rows = read_metrics(run_dir)[1:]
    assert all(r["tau"] is not None and r["grad_norm"] is not None for r in rows)
    # k = ceil(rho * N) per selection set: about rho, more on short rows or small micro-batches.
    assert all(0.1 <= r["kept_frac"] <= 1.0 for r in rows)


@pytest.mark.slow  # end to end, > 5 s
def test_rollout_dumps_feed_analyze(tiny_model_dir, tmp_path):
    from forkrl.analysis.dump import read_dump

    run_dir, _ = _run(tiny_model_dir, tmp_path, "train.dump_every=1")
    dump = read_dump(run_dir / "rollouts")
    assert sorted({r["step"] for r in dump.rows}) == [1, 2]
    assert len(dump.rows) == 2 * 3 * 4  # steps x prompts x group size
    for step in (1, 2):  # the paper's batch-level top 20% of each step's tokens
        rows = [r for r in dump.rows if r["step"] == step]
        sel = np.concatenate([np.asarray(r["sel"], bool) for r in rows])
        ent = np.concatenate([np.asarray(r["entropy"]) for r in rows])
        assert abs(sel.mean() - 0.2) < 0.02 and ent[sel].min() >= ent[~sel].max() - 1e-6


def test_package_level_train_takes_a_list_of_overrides(tiny_model_dir, tmp_path):
    import forkrl

    run_dir, summary = forkrl.train(
        [
            f"model.path={tiny_model_dir}",
            f"train.out_dir={tmp_path / 'r'}",
            "train.steps=1",
            "train.eval_n=2",
            "train.progress=false",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "rollout.max_new_tokens=4",
            "sampling.dynamic=false",
            "reward.isolate=false",
        ],
        reward_fn=length_reward,
    )
    assert summary["steps"] == 1 and (run_dir / "final").is_dir()
    with pytest.raises(TypeError, match="config must be a Config"):
        forkrl.train("selection.rho=0.1")


@pytest.mark.slow  # end to end, > 5 s
def test_generation_runs_with_rollout_threads_and_training_with_train_threads(
    tiny_model_dir, tmp_path, monkeypatch
):
    import forkrl.training.step as step_mod

    seen = {"collect": [], "update": []}
    collect, update = step_mod.collect, step_mod.actor_update

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen[name].append(torch.get_num_threads())
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(step_mod, "collect", spy("collect", collect))
    monkeypatch.setattr(step_mod, "actor_update", spy("update", update))
    before = torch.get_num_threads()
    try:
        for setting, want in (("0", 1), ("3", 3)):  # auto: 1 for this tiny model; else as set
            seen["collect"].clear(), seen["update"].clear()
            _run(
                tiny_model_dir,
                tmp_path / setting,
                "train.steps=1",
                "train.threads=2",
                f"rollout.threads={setting}",
            )
            assert seen["collect"] == [want] and seen["update"] == [2]
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow  # end to end, > 5 s
def test_rollout_lean_decode_switches_the_decode_step(tiny_model_dir, tmp_path, monkeypatch):
    import forkrl.rollout.lean as lean

    made = []
    init = lean.LeanDecoder.__init__

    def counting(self, *args, **kwargs):
        made.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(lean.LeanDecoder, "__init__", counting)
    rewards = {}
    for on in (True, False):
        made.clear()
        run_dir, _ = _run(tiny_model_dir, tmp_path / str(on), "train.steps=1", f"rollout.lean_decode={on}")
        assert bool(made) is on  # rollouts and evaluation: lean step only when asked
        rewards[on] = [m["reward_mean"] for m in read_metrics(run_dir) if m["step"] >= 1]
    assert rewards[True] == rewards[False]  # the same samples either way
