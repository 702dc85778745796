"""The numbers of a `forkrl ablate` study: aggregation over seeds, verdicts, the table, the curves, RESULTS.md.

Pure functions of run folders and of the `results` dict that `forkrl.analysis.ablate.ablate` builds:

    results = {"settings": {arms, seeds, steps, eval_every, eval_n, jobs, overrides}, "command", "date",
               "arms": {arm: aggregate_arm(...) + {"what"}}, "failures": [...],
               "warmstart_entropy": {...}, "overlap": {arm: {...}}, "findings": findings(results)}

A verdict compares a difference with its standard error (`verdict`): `holds` beyond Z standard errors for
the claim, `does not hold` beyond Z against it, `within noise` in between, `not tested` without the arms.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

Z = 2.0  # a difference counts when |d| > Z * its standard error (about 95%)
HIGH_OVERLAP = 0.8  # "high" overlap of forking positions (the paper reports > 86%; chance is rho)
THRESHOLDS = (0.1, 0.5, 0.672, 1.0)  # 0.672: the paper's 80th percentile (Qwen3-8B, AIME)


# ----------------------------------------------------------------------------------------- aggregation


def mean_std(values) -> dict:
    """{"mean", "std" (sample std, ddof 1; 0 for one value), "n"} of the finite values.

    >>> mean_std([0.5, 0.7, float("nan")])
    {'mean': 0.6, 'std': 0.14142135623730948, 'n': 2}
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def run_result(run_dir: str | Path) -> dict:
    """Final, best (over steps >= 1) and curve-mean held-out accuracy, wall time and the eval curve of a run."""
    from forkrl.analysis.report import series
    from forkrl.training.metrics import read_metrics

    run_dir = Path(run_dir)
    steps, acc = series(read_metrics(run_dir), "eval_accuracy")
    trained = [a for s, a in zip(steps, acc) if s >= 1] or acc
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "dir": str(run_dir),
        "final": acc[-1] if acc else float("nan"),
        "best": max(trained) if trained else float("nan"),
        "curve_mean": float(np.mean(trained)) if trained else float("nan"),
        "wall_s": float(summary.get("wall_time_s", float("nan"))),
        "curve": {"steps": steps, "accuracy": acc},
    }


def aggregate_arm(runs: list[dict]) -> dict:
    """Mean ± std over seeds of final, best and curve-mean accuracy and wall time; the mean ± std curve
    at the evaluation steps every run has."""
    common = sorted(set.intersection(*(set(r["curve"]["steps"]) for r in runs))) if runs else []
    at = [dict(zip(r["curve"]["steps"], r["curve"]["accuracy"])) for r in runs]
    curve = {"steps": common, "mean": [], "std": []}
    for s in common:
        ms = mean_std([a[s] for a in at])
        curve["mean"].append(ms["mean"])
        curve["std"].append(ms["std"])
    out = {k: mean_std([r[k] for r in runs]) for k in ("final", "best", "curve_mean", "wall_s")}
    return {**out, "curve": curve, "runs": runs}


# ----------------------------------------------------------------------------------- entropy, overlap


def entropy_concentration(entropy, rho: float = 0.2, thresholds=THRESHOLDS) -> dict:
    """How much of the entropy a minority of tokens holds, for entropies (N,) of valid tokens.

    share_top: the share of all entropy held by the top-rho tokens; tokens_for_80pct: the smallest share
    of tokens (highest entropy first) holding 80% of all entropy; frac_above_t: tokens with H > t.

    >>> c = entropy_concentration(np.array([0.0, 0.0, 0.0, 1.0, 3.0]), rho=0.2, thresholds=(0.5,))
    >>> c["share_top"], c["tokens_for_80pct"], c["frac_above_0.5"]
    (0.75, 0.4, 0.4)
    """
    h = np.sort(np.asarray(entropy, dtype=np.float64).reshape(-1))[::-1]
    out: dict = {f"frac_above_{t:g}": float((h > t).mean()) if h.size else float("nan") for t in thresholds}
    total = h.sum()
    if h.size == 0 or total <= 0:
        return {**out, "share_top": float("nan"), "tokens_for_80pct": float("nan")}
    cum = np.cumsum(h) / total
    out["share_top"] = float(cum[math.ceil(rho * h.size) - 1])
    out["tokens_for_80pct"] = float((np.searchsorted(cum, 0.8 - 1e-12) + 1) / h.size)
    return out


def bootstrap_share_se(rows: list[np.ndarray], rho: float = 0.2, n_boot: int = 200, seed: int = 0) -> float:
    """Standard error of `share_top` over responses (resampled with replacement)."""
    if len(rows) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    shares = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(rows), len(rows))
        shares.append(entropy_concentration(np.concatenate([rows[i] for i in pick]), rho, ())["share_top"])
    return float(np.nanstd(shares, ddof=1))


