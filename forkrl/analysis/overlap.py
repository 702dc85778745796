"""Do checkpoints agree on where the forking tokens are? Overlap of top-rho entropy positions.

The paper (Wang et al. 2025, Sec. 4, Fig. 6) scores the same responses with the base model and with RL
checkpoints and finds that most top-20% entropy positions stay the same (overlap above 86% at the end
of training), and that RL mostly changes the entropy of the tokens that started high. Here every
checkpoint scores the SAME responses, sampled once by the first one, and:

    overlap(A, B) = |S_A ∩ S_B| / |S_A|

with S_X the top-rho positions under checkpoint X (`select_tokens`, batch scope, exact count, so
|S_A| = |S_B| = ceil(rho N) and the overlap is symmetric). Entropies are H of softmax(z / T) at the
sampling temperature T, from forkrl's scoring pass.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from forkrl.analysis.report import short_labels
from forkrl.core.selection import select_tokens
from forkrl.rollout.base import Rollout
from forkrl.rollout.hf import generate
from forkrl.training.forward import scoring_pass


def topk_overlap(entropy_a: Tensor, entropy_b: Tensor, loss_mask: Tensor, rho: float = 0.2) -> float:
    """|S_a ∩ S_b| / |S_a| for the top-rho entropy positions S of each (B, L) entropy (nan when empty).

    >>> m = torch.ones(1, 5, dtype=torch.bool)
    >>> topk_overlap(torch.tensor([[5.0, 4, 3, 2, 1]]), torch.tensor([[5.0, 1, 4, 2, 3]]), m, rho=0.4)
    0.5
    """
    sel_a = select_tokens(entropy_a, loss_mask, rho=rho)  # (B, L)
    sel_b = select_tokens(entropy_b, loss_mask, rho=rho)  # (B, L)
    n_a = int(sel_a.sum())
    return float((sel_a & sel_b).sum()) / n_a if n_a else float("nan")


def entropy_change(entropy_a: Tensor, entropy_b: Tensor, loss_mask: Tensor, rho: float = 0.2) -> dict:
    """Mean entropy under A and B, and the mean change B - A, for the tokens that were top-rho under A
    ("high") and the rest ("low"); plus the mean change per decile of A's entropy."""
    sel_a = select_tokens(entropy_a, loss_mask, rho=rho)  # (B, L)
    out: dict = {}
    for name, m in (("high", sel_a), ("low", loss_mask & ~sel_a)):
        a, b = entropy_a[m].double(), entropy_b[m].double()
        n = a.numel()
        out[name] = {
            "n": n,
            "entropy_a": a.mean().item() if n else float("nan"),
            "entropy_b": b.mean().item() if n else float("nan"),
            "change": (b - a).mean().item() if n else float("nan"),
            "abs_change": (b - a).abs().mean().item() if n else float("nan"),
        }
    a = entropy_a[loss_mask].double().numpy()
    d = entropy_b[loss_mask].double().numpy() - a
    deciles = []
    if a.size:
        order = np.argsort(a, kind="stable")
        for part in np.array_split(order, 10):
            deciles.append(float(d[part].mean()) if part.size else float("nan"))
    out["change_by_decile"] = deciles  # lowest-entropy tenth first
    return out


@torch.no_grad()
def score_rollout(model, ro: Rollout, *, temperature: float, micro_batch_size: int = 32) -> Tensor:
    """Entropy (B, L) float32 of every response token of `ro` under `model` (no grad, eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for s in range(0, ro.response_ids.shape[0], micro_batch_size):
        rows = slice(s, s + micro_batch_size)
        _, h = scoring_pass(
            model,
            ro.input_ids[rows].to(device),
            ro.attention_mask[rows].to(device),
            ro.prompt_len,
            ro.response_ids[rows].to(device),
            temperature=temperature,
        )
        parts.append(h.float().cpu())
    model.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0, ro.response_ids.shape[1])


def same_vocabulary(tok_a, tok_b) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab()


def checkpoint_overlap(
    load,
    checkpoints: list[str],
    prompts: list[str],
    *,
    n: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    rho: float = 0.2,
    seed: int = 0,
) -> dict:
    """Generate once with the first checkpoint, score with each, compare with the first and the previous.

    `load(path) -> (model, tokenizer)` loads a checkpoint; they are loaded one at a time.
    """
    if len(checkpoints) < 2:
        raise ValueError("overlap needs at least two checkpoints (CKPT_A CKPT_B [CKPT ...])")
    model, tok0 = load(checkpoints[0])
    ro = generate(
        model, tok0, prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, generator_seed=seed
    )
    mask = ro.response_mask.cpu()
    entropies = [score_rollout(model, ro, temperature=temperature)]
    del model
    for path in checkpoints[1:]:
        model, tok = load(path)
        if not same_vocabulary(tok0, tok):
            raise ValueError(
                f"checkpoint {path!r} has a different tokenizer from {checkpoints[0]!r}: the same responses "
                "cannot be scored token by token; compare checkpoints of one model family"
            )
        entropies.append(score_rollout(model, ro, temperature=temperature))
        del model
    rows = []
    for i, (path, h) in enumerate(zip(checkpoints, entropies)):
        rows.append(
            {
                "checkpoint": str(path),
                "mean_entropy": h[mask].double().mean().item() if mask.any() else float("nan"),
                "overlap_vs_first": topk_overlap(entropies[0], h, mask, rho),
                "overlap_vs_previous": topk_overlap(entropies[max(0, i - 1)], h, mask, rho),
                "change_vs_first": entropy_change(entropies[0], h, mask, rho),
            }
        )
    return {
        "rho": rho,
        "temperature": temperature,
        "responses": len(ro.texts),
        "tokens": int(mask.sum()),
        "checkpoints": rows,
    }


def plot_overlap(result: dict, path, labels: list[str] | None = None) -> None:
    """Overlap with the first checkpoint (and the previous one) per checkpoint; entropy of the tokens that
    started high vs low."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["checkpoints"]
    labels = labels or short_labels([r["checkpoint"] for r in rows])
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    ax1.plot(x, [r["overlap_vs_first"] for r in rows], "o-", label="vs first checkpoint")
    ax1.plot(x[1:], [r["overlap_vs_previous"] for r in rows[1:]], "s--", label="vs previous checkpoint")
    ax1.set_ylim(0, 1.02)
    ax1.set_ylabel(f"overlap of top-{result['rho']:.0%} entropy positions")
    ax1.set_title(f"{result['tokens']} tokens of {result['responses']} responses (sampled by the first)")
    for name, style in (("high", "o-"), ("low", "s-")):
        ax2.plot(
            x,
            [r["change_vs_first"][name]["entropy_b"] for r in rows],
            style,
            label=f"started {name} under first",
        )
    ax2.set_ylabel("mean entropy (nats)")
    ax2.set_title("entropy of tokens that started high vs low")
    for ax in (ax1, ax2):
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
