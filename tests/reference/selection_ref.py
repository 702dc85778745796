"""Slow, obviously-correct token selection on Python lists (the spec of forkrl.core.selection).

Entropies are float32 values held as Python floats (exact); every sort is a plain `sorted` over
(value, flat index) pairs, every count a loop, every quantile exact rational arithmetic.
"""

from __future__ import annotations

import math
from fractions import Fraction

from tests.reference.official_ref import official_k

Matrix = list[list[float]]
BoolMatrix = list[list[bool]]


def ref_num_selected(n_valid: int, rho: float) -> int:
    """Smallest k with k >= rho * n - min(rho * n * 1e-7, 1e-3) (rho as the decimal it prints as)."""
    exact = Fraction(repr(float(rho))) * n_valid
    target = exact - min(exact / 10**7, Fraction(1, 1000))
    k = 0
    while k < target:
        k += 1
    return k


def ref_quantile(values: list[float], p: Fraction) -> float:
    """Linear-interpolated p-quantile (torch.quantile's default), in exact arithmetic, as a float64."""
    ordered = sorted(values)
    pos = p * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    x_lo, x_hi = Fraction(ordered[lo]), Fraction(ordered[hi])
    return float(x_lo + (pos - lo) * (x_hi - x_lo))


def ref_top_k(items: list[tuple[float, int]], k: int) -> list[tuple[float, int]]:
    """The k items with the largest value; equal values: smaller index first."""
    return sorted(items, key=lambda vi: (-vi[0], vi[1]))[:k]


def ref_select(
    entropy: Matrix,
    mask: BoolMatrix,
    rho: float,
    rule: str = "top",
    count: str = "exact",
    per_sequence: bool = False,
    keys: Matrix | None = None,
) -> tuple[BoolMatrix, float | list[float]]:
    """(sel, tau) exactly as `select_tokens_with_threshold` specifies, one scope at a time.

    `keys` are the random rule's uniform draws (the same (B, L) values the fast path draws).
    """
    if per_sequence:
        rows = [
            _select_scope([entropy[b]], [mask[b]], rho, rule, count, None if keys is None else [keys[b]])
            for b in range(len(mask))
        ]
        return [sel[0] for sel, _ in rows], [tau for _, tau in rows]
    return _select_scope(entropy, mask, rho, rule, count, keys)


def _select_scope(entropy, mask, rho, rule, count, keys):
    width = len(mask[0]) if mask else 0
    flat = [(entropy[b][j], b * width + j) for b in range(len(mask)) for j in range(width) if mask[b][j]]
    sel = [[False] * width for _ in mask]
    chosen: set[int] = set()
    tau = math.nan
    if rule == "all":
        chosen = {i for _, i in flat}
    elif not flat:
        pass
    elif count == "quantile" and rule in ("top", "bottom"):
        q = Fraction(repr(float(rho)))
        if rule == "top":
            tau = ref_quantile([v for v, _ in flat], 1 - q)
            chosen = {i for v, i in flat if v >= tau}
        else:
            tau = ref_quantile([v for v, _ in flat], q)
            chosen = {i for v, i in flat if v <= tau}
    else:
        k = official_k(len(flat), rho) if count == "fork" else ref_num_selected(len(flat), rho)
        if rule == "top":
            picked = ref_top_k(flat, k)
        elif rule == "bottom":
            picked = [(-v, i) for v, i in ref_top_k([(-v, i) for v, i in flat], k)]
        elif rule == "random":
            picked = ref_top_k([(keys[i // width][i % width], i) for _, i in flat], k)
        else:
            raise ValueError(rule)
        chosen = {i for _, i in picked}
        if picked and rule != "random":
            tau = picked[-1][0]
    for i in chosen:
        sel[i // width][i % width] = True
    return sel, tau


def ref_kth_largest(values: list[float], k: int) -> float:
    """k-th largest (k = 1 the maximum) by a full sort."""
    return sorted(values, reverse=True)[k - 1]