# -------------------------------------------------------------------------------------------- findings


def verdict(d: float, se: float, z: float = Z) -> str:
    """`holds` when d > z·se, `does not hold` when d < -z·se, else `within noise` (d: evidence for the claim).

    >>> verdict(0.05, 0.01), verdict(-0.05, 0.01), verdict(0.01, 0.01), verdict(float("nan"), 0.1)
    ('holds', 'does not hold', 'within noise', 'not tested')
    """
    if not (math.isfinite(d) and math.isfinite(se)):
        return "not tested"
    return "holds" if d > z * se else "does not hold" if d < -z * se else "within noise"


def mean_se(s: dict, eval_n: int) -> float:
    """Standard error of an arm's mean accuracy: std/√n over seeds, or with one seed the binomial
    error of one evaluation on eval_n problems."""
    if s["n"] >= 2:
        return s["std"] / math.sqrt(s["n"])
    p = s["mean"]
    return math.sqrt(max(p * (1 - p), 0.0) / eval_n) if s["n"] == 1 else float("nan")


def _gap(arms: dict, a: str, b: str, eval_n: int) -> tuple[float, float, str]:
    """(final accuracy of a minus b, its standard error, the numbers as text)."""
    if a not in arms or b not in arms or not arms[a]["final"]["n"] or not arms[b]["final"]["n"]:
        return float("nan"), float("nan"), f"needs arms {a} and {b}"
    fa, fb = arms[a]["final"], arms[b]["final"]
    d, se = fa["mean"] - fb["mean"], math.hypot(mean_se(fa, eval_n), mean_se(fb, eval_n))
    return d, se, f"{a} {fa['mean']:.3f} vs {b} {fb['mean']:.3f}: {d:+.3f} ± {se:.3f} (SE)"


def _combine(verdicts: list[str]) -> str:
    """Verdict of a claim made of several comparisons that must all hold."""
    for v in ("not tested", "does not hold", "within noise"):
        if v in verdicts:
            return v
    return "holds"


def findings(results: dict) -> list[dict]:
    """The paper's claims, each with a verdict computed from `results` and the numbers behind it."""
    arms, n = results["arms"], results["settings"]["eval_n"]
    out = []

    def add(key: str, claim: str, v: str, evidence: str) -> None:
        out.append({"finding": key, "claim": claim, "verdict": v, "evidence": evidence})

    d, se, text = _gap(arms, "top20", "all", n)
    add(
        "top20_vs_all",
        "training on the top-20% entropy tokens is at least as good as on all tokens "
        "(paper: on par for Qwen3-8B, better for 14B and 32B)",
        verdict(d, se),
        text,
    )
    d, se, text = _gap(arms, "top20", "bottom80", n)
    add(
        "bottom80_worse",
        "training on the bottom-80% tokens is clearly worse than on the top 20%",
        verdict(d, se),
        text,
    )
    gaps = [_gap(arms, "top20", other, n) for other in ("top10", "top50")]
    add(
        "rho_trend",
        "rho = 0.2 beats both rho = 0.1 and rho = 0.5 (paper: both lower)",
        _combine([verdict(d, se) for d, se, _ in gaps]),
        "; ".join(t for _, _, t in gaps),
    )
    ent = results.get("warmstart_entropy") or {}
    share, share_se = ent.get("share_top", math.nan), ent.get("share_top_se", math.nan)
    p = ent.get("percentiles", {})
    add(
        "entropy_minority",
        "entropy is concentrated in a minority of tokens: the top 20% hold over half of it "
        "(paper, Qwen3-8B: 50.64% of tokens have H < 0.01, 80th percentile 0.672)",
        verdict(share - 0.5, share_se),
        f"top 20% hold {share:.1%} ± {share_se:.1%} (bootstrap SE) of the entropy; "
        f"{ent.get('tokens_for_80pct', math.nan):.1%} of tokens hold 80%; "
        f"{p.get('frac_below_0.01', math.nan):.1%} have H < 0.01; p80 = {p.get('p80', math.nan):.3f}",
    )
    overlap = results.get("overlap") or {}
    ov = mean_std([x for o in overlap.values() for x in o["values"]])
    se = ov["std"] / math.sqrt(ov["n"]) if ov["n"] >= 2 else 0.0
    per_arm = ", ".join(f"{a} {o['overlap']['mean']:.1%}" for a, o in overlap.items())
    add(
        "overlap_high",
        f"RL keeps the forking positions: the top-20% positions of a final model overlap the "
        f"warm start's by at least {HIGH_OVERLAP:.0%} (paper: > 86% at the end of training; chance: 20%)",
        verdict(ov["mean"] - HIGH_OVERLAP, se),
        f"mean over {ov['n']} final models {ov['mean']:.1%} ± {se:.1%} (SE); {per_arm}",
    )
    return out


