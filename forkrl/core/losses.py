"""Clipped policy-gradient loss on the selected (forking) tokens, its normalizers and KL estimators.

The objective is the paper's (DESIGN.md), written as a loss to minimise:

    loss = 1/D · Σᵢ Σₜ 𝟙[selected]ᵢₜ · −min(rᵢₜ Âᵢₜ, clip(rᵢₜ, 1−ε_low, 1+ε_high) Âᵢₜ)

with ``rᵢₜ = exp(logp − old_logp)`` and the denominator ``D`` a named choice (``NORMALIZERS``). The
per-token term is the ``clip`` mode; ``mode=`` names another from ``POLICY_LOSSES`` (GSPO, CISPO,
Clip-Cov, KL-Cov, Archer: ``forkrl.core.loss_modes``), normalised the same way:

==================  ====================================================  ==========================
name                D                                                      matches
==================  ====================================================  ==========================
``all_tokens``      valid response tokens (``loss_mask``)                  the paper's 1/Σ|oᵢ|; TRL
                                                                           ``loss_type="dapo"``
``selected_tokens`` selected tokens (``sel_mask``)                         the official verl fork
                                                                           (mask folded into
                                                                           ``response_mask``, then
                                                                           ``token-mean``)
``seq_mean``        per sequence: its valid tokens; then mean over          verl
                    sequences                                              ``seq-mean-token-mean``,
                                                                           GRPO's 1/|oᵢ|
``constant``        sequences · ``max_len``                                Dr. GRPO (rows with a
                                                                           valid token)
``dr_grpo``         every row · ``max_len`` (a fully masked row counts)     TRL ``loss_type="dr_grpo"``
==================  ====================================================  ==========================

"Sequences" are rows with at least one valid token: a fully masked row (padding, or a truncated
response removed by overlong filtering) is not part of the batch it sits in. A zero denominator
gives loss 0 (with zero, finite gradients), never nan.

Micro-batches, gradient accumulation and data parallelism: by default each call counts its own
tokens. To make a sum of micro-batch losses equal the loss of the whole (mini- or global) batch,
pass that batch's totals as ``token_counts``::

    counts = sum((TokenCounts.from_masks(m.loss_mask, m.sel_mask) for m in micro_batches), TokenCounts.zero())
    # data parallel: t = counts.as_tensor(); dist.all_reduce(t); counts = TokenCounts.from_tensor(t)
    for m in micro_batches:
        loss, metrics = policy_loss(..., token_counts=counts)
        loss.backward()          # no 1/num_micro_batches scaling: the counts already are global
    # (under DDP, which averages gradients over W ranks, multiply the loss by W)

Metrics are local to the call (means over its own tokens; ``pg_loss`` and ``kl_loss`` are its
shares of the loss) and detached. No host sync inside except the input check that ``sel_mask``
is a subset of ``loss_mask``.

PPO's critic has its own loss, :func:`value_loss` (clipped squared error against the GAE returns),
aggregated by the same normalizers and ``TokenCounts``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from forkrl.core import archer, cov_losses  # noqa: F401  (register archer, clip_cov and kl_cov)
from forkrl.core.kl import KL_ESTIMATORS, KLPenalty, register_kl_estimator
from forkrl.core.loss_modes import POLICY_LOSSES, LossMode, ModeInputs, check_mode, register_policy_loss
from forkrl.core.normalizers import (
    _CONSTANT_NEEDS_MAX_LEN,
    NORMALIZERS,
    TokenCounts,
    _safe_div,
    register_normalizer,
)
from forkrl.core.value_loss import explained_variance, value_loss

__all__ = [
    "KL_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "NORMALIZERS",
    "KLPenalty",
    "LossMode",
    "POLICY_LOSSES",
    "TokenCounts",
    "explained_variance",
    "policy_loss",
    "register_kl_estimator",
    "register_normalizer",
    "register_policy_loss",
    "value_loss",
]

# verl clamps the log-ratio to [-20, 20] before exp (compute_policy_loss_vanilla): beyond it the
# ratio is already absurd and float32 exp would overflow to inf at ~88.
LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------- the loss


def _check_tensors(logp: Tensor, adv: Tensor, others: dict[str, Tensor | None]) -> None:
    """Shapes and dtypes of the tensor inputs; ``others`` maps names to (B, L) tensors or None."""
    if not isinstance(logp, Tensor) or logp.dim() != 2 or not logp.is_floating_point():
        raise ValueError(f"logp must be a floating (B, L) tensor, got {getattr(logp, 'shape', type(logp))}")
    shape = tuple(logp.shape)
    for name, t in others.items():
        if t is None:
            continue
        is_mask = name.endswith("mask")
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must have logp's shape {shape}, got {tuple(getattr(t, 'shape', ()))}")
        if is_mask and t.dtype != torch.bool:
            raise ValueError(
                f"{name} must be a bool tensor (True = counts), got {t.dtype}; pass {name}.bool()"
            )
        if not is_mask and not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if not isinstance(adv, Tensor) or not adv.is_floating_point():
        raise ValueError(
            f"adv must be a floating tensor of shape (B,) or (B, L), got {getattr(adv, 'dtype', adv)}"
        )
    if tuple(adv.shape) not in ((shape[0],), shape):
        raise ValueError(f"adv must have shape ({shape[0]},) or {shape}, got {tuple(adv.shape)}")
    if bool((others["sel_mask"] & ~others["loss_mask"]).any()):
        raise ValueError(
            "sel_mask selects tokens outside loss_mask; selection must return a subset of loss_mask"
        )


def _check_options(
    *,
    normalizer: str,
    max_len: int | None,
    token_counts: TokenCounts | None,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    kl: KLPenalty | None,
    log_ratio_clamp: float | None = LOG_RATIO_CLAMP,
) -> None:
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {normalizer!r}; known: {sorted(NORMALIZERS)}")
    if normalizer in ("constant", "dr_grpo") and max_len is None:
        raise ValueError(_CONSTANT_NEEDS_MAX_LEN)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if token_counts is not None and not isinstance(token_counts, TokenCounts):
        raise ValueError(f"token_counts must be a TokenCounts, got {type(token_counts).__name__}")
    if not 0.0 <= eps_low < 1.0 or eps_high < 0.0:
        raise ValueError(
            f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}"
        )
    if dual_clip is not None and not dual_clip > 1.0:
        # Same bound as verl (clip_ratio_c must exceed 1): c <= 1 would cut into the ordinary clip.
        raise ValueError(f"dual_clip must be > 1 (e.g. 3 or 10) or None, got {dual_clip}")
    if log_ratio_clamp is not None and not log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be > 0 (verl: 20) or None (TRL), got {log_ratio_clamp}")
    if kl is not None:
        if kl.estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {kl.estimator!r}; known: {sorted(KL_ESTIMATORS)}")
        if kl.scope not in ("all", "selected"):
            raise ValueError(f"KLPenalty.scope must be 'all' or 'selected', got {kl.scope!r}")
        if kl.normalizer is not None and kl.normalizer not in NORMALIZERS:
            raise ValueError(f"unknown KL normalizer {kl.normalizer!r}; known: {sorted(NORMALIZERS)} or None")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    loss_mask: Tensor,
    sel_mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
    normalizer: str = "all_tokens",
    max_len: int | None = None,
    kl: KLPenalty | None = None,
    entropy: Tensor | None = None,
    token_counts: TokenCounts | None = None,
    log_ratio_clamp: float | None = LOG_RATIO_CLAMP,
    mode: str | LossMode = "clip",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (DAPO clip-higher, optional dual clip) on ``sel_mask`` tokens.

    Args:
        logp: ``(B, L)`` log-probs of the sampled tokens under the current policy (carries grad).
        old_logp: ``(B, L)`` log-probs from the scoring pass (treated as constant).
        adv: ``(B,)`` per-sequence or ``(B, L)`` per-token advantages (treated as constant).
        loss_mask: ``(B, L)`` bool, True = valid response token.
        sel_mask: ``(B, L)`` bool subset of ``loss_mask``: tokens that carry the policy gradient.
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]`` (DAPO clip-higher).
        dual_clip: ``c > 1``; for ``A < 0`` the per-token loss is capped at ``-c·A`` (verl's
            ``clip_ratio_c``: ``where(A < 0, min(max(-rA, -clip(r)A), -cA), max(-rA, -clip(r)A))``).
        normalizer: a key of ``NORMALIZERS`` (module docstring).
        max_len: rollout token budget, required by ``constant``.
        kl: optional KL penalty against a reference policy.
        entropy: ``(B, L)`` token entropies, for the kept/dropped entropy metrics and the modes that
            split on them (``archer``).
        token_counts: denominators of the whole batch being normalised (module docstring); default:
            this call's own counts.
        log_ratio_clamp: ``log r`` is clamped to ``[-c, c]`` before ``exp`` (verl's
            ``compute_policy_loss``: 20, the default); None = no clamp (TRL).
        mode: a key of ``POLICY_LOSSES`` or a ``LossMode`` with its options (``forkrl.core.loss_modes``:
            ``clip``, the default, is the surrogate above; ``gspo``, ``cispo``, ``clip_cov``,
            ``kl_cov``, ``archer``); each acts on the ``sel_mask`` tokens and its terms go through the normalizer.

    Returns:
        ``(loss, metrics)``: a 0-dim loss and detached 0-dim float32 metrics: ``clip_frac_low``
        (``A < 0 and r < 1 - eps_low``) and ``clip_frac_high`` (``A > 0 and r > 1 + eps_high``),
        TRL's definitions, as fractions of selected tokens; ``dual_clip_frac`` (verl's
        ``pg_clipfrac_lower``: ``A < 0`` and the ``-c·A`` cap active) when ``dual_clip`` is set;
        ``approx_kl``: mean over selected tokens of ``(r - 1) - log r`` (k3 of KL(old‖new), cleanrl's
        ``approx_kl``; ≥ 0); ``kept_frac`` = selected / valid; ``entropy_kept`` / ``entropy_dropped``
        (mean over selected / valid-but-unselected tokens) when ``entropy`` is given; ``kl`` (mean
        estimator over the KL scope) and ``kl_loss`` when ``kl`` is given; ``pg_loss``;
        ``valid_tokens`` / ``selected_tokens`` (local counts, to weight metrics across calls);
        and the mode's own (``seq_clip_frac``, ``cispo_clip_frac``, ``cov_*``, ``archer_*``;
        ``forkrl.core.loss_modes``). For ``gspo`` the clip fractions test the sequence ratio ``s_i`` on
        each selected token; for ``archer`` each token's own clip range.
        A mean over no tokens is reported as 0.
    """
    mode = LossMode(name=mode) if isinstance(mode, str) else mode
    check_mode(mode)
    _check_options(
        normalizer=normalizer,
        max_len=max_len,
        token_counts=token_counts,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        kl=kl,
        log_ratio_clamp=log_ratio_clamp,
    )
    others = {"old_logp": old_logp, "loss_mask": loss_mask, "sel_mask": sel_mask, "entropy": entropy}
    _check_tensors(logp, adv, {**others, "kl.ref_logp": kl.ref_logp if kl is not None else None})

    logp = logp.float()
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    adv = adv.detach().float()
    adv = adv[:, None].expand_as(logp) if adv.dim() == 1 else adv  # (B, L)
    inputs = ModeInputs(
        logp,
        old_logp.detach().float(),
        torch.where(sel_mask, adv, zero),
        loss_mask,
        sel_mask,
        eps_low,
        eps_high,
        dual_clip,
        log_ratio_clamp,
        entropy.detach().float() if entropy is not None else None,
    )
    pg, parts, mode_metrics = POLICY_LOSSES[mode.name](inputs, mode)  # (B, L), zero outside sel_mask
    counts = token_counts if token_counts is not None else TokenCounts.from_masks(loss_mask, sel_mask)
    norm = NORMALIZERS[normalizer]
    kl_terms = _kl_terms(logp, kl, loss_mask, sel_mask) if kl is not None else None  # (B, L)
    kl_norm = norm if kl is None or kl.normalizer is None else NORMALIZERS[kl.normalizer]
    # coef · KL: KLPenalty.coef, or the mode's own per token (parts["kl_coef"], archer)
    tok_coef = parts.get("kl_coef") if kl_terms is not None else None  # (B, L) or None
    coef = 1.0 if tok_coef is not None else (kl.coef if kl is not None else 0.0)
    kl_weighted = kl_terms * tok_coef if tok_coef is not None else kl_terms  # (B, L)
    if kl_terms is None:
        loss = norm(pg, loss_mask, counts, max_len)
    elif kl.normalizer is None:  # per token, before the policy normalizer
        loss = norm(pg + coef * kl_weighted, loss_mask, counts, max_len)
    else:  # aggregated on its own
        loss = norm(pg, loss_mask, counts, max_len) + coef * kl_norm(kl_weighted, loss_mask, counts, max_len)

    with torch.no_grad():
        metrics = _metrics(parts, loss_mask, sel_mask, eps_low, eps_high, entropy)
        metrics.update(mode_metrics)
        metrics["pg_loss"] = norm(pg.detach(), loss_mask, counts, max_len)
        if kl_terms is not None:
            kl_mask = sel_mask if kl.scope == "selected" else loss_mask
            raw = kl_terms.detach()  # (B, L)
            metrics["kl"] = _safe_div(raw.sum(), kl_mask.sum().float())
            metrics["kl_loss"] = coef * kl_norm(kl_weighted.detach(), loss_mask, counts, max_len)
            for key, m in parts.items():  # a mode's per-class KL means (kl_mask/NAME)
                if key.startswith("kl_mask/"):
                    m = m & kl_mask
                    metrics[key.removeprefix("kl_mask/")] = _safe_div(
                        torch.where(m, raw, zero).sum(), m.sum().float()
                    )
    return loss, metrics


