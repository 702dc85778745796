"""Token selection: which response tokens carry the policy gradient.

The paper's high-entropy objective (Wang et al. 2025, arXiv 2506.01939, the DAPO variant in DESIGN.md)
multiplies every token's clipped surrogate by the indicator 1[H_it >= tau_rho^B], where tau_rho^B is the
top-rho entropy threshold over the batch B. This module computes that indicator as a boolean mask
`sel_mask` (a subset of `loss_mask`) together with the threshold tau, which the trainer logs every step.

Options, each a named choice (DESIGN.md, "Conventions the user can name"):

- `rule`: `top` (highest entropy, the paper), `bottom` (lowest; the paper's ablation), `random`
  (uniform, seeded by a `torch.Generator`), `all` (plain DAPO: every valid token). A registry, `RULES`.
- `count`: `exact` keeps k = ceil(rho * N) of the N valid tokens, ties at the boundary broken by the
  earlier row-major position, so exactly k are kept (the official verl fork counts with `torch.topk`,
  which breaks ties arbitrarily). `quantile` is TRL's `get_high_entropy_mask`: keep H >= the linearly
  interpolated (1 - rho) quantile of the valid entropies, so ties can keep more than k and rho = 0 keeps
  the highest-entropy token(s) ("0.0 masks all but the highest entropy token", TRL's GRPOConfig).
  `fork` is the official fork's count (`get_global_entropy_top_mask`: `top_k = max(1,
  int(len(response_entropy) * top_ratio + 0.9999))`, so at least one token and a fractional part
  under 1e-4 rounds down), ties kept in position order like `exact`. Which tied tokens the fork's
  `torch.topk` keeps is unspecified, so its tie order cannot be reproduced.
- scope: the whole (B, L) batch by default, each row with `per_sequence=True`, and the union of every
  rank's tokens with `group=` (the paper's batch scope across data-parallel ranks). Across ranks the
  result equals selecting, in one process, on the concatenation of every rank's flattened (B, L) tokens in
  rank order; it is found by a radix select over the float bits (a few all-reduces of small histograms),
  never by gathering the entropies, and has no 2^24-element limit (unlike `torch.quantile`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from fractions import Fraction
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import Tensor

from forkrl.core.radix import RADIX_BITS, all_gather, all_reduce_sum, kth_largest, radix_select

__all__ = [
    "COUNTS",
    "RULES",
    "num_selected",
    "radix_kth_largest",
    "register_rule",
    "select_tokens",
    "select_tokens_with_threshold",
    "top_k_mask",
]

COUNTS = ("exact", "quantile", "fork")
"""How many tokens a rule keeps: `exact` (k = ceil(rho N)), `quantile` (TRL's H >= quantile) or `fork`
(the official verl fork's k = max(1, int(rho N + 0.9999)), ties in position order)."""

# k = ceil(rho N) is computed on the decimal rho prints as, less a slack of min(rho N / 10^7, 1 / 10^3),
# so that float noise in a computed or float32 rho (0.1 + 0.2 = 0.30000000000000004, float32 0.2 =
# 0.20000000298...) never adds a token; a real fractional part above the slack always counts.
_K_SLACK_RELATIVE = Fraction(1, 10**7)
_K_SLACK_ABSOLUTE = Fraction(1, 10**3)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def num_selected(n_valid: int, rho: float) -> int:
    """Number of tokens kept in `exact` mode: k = ceil(rho * n_valid).

    Exact rational arithmetic on the shortest decimal that prints as rho (0.2 means 1/5), less a tiny
    slack against float noise, so `num_selected(10, 0.2) == 2`, not 3, also for a float32 0.2;
    k = 0 only when n_valid = 0 or rho = 0.

    >>> num_selected(10, 0.2), num_selected(5, 0.5), num_selected(3, 1e-9), num_selected(0, 0.2)
    (2, 3, 1, 0)
    """
    _check_rho(rho)
    if isinstance(n_valid, bool) or not isinstance(n_valid, numbers.Integral) or n_valid < 0:
        raise ValueError(f"n_valid must be a non-negative int; got {n_valid!r}")
    return _num_selected(int(n_valid), _rho_fraction(rho))


def select_tokens(
    entropy: Tensor,
    loss_mask: Tensor,
    *,
    rho: float = 0.2,
    rule: str = "top",
    count: str = "exact",
    per_sequence: bool = False,
    generator: torch.Generator | None = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """The paper's indicator 1[H_it >= tau_rho^B] as a mask: `sel_mask` (B, L), a subset of `loss_mask`.

    See `select_tokens_with_threshold` for the arguments; this drops the threshold.
    """
    sel_mask, _ = select_tokens_with_threshold(
        entropy,
        loss_mask,
        rho=rho,
        rule=rule,
        count=count,
        per_sequence=per_sequence,
        generator=generator,
        group=group,
    )
    return sel_mask


def select_tokens_with_threshold(
    entropy: Tensor,
    loss_mask: Tensor,
    *,
    rho: float = 0.2,
    rule: str = "top",
    count: str = "exact",
    per_sequence: bool = False,
    generator: torch.Generator | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """Select tokens and return `(sel_mask, tau)`.

    Args:
        entropy: (B, L) float tensor of token entropies H_it (any float dtype; compared in float32).
        loss_mask: (B, L) bool tensor, True = a valid response token.
        rho: fraction of valid tokens to keep, in [0, 1] (the paper's rho; 0.2 in its main runs).
        rule: a key of `RULES`: `top`, `bottom`, `random` or `all`.
        count: `exact` (k = ceil(rho N), deterministic ties) or `quantile` (TRL's rule, see module
            docstring). `random` ignores it and always keeps exactly k; `all` ignores rho and count.
        per_sequence: apply the rule to each row on its own (k per row = ceil(rho * N_row)).
        generator: seeds `random`, which keeps the k tokens with the largest keys
            `torch.rand((B, L), generator=generator)` (ties by position), so a seed fixes the selection.
        group: a `torch.distributed` process group: select over the union of all ranks' valid tokens,
            exactly as one process would on every rank's flattened (B, L) concatenated in rank order.
            Every rank of the group must call this with the same rho, rule, count and per_sequence.
            With `random`, each rank draws its own keys from its own generator. Ignored when
            `per_sequence=True` (rows are local).

    Returns:
        sel_mask: (B, L) bool, a subset of `loss_mask`.
        tau: float32 threshold on the entropy: the k-th largest valid entropy (`top`, `exact`), the k-th
            smallest (`bottom`, `exact`: kept tokens have H <= tau), the interpolated quantile
            (`quantile`); nan when nothing is kept and for `random` and `all`, which use no threshold.
            A 0-dim tensor, or (B,) with `per_sequence=True`.
    """
    _check_inputs(entropy, loss_mask, rho, rule, count, per_sequence)
    # Contiguous, so that flat (row-major) order is memory order for the tie-break.
    return RULES[rule](
        entropy.float().contiguous(),
        loss_mask.contiguous(),
        rho=_rho_fraction(rho),
        count=count,
        per_sequence=per_sequence,
        generator=generator,
        group=None if per_sequence else group,
    )


def radix_kth_largest(
    values: Tensor,
    k: int,
    *,
    valid: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    bits_per_pass: int | None = None,
) -> Tensor:
    """The k-th largest (k = 1 is the maximum) of `values[valid]` over all ranks of `group`.

    A radix select on an order-preserving integer key of the float32 bits: each pass histograms the
    next `bits_per_pass` bits of the candidates (all-reduced across ranks: 2^bits counts, never the
    values) and keeps the bin that holds the k-th largest. 32 / bits_per_pass passes, no host sync in
    the passes, any number of elements. `bits_per_pass=None` picks 16 for large inputs, 8 for small.
    -0.0 and 0.0 count as equal; NaN is not allowed among valid values. Every rank must pass the same k.

    Returns a 0-dim float32 tensor, identical on every rank.
    """
    if valid is None:
        valid = torch.ones_like(values, dtype=torch.bool)
    if valid.dtype != torch.bool or valid.shape != values.shape:
        raise ValueError(
            f"valid must be a bool tensor shaped like values {tuple(values.shape)}; "
            f"got {valid.dtype} {tuple(valid.shape)}"
        )
    if bits_per_pass is not None and bits_per_pass not in RADIX_BITS:
        raise ValueError(
            f"bits_per_pass must be None (automatic) or one of {RADIX_BITS}; got {bits_per_pass!r}"
        )
    n_valid = _global_valid_count(values.float(), valid, group)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n_valid:
        raise ValueError(f"k must be an int in [1, {n_valid}] (the number of valid values); got {k!r}")
    if bits_per_pass is None:
        return kth_largest(values.float(), valid, [int(k)], n_valid, group)[0]
    return radix_select(values.float(), valid, [int(k)], group, bits_per_pass)[0]


def top_k_mask(
    score: Tensor, valid: Tensor, k: int, *, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, Tensor]:
    """The min(k, N) valid positions with the largest score over all ranks of `group`, ties by earlier
    (rank, row-major position), as `select_tokens`' exact count: (mask (B, L), k-th largest score).

    The k-th largest is nan when nothing is kept. Every rank must pass the same k. Used by the
    covariance losses (forkrl.core.cov_losses) for their top-k and their uniform random pick.
    """
    n_valid = _global_valid_count(score.float(), valid, group)
    k = min(int(k), n_valid)
    if k <= 0:
        return torch.zeros_like(valid), torch.full((), math.nan, device=score.device)
    (kth,) = kth_largest(score.float(), valid, [k], n_valid, group)  # ()
    return _take_k_in_order(score.float(), valid, kth, k, group), kth


# ---------------------------------------------------------------------------------------------------
# Rules: name -> function(entropy f32 (B, L), loss_mask, *, rho, count, per_sequence, generator, group)
# ---------------------------------------------------------------------------------------------------

RuleFn = Callable[..., tuple[Tensor, Tensor]]
RULES: dict[str, RuleFn] = {}
"""Selection rules by name; each returns `(sel_mask, tau)`."""


def register_rule(name: str) -> Callable[[RuleFn], RuleFn]:
    """Add a selection rule to `RULES` (verl's `register_adv_est` pattern)."""

    def decorator(fn: RuleFn) -> RuleFn:
        RULES[name] = fn
        return fn

    return decorator


@register_rule("top")
def _rule_top(entropy, loss_mask, *, rho, count, per_sequence, generator, group):
    # The paper's forking tokens: keep the highest entropies.
    if count == "quantile":  # TRL: keep H >= quantile(H, 1 - rho)
        return _quantile_select(
            entropy, loss_mask, 1 - rho, keep_above=True, per_sequence=per_sequence, group=group
        )
    return _exact_top_k(entropy, loss_mask, rho, per_sequence, group, count)


@register_rule("bottom")
def _rule_bottom(entropy, loss_mask, *, rho, count, per_sequence, generator, group):
    # The paper's ablation: keep the lowest entropies. Top-k of -H keeps the earlier position on ties too.
    if count == "quantile":  # mirror of TRL: keep H <= quantile(H, rho)
        return _quantile_select(
            entropy, loss_mask, rho, keep_above=False, per_sequence=per_sequence, group=group
        )
    sel_mask, kth = _exact_top_k(-entropy, loss_mask, rho, per_sequence, group, count)
    return sel_mask, -kth + 0.0  # + 0.0 turns -0.0 into 0.0


@register_rule("random")
def _rule_random(entropy, loss_mask, *, rho, count, per_sequence, generator, group):
    # Exactly k uniform picks (count="quantile" is treated as exact: a quantile of uniform keys is
    # meaningless). Keys cover every (B, L) position so the draw does not depend on the mask.
    keys = torch.rand(loss_mask.shape, generator=generator, device=loss_mask.device)  # (B, L)
    sel_mask, kth = _exact_top_k(
        keys, loss_mask, rho, per_sequence, group, "exact" if count == "quantile" else count
    )
    return sel_mask, torch.full_like(kth, math.nan)


@register_rule("all")
def _rule_all(entropy, loss_mask, *, rho, count, per_sequence, generator, group):
    # Plain DAPO: every valid token; no threshold, so tau is nan.
    shape = (loss_mask.shape[0],) if per_sequence else ()
    return loss_mask.clone(), torch.full(shape, math.nan, device=loss_mask.device)


# ---------------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------------


def _exact_top_k(
    score: Tensor, loss_mask: Tensor, rho: Fraction, per_sequence: bool, group, count: str = "exact"
) -> tuple[Tensor, Tensor]:
    """Keep the k valid tokens with the largest score (k = `K_RULES[count](N, rho)`), ties by earlier
    flat position.

    Returns (sel_mask (B, L), kth) with kth the k-th largest valid score (nan when k = 0).
    """
    if per_sequence:
        return _exact_top_k_rows(score, loss_mask, rho, count)
    n_valid = _global_valid_count(score, loss_mask, group)
    k = K_RULES[count](n_valid, rho)
    if k == 0:
        return torch.zeros_like(loss_mask), torch.full((), math.nan, device=score.device)
    (kth,) = kth_largest(score, loss_mask, [k], n_valid, group)  # ()
    return _take_k_in_order(score, loss_mask, kth, k, group), kth


def _take_k_in_order(score: Tensor, loss_mask: Tensor, kth: Tensor, k: int, group) -> Tensor:
    """All valid tokens above kth, plus the first ties at kth in global (rank, position) order up to k."""
    above = loss_mask & (score > kth)  # (B, L)
    ties = loss_mask & (score == kth)  # (B, L)
    counts = torch.stack([above.count_nonzero(), ties.count_nonzero()])  # (2,) this rank's [above, ties]
    per_rank = all_gather(counts, group)  # (W, 2)
    rank = 0 if group is None else dist.get_rank(group)
    # Only one scalar per rank crosses the wire: how many ties the earlier ranks hold.
    ties_wanted = k - per_rank[:, 0].sum() - per_rank[:rank, 1].sum()  # ()
    take, n_ties = torch.stack([ties_wanted.clamp(0, counts[1]), counts[1]]).tolist()
    if take == n_ties:
        return above | ties
    first_ties = ties.view(-1).nonzero().squeeze(1)[:take]  # (take,) in row-major order
    above.view(-1)[first_ties] = True
    return above


def _exact_top_k_rows(score: Tensor, loss_mask: Tensor, rho: Fraction, count: str) -> tuple[Tensor, Tensor]:
    """Per-row exact top-k: k_b = K_RULES[count](N_b, rho), ties by earlier position in the row."""
    k_rows = [K_RULES[count](n, rho) for n in _checked_row_counts(score, loss_mask)]
    if max(k_rows, default=0) == 0:
        return torch.zeros_like(loss_mask), torch.full((len(k_rows),), math.nan, device=score.device)
    k = torch.tensor(k_rows, dtype=torch.long, device=score.device)  # (B,)
    filled = score.masked_fill(~loss_mask, -math.inf)  # (B, L) padding sorts last
    top = filled.topk(max(k_rows), dim=1).values  # (B, k_max) descending
    kth = top.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1)  # (B,)
    kth = torch.where(k > 0, kth, math.inf)  # a row with k = 0 keeps nothing
    above = loss_mask & (score > kth[:, None])  # (B, L)
    ties = loss_mask & (score == kth[:, None])  # (B, L)
    ties_wanted = k - above.count_nonzero(1)  # (B,)
    sel_mask = above | (ties & (ties.cumsum(1) <= ties_wanted[:, None]))  # (B, L)
    return sel_mask, kth.masked_fill(k == 0, math.nan)


def _quantile_select(
    entropy: Tensor, loss_mask: Tensor, p: Fraction, *, keep_above: bool, per_sequence: bool, group
) -> tuple[Tensor, Tensor]:
    """TRL's rule: keep H >= q (keep_above) or H <= q, with q the linear-interpolated p-quantile.

    q = x_lo + w (x_hi - x_lo) with pos = p (N - 1), x_lo/x_hi the floor/ceil(pos)-th smallest valid H
    and w = pos - floor(pos) (torch.quantile's `linear` interpolation), computed from two order
    statistics instead of a sort, so any N works.
    """
    if per_sequence:
        tau = _quantile_rows(entropy, loss_mask, p)  # (B,)
        tau_b = tau[:, None]  # (B, 1)
    else:
        n_valid = _global_valid_count(entropy, loss_mask, group)
        if n_valid == 0:
            return torch.zeros_like(loss_mask), torch.full((), math.nan, device=entropy.device)
        lo, hi, w = _quantile_position(n_valid, p)
        if w == 0.0:  # pos is an integer: one order statistic (and no 0 * inf in the lerp)
            (tau,) = kth_largest(entropy, loss_mask, [n_valid - lo], n_valid, group)  # () lo-th smallest
        else:
            ks = [n_valid - lo, n_valid - hi]
            x_lo, x_hi = kth_largest(entropy, loss_mask, ks, n_valid, group)  # (), ()
            tau = torch.lerp(x_lo, x_hi, w)
        tau_b = tau
    keep = entropy >= tau_b if keep_above else entropy <= tau_b  # (B, L)
    return loss_mask & keep, tau


def _quantile_rows(entropy: Tensor, loss_mask: Tensor, p: Fraction) -> Tensor:
    """Per-row linear-interpolated p-quantile of the valid entropies; nan for rows without any. (B,)"""
    row_counts = _checked_row_counts(entropy, loss_mask)
    device = entropy.device
    if entropy.numel() == 0:
        return torch.full((len(row_counts),), math.nan, device=device)
    positions = [_quantile_position(n, p) if n > 0 else (0, 0, 0.0) for n in row_counts]
    lo = torch.tensor([q[0] for q in positions], dtype=torch.long, device=device)  # (B,)
    hi = torch.tensor([q[1] for q in positions], dtype=torch.long, device=device)  # (B,)
    w = torch.tensor([q[2] for q in positions], dtype=torch.float32, device=device)  # (B,)
    ascending = entropy.masked_fill(~loss_mask, math.inf).sort(dim=1).values  # (B, L) padding last
    x_lo = ascending.gather(1, lo[:, None]).squeeze(1)  # (B,)
    x_hi = ascending.gather(1, hi[:, None]).squeeze(1)  # (B,)
    tau = torch.where(w == 0, x_lo, torch.lerp(x_lo, x_hi, w))  # (B,)
    empty = torch.tensor([n == 0 for n in row_counts], device=device)  # (B,)
    return tau.masked_fill(empty, math.nan)


# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------


def _num_selected(n_valid: int, rho: Fraction) -> int:
    # ceil(rho n - slack) in exact rational arithmetic; the slack (< rho n) only absorbs float noise.
    x = rho * n_valid
    return math.ceil(x - min(x * _K_SLACK_RELATIVE, _K_SLACK_ABSOLUTE))


def _fork_k(n_valid: int, rho: Fraction) -> int:
    # The fork's float arithmetic on the float rho (returns an all-zero mask before k when N = 0).
    return max(1, int(n_valid * float(rho) + 0.9999)) if n_valid else 0


K_RULES: dict[str, Callable[[int, Fraction], int]] = {"exact": _num_selected, "fork": _fork_k}


@lru_cache(maxsize=4096)
def _quantile_position(n_valid: int, p: Fraction) -> tuple[int, int, float]:
    """(lo, hi, w) for the p-quantile of n_valid sorted values: pos = p (n - 1) exactly."""
    pos = p * (n_valid - 1)
    lo = math.floor(pos)
    return lo, math.ceil(pos), float(pos - lo)


def _rho_fraction(rho: float) -> Fraction:
    return Fraction(repr(float(rho)))  # the decimal the float prints as: 0.2 -> 1/5


def _global_valid_count(score: Tensor, loss_mask: Tensor, group) -> int:
    """N, the number of valid tokens over the group; raises on NaN at a valid position (on every rank)."""
    n_nan = torch.isnan(score).logical_and_(loss_mask).count_nonzero()  # ()
    stats = torch.stack([loss_mask.count_nonzero(), n_nan])  # (2,)
    all_reduce_sum(stats, group)
    n_valid, n_nan = stats.tolist()
    if n_nan:
        where = " (summed over the process group)" if group is not None else ""
        raise ValueError(
            f"entropy has {n_nan} NaN values at loss_mask=True positions{where}; "
            "check the scoring pass (log-probs / entropy) for overflow or an empty distribution"
        )
    return n_valid


def _checked_row_counts(score: Tensor, loss_mask: Tensor) -> list[int]:
    """Valid tokens per row, as ints (one host sync); raises on NaN at a valid position."""
    n_nan = torch.isnan(score).logical_and_(loss_mask).count_nonzero()[None]  # (1,)
    stats = torch.cat([loss_mask.count_nonzero(1), n_nan]).tolist()  # (B + 1,)
    if stats[-1]:
        raise ValueError(
            f"entropy has {stats[-1]} NaN values at loss_mask=True positions; "
            "check the scoring pass (log-probs / entropy) for overflow or an empty distribution"
        )
    return stats[:-1]


def _check_rho(rho: object) -> None:
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0.0 <= float(rho) <= 1.0:
        raise ValueError(f"rho must be a number in [0, 1] (the fraction of valid tokens kept); got {rho!r}")


def _check_inputs(entropy, loss_mask, rho, rule, count, per_sequence) -> None:
    """Fail early with the argument, the value and what is allowed (STYLE habit 8)."""
    if not isinstance(entropy, Tensor) or not entropy.is_floating_point() or entropy.dim() != 2:
        got = (
            f"{entropy.dtype} tensor of shape {tuple(entropy.shape)}"
            if isinstance(entropy, Tensor)
            else type(entropy)
        )
        raise ValueError(f"entropy must be a 2-D floating-point tensor (B, L); got {got}")
    if not isinstance(loss_mask, Tensor) or loss_mask.dtype != torch.bool:
        got = loss_mask.dtype if isinstance(loss_mask, Tensor) else type(loss_mask)
        raise ValueError(
            f"loss_mask must be a torch.bool tensor (True = valid response token); got {got}. "
            "Convert it with `loss_mask.bool()`"
        )
    if loss_mask.shape != entropy.shape:
        raise ValueError(
            f"loss_mask shape {tuple(loss_mask.shape)} must equal entropy shape {tuple(entropy.shape)} (B, L)"
        )
    if loss_mask.device != entropy.device:
        raise ValueError(f"loss_mask is on {loss_mask.device} but entropy is on {entropy.device}; move one")
    _check_rho(rho)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {sorted(RULES)}; got {rule!r}")
    if count not in COUNTS:
        raise ValueError(f"count must be one of {list(COUNTS)}; got {count!r}")
    if not isinstance(per_sequence, bool):
        raise ValueError(f"per_sequence must be a bool; got {per_sequence!r}")
