"""Dual-temperature decoding: one temperature for high-entropy (forking) steps, another for the rest.

The paper's decoding experiment (Wang et al. 2025, Sec. 3, Fig. 3) samples each step with T_high when
its entropy is at or above a threshold (their 80th percentile, 0.672 for Qwen3-8B) and T_low otherwise,
and finds that raising T at the forking tokens helps while raising it elsewhere hurts.

The entropy that decides is H = -Σ p ln p with p = softmax(raw logits), i.e. at T = 1: it does not
depend on the two temperatures being compared, so a cell of the sweep changes only how each step is
sampled, never which steps count as forking; and it is the entropy whose percentiles `forkrl analyze
stats` reports for a dump generated at T = 1, so the paper's "80th percentile" threshold carries over.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from transformers import LogitsProcessor

from forkrl.evaluate import pass_at_k
from forkrl.rollout.hf import generate


def row_entropy(scores: Tensor) -> Tensor:
    """H of softmax(scores) per row, float32 (B,); -inf scores (masked tokens) contribute 0."""
    logp = torch.log_softmax(scores.float(), dim=-1)  # (B, V)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)  # (B,)


class DualTemperatureProcessor(LogitsProcessor):
    """Divide each row's logits by `t_high` where its T=1 entropy >= `threshold`, else by `t_low`.

    Works as a `transformers` processor (`model.generate(..., do_sample=True,
    logits_processor=LogitsProcessorList([proc]))`; leave generate's own `temperature` at 1.0 so it
    does not rescale again) and as forkrl's `generate(..., logits_processor=proc)`, which calls it with
    the raw logits and samples from softmax of what it returns. With t_high = t_low = 1 it returns the
    scores unchanged (x / 1.0 is exact), so it samples exactly as plain T = 1 sampling.
    """

    def __init__(self, threshold: float, t_high: float, t_low: float):
        for name, t in (("t_high", t_high), ("t_low", t_low)):
            if not t > 0:
                raise ValueError(f"DualTemperatureProcessor: {name}={t!r} must be > 0")
        self.threshold, self.t_high, self.t_low = float(threshold), float(t_high), float(t_low)

    def high_mask(self, scores: Tensor) -> Tensor:
        """(B,) True where the step is sampled at t_high."""
        return row_entropy(scores) >= self.threshold

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        t = torch.where(self.high_mask(scores), self.t_high, self.t_low)  # (B,) float32
        return (scores.float() / t[:, None]).to(scores.dtype)  # (B, V)


def calibrate_threshold(
    model, tokenizer, examples, *, quantile: float = 0.8, max_new_tokens: int = 64, n: int = 1, seed: int = 0
) -> float:
    """The `quantile` of the T=1 entropy of the response tokens sampled at T = 1 (the paper's choice:
    the 80th percentile)."""
    ro = generate(
        model,
        tokenizer,
        [e.prompt for e in examples],
        n=n,
        temperature=1.0,
        max_new_tokens=max_new_tokens,
        generator_seed=seed,
    )
    h = ro.sampler_entropy[ro.response_mask]
    if h.numel() == 0:
        raise ValueError("calibration produced no response tokens; give --threshold explicitly")
    return float(np.quantile(h.double().numpy(), quantile))


@torch.no_grad()
def dual_temperature_eval(
    model,
    tokenizer,
    task,
    examples,
    t_high: float,
    t_low: float,
    threshold: float,
    k: int = 4,
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """avg@k and pass@k of `examples` sampled k times each with dual-temperature decoding.

    `task.grade(text, example) -> float` grades (>= 0.5 counts as correct for pass@k). Also returns
    `high_frac`, the share of response tokens sampled at t_high. Every cell of a sweep uses the same
    seeds, so cells differ only by the temperatures.
    """
    max_new_tokens = max_new_tokens or getattr(task, "default_max_new_tokens", 64)
    proc = DualTemperatureProcessor(threshold, t_high, t_low)
    grades: list[list[float]] = []
    n_high = n_tok = 0
    per_call = max(1, batch_size // k)
    for start in range(0, len(examples), per_call):
        chunk = examples[start : start + per_call]
        # temperature=1.0: the sampler's entropy is then the processor's T=1 entropy, counted below.
        ro = generate(
            model,
            tokenizer,
            [e.prompt for e in chunk],
            n=k,
            temperature=1.0,
            max_new_tokens=max_new_tokens,
            generator_seed=seed + start,
            logits_processor=proc,
        )
        valid = ro.sampler_entropy[ro.response_mask]
        n_high += int((valid >= threshold).sum())
        n_tok += valid.numel()
        for i, e in enumerate(chunk):
            grades.append([float(task.grade(ro.texts[i * k + j], e)) for j in range(k)])
    flat = [g for row in grades for g in row]
    return {
        "t_high": t_high,
        "t_low": t_low,
        "threshold": threshold,
        "accuracy": sum(flat) / max(1, len(flat)),
        f"pass@{k}": sum(pass_at_k(k, sum(g >= 0.5 for g in row), k) for row in grades) / max(1, len(grades)),
        "high_frac": n_high / max(1, n_tok),
        "n": len(examples),
        "k": k,
    }


def sweep(model, tokenizer, task, examples, t_highs, t_lows, threshold: float, k: int = 4, **kwargs) -> dict:
    """avg@k for every (t_high, t_low): {"grid": [[acc for t_low] for t_high], "cells": [...], ...}."""
    cells = [
        dual_temperature_eval(model, tokenizer, task, examples, th, tl, threshold, k, **kwargs)
        for th in t_highs
        for tl in t_lows
    ]
    grid = [[cells[i * len(t_lows) + j]["accuracy"] for j in range(len(t_lows))] for i in range(len(t_highs))]
    return {
        "t_high": list(t_highs),
        "t_low": list(t_lows),
        "threshold": threshold,
        "k": k,
        "grid": grid,
        "cells": cells,
    }


def plot_sweep(result: dict, path) -> None:
    """Heat map of avg@k over (T_low, T_high), values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.asarray(result["grid"], dtype=float)
    fig, ax = plt.subplots(
        figsize=(1.3 * len(result["t_low"]) + 2.2, 1.0 * len(result["t_high"]) + 1.6), dpi=110
    )
    im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(result["t_low"])), [f"{t:g}" for t in result["t_low"]])
    ax.set_yticks(range(len(result["t_high"])), [f"{t:g}" for t in result["t_high"]])
    ax.set_xlabel("T_low (steps with H < threshold)")
    ax.set_ylabel("T_high (steps with H >= threshold)")
    ax.set_title(f"avg@{result['k']}, threshold H = {result['threshold']:.3g}")
    mid = (np.nanmax(grid) + np.nanmin(grid)) / 2 if grid.size else 0
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(
                j,
                i,
                f"{grid[i, j]:.3f}",
                ha="center",
                va="center",
                color="white" if grid[i, j] < mid else "black",
            )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
