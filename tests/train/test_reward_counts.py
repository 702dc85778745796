"""Per-step reward failure counts in metrics.jsonl include the pool's non-finite rewards (they were
logged as 0 while the pool counted them)."""

from forkrl.config import load_config
from forkrl.training.metrics import read_metrics
from forkrl.training.trainer import train


def test_nonfinite_rewards_from_worker_processes_are_counted_per_step(tiny_model_dir, tmp_path):
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"train.out_dir={tmp_path / 'run'}",
            "train.steps=1",
            "train.eval_n=4",
            "train.eval_every=0",
            "train.progress=false",
            "train.tensorboard=false",
            "rollout.prompts_per_step=3",
            "rollout.group_size=4",
            "rollout.max_new_tokens=12",
            "sampling.dynamic=false",
            "reward.isolate=true",
            "reward.workers=1",
            "reward.fn=tests.eval_rewards:nan_for_odd_lengths",
        ],
    )
    run_dir, _ = train(cfg)
    (step,) = [m for m in read_metrics(run_dir) if m["step"] >= 1]
    assert step["reward_nonfinite"] > 0
    assert step["reward_errors"] == step["reward_crashes"] == 0
