"""Named option sets: the paper's equation, the official verl fork's code, and TRL's implementation.

Each preset is a plain dict of dotted config keys to values; the run configuration applies it and
then the user's own overrides. The sections and keys are fixed here for the config to consume:

    selection.{rho, rule, count, scope, entropy_source}
    loss.{eps_low, eps_high, dual_clip, normalizer, kl_coef, kl_estimator}
    sampling.{dynamic, max_rounds, overlong_filter}
    rollout.{temperature}
    algorithm.{advantage}   (the ``ppo`` preset also sets gamma, lam, whiten_advantages, value_clip,
                             critic_lr, rollout.{prompts_per_step, group_size} and optim.lr)

What was checked against source (the parity tests in tests/core/test_parity*.py and
tests/train/test_preset_parity.py compare forkrl with these on identical tensors, 1 and 2 ranks):

* Paper run script (``recipe/rlvr_with_high_entropy_tokens_only/run_only_top20_high_entropy_tokens_dapo_qwen3_14b.sh``
  in github.com/Shenzhi-Wang/Beyond-the-80-20-Rule-RLVR at 6f5dda6): ``adv_estimator=grpo``,
  ``clip_ratio_low=0.2``, ``clip_ratio_high=0.28``, ``clip_ratio_c=10.0``, KL off (``use_kl_loss=False``),
  ``max_response_length=20480``, overlong buffer ``4096`` with ``penalty_factor=1.0``,
  ``filter_groups.enable=True`` with ``max_num_gen_batches=10``, ``temperature=1.0``,
  ``loss_agg_mode=token-mean``, ``entropy_top_ratio=0.2``, ``use_dynamic_bsz=True``
  (``ppo_max_token_len_per_gpu=22528``), no overlong filtering.
* Official code (same commit; ``verl/trainer/ppo/core_algos.py`` ``get_global_entropy_top_mask``,
  ``compute_policy_loss_vanilla``, ``agg_loss``; ``verl/workers/actor/dp_actor.py`` ``update_policy``):
  ``k = max(1, int(ρ·N + 0.9999))`` by ``torch.topk`` over one micro-batch's valid tokens *on one rank*
  (no communication, despite the name), on the current forward's entropy; the mask enters only the
  policy term (``agg_loss(pg_losses, response_mask * entropy_top_mask, "token-mean")``: a mean over the
  selected tokens of the micro-batch); the KL loss is ``kl_coef · token-mean(kld)`` over *every*
  response token of the micro-batch; the log-ratio is clamped to ±20; each micro-batch's loss is
  scaled by ``1 / gradient_accumulation`` (or ``rows / ppo_mini_batch_size`` with dynamic batch
  sizes) and FSDP averages gradients over ranks (``loss.aggregate=micro_batch``). verl's ``k3`` and
  ``low_var_kl`` are one clamped function; GRPO's std eps is 1e-6. Tie order of ``torch.topk`` is
  unspecified, so which tied tokens the fork keeps cannot be reproduced (forkrl keeps the earlier).
* TRL 1.16 (``trl/trainer/grpo_trainer.py``): ``get_high_entropy_mask`` pads and gathers every
  process's valid entropies, then ``torch.quantile(gathered, 1 - top_entropy_quantile)`` and keeps
  ``H >= q`` (``selection.across_ranks=true``: the radix select gives the same threshold without the
  gather); no dual clip and no log-ratio clamp; ``loss_type="dapo"`` divides by
  ``num_items_in_batch`` (every process's completion tokens of the generation batch); ``beta ·
  per_token_kl`` (unclamped k3, ``k3_unclamped`` here) is added per token after the entropy mask;
  the group std uses ``+ 1e-4``; ``dr_grpo`` divides by every row (a fully masked one too) times
  ``max_completion_length`` (forkrl's ``dr_grpo`` normalizer; ``constant`` counts only rows with a
  valid token). ``docs/source/paper_index.md`` recommends ``mask_truncated_completions=True,
  loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, top_entropy_quantile=0.2`` and says
  dynamic sampling is not supported.

Overlong reward shaping is not part of any preset: ``reward.overlong_buffer`` is in tokens and
belongs with a response budget (the paper: 4096 of 20480), so it is set by the scale-specific
configs (``forkrl/configs/qwen3-math-*.yaml``, ``--config qwen3-math-1gpu``), not by the conventions a preset names.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "PRESET_DOCS", "get_preset"]

# DAPO pieces shared by the paper and its official code (the same run script).
_DAPO_VERL: dict[str, Any] = {
    "selection.rho": 0.2,
    "selection.rule": "top",
    "loss.eps_low": 0.2,
    "loss.eps_high": 0.28,
    "loss.dual_clip": 10.0,
    "loss.kl_coef": 0.0,
    "loss.kl_estimator": "low_var_kl",  # verl's default kl_loss_type; unused while kl_coef = 0
    "sampling.dynamic": True,
    "sampling.max_rounds": 10,
    "sampling.overlong_filter": False,
    "rollout.temperature": 1.0,
    "algorithm.advantage": "grpo",
    "algorithm.std_eps": 1e-6,  # verl's compute_grpo_outcome_advantage
    "selection.across_ranks": True,
    "loss.aggregate": "batch",
    "loss.log_ratio_clamp": 20.0,  # verl's compute_policy_loss_vanilla
    "loss.kl_normalizer": "policy",
    "optim.micro_batch_packing": "in_order",
}

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's equation: top-ρ entropy threshold over the whole rollout batch (every rank and
    # accumulation step), entropy from the scoring pass, exactly ⌈ρN⌉ tokens, and the DAPO
    # 1/Σ|oᵢ| normaliser over all valid response tokens.
    "paper": {
        **_DAPO_VERL,
        "selection.count": "exact",
        "selection.scope": "batch",
        "selection.entropy_source": "old",
        "loss.normalizer": "all_tokens",
        "loss.kl_estimator": "k3",  # the paper does not use KL; verl's k3 (= low_var_kl, clamped)
    },
    # What the official verl fork's code does: top-k (its k rule) per micro-batch and rank on the
    # entropy of the training forward, mean over the selected tokens of each micro-batch, loss /
    # gradient accumulation, gradients averaged over ranks; KL as a mean over all response tokens.
    "official": {
        **_DAPO_VERL,
        "selection.count": "fork",
        "selection.scope": "micro_batch",
        "selection.entropy_source": "current",
        "selection.across_ranks": False,
        "loss.normalizer": "selected_tokens",
        "loss.aggregate": "micro_batch",
        "loss.kl_normalizer": "all_tokens",
        "optim.micro_batch_packing": "balanced",  # with optim.micro_batch_tokens: verl's rearrange_micro_batches
    },
    # TRL GRPOConfig(top_entropy_quantile=0.2, loss_type="dapo") with the paper-index recipe: quantile
    # threshold on the current forward's entropy per micro-batch (over every rank's tokens), loss
    # divided by all completion tokens, no dual clip, no dynamic sampling, truncated completions
    # masked out of the loss.
    "trl": {
        "selection.rho": 0.2,
        "selection.rule": "top",
        "selection.count": "quantile",
        "selection.scope": "micro_batch",
        "selection.entropy_source": "current",
        "loss.eps_low": 0.2,
        "loss.eps_high": 0.28,
        "loss.dual_clip": None,
        "loss.normalizer": "all_tokens",
        "loss.log_ratio_clamp": None,
        "loss.kl_coef": 0.0,
        "loss.kl_estimator": "k3_unclamped",  # TRL's per_token_kl; unused while beta = 0
        "selection.across_ranks": True,
        "loss.aggregate": "batch",
        "loss.kl_normalizer": "policy",
        "optim.micro_batch_packing": "in_order",
        "sampling.dynamic": False,
        "sampling.max_rounds": 1,
        "sampling.overlong_filter": True,
        "rollout.temperature": 1.0,
        "algorithm.advantage": "grpo",
        "algorithm.std_eps": 1e-4,
    },
}

# PPO with a value model (algorithm.advantage=gae, forkrl.training.critic) on the paper's token conventions.
# GAE gives per-token advantages from the critic, so groups of same-prompt samples are not needed:
# dynamic sampling is off (an all-correct group still trains the critic, and its tokens get non-zero
# advantages wherever the critic is wrong) and the same 128 samples per step are spread over more
# prompts. gamma = lam = 1 (verl's defaults, and the usual RLVR choice): the advantage is the outcome
# minus the critic's value, unbiased however poor the young critic is; lam < 1 would let the fresh
# value head's errors bias the actor. The actor's lr is half the GRPO presets': without dynamic
# sampling a batch near full accuracy holds few failures, and Adam's full-size steps on that thin
# signal made the held-out accuracy fall back in the last steps on the built-in task (at 2e-4 seeds
# 0/1/2 ended at 0.906/0.958/0.960 greedy; at 1e-4 at 0.946/0.982/0.982, still rising).
PRESETS["ppo"] = {
    **PRESETS["paper"],
    "sampling.dynamic": False,
    "sampling.max_rounds": 1,
    "algorithm.advantage": "gae",
    "algorithm.gamma": 1.0,
    "algorithm.lam": 1.0,
    "algorithm.whiten_advantages": True,
    "algorithm.value_clip": 0.2,
    "algorithm.critic_lr": 1e-3,
    "optim.lr": 1e-4,
    "rollout.prompts_per_step": 32,
    "rollout.group_size": 4,
}

PRESET_DOCS: dict[str, str] = {
    "paper": "the paper's equation: batch-wide exact top-20% on scoring-pass entropy, all-token normalizer, DAPO",
    "official": "the official verl fork's code: per-rank, per-micro-batch top-k on current entropy, mean over selected tokens",
    "trl": "TRL top_entropy_quantile=0.2, loss_type='dapo': per-micro-batch quantile, all-token normalizer",
    "ppo": "PPO with a value model (GAE, gamma = lam = 1) on the paper's conventions; no dynamic sampling",
}


def get_preset(name: str) -> dict[str, Any]:
    """A fresh copy of preset ``name`` (mutating it leaves ``PRESETS`` unchanged)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return dict(PRESETS[name])
