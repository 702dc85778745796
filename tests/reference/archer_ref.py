"""Transcription of Archer's dual-token policy loss (ArcherCodeR), on plain tensors.

Source read: github.com/wizard-III/ArcherCodeR, commit 8a1785beff0749a5b5b7f3d8751cd19c1d0e570a (HEAD
of the stored snapshot, "fix setup.py")
  verl/workers/actor/dp_actor.py       update_policy: the entropy split (use_token_entropy_separate)
                                       and the two KL terms (low_entropy_kl_loss, high_entropy_kl_loss)
  verl/trainer/ppo/core_algos.py       compute_policy_loss (its use_token_entropy_separate branch),
                                       agg_loss, kl_penalty ("low_var_kl")
  verl/utils/torch_functional.py       masked_mean (verl's: sum(x * m) / (sum(m) + 1e-8))
  scripts/train/run_archer_qwen2.5_1.5b_code.sh   the settings (defaults below)

Line for line for one micro-batch, ``config`` replaced by its fields, ``loss_agg_mode="token-mean"``
(the script's), entropy coefficient 0 (the script's). Upstream's mask names are kept, and they are
swapped: ``high_entropy_mask`` holds the tokens *at or below* the row's quantile (the low-entropy ones,
which take the ``low_entropy_clip_ratio_*`` range and ``kl_loss_coef``), ``low_entropy_mask`` the
tokens above it. Metrics are returned as tensors (upstream calls .item()).
"""

from __future__ import annotations

import torch


def masked_mean(values, mask, axis=None):
    return (values * mask).sum(axis=axis) / (mask.sum(axis=axis) + 1e-8)


def agg_loss_token_mean(loss_mat, loss_mask):
    return masked_mean(loss_mat, loss_mask)


def kl_penalty_low_var_kl(logprob, ref_logprob):
    kl = ref_logprob - logprob
    kl = torch.clamp(kl, min=-20, max=20)
    ratio = torch.exp(kl)
    kld = (ratio - kl - 1).contiguous()
    return torch.clamp(kld, min=-10, max=10)


def entropy_masks(entropy, response_mask, token_entropy_quantile=0.8):
    """dp_actor.update_policy: (high_entropy_mask, low_entropy_mask), upstream's (swapped) names."""
    with torch.no_grad():
        masked_entropy = torch.where(
            response_mask.bool(), entropy.detach(), torch.nan
        )  # (bsz, response_length)
        q80 = torch.nanquantile(masked_entropy, q=token_entropy_quantile, dim=-1, keepdim=True)  # (bsz, 1)
        high_entropy_mask = (masked_entropy <= q80) & response_mask  # only low entropy token is True
        low_entropy_mask = (masked_entropy > q80) & response_mask  # only high entropy token is True
    return high_entropy_mask, low_entropy_mask


def compute_policy_loss(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    high_entropy_mask,
    low_entropy_clip_ratio_low=0.2,
    low_entropy_clip_ratio_high=0.2,
    high_entropy_clip_ratio_low=0.5,
    high_entropy_clip_ratio_high=0.5,
    clip_ratio_c=10.0,
):
    """core_algos.compute_policy_loss with use_token_entropy_separate=True, token-mean."""
    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)

    pg_losses1 = -advantages * ratio
    clip_ratio = torch.where(
        high_entropy_mask.bool(),
        torch.clamp(ratio, 1 - low_entropy_clip_ratio_low, 1 + low_entropy_clip_ratio_high),
        torch.clamp(ratio, 1 - high_entropy_clip_ratio_low, 1 + high_entropy_clip_ratio_high),
    )
    pg_losses2 = -advantages * clip_ratio
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)

    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask
    )

    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = agg_loss_token_mean(pg_losses, response_mask)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def archer_loss(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    entropy,
    ref_log_prob=None,
    token_entropy_quantile=0.8,
    kl_loss_coef=0.001,
    high_entropy_kl_loss_scale_coef=0.0,
    clip_ratio_c=10.0,
    **clip,
):
    """dp_actor.update_policy's policy_loss for one micro-batch (before / gradient_accumulation):
    (policy_loss, metrics). ``ref_log_prob=None``: use_kl_loss=False."""
    high_entropy_mask, low_entropy_mask = entropy_masks(entropy, response_mask, token_entropy_quantile)
    pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower = compute_policy_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        high_entropy_mask,
        clip_ratio_c=clip_ratio_c,
        **clip,
    )
    policy_loss = pg_loss
    metrics = {
        "pg_loss": pg_loss,
        "pg_clipfrac": pg_clipfrac,
        "ppo_kl": ppo_kl,
        "pg_clipfrac_lower": pg_clipfrac_lower,
    }
    if ref_log_prob is not None:
        kld = kl_penalty_low_var_kl(log_prob, ref_log_prob)
        low_entropy_kl_loss = agg_loss_token_mean(kld, high_entropy_mask)
        high_entropy_kl_loss = agg_loss_token_mean(kld, low_entropy_mask)
        policy_loss = (
            policy_loss
            + low_entropy_kl_loss * kl_loss_coef
            + high_entropy_kl_loss * high_entropy_kl_loss_scale_coef
        )
        metrics.update(low_entropy_kl_loss=low_entropy_kl_loss, high_entropy_kl_loss=high_entropy_kl_loss)
    return policy_loss, metrics
