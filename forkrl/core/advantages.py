"""Outcome advantages for group sampling: one scalar reward per response, G responses per prompt.

Every estimator here takes ``rewards: (N,)`` with ``N = B·G`` laid out group by group (entries
``[g·G, (g+1)·G)`` are the G responses to prompt ``g``) and returns one float32 advantage per
response, ``(N,)``. The loss broadcasts it over the response tokens (``adv[:, None]``, or pass the
``(B,)`` tensor to :func:`forkrl.core.losses.policy_loss` directly).

Conventions shared by all estimators (and where they differ from upstream):

* A group whose rewards are all equal (``max == min``, exact comparison) gets advantage exactly
  ``0.0`` for every member. Floating-point ``r - mean`` is not always exactly zero
  (``mean([0.1] * 3) != 0.1``) and GRPO's ``0 / (0 + eps)`` is not either once rounding leaves a
  residue, so the zero is set explicitly. Such a group carries no learning signal; DAPO's dynamic
  sampling (:mod:`forkrl.core.sampling`) drops it before the update.
* A group of one response (``G = 1``) is a zero-variance group, so its advantage is ``0.0``. verl
  differs here: its ``grpo`` uses mean 0 / std 1 for a singleton (advantage ``r / (1 + eps)``) and
  its ``rloo`` leaves the raw reward (``verl/trainer/ppo/core_algos.py``,
  ``compute_grpo_outcome_advantage`` / ``compute_rloo_outcome_advantage``).

New estimators register with ``@register_advantage("name")`` (the verl ``register_adv_est`` style).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "ADVANTAGES",
    "AdvantageFn",
    "compute_advantages",
    "dr_grpo_advantages",
    "grpo_advantages",
    "register_advantage",
    "rloo_advantages",
    "to_token_advantages",
]

AdvantageFn = Callable[..., Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register ``fn(rewards, group_size, **kw) -> (N,) float32`` under ``name`` in ``ADVANTAGES``."""

    def decorator(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGES and ADVANTAGES[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered ({ADVANTAGES[name]!r})")
        ADVANTAGES[name] = fn
        return fn

    return decorator


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """Validate and view rewards as ``(num_groups, G)``."""
    if not isinstance(rewards, Tensor):
        raise ValueError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B·G,), got shape {tuple(rewards.shape)}; flatten it first")
    if not rewards.is_floating_point():
        raise ValueError(
            f"rewards must be a floating-point tensor, got {rewards.dtype}; pass rewards.float()"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}; "
            "each prompt needs exactly group_size consecutive rewards"
        )
    if not bool(torch.isfinite(rewards).all()):
        bad = int(torch.nonzero(~torch.isfinite(rewards))[0, 0])
        raise ValueError(f"rewards[{bad}] is {rewards[bad].item()}; every reward must be finite")
    # Double precision where the device has it: rewards are few, and near-equal rewards would
    # otherwise lose most of r - mean to cancellation. The result is cast to float32.
    dtype = torch.float32 if rewards.device.type == "mps" else torch.float64
    return rewards.to(dtype).view(-1, group_size)  # (num_groups, G)


def _zero_constant_groups(adv: Tensor, grouped: Tensor) -> Tensor:
    """Exactly 0 for every member of a group whose rewards are all equal (includes G = 1)."""
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)  # (num_groups, 1)
    return torch.where(constant, torch.zeros_like(adv), adv).reshape(-1).float()  # (N,)


@register_advantage("grpo")
def grpo_advantages(rewards: Tensor, group_size: int, *, eps: float = 1e-6) -> Tensor:
    """GRPO: ``(r - mean_g) / (std_g + eps)`` within each group.

    ``std_g`` is the *unbiased* sample standard deviation (divisor ``G - 1``), as verl
    (``torch.std`` in ``compute_grpo_outcome_advantage``, eps 1e-6) and TRL (``.std()`` on the grouped
    rewards, eps 1e-4) both use. Zero-variance groups and ``G = 1`` give exactly 0.

    >>> grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    tensor([ 0.7071, -0.7071,  0.0000,  0.0000])
    """
    grouped = _grouped(rewards, group_size)  # (num_groups, G)
    if group_size == 1:
        return torch.zeros(grouped.shape[0], dtype=torch.float32, device=grouped.device)
    mean = grouped.mean(dim=1, keepdim=True)  # (num_groups, 1)
    std = grouped.std(dim=1, correction=1, keepdim=True)  # (num_groups, 1)
    return _zero_constant_groups((grouped - mean) / (std + eps), grouped)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): ``r - mean_g``, no std scaling.

    >>> dr_grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    tensor([ 0.7500, -0.2500, -0.2500, -0.2500])
    """
    grouped = _grouped(rewards, group_size)  # (num_groups, G)
    return _zero_constant_groups(grouped - grouped.mean(dim=1, keepdim=True), grouped)


@register_advantage("rloo")
def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740): ``r_i - mean of the other G - 1 rewards``.

    Equals ``G / (G - 1) · (r_i - mean_g)``, the form verl computes. ``G = 1`` gives 0.

    >>> rloo_advantages(torch.tensor([1.0, 0.0, 0.0]), 3)
    tensor([ 1.0000, -0.5000, -0.5000])
    """
    grouped = _grouped(rewards, group_size)  # (num_groups, G)
    if group_size == 1:
        return torch.zeros(grouped.shape[0], dtype=torch.float32, device=grouped.device)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # (num_groups, G)
    return _zero_constant_groups(grouped - others_mean, grouped)


def compute_advantages(name: str, rewards: Tensor, group_size: int, **kw) -> Tensor:
    """Look up ``name`` in ``ADVANTAGES`` and return its ``(B·G,)`` float32 advantages."""
    fn = ADVANTAGES.get(name)
    if fn is None:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(ADVANTAGES)}")
    return fn(rewards, group_size, **kw)


def to_token_advantages(adv: Tensor, loss_mask: Tensor) -> Tensor:
    """Broadcast per-sequence ``adv (B,)`` over the response tokens: ``(B, L)``, 0 outside ``loss_mask``."""
    if adv.dim() != 1 or loss_mask.dim() != 2 or adv.shape[0] != loss_mask.shape[0]:
        raise ValueError(
            f"expected adv (B,) and loss_mask (B, L), got {tuple(adv.shape)} and {tuple(loss_mask.shape)}"
        )
    return torch.where(loss_mask, adv[:, None], torch.zeros((), dtype=adv.dtype, device=adv.device))  # (B, L)
