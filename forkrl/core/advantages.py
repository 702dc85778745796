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

Token-level estimators that need a critic (PPO's GAE) have another signature and their own registry,
``TOKEN_ADVANTAGES``: ``fn(token_rewards, values, loss_mask, **kw) -> (adv, returns)``, all ``(B, L)``
(``@register_token_advantage("name")``). :func:`token_rewards` builds their reward tensor from the
outcome rewards and :func:`whiten` normalises their advantages.

:func:`entropy_shaped_advantages` adds Cheng et al.'s clipped entropy term to any of them, per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "ADVANTAGES",
    "TOKEN_ADVANTAGES",
    "AdvantageFn",
    "compute_advantages",
    "dr_grpo_advantages",
    "entropy_shaped_advantages",
    "gae_advantages",
    "grpo_advantages",
    "register_advantage",
    "register_token_advantage",
    "rloo_advantages",
    "to_token_advantages",
    "token_rewards",
    "whiten",
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
    if fn is None and name in TOKEN_ADVANTAGES:
        raise ValueError(
            f"advantage estimator {name!r} is token-level and needs a critic's values; "
            "call TOKEN_ADVANTAGES[name](token_rewards, values, loss_mask) (forkrl.training.critic does)"
        )
    if fn is None:
        raise ValueError(
            f"unknown advantage estimator {name!r}; known: {sorted({**ADVANTAGES, **TOKEN_ADVANTAGES})}"
        )
    return fn(rewards, group_size, **kw)


def to_token_advantages(adv: Tensor, loss_mask: Tensor) -> Tensor:
    """Broadcast per-sequence ``adv (B,)`` over the response tokens: ``(B, L)``, 0 outside ``loss_mask``."""
    if adv.dim() != 1 or loss_mask.dim() != 2 or adv.shape[0] != loss_mask.shape[0]:
        raise ValueError(
            f"expected adv (B,) and loss_mask (B, L), got {tuple(adv.shape)} and {tuple(loss_mask.shape)}"
        )
    return torch.where(loss_mask, adv[:, None], torch.zeros((), dtype=adv.dtype, device=adv.device))  # (B, L)


# --------------------------------------------------------------------------- token level (PPO)

TokenAdvantageFn = Callable[..., tuple[Tensor, Tensor]]
TOKEN_ADVANTAGES: dict[str, TokenAdvantageFn] = {}


def register_token_advantage(name: str) -> Callable[[TokenAdvantageFn], TokenAdvantageFn]:
    """Register ``fn(token_rewards, values, loss_mask, **kw) -> (adv, returns)`` in ``TOKEN_ADVANTAGES``."""

    def decorator(fn: TokenAdvantageFn) -> TokenAdvantageFn:
        if name in ADVANTAGES or (name in TOKEN_ADVANTAGES and TOKEN_ADVANTAGES[name] is not fn):
            raise ValueError(f"advantage estimator {name!r} is already registered")
        TOKEN_ADVANTAGES[name] = fn
        return fn

    return decorator


def _check_token_inputs(**tensors: Tensor) -> None:
    mask = tensors["loss_mask"]
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"loss_mask must be a bool (B, L) tensor, got {getattr(mask, 'dtype', type(mask))}")
    for name, t in tensors.items():
        if name != "loss_mask" and t is not None and tuple(t.shape) != tuple(mask.shape):
            raise ValueError(f"{name} must have loss_mask's shape {tuple(mask.shape)}, got {tuple(t.shape)}")


