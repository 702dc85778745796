"""PPO's clipped value loss and explained variance, aggregated by the policy loss's normalizers."""

from __future__ import annotations

import torch
from torch import Tensor

from forkrl.core.normalizers import NORMALIZERS, TokenCounts, _safe_div

__all__ = ["explained_variance", "value_loss"]


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
    from forkrl.core.losses import (  # the policy loss's checks (it re-exports us)
        _check_options,
        _check_tensors,
    )

    if clip is not None and not clip > 0:
        raise ValueError(f"value clip must be > 0 (e.g. 0.2) or None, got {clip}")
    _check_options(
        normalizer=normalizer,
        max_len=max_len,
        token_counts=token_counts,
        eps_low=0.0,
        eps_high=0.0,
        dual_clip=None,
        kl=None,
    )
    zero_adv = torch.zeros(values.shape[:1], dtype=torch.float32, device=values.device)
    _check_tensors(
        values,
        zero_adv,
        {"old_values": old_values, "returns": returns, "loss_mask": loss_mask, "sel_mask": sel_mask},
    )
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