def _kl_terms(logp: Tensor, kl: KLPenalty, loss_mask: Tensor, sel_mask: Tensor) -> Tensor:
    """``estimator(logp, ref_logp)`` on the KL scope's tokens, 0 elsewhere: ``(B, L)``."""
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    mask = sel_mask if kl.scope == "selected" else loss_mask
    kl_logp = torch.where(mask, logp, zero)  # (B, L)
    kl_ref = torch.where(mask, kl.ref_logp.detach().float(), zero)  # (B, L)
    return torch.where(mask, KL_ESTIMATORS[kl.estimator](kl_logp, kl_ref), zero)  # (B, L)


def _metrics(
    parts: dict[str, Tensor],
    loss_mask: Tensor,
    sel: Tensor,
    eps_low: float,
    eps_high: float,
    entropy: Tensor | None,
) -> dict[str, Tensor]:
    """Detached 0-dim diagnostics of one call (listed under Returns in ``policy_loss``)."""
    zero = torch.zeros((), dtype=torch.float32, device=loss_mask.device)
    adv, ratio, log_ratio = parts["adv"], parts["ratio"], parts["log_ratio"]
    clip_ratio = parts.get("clip_ratio", ratio)  # gspo: the sequence ratio
    lo = parts.get("clip_lo", 1.0 - eps_low)  # archer: a (B, L) range
    hi = parts.get("clip_hi", 1.0 + eps_high)
    n_valid = loss_mask.sum().float()
    n_sel = sel.sum().float()

    def mean_over(mask: Tensor, x: Tensor) -> Tensor:
        return _safe_div(torch.where(mask, x.float(), zero).sum(), mask.sum().float())

    metrics = {
        "clip_frac_low": mean_over(sel, (adv < 0) & (clip_ratio < lo)),
        "clip_frac_high": mean_over(sel, (adv > 0) & (clip_ratio > hi)),
        "approx_kl": mean_over(sel, (ratio - 1.0) - log_ratio),
        "kept_frac": _safe_div(n_sel, n_valid),
        "valid_tokens": n_valid,
        "selected_tokens": n_sel,
    }
    if "dual_active" in parts:
        metrics["dual_clip_frac"] = mean_over(sel, parts["dual_active"])
    if entropy is not None:
        metrics["entropy_kept"] = mean_over(sel, entropy.detach())
        metrics["entropy_dropped"] = mean_over(loss_mask & ~sel, entropy.detach())
    return metrics
