"""DAPO sampling pieces (Yu et al. 2025, arXiv 2503.14476): dynamic sampling, overlong shaping, overlong filtering.

* :func:`dynamic_sampling_keep` — which prompt groups carry a learning signal (DAPO §3.2).
* :func:`overlong_penalty` — the soft overlong punishment added to the reward (DAPO Eq. 13).
* :func:`overlong_filter_mask` — drop truncated responses from the loss (DAPO §3.4, "overlong filtering").
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dynamic_sampling_keep", "overlong_filter_mask", "overlong_penalty"]


def dynamic_sampling_keep(rewards: Tensor, group_size: int) -> Tensor:
    """Bool ``(num_groups,)``: True for groups whose rewards are not all equal.

    ``rewards`` is ``(B·G,)`` laid out group by group, as in :mod:`forkrl.core.advantages`. Equality
    is exact (``max == min``, no tolerance): verifier rewards are exact values such as 0/1, and a
    tolerance would silently drop groups whose differences are small but real. A group of one
    response is kept, as verl's ``std > 0 or len == 1`` (``recipe/dapo/dapo_ray_trainer.py``); it
    has zero advantage anyway, and dropping it would leave nothing to train on when ``G = 1``.

    DAPO filters on accuracy: verl's recipe sets ``filter_groups.metric=acc``, so pass the verifier
    score, not the reward after overlong shaping (which can differ within an all-correct group).
    Expand to responses with ``keep.repeat_interleave(group_size)``.

    >>> dynamic_sampling_keep(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2)
    tensor([False,  True, False])
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 1:
        raise ValueError(
            f"rewards must be a 1-D (B·G,) tensor, got {getattr(rewards, 'shape', type(rewards))}"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}; "
            "each prompt needs exactly group_size consecutive rewards"
        )
    if rewards.is_floating_point() and not bool(torch.isfinite(rewards).all()):
        bad = int(torch.nonzero(~torch.isfinite(rewards))[0, 0])
        raise ValueError(f"rewards[{bad}] is {rewards[bad].item()}; every reward must be finite")
    grouped = rewards.view(-1, group_size)  # (num_groups, G)
    if group_size == 1:
        return torch.ones(grouped.shape[0], dtype=torch.bool, device=rewards.device)
    return grouped.amax(dim=1) != grouped.amin(dim=1)  # (num_groups,)


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment, float32 ``(B,)``, to add to each response's reward.

    With ``expected = max_len - buffer`` (DAPO's L_max - L_cache)::

        L <= expected             ->  0
        expected < L <= max_len   ->  (expected - L) / buffer · factor     (linear from 0 to -factor)
        L > max_len               ->  -factor

    This is DAPO Eq. 13 scaled by ``factor``, and equals verl's DAPO reward manager
    (``verl/workers/reward_manager/dapo.py``: ``min(-(L - expected) / buffer · factor, 0)``) for every
    ``L <= max_len``, the only lengths verl's truncating rollout can produce; beyond ``max_len`` Eq. 13
    (and TRL's ``get_soft_overlong_punishment``) holds the penalty at ``-factor``, as here. The DAPO
    runs use ``max_len = 20480``, ``buffer = 4096``, ``factor = 1.0``. ``buffer = 0`` is a hard cutoff.

    >>> overlong_penalty(torch.tensor([10, 16, 18, 20, 25]), max_len=20, buffer=4)
    tensor([ 0.0000,  0.0000, -0.5000, -1.0000, -1.0000])
    """
    if not isinstance(lengths, Tensor) or lengths.dim() != 1:
        raise ValueError(f"lengths must be a 1-D (B,) tensor, got {getattr(lengths, 'shape', type(lengths))}")
    if lengths.dtype == torch.bool or lengths.is_complex():
        raise ValueError(f"lengths must hold token counts (integer or float), got {lengths.dtype}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if isinstance(buffer, bool) or not isinstance(buffer, int) or not 0 <= buffer <= max_len:
        raise ValueError(f"buffer must be an int in [0, max_len={max_len}], got {buffer!r}")
    if not factor >= 0:
        raise ValueError(f"factor must be >= 0 (the penalty is subtracted), got {factor!r}")
    length = lengths.float()  # (B,)
    expected = float(max_len - buffer)
    ramp = (expected - length) / max(buffer, 1) * factor  # (B,)
    full = torch.full_like(length, -float(factor))  # (B,)
    penalty = torch.where(length > max_len, full, ramp)  # (B,)
    return torch.where(length <= expected, torch.zeros_like(length), penalty)  # (B,)


def overlong_filter_mask(loss_mask: Tensor, truncated: Tensor) -> Tensor:
    """``loss_mask`` with every truncated response masked out entirely: ``(B, L)`` bool.

    ``truncated`` is ``(B,)`` bool, True where generation hit the token budget without EOS. DAPO's
    overlong filtering keeps these responses out of the loss instead of punishing a possibly sound
    but unfinished reasoning trace (TRL: ``mask_truncated_completions``). The rows stay in the batch
    (their rewards still count for the group advantages); they only stop counting toward the loss.
    """
    if not isinstance(loss_mask, Tensor) or loss_mask.dim() != 2 or loss_mask.dtype != torch.bool:
        raise ValueError(
            f"loss_mask must be a bool (B, L) tensor, got {getattr(loss_mask, 'dtype', type(loss_mask))}"
        )
    if not isinstance(truncated, Tensor) or truncated.dtype != torch.bool:
        raise ValueError(
            f"truncated must be a bool tensor, got {getattr(truncated, 'dtype', type(truncated))}"
        )
    if tuple(truncated.shape) != (loss_mask.shape[0],):
        raise ValueError(f"truncated must have shape ({loss_mask.shape[0]},), got {tuple(truncated.shape)}")
    return loss_mask & ~truncated[:, None]  # (B, L)