# --------------------------------------------------------------------------------------------- outputs


def plot_curves(results: dict, path: str | Path, key: str = "curve") -> Path:
    """Held-out accuracy (`key="curve"`) or the trained samples' mean token entropy (`key="entropy"`) vs
    step per arm: the mean over seeds, shaded mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from forkrl.analysis.report import COLORS

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for i, (arm, a) in enumerate(results["arms"].items()):
        c = a.get(key) or {"steps": []}
        if not c["steps"]:
            continue
        x, m, sd = np.asarray(c["steps"]), np.asarray(c["mean"]), np.asarray(c["std"])
        color = COLORS[i % len(COLORS)]
        ax.plot(x, m, "o-", color=color, ms=3.5, lw=1.5, label=f"{arm} (n={a['final']['n']})")
        ax.fill_between(x, m - sd, m + sd, color=color, alpha=0.15, lw=0)
    st = results["settings"]
    ax.set_xlabel("RL step")
    ax.set_ylabel(
        "mean token entropy of the rollouts (nats)"
        if key == "entropy"
        else f"held-out greedy accuracy ({st['eval_n']} problems)"
    )
    ax.set_title(f"mean ± std over {st['seeds']} seed(s) per arm")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _pm(s: dict, fmt: str = ".3f") -> str:
    if not s["n"]:
        return "-"
    return format(s["mean"], fmt) + (f" ± {format(s['std'], fmt)}" if s["n"] > 1 else "")


def table_rows(results: dict) -> list[list[str]]:
    """Header and one row per arm: the results table, shared by the terminal and RESULTS.md."""
    rows = [["arm", "what", "runs", "final acc", "best acc", "mean acc over evals", "wall s / run"]]
    for arm, a in results["arms"].items():
        ok = f"{a['final']['n']}/{results['settings']['seeds']}"
        rows.append(
            [
                arm,
                a.get("what", ""),
                ok,
                _pm(a["final"]),
                _pm(a["best"]),
                _pm(a["curve_mean"]),
                "-" if not a["wall_s"]["n"] else f"{a['wall_s']['mean']:.0f}",
            ]
        )
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    """
    >>> print(markdown_table([["a", "b"], ["1", "2"]]))
    | a | b |
    |---|---|
    | 1 | 2 |
    """

    def line(r):  # a "|" inside a cell (|log r|) would end it
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |"

    return "\n".join([line(rows[0]), "|" + "---|" * len(rows[0])] + [line(r) for r in rows[1:]])


def print_table(results: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [r[:1] + r[2:] for r in table_rows(results)]  # without "what": it fits an 80-column terminal
    st = results["settings"]
    t = Table(title=f"held-out accuracy after {st['steps']} steps, mean ± std over seeds")
    for i, col in enumerate(rows[0]):
        t.add_column(col, justify="left" if i == 0 else "right")
    for r in rows[1:]:
        t.add_row(*r)
    (console or Console()).print(t)


def _entropy_section(results: dict, figures: str) -> list[str]:
    """Mean token entropy of each arm's rollouts over training (metrics.jsonl's `entropy_mean`)."""
    arms = {a: r["entropy"] for a, r in results["arms"].items() if (r.get("entropy") or {}).get("steps")}
    if not arms:
        return []
    rows = [["arm", "first step", "last step", "change"]]
    for arm, c in arms.items():
        first, last = c["mean"][0], c["mean"][-1]
        rows.append(
            [
                arm,
                f"{first:.3f} ± {c['std'][0]:.3f} (step {c['steps'][0]})",
                f"{last:.3f} ± {c['std'][-1]:.3f} (step {c['steps'][-1]})",
                f"{last - first:+.3f}",
            ]
        )
    return [
        "## Entropy over training",
        "",
        "Mean token entropy (nats, at the rollout temperature) of each step's rollouts, mean ± std over seeds.",
        "",
        markdown_table(rows),
        "",
        f"![mean token entropy of the rollouts vs step, mean ± std over seeds]({figures}entropy.png)",
        "",
    ]


def results_markdown(results: dict, figures: str = "") -> str:
    """RESULTS.md: the command, the verdicts, the table, the curves, the entropy statistics, the overlap.
    `figures`: a prefix for the figure links (e.g. `docs/ablate/`)."""
    st, ent, overlap = (
        results["settings"],
        results.get("warmstart_entropy") or {},
        results.get("overlap") or {},
    )
    out = [
        f"# {st.get('title', 'Ablations at laptop scale')}",
        "",
        f"The paper's ablations (arXiv 2506.01939) {st.get('setting', 'on the built-in task from the shipped warm start')}: "
        f"{len(results['arms'])} arms x {st['seeds']} seed(s), {st['steps']} RL steps each, greedy held-out "
        f"accuracy on {st['eval_n']} fixed test problems every {st['eval_every']} steps. Generated by "
        f"`forkrl ablate` on {results['date']}; every number below comes from `results.json`.",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        "## Which findings hold",
        "",
        f"A difference counts when it exceeds {Z:g} standard errors (the seeds' std/√n per arm, or with one "
        "seed the binomial error of one evaluation); otherwise it is *within noise*. Accuracies are final "
        "held-out accuracies, mean over seeds.",
        "",
        markdown_table(
            [["finding", "claim", "verdict", "numbers"]]
            + [[f["finding"], f["claim"], f"**{f['verdict']}**", f["evidence"]] for f in results["findings"]]
        ),
        "",
        "## Held-out accuracy",
        "",
        markdown_table(table_rows(results)),
        "",
        f"Wall time: `summary.json`'s `wall_time_s` of each run (model load to final model, evaluations "
        f"included), {st['jobs']} run(s) in parallel, one torch thread each.",
        "",
        f"![held-out accuracy vs step, mean ± std over seeds]({figures}curves.png)",
        "",
    ]
    out += _entropy_section(results, figures)
    if results.get("sampled"):
        from forkrl.analysis.ablate_sampled import sampled_markdown

        out.append(sampled_markdown(results["sampled"]))  # its verdicts are rows of the first table
    if ent:
        p = ent["percentiles"]
        rows = [
            ["statistic", "value"],
            ["valid tokens", str(p.get("n", 0))],
            ["responses", str(ent["responses"])],
        ]
        rows += [[k, f"{v:.4g}"] for k, v in p.items() if k.startswith("p") or k == "mean"]
        rows += [[k.replace("_", " "), f"{v:.1%}"] for k, v in p.items() if k.startswith("frac_")]
        rows += [
            [f"H > {k.removeprefix('frac_above_')}", f"{v:.1%}"]
            for k, v in ent.items()
            if k.startswith("frac_above_")
        ]
        rows += [
            [
                "share of entropy in the top 20% of tokens",
                f"{ent['share_top']:.1%} ± {ent['share_top_se']:.1%}",
            ],
            ["share of tokens holding 80% of the entropy", f"{ent['tokens_for_80pct']:.1%}"],
        ]
        out += [
            "## Entropy of the warm start",
            "",
            f"Token entropy (nats, at the rollout temperature) of {ent['responses']} samples of the warm start "
            "on held-out prompts. The paper (Qwen3-8B, AIME): 50.64% of tokens below 0.01, 80th percentile 0.672.",
            "",
            markdown_table(rows),
            "",
            f"![entropy histogram]({figures}warmstart_entropy/entropy_hist.png)",
            f"![highest-entropy tokens]({figures}warmstart_entropy/wordcloud_high.png)",
            f"![lowest-entropy tokens]({figures}warmstart_entropy/wordcloud_low.png)",
            "",
        ]
    if overlap:
        rows = [
            [
                "arm",
                "overlap with the warm start",
                "H of top-20% tokens: warm start -> final",
                "H of the rest",
            ]
        ]
        for arm, o in overlap.items():
            rows.append(
                [
                    arm,
                    _pm(o["overlap"], ".1%"),
                    f"{o['high_entropy_before']:.3f} -> {o['high_entropy_after']:.3f}",
                    f"{o['low_entropy_before']:.3f} -> {o['low_entropy_after']:.3f}",
                ]
            )
        tokens = next(iter(overlap.values()))["tokens"]
        out += [
            "## Forking positions after RL",
            "",
            f"The warm start samples once ({tokens} tokens); it and every final model score the same tokens, and "
            "the overlap is |top-20% under the final model ∩ top-20% under the warm start| / |top 20%| "
            "(`forkrl.analysis.overlap`), mean ± std over seeds. Chance level: 20%.",
            "",
            markdown_table(rows),
            "",
        ]
    if results.get("failures"):
        out += (
            ["## Failed runs", ""]
            + [
                f"- {f['arm']} seed {f['seed']}: exit {f['rc']}, log `{f['log']}`"
                for f in results["failures"]
            ]
            + [""]
        )
    return "\n".join(out)


def write_results_md(results: dict, out_dir: str | Path, name: str = "RESULTS.md", figures: str = "") -> Path:
    path = Path(out_dir) / name
    path.write_text(results_markdown(results, figures), encoding="utf-8")
    return path
