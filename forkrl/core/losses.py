"""Clipped policy-gradient loss on the selected (forking) tokens, its normalizers and KL estimators.

The objective is the paper's (DESIGN.md), written as a loss to minimise:

    loss = 1/D · Σᵢ Σₜ 𝟙[selected]ᵢₜ · −min(rᵢₜ Âᵢₜ, clip(rᵢₜ, 1−ε_low, 1+ε_high) Âᵢₜ)

with ``rᵢₜ = exp(logp − old_logp)`` and the denominator ``D`` a named choice (``NORMALIZERS``):

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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "KL_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "NORMALIZERS",
    "KLPenalty",
    "TokenCounts",
    "explained_variance",
    "policy_loss",
    "register_kl_estimator",
    "register_normalizer",
    "value_loss",
]

# verl clamps the log-ratio to [-20, 20] before exp (compute_policy_loss_vanilla): beyond it the
# ratio is already absurd and float32 exp would overflow to inf at ~88.
LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class TokenCounts:
    """Denominators of the normalizers, counted over the batch the loss is normalised by.

    Fields are python floats or 0-dim tensors (an all-reduced tensor need not be synced to host).
    ``valid``: tokens in ``loss_mask``; ``selected``: tokens in ``sel_mask``; ``sequences``: rows
    with at least one valid token; ``rows``: every row, a fully masked one included (TRL's
    ``dr_grpo`` counts those; None = ``sequences``).
    """

    valid: float | Tensor
    selected: float | Tensor
    sequences: float | Tensor
    rows: float | Tensor | None = None

    @classmethod
    def from_masks(cls, loss_mask: Tensor, sel_mask: Tensor) -> TokenCounts:
        """This batch's own counts, as float32 0-dim tensors."""
        return cls(
            valid=loss_mask.sum().float(),
            selected=(sel_mask & loss_mask).sum().float(),
            sequences=loss_mask.any(dim=-1).sum().float(),
            rows=torch.tensor(float(loss_mask.shape[0]), device=loss_mask.device),
        )

    @classmethod
    def zero(cls) -> TokenCounts:
        return cls(0.0, 0.0, 0.0, 0.0)

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(*(a + b for a, b in zip(self._values(), other._values())))

    def as_tensor(self, device: torch.device | str | None = None) -> Tensor:
        """``[valid, selected, sequences, rows]`` float32, ready for ``dist.all_reduce``."""
        return torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in self._values()])

    @classmethod
    def from_tensor(cls, t: Tensor) -> TokenCounts:
        return cls(t[0], t[1], t[2], t[3] if t.numel() > 3 else None)

    def _values(self) -> tuple:
        rows = self.sequences if self.rows is None else self.rows
        return (self.valid, self.selected, self.sequences, rows)


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


# --------------------------------------------------------------------------- normalizers
# fn(terms (B, L) already zero outside the loss, loss_mask (B, L), counts, max_len) -> 0-dim loss.

NormalizerFn = Callable[[Tensor, Tensor, TokenCounts, int | None], Tensor]
NORMALIZERS: dict[str, NormalizerFn] = {}


def register_normalizer(name: str) -> Callable[[NormalizerFn], NormalizerFn]:
    def decorator(fn: NormalizerFn) -> NormalizerFn:
        NORMALIZERS[name] = fn
        return fn

    return decorator


_CONSTANT_NEEDS_MAX_LEN = (
    'normalizer "constant" (Dr. GRPO: sequences · max_len) needs max_len, the token budget'
)


def _safe_div(num: Tensor, denom: float | Tensor) -> Tensor:
    """``num / denom``, and 0 where ``denom <= 0``, with finite gradients either way."""
    denom = torch.as_tensor(denom, dtype=num.dtype, device=num.device)
    positive = denom > 0
    return torch.where(
        positive, num / torch.where(positive, denom, torch.ones_like(denom)), torch.zeros_like(num)
    )


@register_normalizer("all_tokens")
def _norm_all_tokens(terms: Tensor, loss_mask: Tensor, counts: TokenCounts, max_len: int | None) -> Tensor:
    return _safe_div(terms.sum(), counts.valid)


