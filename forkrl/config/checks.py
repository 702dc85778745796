"""Checks of a whole configuration: bounds between fields (refused when the config is read) and
settings that by themselves mean the policy learns nothing (warnings)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from forkrl.errors import ConfigError

if TYPE_CHECKING:
    from forkrl.config import Config

__all__ = ["check_together", "warnings_for"]


def check_together(cfg: Config) -> None:
    """Bounds between two fields, as the core enforces them (overlong_penalty: 0 <= buffer <= max_len)."""
    budget, buffer = cfg.rollout.max_new_tokens, cfg.reward.overlong_buffer
    if budget > 0 and buffer > budget:
        raise ConfigError(
            f"reward.overlong_buffer={buffer} exceeds rollout.max_new_tokens={budget}: the buffer is the "
            "last part of the response budget (the paper: 4096 of 20480); lower it or raise the budget"
        )
    if cfg.model.lora_rank > 0 and cfg.train.parallel == "fsdp":
        raise ConfigError(
            "model.lora_rank > 0 with train.parallel=fsdp: LoRA adapters are not sharded yet; use "
            "train.parallel=ddp (the base weights are frozen and the adapters small)"
        )
    if cfg.rollout.dtype != "float32" and (
        cfg.model.lora_rank > 0
        or cfg.train.parallel == "fsdp"
        or cfg.rollout.backend != "hf"
        or cfg.algorithm.advantage == "gae"
    ):
        raise ConfigError(
            f"rollout.dtype={cfg.rollout.dtype} samples from a copy of the whole policy: the hf backend, "
            "without LoRA adapters (model.lora_rank=0), FSDP2 shards or a critic (algorithm.advantage=gae, "
            "whose KL-in-reward reads the sampler's log-probs); use rollout.dtype=float32 there"
        )
    task = cfg.task
    if task.max_value <= task.n_candidates:  # forkrl.tasks.pick.PickTask: distinct wrong candidates
        raise ConfigError(
            f"task.n_candidates={task.n_candidates} needs task.max_value > {task.n_candidates} (got "
            f"{task.max_value}): the candidates are distinct numbers in 1..max_value; raise task.max_value "
            "or lower task.n_candidates"
        )
    sel, loss = cfg.selection, cfg.loss
    if not loss.clip_cov_lb < loss.clip_cov_ub:
        raise ConfigError(
            f"loss.clip_cov_lb={loss.clip_cov_lb} must be below loss.clip_cov_ub={loss.clip_cov_ub}: they "
            "bound the covariance band of clip_cov (verl: 1 and 5)"
        )
    if loss.mode == "archer" and loss.kl_coef > 0:
        raise ConfigError(
            f"loss.kl_coef={loss.kl_coef} with loss.mode=archer: Archer's KL has a coefficient per entropy "
            "class; set loss.archer_kl_coef_low / loss.archer_kl_coef_high instead and loss.kl_coef=0"
        )
    in_forward = sel.entropy_source == "current" and sel.scope in ("micro_batch", "sequence")
    if (
        in_forward
        and loss.aggregate == "batch"
        and "selected_tokens" in (loss.normalizer, loss.kl_normalizer)
    ):
        raise ConfigError(
            f"loss.normalizer=selected_tokens with selection.scope={sel.scope} on current entropies needs "
            "loss.aggregate=micro_batch: the mini-batch's selected count is known only after its last "
            "training forward (set loss.aggregate=micro_batch, as the official preset does, or "
            "selection.entropy_source=old)"
        )


def warnings_for(cfg: Config) -> list[str]:
    """Settings that by themselves mean the policy learns nothing, or that nothing measures it, one message
    each (empty: none).

    Only what the configuration alone decides; a run can still learn nothing for reasons found while
    it runs (every reward equal, so dynamic sampling keeps no group). The estimators are asked, not
    listed: a group advantage is one that is 0 for every group of one completion.
    """
    import torch

    from forkrl.core.advantages import ADVANTAGES, compute_advantages

    out = []
    sel, a = cfg.selection, cfg.algorithm
    # `random` always counts exactly; `quantile` keeps the ties at the top, `fork` at least one token,
    # and `all` ignores rho (forkrl.core.selection).
    count = "exact" if sel.rule == "random" else sel.count
    if sel.rho == 0 and sel.rule in ("top", "bottom", "random") and count == "exact":
        out.append(
            f"selection.rho=0 with selection.count=exact keeps k = ceil(0 * N) = 0 tokens (rule "
            f"{sel.rule}): no token carries the policy gradient, so the policy never changes (raise "
            "selection.rho, e.g. 0.2)"
        )
    if cfg.rollout.group_size == 1 and a.advantage in ADVANTAGES:
        try:
            zero = not compute_advantages(a.advantage, torch.tensor([0.0, 1.0, 0.5]), 1).any()
        except Exception:  # a user's estimator that refuses groups of one says so itself at the first step
            zero = False
        if zero:
            out.append(
                f"rollout.group_size=1 with algorithm.advantage={a.advantage}: a group of one completion "
                "has nothing to compare with, so every advantage is 0 and the policy never changes "
                "(use rollout.group_size >= 2, e.g. 8, or algorithm.advantage=gae with a critic)"
            )
    if cfg.optim.lr == 0:
        out.append(
            "optim.lr=0: the policy never changes (give a positive learning rate, e.g. the default 2e-4)"
        )
    if cfg.data.path and not cfg.data.eval_path:
        out.append(
            "data.path without data.eval_path: no held-out evaluation runs, so the run reports no held-out "
            "accuracy (give data.eval_path=FILE, in any form data.path takes, to measure it)"
        )
    steps = cfg.train.steps
    if a.advantage not in ADVANTAGES and steps > 0 and a.critic_warmup >= steps:
        out.append(
            f"algorithm.critic_warmup={a.critic_warmup} with train.steps={steps}: every step only fits "
            "the critic, so the policy never changes (lower the warm-up or raise train.steps)"
        )
    return out
