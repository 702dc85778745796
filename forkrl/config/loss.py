"""The loss and algorithm sections of the run configuration (`forkrl.config.sections` holds the rest):
the policy loss, its clip ranges, KL and normalizer, the loss modes' own settings, and the advantage.
"""

from __future__ import annotations

from dataclasses import dataclass

from forkrl.config import fields as choices
from forkrl.config.fields import opt
from forkrl.core.loss_modes import LossMode

#: the loss modes' options take their defaults from the core's LossMode, under the same names
MODE = LossMode()

__all__ = ["AlgorithmConfig", "LossConfig"]


@dataclass
class LossConfig:
    # The bounds of forkrl.core.losses._check_options: 0 <= eps_low < 1 (1 - eps_low is the lower
    # clip of the ratio), eps_high >= 0, dual_clip > 1 (verl's clip_ratio_c bound).
    eps_low: float = opt(0.2, "lower clip range of the importance ratio (DAPO)", lo=0.0, lt=1.0)
    eps_high: float = opt(0.28, "upper clip range (DAPO clip-higher)", lo=0.0)
    dual_clip: float | None = opt(10.0, "dual-clip constant c for negative advantages; null = off", gt=1.0)
    log_ratio_clamp: float | None = opt(
        20.0,
        "clamp of log(pi/pi_old) before exp (verl's compute_policy_loss: 20); null = no clamp (TRL)",
        gt=0.0,
    )
    normalizer: str = opt(
        "all_tokens", "loss denominator (forkrl.core.losses.NORMALIZERS)", choices.normalizers
    )
    aggregate: str = opt(
        "batch",
        "batch: the normalizer counts tokens over the whole mini-batch on every rank, so micro-batch "
        "losses add up to it (the paper, TRL); micro_batch: each micro-batch on each rank is normalised "
        "by its own counts and weighted by its share of the mini-batch's rows, gradients averaged over "
        "ranks (verl and the official fork: agg_loss per micro-batch, loss / gradient_accumulation)",
        ("batch", "micro_batch"),
    )
    kl_coef: float = opt(
        0.0, "KL penalty coefficient against the initial model (0 = off, as in DAPO)", lo=0.0
    )
    kl_estimator: str = opt(
        "k3",
        "KL estimator (Schulman's k1/k2/k3; verl's clamped low_var_kl; forkrl.core.losses.KL_ESTIMATORS)",
        choices.kl_estimators,
    )
    kl_normalizer: str = opt(
        "policy",
        "how the KL term is aggregated: policy = coef*KL added to each token's loss before the policy "
        "normalizer (TRL); a normalizer name = its own aggregate, added to the loss (the official fork: "
        "coef * mean KL over all response tokens, all_tokens)",
        choices.kl_normalizers,
    )
    mode: str = opt(
        "clip",
        "policy-loss mode on the selected tokens (forkrl.core.loss_modes.POLICY_LOSSES): clip = DAPO's "
        "clipped surrogate; gspo = one clipped ratio per sequence (GSPO); cispo = clipped, detached "
        "importance weight on each token's log-prob (MiniMax-M1); clip_cov / kl_cov = Cui et al.'s "
        "covariance-based detach / KL penalty (verl's loss_mode); archer = a per-response entropy "
        "quantile gives high-entropy tokens a looser clip and weaker KL (Archer)",
        choices.loss_modes,
    )
    gspo_tokens: str = opt(
        MODE.gspo_tokens,
        "gspo: the tokens the sequence ratio averages; selected = the forking tokens, gradient only on "
        "them (verl's gspo on the official fork's mask); valid = every response token (TRL's "
        "importance_sampling_level=sequence with its entropy mask)",
        ("selected", "valid"),
    )
    gspo_log_ratio_max: float | None = opt(
        MODE.gspo_log_ratio_max,
        "gspo: upper clamp of the sequence log-ratio (verl: 10); null = none (TRL)",
        gt=0.0,
    )
    cispo_clip_low: bool = opt(
        MODE.cispo_clip_low,
        "cispo: clip the weight below at 1 - eps_low (verl); false = no lower bound (the MiniMax-M1 "
        "paper, TRL; TRL's epsilon_high is the bound itself, 1 + loss.eps_high here)",
    )
    cov_ratio: float = opt(
        MODE.cov_ratio,
        "clip_cov / kl_cov: share of the selected tokens detached / KL-penalised (verl's clip_cov_ratio, "
        "kl_cov_ratio: 2e-4)",
        gt=0.0,
        hi=1.0,
    )
    clip_cov_lb: float = opt(MODE.clip_cov_lb, "clip_cov: lower bound of the covariance band (verl: 1)")
    clip_cov_ub: float = opt(MODE.clip_cov_ub, "clip_cov: upper bound of the covariance band (verl: 5)")
    kl_cov_coef: float = opt(
        MODE.kl_cov_coef,
        "kl_cov: coefficient of |log r| on the top-covariance tokens (verl's ppo_kl_coef)",
        lo=0.0,
    )
    cov_across_ranks: bool = opt(
        MODE.cov_across_ranks,
        "clip_cov / kl_cov under torchrun: covariance means, top-k and random pick over every rank's "
        "micro-batch (equal to one process on the whole batch); false = per rank (verl)",
    )
    # Archer (forkrl.core.archer); defaults (LossMode's): ArcherCodeR's run_archer_qwen2.5_1.5b_code.sh
    archer_quantile: float = opt(
        MODE.archer_quantile,
        "archer: per-response entropy quantile; tokens above it are high-entropy (token_entropy_quantile)",
        lo=0.0,
        hi=1.0,
    )
    archer_tokens: str = opt(
        MODE.archer_tokens,
        "archer: the tokens each row's quantile is over; selected = the selected tokens (upstream on the "
        "official fork's folded mask); valid = every response token (upstream's response_mask)",
        ("selected", "valid"),
    )
    archer_low_eps_low: float = opt(
        MODE.archer_low_eps_low, "archer: lower clip range of low-entropy tokens", lo=0.0, lt=1.0
    )
    archer_low_eps_high: float = opt(
        MODE.archer_low_eps_high, "archer: upper clip range of low-entropy tokens", lo=0.0
    )
    archer_high_eps_low: float = opt(
        MODE.archer_high_eps_low, "archer: lower clip range of high-entropy tokens", lo=0.0, lt=1.0
    )
    archer_high_eps_high: float = opt(
        MODE.archer_high_eps_high, "archer: upper clip range of high-entropy tokens", lo=0.0
    )
    archer_kl_coef_low: float = opt(
        MODE.archer_kl_coef_low,
        "archer: KL coefficient of low-entropy tokens, in place of loss.kl_coef (upstream kl_loss_coef; "
        "estimator loss.kl_estimator, upstream low_var_kl); both 0 = no KL, no reference model",
        lo=0.0,
    )
    archer_kl_coef_high: float = opt(
        MODE.archer_kl_coef_high,
        "archer: KL coefficient of high-entropy tokens (upstream high_entropy_kl_loss_scale_coef)",
        lo=0.0,
    )