def token_rewards(
    rewards: Tensor,
    loss_mask: Tensor,
    *,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """Per-token rewards ``(B, L)`` float32: the outcome reward on each row's last valid token.

    With ``kl_coef > 0`` and both log-probs given, every valid token also gets
    ``-kl_coef · (old_logp - ref_logp)`` (the k1 KL penalty in the reward, verl's ``apply_kl_penalty``
    with ``kl_penalty="kl"``). Rows without a valid token get no reward.

    >>> token_rewards(torch.tensor([1.0, 0.5]), torch.tensor([[True, True, False], [True, False, False]]))
    tensor([[0.0000, 1.0000, 0.0000],
            [0.5000, 0.0000, 0.0000]])
    """
    _check_token_inputs(loss_mask=loss_mask, old_logp=old_logp, ref_logp=ref_logp)
    if rewards.shape != (loss_mask.shape[0],):
        raise ValueError(f"rewards must be (B,) = ({loss_mask.shape[0]},), got {tuple(rewards.shape)}")
    B, L = loss_mask.shape
    pos = torch.arange(L, device=loss_mask.device).expand(B, L)  # (B, L)
    last = torch.where(loss_mask, pos, -1).amax(dim=1)  # (B,): -1 = no valid token
    out = torch.zeros(B, L, dtype=torch.float32, device=loss_mask.device)
    out = torch.where(pos == last[:, None], rewards.float()[:, None], out)  # (B, L)
    if kl_coef > 0 and old_logp is not None and ref_logp is not None:
        kl = torch.where(loss_mask, old_logp.float() - ref_logp.float(), 0.0)  # (B, L)
        out = out - kl_coef * kl
    return out


@register_token_advantage("gae")
def gae_advantages(
    token_rewards: Tensor, values: Tensor, loss_mask: Tensor, *, gamma: float = 1.0, lam: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv 1506.02438) over response tokens.

    ``δₜ = rₜ + γ·V_next − Vₜ``, ``Âₜ = δₜ + γλ·Â_next``, returns ``Rₜ = Âₜ + Vₜ``, where "next" is
    the next *valid* token: masked tokens are skipped (they neither bootstrap nor accumulate, as in
    verl's ``compute_gae_advantage_return``), and past a row's last valid token the episode has ended
    (``V = 0``, no bootstrap: a truncated response is terminal with its reward). With ``γ = λ = 1``
    this is ``Âₜ = Σ_{s≥t} r_s − Vₜ``, the Monte-Carlo return minus the critic's baseline.

    Args:
        token_rewards: ``(B, L)`` per-token rewards (:func:`token_rewards`).
        values: ``(B, L)`` critic values ``V(s_t)`` of the state before each response token.
        loss_mask: ``(B, L)`` bool, True = valid response token.
        gamma, lam: discount and GAE λ.

    Returns:
        ``(adv, returns)``, both ``(B, L)`` float32, exactly 0 outside ``loss_mask`` (not whitened).
    """
    _check_token_inputs(token_rewards=token_rewards, values=values, loss_mask=loss_mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"need 0 <= gamma <= 1 and 0 <= lam <= 1, got gamma={gamma}, lam={lam}")
    zero = torch.zeros((), dtype=torch.float32, device=loss_mask.device)
    # Garbage in padding (nan, inf) must not leak through the recursion: zero it before any arithmetic.
    r = torch.where(loss_mask, token_rewards.float(), zero)  # (B, L)
    v = torch.where(loss_mask, values.detach().float(), zero)  # (B, L)
    B, L = loss_mask.shape
    next_v = torch.zeros(B, dtype=torch.float32, device=loss_mask.device)  # (B,)
    next_adv = torch.zeros_like(next_v)  # (B,)
    adv = torch.zeros(B, L, dtype=torch.float32, device=loss_mask.device)
    for t in range(L - 1, -1, -1):  # a loop over L, vectorised over B
        valid = loss_mask[:, t]  # (B,)
        delta = r[:, t] + gamma * next_v - v[:, t]  # (B,)
        a_t = delta + gamma * lam * next_adv  # (B,)
        adv[:, t] = torch.where(valid, a_t, zero)
        next_adv = torch.where(valid, a_t, next_adv)
        next_v = torch.where(valid, v[:, t], next_v)
    returns = torch.where(loss_mask, adv + v, zero)  # (B, L)
    return adv, returns


def whiten(
    x: Tensor, loss_mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8, reduce=None
) -> Tensor:
    """``(x − mean) / sqrt(var + eps)`` over the valid tokens, 0 outside ``loss_mask``: ``(B, L)``.

    Mean and *unbiased* variance are taken over every valid token of the batch (verl's
    ``masked_whiten``; a single token has variance 0). ``shift_mean=False`` adds the mean back
    (scale only). ``reduce``: an optional in-place sum over workers for a 1-D tensor (e.g.
    ``dist.all_reduce``), so the statistics are global under data parallelism.
    """
    _check_token_inputs(x=x, loss_mask=loss_mask)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    xm = torch.where(loss_mask, x.float(), zero)  # (B, L)
    stats = torch.stack([loss_mask.sum().float(), xm.sum()])  # [n, Σx]
    if reduce is not None:
        reduce(stats)
    n, total = stats[0], stats[1]
    mean = total / n.clamp(min=1.0)
    sq = torch.where(loss_mask, (xm - mean).square(), zero).sum().reshape(1)  # [Σ(x − mean)²]
    if reduce is not None:
        reduce(sq)
    var = torch.where(n > 1, sq[0] / (n - 1).clamp(min=1.0), zero)
    out = (xm - mean) * torch.rsqrt(var + eps)  # (B, L)
    if not shift_mean:
        out = out + mean
    return torch.where(loss_mask, out, zero)


# --------------------------------------------------------------------------- entropy shaping


def entropy_shaped_advantages(
    adv: Tensor, entropy: Tensor, loss_mask: Tensor, *, alpha: float, kappa: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Cheng et al. 2025 (arXiv 2506.14758, "Reasoning with Exploration: An Entropy Perspective"):
    ``A_t + ψ(H_t)`` with ``ψ(H_t) = min(α · sg(H_t), |A_t| / κ)`` on every valid token.

    The term is detached (``sg``: it shapes the advantage, not the gradient's direction through H) and
    applies to positive and negative advantages alike; the ``|A|/κ`` cap keeps it from dominating,
    and with ``κ > 1`` from flipping a negative advantage's sign (``A + ψ ≤ A (1 − 1/κ) < 0``); a zero
    advantage stays 0. The paper's settings: ``α = 0.4``, ``κ = 2`` (no public code; the equation is
    restated in tests/reference/entropy_adv_ref.py).

    Args:
        adv: ``(B,)`` per-sequence or ``(B, L)`` per-token advantages.
        entropy: ``(B, L)`` token entropies (the scoring pass's).
        loss_mask: ``(B, L)`` bool, True = valid response token.
        alpha, kappa: ``α >= 0`` and ``κ > 0``.

    Returns:
        ``(shaped (B, L), psi (B, L), capped (B, L) bool)``, float32, 0 / False outside ``loss_mask``;
        ``capped``: the tokens where ``|A|/κ < α·H``, the cap bound.

    >>> a, psi, cap = entropy_shaped_advantages(
    ...     torch.tensor([1.0, -1.0]), torch.tensor([[0.5, 2.0], [2.0, 0.0]]), torch.ones(2, 2, dtype=torch.bool),
    ...     alpha=0.4, kappa=2.0)
    >>> a
    tensor([[ 1.2000,  1.5000],
            [-0.5000, -1.0000]])
    """
    if not alpha >= 0.0 or not kappa > 0.0:
        raise ValueError(
            f"need alpha >= 0 and kappa > 0 (paper: 0.4 and 2), got alpha={alpha}, kappa={kappa}"
        )
    _check_token_inputs(entropy=entropy, loss_mask=loss_mask)
    zero = torch.zeros((), dtype=torch.float32, device=loss_mask.device)
    B = loss_mask.shape[0]
    if tuple(adv.shape) not in ((B,), tuple(loss_mask.shape)):
        raise ValueError(f"adv must be ({B},) or {tuple(loss_mask.shape)}, got {tuple(adv.shape)}")
    a = adv.detach().float()
    a = a[:, None].expand(loss_mask.shape) if a.dim() == 1 else a  # (B, L)
    a = torch.where(loss_mask, a, zero)  # (B, L)
    bonus = alpha * torch.where(loss_mask, entropy.detach().float(), zero)  # (B, L) α·sg(H)
    cap = a.abs() / kappa  # (B, L)
    psi = torch.where(loss_mask, torch.minimum(bonus, cap), zero)  # (B, L)
    return a + psi, psi, loss_mask & (cap < bonus)
