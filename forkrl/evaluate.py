"""Held-out evaluation: accuracy (greedy), avg@k and unbiased pass@k (sampled)."""

from __future__ import annotations

from math import comb

import torch

from forkrl.rollout.hf import generate


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(4, 0, 2)
    (0.25, 1.0, 0.0)
    """
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@torch.no_grad()
def evaluate_task(
    model,
    tokenizer,
    task,
    examples,
    *,
    greedy=True,
    k=1,
    temperature=1.0,
    top_p=1.0,
    max_new_tokens=None,
    batch_size=256,
    seed=0,
) -> dict:
    """Accuracy of `model` on `examples` graded by `task.grade`.

    Greedy: one completion each, "accuracy" is the mean grade. Sampled: k completions each, "accuracy"
    is avg@k (mean grade over all samples) and "pass@k" the unbiased estimator averaged over problems.
    """
    with torch.random.fork_rng():  # evaluation must not shift the training run's random stream
        return _evaluate_task(
            model,
            tokenizer,
            task,
            examples,
            greedy=greedy,
            k=k,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
        )


def _evaluate_task(
    model, tokenizer, task, examples, *, greedy, k, temperature, top_p, max_new_tokens, batch_size, seed
) -> dict:
    max_new_tokens = max_new_tokens or task.default_max_new_tokens
    n = 1 if greedy else k
    grades: list[list[float]] = []
    for start in range(0, len(examples), max(1, batch_size // n)):
        chunk = examples[start : start + max(1, batch_size // n)]
        ro = generate(
            model,
            tokenizer,
            [e.prompt for e in chunk],
            n=n,
            greedy=greedy,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            generator_seed=seed + start,
        )
        for i, e in enumerate(chunk):
            grades.append([task.grade(ro.texts[i * n + j], e) for j in range(n)])
    flat = [g for row in grades for g in row]
    out = {"accuracy": sum(flat) / max(1, len(flat)), "n": len(examples)}
    if not greedy:
        out[f"pass@{k}"] = sum(pass_at_k(n, int(sum(row)), k) for row in grades) / max(1, len(grades))
    return out
