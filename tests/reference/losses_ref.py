"""Slow, obviously-correct references for forkrl.core.{advantages, losses, sampling}.

Plain Python loops over floats (double precision), one token at a time, written from the formulas
in the docstrings of the fast versions and not from their code.
"""

from __future__ import annotations

import math

import torch

# ----------------------------------------------------------------------------- advantages


def _groups(rewards: torch.Tensor, group_size: int) -> list[list[float]]:
    values = [float(x) for x in rewards.tolist()]
    return [values[i : i + group_size] for i in range(0, len(values), group_size)]


def grpo_ref(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> list[float]:
    out = []
    for g in _groups(rewards, group_size):
        if len(g) == 1 or max(g) == min(g):
            out += [0.0] * len(g)
            continue
        mean = sum(g) / len(g)
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / (len(g) - 1))  # unbiased
        out += [(x - mean) / (std + eps) for x in g]
    return out


def dr_grpo_ref(rewards: torch.Tensor, group_size: int) -> list[float]:
    out = []
    for g in _groups(rewards, group_size):
        if max(g) == min(g):
            out += [0.0] * len(g)
            continue
        mean = sum(g) / len(g)
        out += [x - mean for x in g]
    return out


def rloo_ref(rewards: torch.Tensor, group_size: int) -> list[float]:
    out = []
    for g in _groups(rewards, group_size):
        if len(g) == 1 or max(g) == min(g):
            out += [0.0] * len(g)
            continue
        for i, x in enumerate(g):
            others = [y for j, y in enumerate(g) if j != i]
            out.append(x - sum(others) / len(others))
    return out


ADVANTAGES_REF = {"grpo": grpo_ref, "dr_grpo": dr_grpo_ref, "rloo": rloo_ref}

# ----------------------------------------------------------------------------- loss


def kl_ref(estimator: str, logp: float, ref: float) -> float:
    if estimator in ("k1", "kl"):
        return logp - ref
    if estimator == "abs":
        return abs(logp - ref)
    if estimator in ("k2", "mse"):
        return 0.5 * (logp - ref) ** 2
    if estimator == "k3_unclamped":
        return math.exp(ref - logp) - (ref - logp) - 1
    if estimator in ("k3", "low_var_kl"):
        d = min(max(ref - logp, -20.0), 20.0)
        return min(max(math.exp(d) - d - 1, -10.0), 10.0)
    raise KeyError(estimator)


def token_pg_ref(logp: float, old: float, a: float, eps_low: float, eps_high: float, dual_clip) -> float:
    """-min(r·A, clip(r)·A), and for A < 0 at most -c·A."""
    r = math.exp(min(max(logp - old, -20.0), 20.0))
    term = -min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
    if dual_clip is not None and a < 0:
        term = min(term, -dual_clip * a)
    return term


