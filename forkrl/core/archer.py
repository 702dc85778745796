"""Archer (Wang et al. 2025, arXiv 2507.15778, "Stabilizing Knowledge, Promoting Reasoning: Dual-Token
Constraints for RLVR"): policy-loss mode ``archer`` in ``POLICY_LOSSES``.

Each row's entropy quantile ``q_i`` (``LossMode.archer_quantile``, 0.8) splits its tokens in two, with
no hard mask: every selected token keeps its gradient, under a range that depends on its class::

    high_it = H_it > q_i                    (q_i: torch.nanquantile of row i's entropies, linear)
    term_it = the ``clip`` term with [1 − ε_low, 1 + ε_high] = archer_high_eps_* if high_it else archer_low_eps_*
    KL coef = archer_kl_coef_high if high_it else archer_kl_coef_low

High-entropy tokens (the forks, reasoning) get the looser clip (0.5, 0.5) and the weaker KL (0.0);
low-entropy tokens (knowledge) the tighter clip (0.2, 0.2) and the stronger KL (0.001): the
defaults of ArcherCodeR's ``scripts/train/run_archer_qwen2.5_1.5b_code.sh`` (8a1785be), whose
``verl/workers/actor/dp_actor.py`` computes the split and ``verl/trainer/ppo/core_algos.py``
(``compute_policy_loss``, ``use_token_entropy_separate``) the per-token clip; tests/reference/archer_ref.py.
Upstream's names are swapped: its ``high_entropy_mask`` holds the tokens *at or below* the quantile.

forkrl's selection: the quantile is over the row's selected tokens (``archer_tokens="selected"``, the
upstream code on the official fork's folded mask, ``response_mask = sel_mask``) or over every valid
token (``"valid"``, upstream's own ``response_mask``); the clipped terms are on the selected tokens
only, as every mode's; with ``selection.rule=all`` the two are upstream. Tokens outside the quantile's
tokens are low-entropy for the KL. The entropies are those ``policy_loss`` is given: the scoring
pass's (``selection.entropy_source=old``) or the training forward's (``current``: upstream's).

The KL: upstream adds ``kl_loss_coef · token-mean_low(kld) + high_entropy_kl_loss_scale_coef ·
token-mean_high(kld)``, each class averaged over its own tokens of the micro-batch. forkrl weights
each token's KL by its class's coefficient (``parts["kl_coef"]``, replacing ``loss.kl_coef``) and
aggregates with the KL's normalizer, so micro-batch losses still add up to the batch's; with the
KL's normalizer ``all_tokens`` that is upstream with each coefficient times ``N_class / N`` (the
parity test checks this identity exactly).
"""

from __future__ import annotations

import torch
from torch import Tensor

from forkrl.core.loss_modes import LossMode, ModeInputs, _safe_ratio, clipped_surrogate, register_policy_loss

__all__ = ["high_entropy_mask"]


def high_entropy_mask(entropy: Tensor, scope: Tensor, quantile: float) -> Tensor:
    """Bool ``(B, L)``: tokens of ``scope`` whose entropy exceeds their row's ``quantile`` over ``scope``
    (``torch.nanquantile``, linear interpolation; a row without scope tokens has none)."""
    nan = torch.full((), float("nan"), dtype=torch.float32, device=entropy.device)
    masked = torch.where(scope, entropy.detach().float(), nan)  # (B, L)
    q = torch.nanquantile(masked, quantile, dim=-1, keepdim=True)  # (B, 1), nan for an empty row
    return scope & (masked > q)  # nan compares False


@register_policy_loss(
    "archer",
    acted="the selected tokens above their row's archer_quantile of entropy: the looser clip "
    "(archer_high_eps_*) and the weaker KL (archer_kl_coef_high)",
)
def _mode_archer(x: ModeInputs, m: LossMode) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    if x.entropy is None:
        raise ValueError("loss mode 'archer' splits on token entropies: pass policy_loss(entropy=...)")
    zero = torch.zeros((), dtype=torch.float32, device=x.logp.device)
    scope = x.sel if m.archer_tokens == "selected" else x.loss_mask
    with torch.no_grad():
        high = high_entropy_mask(x.entropy, scope, m.archer_quantile)  # (B, L)

    def per_token(hi: float, lo: float) -> Tensor:
        return torch.where(high, torch.tensor(hi, device=zero.device), torch.tensor(lo, device=zero.device))

    eps_low = per_token(m.archer_high_eps_low, m.archer_low_eps_low)  # (B, L)
    eps_high = per_token(m.archer_high_eps_high, m.archer_low_eps_high)  # (B, L)
    log_ratio = x.log_ratio()  # (B, L)
    ratio = torch.exp(log_ratio)  # (B, L)
    pg, dual_active = clipped_surrogate(ratio, x.adv, x.sel, eps_low, eps_high, x.dual_clip)
    r = ratio.detach()
    acted = x.sel & high
    low = x.loss_mask & ~high  # every other valid token: the tight class for the KL
    parts = {
        "adv": x.adv,
        "ratio": r,
        "log_ratio": log_ratio.detach(),
        "clip_lo": 1.0 - eps_low,
        "clip_hi": 1.0 + eps_high,
        "acted": acted,
        "kl_coef": per_token(m.archer_kl_coef_high, m.archer_kl_coef_low),
        "kl_mask/archer_kl_high_entropy": x.loss_mask & high,
        "kl_mask/archer_kl_low_entropy": low,
    }
    if dual_active is not None:
        parts["dual_active"] = dual_active
    with torch.no_grad():
        # verl's pg_clipfrac: the clipped surrogate is the larger loss, per class
        clipped = x.sel & (-x.adv * r.clamp(1.0 - eps_low, 1.0 + eps_high) > -x.adv * r)
        n_sel = x.sel.sum().float()
        metrics = {
            "archer_clip_frac_high_entropy": _safe_ratio((clipped & high).sum().float(), acted.sum().float()),
            "archer_clip_frac_low_entropy": _safe_ratio(
                (clipped & ~high).sum().float(), (x.sel & ~high).sum().float()
            ),
            "archer_high_entropy_frac": _safe_ratio(acted.sum().float(), n_sel),
        }
    return pg, parts, metrics
