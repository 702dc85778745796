"""Which tokens a policy-loss mode acted on, at the rollout's policy: the ``cov`` and ``acted`` of dumps.

``cov``: each selected token's covariance of advantage and log-prob, Cui et al.'s
``(A − Ā)(logp − l̄)`` (``forkrl.core.cov_losses.token_covariance``), the means over the selected
tokens of every rank of ``LossMode.group`` when ``cov_across_ranks`` (else this call's). ``acted``:
the mode evaluated with ``logp = old_logp`` (ratio 1, the first micro-batch of an on-policy update)
returns ``parts["acted_candidates"]`` or ``parts["acted"]`` (``forkrl.core.loss_modes``), or None
when it sets neither. The batch given is one micro-batch: a dump passes the whole step, which equals
the update's first micro-batch when the step has one (``optim.mini_batches=1``, every row in one
micro-batch); with several, the update's statistics were each micro-batch's own.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from forkrl.core.cov_losses import _group, token_covariance
from forkrl.core.loss_modes import POLICY_LOSSES, LossMode, ModeInputs

__all__ = ["mode_tokens"]


def mode_tokens(
    old_logp: Tensor,
    adv: Tensor,
    loss_mask: Tensor,
    sel_mask: Tensor,
    mode: LossMode,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
    log_ratio_clamp: float | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(cov (B, L) float32, acted (B, L) bool or None)`` at ratio 1 (module docstring).

    ``old_logp``: ``(B, L)`` the rollout's log-probs; ``adv``: ``(B,)`` or ``(B, L)``; ``sel_mask``
    is cut to ``loss_mask``; ``entropy``: ``(B, L)``, the entropies the update gave ``policy_loss``
    (for modes that split on them, as ``archer``). Under a group every rank must call (the
    covariance's all-reduce, the mode's own collectives). A random pick (``clip_cov``) draws from a
    private generator, so the global RNG, and the training after a dump, is untouched.
    """
    with torch.no_grad():
        sel = sel_mask.bool() & loss_mask.bool()
        logp = old_logp.detach().float()
        zero = torch.zeros((), dtype=torch.float32, device=logp.device)
        adv = adv.detach().float().to(logp.device)
        adv = adv[:, None].expand_as(logp) if adv.dim() == 1 else adv  # (B, L)
        adv = torch.where(sel, adv, zero)  # (B, L), as policy_loss hands it to the modes
        cov, _ = token_covariance(adv, logp, sel, _group(mode))  # (B, L)
        private = dataclasses.replace(
            mode, generator=torch.Generator(device=logp.device).manual_seed(0), keys=None
        )
        ent = entropy.detach().float() if entropy is not None else None  # as policy_loss gives it
        x = ModeInputs(
            logp, logp, adv, loss_mask.bool(), sel, eps_low, eps_high, dual_clip, log_ratio_clamp, ent
        )
        _, parts, _ = POLICY_LOSSES[mode.name](x, private)
    acted = parts.get("acted_candidates", parts.get("acted"))
    return cov, (acted.bool() & sel if acted is not None else None)