@dataclass
class AlgorithmConfig:
    advantage: str = opt(
        "grpo",
        "advantage estimator; gae = PPO with a value model (critic) trained alongside the policy "
        "(forkrl.core.advantages.ADVANTAGES and TOKEN_ADVANTAGES)",
        choices.advantages,
    )
    std_eps: float = opt(1e-6, "grpo: eps in (r - mean) / (std + eps) (verl: 1e-6; TRL: 1e-4)", lo=0.0)
    gamma: float = opt(
        1.0, "gae: discount over response tokens (1.0: the reward is the outcome)", lo=0.0, hi=1.0
    )
    lam: float = opt(
        1.0,
        "gae: lambda; 1.0 = Monte-Carlo return minus the critic's baseline (verl's RLVR default), "
        "< 1 leans on the critic's own bootstrapped values",
        lo=0.0,
        hi=1.0,
    )
    whiten_advantages: bool = opt(
        True, "gae: normalise advantages to mean 0, std 1 over the batch's valid tokens"
    )
    kl_in_reward: float = opt(
        0.0,
        "gae: beta of the per-token KL penalty in the reward, -beta*(logp_old - logp_ref) (0 = off)",
        lo=0.0,
    )
    value_clip: float | None = opt(
        0.2, "gae: clip of the value prediction around the scoring pass's value; null = off", gt=0.0
    )
    critic_lr: float = opt(1e-3, "gae: the critic's AdamW learning rate", lo=0.0)
    critic_warmup: int = opt(0, "gae: first RL steps that train only the critic (the policy waits)", lo=0)
    critic_path: str | None = opt(
        None,
        "gae: local folder to initialise the critic from (a causal LM or a saved critic); empty = the policy's",
    )
    critic_selection: bool = opt(
        False,
        "gae: train the critic only on the actor's selected tokens (ablation; default: every valid token)",
    )
    entropy_adv_alpha: float = opt(
        0.0,
        "entropy-shaped advantage (Cheng et al. 2025): A + min(alpha * H, |A| / kappa) on every token, H "
        "the scoring pass's entropy, detached; 0 = off (forkrl ablate's arms: 0.4, the paper's value as recalled, unchecked)",
        lo=0.0,
    )
    entropy_adv_kappa: float = opt(
        2.0,
        "entropy-shaped advantage: the term is at most |A| / kappa (2, the paper's value as recalled, unchecked; > 1 keeps A's sign)",
        gt=0.0,
    )
