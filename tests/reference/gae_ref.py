"""Slow, obviously-correct references for PPO's token-level math (forkrl.core.advantages, losses).

Plain Python loops over floats, one row and one token at a time, written from the formulas in the
docstrings of the fast versions and not from their code.
"""

from __future__ import annotations

import math


def gae_ref(
    rewards: list[list[float]], values: list[list[float]], mask: list[list[bool]], gamma: float, lam: float
) -> tuple[list[list[float]], list[list[float]]]:
    """GAE row by row over the valid tokens only (masked tokens are skipped, the episode ends after
    the last valid one): δₜ = rₜ + γ V_next − Vₜ, Âₜ = δₜ + γλ Â_next; Rₜ = Âₜ + Vₜ; 0 elsewhere."""
    adv_rows, ret_rows = [], []
    for r, v, m in zip(rewards, values, mask):
        L = len(m)
        adv, ret = [0.0] * L, [0.0] * L
        idx = [t for t in range(L) if m[t]]
        next_v, next_a = 0.0, 0.0
        for t in reversed(idx):
            delta = r[t] + gamma * next_v - v[t]
            a = delta + gamma * lam * next_a
            adv[t], ret[t] = a, a + v[t]
            next_v, next_a = v[t], a
        adv_rows.append(adv)
        ret_rows.append(ret)
    return adv_rows, ret_rows


def monte_carlo_ref(
    rewards: list[list[float]], values: list[list[float]], mask: list[list[bool]]
) -> list[list[float]]:
    """γ = λ = 1: the sum of the rewards from t to the end of the row minus Vₜ."""
    out = []
    for r, v, m in zip(rewards, values, mask):
        L = len(m)
        out.append([sum(r[s] for s in range(t, L) if m[s]) - v[t] if m[t] else 0.0 for t in range(L)])
    return out


def whiten_ref(x: list[list[float]], mask: list[list[bool]], eps: float = 1e-8) -> list[list[float]]:
    """(x − mean) / sqrt(unbiased var + eps) over every valid token; 0 elsewhere."""
    vals = [xi for row, mrow in zip(x, mask) for xi, mi in zip(row, mrow) if mi]
    n = len(vals)
    mean = sum(vals) / n if n else 0.0
    var = sum((xi - mean) ** 2 for xi in vals) / (n - 1) if n > 1 else 0.0
    return [
        [(xi - mean) / math.sqrt(var + eps) if mi else 0.0 for xi, mi in zip(row, mrow)]
        for row, mrow in zip(x, mask)
    ]
