"""Clip-Cov and KL-Cov (Cui et al. 2025, arXiv 2505.22617): policy-loss modes driven by each token's
covariance of advantage and log-prob, registered in ``POLICY_LOSSES`` as ``clip_cov`` and ``kl_cov``.

    cov_it = (A_it − mean A) · (logp_it − mean logp)        (means over the selected tokens; detached)

``clip_cov``: the ``clip`` terms, except that ``max(1, ⌊cov_ratio · N⌋)`` tokens drawn uniformly at
random among those whose ratio the clip left alone and whose ``clip_cov_lb < cov < clip_cov_ub`` get no
gradient (their term is 0). ``kl_cov``: the unclipped ``−r·A`` on every token, plus ``kl_cov_coef ·
|log r|`` on the ``max(1, ⌊cov_ratio · N⌋)`` tokens of largest covariance (verl: no ratio clip). N is
the number of selected tokens; verl's ``compute_policy_loss_clip_cov`` / ``_kl_cov``
(tests/reference/verl_ref.py) on the official fork's folded mask (``response_mask = sel_mask``).

Scope (``LossMode.cov_across_ranks``):

- True (batch): the means, N, the top-k and the random pick are over every rank of ``LossMode.group``
  (None: this call's tokens): the result on W ranks equals one process on the concatenated batch.
  The means are one all-reduce of three numbers; the top-k is forkrl's radix select (``top_k_mask``,
  histograms only); the random pick is the top-k of uniform keys over the band (``LossMode.keys``, or
  drawn from ``LossMode.generator``), ties in (rank, position) order. Every rank must call.
- False (rank): each call on its own, as verl (which computes the statistics per micro-batch and rank);
  the random pick is verl's ``torch.randperm`` over the band tokens in row-major order (from
  ``LossMode.generator``; None = the global RNG, exactly verl's draw).

Either way the statistics are those of one micro-batch (on every rank): the covariance needs the
current log-probs, known only in that micro-batch's forward. One host sync (N) per call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from forkrl.core.loss_modes import LossMode, ModeInputs, _safe_ratio, clipped_surrogate, register_policy_loss
from forkrl.core.radix import all_reduce_sum
from forkrl.core.selection import top_k_mask

__all__ = ["token_covariance"]


def token_covariance(adv: Tensor, logp: Tensor, sel: Tensor, group) -> tuple[Tensor, int]:
    """``(cov (B, L), N)``: each selected token's ``(A − Ā)(logp − l̄)`` (0 elsewhere), the means and
    N over the selected tokens of every rank of ``group`` (None: this call). ``adv`` is 0 outside ``sel``."""
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    logp = torch.where(sel, logp.detach().float(), zero)  # (B, L)
    sums = torch.stack([sel.sum().float(), adv.sum(), logp.sum()])  # (3,)
    all_reduce_sum(sums, group)
    n = sums[0].clamp(min=1.0)
    cov = torch.where(sel, (adv - sums[1] / n) * (logp - sums[2] / n), zero)  # (B, L)
    return cov, int(sums[0].item())


def _group(m: LossMode):
    return m.group if m.cov_across_ranks else None


def _metrics(sel: Tensor, cov: Tensor, touched: Tensor) -> dict[str, Tensor]:
    n_sel = sel.sum().float()
    return {
        "cov_mean": _safe_ratio(cov.sum(), n_sel),  # the call's share of Cov(A, logp)
        "cov_touched_frac": _safe_ratio(touched.sum().float(), n_sel),
    }


def _random_pick(band: Tensor, k: int, m: LossMode, group) -> Tensor:
    """``min(k, |band|)`` band tokens uniformly at random (module docstring, Scope)."""
    if not m.cov_across_ranks:  # verl: torch.randperm over the band in row-major order, first k
        picked = torch.zeros_like(band)
        idx = band.nonzero()  # (n, 2)
        if len(idx) > 0:
            device = m.generator.device if m.generator is not None else "cpu"
            perm = torch.randperm(len(idx), generator=m.generator, device=device).to(idx.device)
            idx = idx[perm[: min(k, len(idx))]]
            picked[idx[:, 0], idx[:, 1]] = True
        return picked
    keys = m.keys
    if keys is None:
        device = m.generator.device if m.generator is not None else band.device
        keys = torch.rand(band.shape, generator=m.generator, device=device).to(band.device)  # (B, L)
    elif tuple(keys.shape) != tuple(band.shape):
        raise ValueError(f"LossMode.keys must have logp's shape {tuple(band.shape)}, got {tuple(keys.shape)}")
    return top_k_mask(keys, band, k, group=group)[0]


@register_policy_loss(
    "clip_cov",
    acted="candidates, not the pick: the selected tokens with clip_cov_lb < cov < clip_cov_ub the clip "
    "leaves alone (the band); the update detached a random max(1, floor(cov_ratio N)) of them per "
    "micro-batch, a draw a dump does not replay",
)
def _mode_clip_cov(x: ModeInputs, m: LossMode) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    zero = torch.zeros((), dtype=torch.float32, device=x.logp.device)
    group = _group(m)
    log_ratio = x.log_ratio()  # (B, L)
    ratio = torch.exp(log_ratio)  # (B, L)
    pg, dual_active = clipped_surrogate(ratio, x.adv, x.sel, x.eps_low, x.eps_high, x.dual_clip)
    with torch.no_grad():
        r = ratio.detach()
        # verl's clip_by_origin: pg_losses2 > pg_losses1, the clip already holds the gradient back
        clipped = x.sel & (-x.adv * r.clamp(1.0 - x.eps_low, 1.0 + x.eps_high) > -x.adv * r)
        cov, n = token_covariance(x.adv, x.logp, x.sel, group)
        band = x.sel & ~clipped & (cov > m.clip_cov_lb) & (cov < m.clip_cov_ub)  # (B, L)
        touched = _random_pick(band, max(int(m.cov_ratio * n), 1), m, group)  # (B, L)
    pg = torch.where(touched, zero, pg)  # verl: * corr, value 0 and no gradient
    parts = {
        "adv": x.adv,
        "ratio": r,
        "log_ratio": log_ratio.detach(),
        "acted": touched,
        "acted_candidates": band,
    }
    if dual_active is not None:
        parts["dual_active"] = dual_active
    metrics = _metrics(x.sel, cov, touched)
    metrics.update(
        cov_band_frac=_safe_ratio(band.sum().float(), x.sel.sum().float()),
        cov_band_lb=torch.tensor(float(m.clip_cov_lb), device=zero.device),
        cov_band_ub=torch.tensor(float(m.clip_cov_ub), device=zero.device),
    )
    return pg, parts, metrics


@register_policy_loss(
    "kl_cov",
    acted="the max(1, floor(cov_ratio N)) selected tokens of largest cov, KL-penalised (kl_cov_coef |log r|)",
)
def _mode_kl_cov(x: ModeInputs, m: LossMode) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    zero = torch.zeros((), dtype=torch.float32, device=x.logp.device)
    group = _group(m)
    log_ratio = x.log_ratio()  # (B, L)
    ratio = torch.exp(log_ratio)  # (B, L)
    pg = torch.where(x.sel, -x.adv * ratio, zero)  # (B, L) verl's kl_cov has no ratio clip
    with torch.no_grad():
        cov, n = token_covariance(x.adv, x.logp, x.sel, group)
        k = max(1, int(n * m.cov_ratio)) if n > 0 else 0
        touched, kth = top_k_mask(cov, x.sel, k, group=group)  # (B, L), () largest covariances
    pg = torch.where(touched, pg + m.kl_cov_coef * log_ratio.abs(), pg)  # (B, L)
    parts = {"adv": x.adv, "ratio": ratio.detach(), "log_ratio": log_ratio.detach(), "acted": touched}
    metrics = _metrics(x.sel, cov, touched)
    with torch.no_grad():
        metrics.update(
            cov_kth=torch.nan_to_num(kth.float(), nan=0.0),  # the smallest covariance penalised
            abs_log_ratio=_safe_ratio(log_ratio.abs().sum(), x.sel.sum().float()),  # verl's ppo_kl here
        )
    return pg, parts, metrics
