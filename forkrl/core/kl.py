"""KL estimators against a reference policy (``KL_ESTIMATORS``) and the ``KLPenalty`` the policy loss adds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KL_ESTIMATORS", "KLPenalty", "register_kl_estimator"]


# --------------------------------------------------------------------------- KL estimators
# Schulman, "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html). A name means what
# it means in verl's kl_penalty (core_algos.py; tests/core/test_parity_verl.py compares each), where
# k3 and low_var_kl are one clamped function; TRL's unclamped k3 is k3_unclamped. Each takes
# (logp, ref_logp), both (B, L), returns (B, L).

KLEstimatorFn = Callable[[Tensor, Tensor], Tensor]
KL_ESTIMATORS: dict[str, KLEstimatorFn] = {}


def register_kl_estimator(name: str) -> Callable[[KLEstimatorFn], KLEstimatorFn]:
    def decorator(fn: KLEstimatorFn) -> KLEstimatorFn:
        KL_ESTIMATORS[name] = fn
        return fn

    return decorator


@register_kl_estimator("k1")
@register_kl_estimator("kl")
def _kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp  # (B, L)


@register_kl_estimator("abs")
def _kl_abs(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return (logp - ref_logp).abs()  # (B, L)


@register_kl_estimator("k2")
@register_kl_estimator("mse")
def _kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return 0.5 * (logp - ref_logp).square()  # (B, L)


@register_kl_estimator("k3_unclamped")
def _kl_k3_unclamped(logp: Tensor, ref_logp: Tensor) -> Tensor:
    # exp(ref - logp) - (ref - logp) - 1: unbiased and >= 0; TRL's per_token_kl (GRPOTrainer._compute_loss).
    d = ref_logp - logp  # (B, L)
    return torch.exp(d) - d - 1


@register_kl_estimator("k3")
@register_kl_estimator("low_var_kl")
def _kl_low_var(logp: Tensor, ref_logp: Tensor) -> Tensor:
    # verl's kl_penalty "low_var_kl" / "k3" (one branch there): the log-ratio clamped to [-20, 20], the
    # result to [-10, 10]. TRL's unclamped k3 is "k3_unclamped".
    d = (ref_logp - logp).clamp(-20.0, 20.0)  # (B, L)
    return (torch.exp(d) - d - 1).clamp(-10.0, 10.0)  # (B, L)


@dataclass(frozen=True)
class KLPenalty:
    """``coef · estimator(logp, ref_logp)`` added to the per-token loss terms.

    ``scope="all"``: on every valid token (TRL adds ``beta · per_token_kl`` after its entropy mask;
    the official fork aggregates ``kld`` with the unmasked ``response_mask``); ``scope="selected"``:
    only on selected tokens.

    ``normalizer=None``: the KL terms join the policy terms before the policy loss's normalizer (TRL);
    a normalizer name: they are aggregated on their own with it and added, ``coef · D(kl)`` (the fork:
    ``policy_loss = pg_loss + kl_loss * kl_coef`` with ``kl_loss`` a token-mean over all response
    tokens, i.e. ``all_tokens``).
    """

    ref_logp: Tensor
    coef: float
    estimator: str = "k3"
    scope: str = "all"
    normalizer: str | None = None