@register_normalizer("selected_tokens")
def _norm_selected_tokens(
    terms: Tensor, loss_mask: Tensor, counts: TokenCounts, max_len: int | None
) -> Tensor:
    return _safe_div(terms.sum(), counts.selected)


@register_normalizer("seq_mean")
def _norm_seq_mean(terms: Tensor, loss_mask: Tensor, counts: TokenCounts, max_len: int | None) -> Tensor:
    # A sequence's length is always its own (local) valid-token count; only the number of
    # sequences comes from `counts`, so micro-batch losses still add up to the batch loss.
    per_seq = _safe_div(terms.sum(dim=-1), loss_mask.sum(dim=-1))  # (B,)
    return _safe_div(per_seq.sum(), counts.sequences)


@register_normalizer("constant")
def _norm_constant(terms: Tensor, loss_mask: Tensor, counts: TokenCounts, max_len: int | None) -> Tensor:
    if max_len is None:
        raise ValueError(_CONSTANT_NEEDS_MAX_LEN)
    sequences = torch.as_tensor(counts.sequences, dtype=terms.dtype, device=terms.device)
    return _safe_div(terms.sum(), sequences * max_len)


@register_normalizer("dr_grpo")
def _norm_dr_grpo(terms: Tensor, loss_mask: Tensor, counts: TokenCounts, max_len: int | None) -> Tensor:
    # TRL's loss_type="dr_grpo": sum / (per_token_loss.size(0) * max_completion_length), every row
    # counted, also one whose tokens are all masked (``constant`` counts only rows with a valid token).
    if max_len is None:
        raise ValueError(_CONSTANT_NEEDS_MAX_LEN)
    rows = counts._values()[3]
    return _safe_div(terms.sum(), torch.as_tensor(rows, dtype=terms.dtype, device=terms.device) * max_len)


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
        entropy: ``(B, L)`` token entropies, only for the kept/dropped entropy metrics.
        token_counts: denominators of the whole batch being normalised (module docstring); default:
            this call's own counts.
        log_ratio_clamp: ``log r`` is clamped to ``[-c, c]`` before ``exp`` (verl's
            ``compute_policy_loss``: 20, the default); None = no clamp (TRL).

    Returns:
        ``(loss, metrics)``: a 0-dim loss and detached 0-dim float32 metrics: ``clip_frac_low``
        (``A < 0 and r < 1 - eps_low``) and ``clip_frac_high`` (``A > 0 and r > 1 + eps_high``),
        TRL's definitions, as fractions of selected tokens; ``dual_clip_frac`` (verl's
        ``pg_clipfrac_lower``: ``A < 0`` and the ``-c·A`` cap active) when ``dual_clip`` is set;
        ``approx_kl``: mean over selected tokens of ``(r - 1) - log r`` (k3 of KL(old‖new), cleanrl's
        ``approx_kl``; ≥ 0); ``kept_frac`` = selected / valid; ``entropy_kept`` / ``entropy_dropped``
        (mean over selected / valid-but-unselected tokens) when ``entropy`` is given; ``kl`` (mean
        estimator over the KL scope) and ``kl_loss`` when ``kl`` is given; ``pg_loss``;
        ``valid_tokens`` / ``selected_tokens`` (local counts, to weight metrics across calls).
        A mean over no tokens is reported as 0.
    """
    _check_options(
        normalizer=normalizer, max_len=max_len, token_counts=token_counts,
        eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, kl=kl, log_ratio_clamp=log_ratio_clamp,
    )  # fmt: skip
    others = {"old_logp": old_logp, "loss_mask": loss_mask, "sel_mask": sel_mask, "entropy": entropy}
    _check_tensors(logp, adv, {**others, "kl.ref_logp": kl.ref_logp if kl is not None else None})

    logp = logp.float()
    pg, parts = _clipped_terms(
        logp, old_logp, adv, sel_mask, eps_low, eps_high, dual_clip, log_ratio_clamp
    )  # (B, L)
    counts = token_counts if token_counts is not None else TokenCounts.from_masks(loss_mask, sel_mask)
    norm = NORMALIZERS[normalizer]
    kl_terms = _kl_terms(logp, kl, loss_mask, sel_mask) if kl is not None else None  # (B, L)
    kl_norm = norm if kl is None or kl.normalizer is None else NORMALIZERS[kl.normalizer]
    if kl_terms is None:
        loss = norm(pg, loss_mask, counts, max_len)
    elif kl.normalizer is None:  # per token, before the policy normalizer
        loss = norm(pg + kl.coef * kl_terms, loss_mask, counts, max_len)
    else:  # aggregated on its own
        loss = norm(pg, loss_mask, counts, max_len) + kl.coef * kl_norm(kl_terms, loss_mask, counts, max_len)

    with torch.no_grad():
        metrics = _metrics(parts, loss_mask, sel_mask, eps_low, eps_high, entropy)
        metrics["pg_loss"] = norm(pg.detach(), loss_mask, counts, max_len)
        if kl_terms is not None:
            kl_mask = sel_mask if kl.scope == "selected" else loss_mask
            metrics["kl"] = _safe_div(kl_terms.detach().sum(), kl_mask.sum().float())
            metrics["kl_loss"] = kl.coef * kl_norm(kl_terms.detach(), loss_mask, counts, max_len)
    return loss, metrics


def _clipped_terms(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    sel: Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    log_ratio_clamp: float | None = LOG_RATIO_CLAMP,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate ``(B, L)``, zero outside ``sel``, and the pieces the metrics need."""
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    adv = adv.detach().float()
    adv = adv[:, None].expand_as(logp) if adv.dim() == 1 else adv  # (B, L)
    # Everything outside the selection is replaced by zeros *before* any arithmetic: padding may
    # hold garbage (inf, nan), and a masked-out nan still poisons gradients through torch.where.
    log_ratio = torch.where(sel, logp - old_logp.detach().float(), zero)  # (B, L)
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)  # (B, L)
    adv = torch.where(sel, adv, zero)  # (B, L)
    ratio = torch.exp(log_ratio)  # (B, L)

    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high))  # (B, L)
    parts = {"adv": adv, "ratio": ratio.detach(), "log_ratio": log_ratio.detach()}
    if dual_clip is not None:
        cap = -adv * dual_clip  # (B, L)
        parts["dual_active"] = sel & (adv < 0) & (pg.detach() > cap)  # (B, L)
        pg = torch.where(adv < 0, torch.minimum(pg, cap), pg)  # (B, L)
    return torch.where(sel, pg, zero), parts  # (B, L)


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
    n_valid = loss_mask.sum().float()
    n_sel = sel.sum().float()

    def mean_over(mask: Tensor, x: Tensor) -> Tensor:
        return _safe_div(torch.where(mask, x.float(), zero).sum(), mask.sum().float())

    metrics = {
        "clip_frac_low": mean_over(sel, (adv < 0) & (ratio < 1.0 - eps_low)),
        "clip_frac_high": mean_over(sel, (adv > 0) & (ratio > 1.0 + eps_high)),
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


# --------------------------------------------------------------------------- PPO value loss


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    loss_mask: Tensor,
    sel_mask: Tensor | None = None,
    *,
    clip: float | None = 0.2,
    normalizer: str = "all_tokens",
    max_len: int | None = None,
    token_counts: TokenCounts | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss on ``sel_mask`` tokens (default: every valid token).

    Per token ``0.5 · max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²)`` (verl's
    ``compute_value_loss``, cleanrl's ``clip_vloss``); ``clip=None`` gives ``0.5 · (V − R)²``. The
    per-token terms are aggregated by ``NORMALIZERS[normalizer]`` exactly as in :func:`policy_loss`
    (``token_counts`` for micro-batches). The critic learns from every valid token unless the caller
    passes the actor's selection as ``sel_mask``.

    Args:
        values: ``(B, L)`` current critic values (carry grad).
        old_values: ``(B, L)`` values of the scoring pass (constant): the centre of the clip.
        returns: ``(B, L)`` targets (GAE returns, constant).
        loss_mask, sel_mask: ``(B, L)`` bool; ``sel_mask`` ⊆ ``loss_mask``.
        clip: ``ε_v > 0`` or None.

    Returns:
        ``(loss, metrics)``: ``value_loss`` (this call's share of the loss), ``value_clip_frac`` (share
        of the trained tokens where the clipped term is the larger one, verl's ``vf_clipfrac``),
        ``values_mean`` (mean prediction on them), ``value_tokens`` (their count).
    """
    if not isinstance(values, Tensor) or values.dim() != 2 or not values.is_floating_point():
        raise ValueError(
            f"values must be a floating (B, L) tensor, got {getattr(values, 'shape', type(values))}"
        )
    sel_mask = loss_mask if sel_mask is None else sel_mask
    if clip is not None and not clip > 0:
        raise ValueError(f"value clip must be > 0 (e.g. 0.2) or None, got {clip}")
    _check_options(
        normalizer=normalizer, max_len=max_len, token_counts=token_counts,
        eps_low=0.0, eps_high=0.0, dual_clip=None, kl=None,
    )  # fmt: skip
    zero_adv = torch.zeros(values.shape[:1], dtype=torch.float32, device=values.device)
    _check_tensors(
        values, zero_adv,
        {"old_values": old_values, "returns": returns, "loss_mask": loss_mask, "sel_mask": sel_mask},
    )  # fmt: skip
    zero = torch.zeros((), dtype=torch.float32, device=values.device)
    # Padding may hold garbage: replace it before any arithmetic (see _clipped_terms).
    v = torch.where(sel_mask, values.float(), zero)  # (B, L)
    v_old = torch.where(sel_mask, old_values.detach().float(), zero)  # (B, L)
    ret = torch.where(sel_mask, returns.detach().float(), zero)  # (B, L)
    err = (v - ret).square()  # (B, L)
    if clip is not None:
        v_clipped = v_old + (v - v_old).clamp(-clip, clip)  # (B, L)
        err_clipped = (v_clipped - ret).square()  # (B, L)
        terms = 0.5 * torch.maximum(err, err_clipped)  # (B, L)
    else:
        err_clipped, terms = err, 0.5 * err
    terms = torch.where(sel_mask, terms, zero)  # (B, L)
    counts = token_counts if token_counts is not None else TokenCounts.from_masks(loss_mask, sel_mask)
    norm = NORMALIZERS[normalizer]
    loss = norm(terms, loss_mask, counts, max_len)
    with torch.no_grad():
        n = sel_mask.sum().float()
        metrics = {
            "value_loss": loss.detach(),
            "value_clip_frac": _safe_div((sel_mask & (err_clipped > err)).sum().float(), n),
            "values_mean": _safe_div(v.detach().sum(), n),
            "value_tokens": n,
        }
    return loss, metrics


def explained_variance(values: Tensor, returns: Tensor, loss_mask: Tensor) -> Tensor:
    """``1 − Var(R − V) / Var(R)`` over the valid tokens (cleanrl's ``explained_var``), 0-dim float32.

    1 = the critic predicts the returns exactly, 0 = no better than their mean, < 0 = worse; ``nan``
    when the returns have no variance (nothing to explain).
    """
    zero = torch.zeros((), dtype=torch.float32, device=values.device)
    n = loss_mask.sum().float()
    ret = torch.where(loss_mask, returns.float(), zero)  # (B, L)
    diff = torch.where(loss_mask, returns.float() - values.float(), zero)  # (B, L)

    def var(x: Tensor) -> Tensor:
        mean = _safe_div(x.sum(), n)
        return _safe_div(torch.where(loss_mask, (x - mean).square(), zero).sum(), n)

    var_r = var(ret)
    return torch.where(var_r > 0, 1.0 - var(diff) / torch.where(var_r > 0, var_r, 1.0), float("nan"))
