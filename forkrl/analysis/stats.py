"""Entropy statistics of a dump: percentiles, a log-axis histogram, and the forking / low-entropy tokens.

The paper (Wang et al. 2025, Sec. 3) reports, for Qwen3-8B on AIME, that 50.64% of the tokens have
H < 0.01 and that the 80th percentile of H is 0.672; `entropy_percentiles` gives the same two numbers
(`frac_below_0.01`, `p80`) for any dump. Percentiles are numpy's linear interpolation over the valid
tokens (the `loss` flag of the dump).

The "high" tokens are the top-rho entropy positions (k = ceil(rho N), `select_tokens` rule `top`), the
"low" ones the bottom-rho positions (rule `bottom`): the paper's Figure 2 word clouds. Both are taken over
every valid token of the dump, whatever selection the dump itself stored.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from forkrl.analysis.dump import Dump, as_tensors
from forkrl.core.selection import select_tokens

PERCENTILES = (1, 5, 10, 25, 50, 75, 80, 90, 95, 99)
LOW_ENTROPY = 0.01


def entropy_percentiles(
    entropy: np.ndarray, percentiles=PERCENTILES, low: float = LOW_ENTROPY
) -> dict[str, float]:
    """n, mean, min, max, the fraction of tokens with H < `low`, and the percentiles `p{q}` of H (N,).

    >>> s = entropy_percentiles(np.array([0.0, 0.005, 0.5, 1.0, 2.0]), percentiles=(50, 80))
    >>> s["frac_below_0.01"], s["p50"], round(s["p80"], 6)
    (0.4, 0.5, 1.2)
    """
    h = np.asarray(entropy, dtype=np.float64).reshape(-1)
    out: dict[str, float] = {"n": int(h.size)}
    if h.size == 0:
        return out
    out.update(mean=float(h.mean()), min=float(h.min()), max=float(h.max()))
    out[f"frac_below_{low:g}"] = float((h < low).mean())
    for q, v in zip(percentiles, np.percentile(h, percentiles)):
        out[f"p{q:g}"] = float(v)
    return out


def show_token(tok: str) -> str:
    """A token made visible: whitespace and control characters escaped ("\\n", "␣" for a space).

    >>> show_token(" the"), show_token("\\n"), show_token("x")
    ('␣the', '\\\\n', 'x')
    """
    if tok == "":
        return "∅"
    out = tok.encode("unicode_escape").decode("ascii") if not tok.isprintable() else tok
    return out.replace(" ", "␣")


def token_table(tokens: list[str], entropy: np.ndarray, mask: np.ndarray, top: int = 30) -> list[dict]:
    """The `top` most frequent tokens among the positions in `mask` (N,), with their count, their share of
    the masked positions, and their mean entropy there. Sorted by count, then by mean entropy."""
    count: dict[str, int] = defaultdict(int)
    total: dict[str, float] = defaultdict(float)
    for tok, h, m in zip(tokens, np.asarray(entropy, dtype=np.float64), np.asarray(mask, dtype=bool)):
        if m:
            count[tok] += 1
            total[tok] += float(h)
    n = max(1, int(np.asarray(mask).sum()))
    rows = [{"token": t, "count": c, "share": c / n, "mean_entropy": total[t] / c} for t, c in count.items()]
    rows.sort(key=lambda r: (-r["count"], -r["mean_entropy"], r["token"]))
    return rows[:top]


def high_low_masks(dump: Dump, rho: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(valid, high, low) flat masks (N,) over every token of the dump: the loss flag, the top-rho and the
    bottom-rho entropy positions among the valid ones."""
    entropy, present = as_tensors(dump, "entropy")  # (B, L)
    loss, _ = as_tensors(dump, "loss")  # (B, L)
    valid = present & loss.bool()
    high = select_tokens(entropy, valid, rho=rho, rule="top")  # (B, L)
    low = select_tokens(entropy, valid, rho=rho, rule="bottom")  # (B, L)
    return valid[present].numpy(), high[present].numpy(), low[present].numpy()