def policy_loss_ref(
    logp,
    old_logp,
    adv,
    loss_mask,
    sel_mask,
    *,
    eps_low=0.2,
    eps_high=0.28,
    dual_clip=None,
    normalizer="all_tokens",
    max_len=None,
    kl=None,
    entropy=None,
    token_counts=None,
):
    """Returns (loss, metrics) as Python floats. ``kl`` is a forkrl KLPenalty (or None)."""
    lp, old, lm, sm = logp.tolist(), old_logp.tolist(), loss_mask.tolist(), sel_mask.tolist()
    B, L = len(lp), len(lp[0]) if lp else 0
    a = adv.tolist()
    adv_at = (lambda i, t: a[i]) if adv.dim() == 1 else (lambda i, t: a[i][t])
    ref = kl.ref_logp.tolist() if kl is not None else None
    ent = entropy.tolist() if entropy is not None else None

    terms = [[0.0] * L for _ in range(B)]
    pg_terms = [[0.0] * L for _ in range(B)]
    kl_terms = [[0.0] * L for _ in range(B)]
    n_valid = n_sel = 0
    low = high = dual = 0
    approx = 0.0
    for i in range(B):
        for t in range(L):
            if lm[i][t]:
                n_valid += 1
            if sm[i][t]:
                n_sel += 1
                A = adv_at(i, t)
                pg = token_pg_ref(lp[i][t], old[i][t], A, eps_low, eps_high, dual_clip)
                pg_terms[i][t] = pg
                log_r = min(max(lp[i][t] - old[i][t], -20.0), 20.0)
                r = math.exp(log_r)
                low += A < 0 and r < 1 - eps_low
                high += A > 0 and r > 1 + eps_high
                if dual_clip is not None:
                    plain = -min(r * A, min(max(r, 1 - eps_low), 1 + eps_high) * A)
                    dual += A < 0 and plain > -dual_clip * A
                approx += (r - 1) - log_r
            in_kl = kl is not None and (sm[i][t] if kl.scope == "selected" else lm[i][t])
            if in_kl:
                kl_terms[i][t] = kl_ref(kl.estimator, lp[i][t], ref[i][t])
            terms[i][t] = pg_terms[i][t] + (kl.coef * kl_terms[i][t] if in_kl else 0.0)

    n_seq = sum(1 for i in range(B) if any(lm[i]))
    if token_counts is None:
        counts = (float(n_valid), float(n_sel), float(n_seq), float(B))
    else:
        rows = token_counts.rows if token_counts.rows is not None else token_counts.sequences
        counts = tuple(
            float(v) for v in (token_counts.valid, token_counts.selected, token_counts.sequences, rows)
        )

    def normalise(x):
        total = sum(sum(row) for row in x)
        if normalizer == "all_tokens":
            return total / counts[0] if counts[0] > 0 else 0.0
        if normalizer == "selected_tokens":
            return total / counts[1] if counts[1] > 0 else 0.0
        if normalizer == "seq_mean":
            per_seq = 0.0
            for i in range(B):
                n_i = sum(1 for t in range(L) if lm[i][t])
                per_seq += sum(x[i]) / n_i if n_i > 0 else 0.0
            return per_seq / counts[2] if counts[2] > 0 else 0.0
        if normalizer == "constant":
            d = counts[2] * max_len
            return total / d if d > 0 else 0.0
        if normalizer == "dr_grpo":  # every row, a fully masked one too
            d = counts[3] * max_len
            return total / d if d > 0 else 0.0
        raise KeyError(normalizer)

    def frac(num, den):
        return num / den if den > 0 else 0.0

    metrics = {
        "pg_loss": normalise(pg_terms),
        "clip_frac_low": frac(low, n_sel),
        "clip_frac_high": frac(high, n_sel),
        "approx_kl": frac(approx, n_sel),
        "kept_frac": frac(n_sel, n_valid),
        "valid_tokens": float(n_valid),
        "selected_tokens": float(n_sel),
    }
    if dual_clip is not None:
        metrics["dual_clip_frac"] = frac(dual, n_sel)
    if ent is not None:
        kept = [ent[i][t] for i in range(B) for t in range(L) if sm[i][t]]
        dropped = [ent[i][t] for i in range(B) for t in range(L) if lm[i][t] and not sm[i][t]]
        metrics["entropy_kept"] = frac(sum(kept), len(kept))
        metrics["entropy_dropped"] = frac(sum(dropped), len(dropped))
    if kl is not None:
        n_kl = sum(1 for i in range(B) for t in range(L) if (sm if kl.scope == "selected" else lm)[i][t])
        metrics["kl"] = frac(sum(sum(row) for row in kl_terms), n_kl)
        metrics["kl_loss"] = normalise([[kl.coef * v for v in row] for row in kl_terms])
    return normalise(terms), metrics


# ----------------------------------------------------------------------------- sampling


def dynamic_sampling_keep_ref(rewards: torch.Tensor, group_size: int) -> list[bool]:
    return [len(g) == 1 or any(x != g[0] for x in g) for g in _groups(rewards, group_size)]


def overlong_penalty_ref(lengths: torch.Tensor, max_len: int, buffer: int, factor: float) -> list[float]:
    out = []
    for length in lengths.tolist():
        if length <= max_len - buffer:
            out.append(0.0)
        elif length <= max_len:
            out.append(((max_len - buffer) - length) / buffer * factor)
        else:
            out.append(-factor)
    return out


def overlong_filter_mask_ref(loss_mask: torch.Tensor, truncated: torch.Tensor) -> list[list[bool]]:
    return [
        [bool(m) and not bool(tr) for m in row]
        for row, tr in zip(loss_mask.tolist(), truncated.tolist(), strict=True)
    ]