def dump_stats(dump: Dump, *, rho: float = 0.2, top: int = 30) -> dict:
    """Percentiles of the valid tokens' entropy and the high / low token tables (see the module doc)."""
    entropy = dump.flat("entropy").astype(np.float64)
    tokens = dump.flat_tokens()
    valid, high, low = high_low_masks(dump, rho)
    h_valid = entropy[valid]
    tau = float(entropy[high].min()) if high.any() else float("nan")
    return {
        "responses": len(dump.rows),
        "rho": rho,
        "tau": tau,
        "percentiles": entropy_percentiles(h_valid),
        "entropy_high_mean": float(entropy[high].mean()) if high.any() else float("nan"),
        "entropy_rest_mean": float(entropy[valid & ~high].mean()) if (valid & ~high).any() else float("nan"),
        "high_tokens": token_table(tokens, entropy, high, top),
        "low_tokens": token_table(tokens, entropy, low, top),
        "meta": dump.meta,
    }


def plot_histogram(entropy: np.ndarray, path: str | Path, *, floor: float = 1e-6, title: str = "") -> Path:
    """Histogram of H on a log x-axis (values below `floor`, exact zeros included, go to the first bin),
    with the 80th percentile and H = 0.01 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = np.asarray(entropy, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if h.size:
        hi = max(float(h.max()), floor * 10)
        bins = np.logspace(np.log10(floor), np.log10(hi) + 1e-9, 60)
        ax.hist(np.clip(h, floor, None), bins=bins, color="#4477aa")
        p80 = float(np.percentile(h, 80))
        ax.axvline(max(p80, floor), color="#cc3311", ls="--", label=f"80th percentile = {p80:.3g}")
        ax.axvline(
            LOW_ENTROPY, color="#999999", ls=":", label=f"H = 0.01 ({(h < LOW_ENTROPY).mean():.1%} below)"
        )
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"token entropy H (nats; H < {floor:g} shown at {floor:g})")
    ax.set_ylabel("tokens")
    ax.set_title(title or f"entropy of {h.size} tokens")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def print_stats(stats: dict, console=None) -> None:
    """The percentiles and both token tables as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    p = stats["percentiles"]
    t = Table(title=f"token entropy over {p.get('n', 0)} valid tokens of {stats['responses']} responses")
    t.add_column("statistic")
    t.add_column("value", justify="right")
    for key, value in p.items():
        if key == "n":
            continue
        t.add_row(key, f"{value:.2%}" if key.startswith("frac_") else f"{value:.4g}")
    t.add_row(f"tau (top {stats['rho']:.0%})", f"{stats['tau']:.4g}")
    console.print(t)
    for key, title in (("high_tokens", "top"), ("low_tokens", "bottom")):
        tt = Table(title=f"most frequent tokens among the {title} {stats['rho']:.0%} entropy positions")
        for col, justify in (("token", "left"), ("count", "right"), ("share", "right"), ("mean H", "right")):
            tt.add_column(col, justify=justify)
        for r in stats[key]:
            tt.add_row(
                show_token(r["token"]), str(r["count"]), f"{r['share']:.1%}", f"{r['mean_entropy']:.3f}"
            )
        console.print(tt)


def write_stats(dump: Dump, out_dir: str | Path, *, rho: float = 0.2, top: int = 30) -> dict:
    """`stats.json`, `entropy_hist.png`, `wordcloud_high.png` and `wordcloud_low.png` in `out_dir`."""
    from forkrl.analysis.wordcloud import draw_word_cloud

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = dump_stats(dump, rho=rho, top=top)
    valid, _, _ = high_low_masks(dump, rho)
    plot_histogram(dump.flat("entropy")[valid], out / "entropy_hist.png")
    for key, name, color in (("high_tokens", "high", "#cc3311"), ("low_tokens", "low", "#4477aa")):
        freqs = {show_token(r["token"]): r["count"] for r in stats[key]}
        title = f"{'highest' if name == 'high' else 'lowest'}-entropy {stats['rho']:.0%} tokens"
        draw_word_cloud(freqs, out / f"wordcloud_{name}.png", color=color, title=title)
    (out / "stats.json").write_text(json.dumps(stats, indent=2, allow_nan=True))
    return stats
