"""The methods study of `forkrl ablate --study methods`: entropy curves, each method's own metrics, one
verdict per method, the entropy plot and RESULTS-methods.md.

Pure functions of run folders and of the `results` dict (`forkrl.analysis.ablate_results` has its layout);
the methods study adds to each arm

    "entropy": {"steps", "mean", "std"}       mean token entropy per step (metrics.jsonl `entropy_mean`)
    "final_entropy": mean_std                 of the last step's entropy_mean, over seeds
    "metrics": {key: mean_std}                each run's mean over steps of `METHOD_METRICS`, over seeds

A method's verdict is that of its final held-out accuracy minus its baseline's (`baseline_of`: `all` for a
method on all tokens, `top20` for a top20_ combination), with `ablate_results.verdict`: `holds` beyond
2 standard errors above the baseline, `does not hold` beyond 2 below, else `within noise`. Its final
entropy is compared the same way (`higher` / `lower` / `within noise`), since several of the papers
claim that their method keeps entropy up.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from forkrl.analysis.ablate_arms import baseline_of
from forkrl.analysis.ablate_results import Z, _gap, _pm, markdown_table, mean_std, table_rows, verdict

__all__ = [
    "CLAIMS",
    "METHOD_METRICS",
    "aggregate_methods",
    "method_findings",
    "methods_markdown",
    "plot_entropy",
    "plot_panels",
    "run_methods",
]

# Per-step metrics that show a method acting (each present only in the runs of the modes that log it).
METHOD_METRICS = (
    "selected_tokens",
    "approx_kl",
    "clip_frac_low",
    "clip_frac_high",
    "seq_clip_frac",
    "cispo_clip_frac",
    "cov_touched_frac",
    "cov_band_frac",
    "abs_log_ratio",
    "archer_high_entropy_frac",
    "archer_clip_frac_high_entropy",
    "archer_clip_frac_low_entropy",
    "archer_kl_low_entropy",
    "entropy_adv_mean",
    "entropy_adv_capped_frac",
)

# method (the arm's name without top20_) -> what its paper claims
CLAIMS = {
    "gspo": "GSPO (Zheng et al., arXiv 2507.18071): one clipped importance ratio per sequence trains more "
    "stably and reaches higher accuracy than token-level clipping (GRPO)",
    "cispo": "CISPO (MiniMax-M1, arXiv 2506.13585): clipping the importance weight, not the update, keeps "
    "every token's gradient and beats DAPO (matched it in half the steps on Qwen2.5-32B)",
    "clip_cov": "Clip-Cov (Cui et al., arXiv 2505.22617): detaching a few high-covariance tokens prevents "
    "entropy collapse and improves accuracy over GRPO / clip-higher",
    "kl_cov": "KL-Cov (Cui et al., arXiv 2505.22617): a KL penalty on the top-covariance tokens keeps entropy "
    "over 10x higher and improves accuracy over GRPO / clip-higher",
    "archer": "Archer (Wang et al., arXiv 2507.15778): a looser clip and no KL on high-entropy tokens, tighter "
    "constraints on the rest, improve over DAPO",
    "entadv": "entropy-shaped advantage (Cheng et al., arXiv 2506.14758): adding min(alpha H, |A|/kappa) "
    "to the advantage encourages exploratory reasoning and improves accuracy (Pass@K most)",
}


def method_of(arm: str) -> str:
    return arm.removeprefix("top20_")


# ----------------------------------------------------------------------------------------- aggregation


def run_methods(run_dir: str | Path) -> dict:
    """A run's entropy curve (steps >= 1) and its mean over steps of each `METHOD_METRICS` key it logged."""
    from forkrl.analysis.report import series
    from forkrl.training.metrics import read_metrics

    rows = read_metrics(run_dir)
    steps, ent = series(rows, "entropy_mean")
    metrics = {}
    for key in METHOD_METRICS:
        _, v = series(rows, key)
        if v:
            metrics[key] = float(np.mean(v))
    return {"entropy": {"steps": steps, "values": ent}, "metrics": metrics}


def aggregate_methods(runs: list[dict]) -> dict:
    """Mean ± std over seeds of the entropy curve (at the steps every run has), of the final entropy and
    of each method metric (over the runs that logged it)."""
    common = sorted(set.intersection(*(set(r["entropy"]["steps"]) for r in runs))) if runs else []
    at = [dict(zip(r["entropy"]["steps"], r["entropy"]["values"])) for r in runs]
    curve: dict = {"steps": common, "mean": [], "std": []}
    for s in common:
        ms = mean_std([a[s] for a in at])
        curve["mean"].append(ms["mean"])
        curve["std"].append(ms["std"])
    final = mean_std([r["entropy"]["values"][-1] for r in runs if r["entropy"]["values"]])
    keys = [k for k in METHOD_METRICS if any(k in r["metrics"] for r in runs)]
    metrics = {k: mean_std([r["metrics"][k] for r in runs if k in r["metrics"]]) for k in keys}
    return {"entropy": curve, "final_entropy": final, "metrics": metrics}


# -------------------------------------------------------------------------------------------- findings


def _entropy_gap(arms: dict, a: str, b: str) -> tuple[str, str]:
    """(verdict on a's final entropy vs b's: higher / lower / within noise / not tested, the numbers)."""
    ea, eb = (arms.get(x, {}).get("final_entropy", {"n": 0}) for x in (a, b))
    if not ea["n"] or not eb["n"]:
        return "not tested", "no entropy"
    # one seed: no spread to judge by (entropy has no binomial error); the verdict needs >= 2 seeds
    se = math.hypot(*(s["std"] / math.sqrt(s["n"]) if s["n"] >= 2 else math.nan for s in (ea, eb)))
    d = ea["mean"] - eb["mean"]
    v = {"holds": "higher", "does not hold": "lower"}.get(verdict(d, se), verdict(d, se))
    return v, f"final entropy {ea['mean']:.3f} vs {eb['mean']:.3f}: {d:+.3f} ± {se:.3f} (SE)"


def method_findings(results: dict) -> list[dict]:
    """One finding per method arm in `results`: accuracy vs its baseline (the verdict), entropy vs its."""
    arms, n = results["arms"], results["settings"]["eval_n"]
    out = []
    for arm in arms:
        if arm in ("top20", "all") or method_of(arm) not in CLAIMS:
            continue
        base = baseline_of(arm)
        d, se, text = _gap(arms, arm, base, n)
        ev, etext = _entropy_gap(arms, arm, base)
        claim = CLAIMS[method_of(arm)]
        if base == "top20":
            claim = f"combined with top-20% selection it is at least as good as top-20% alone; {claim}"
        out.append(
            {
                "finding": arm,
                "baseline": base,
                "claim": claim,
                "verdict": verdict(d, se),
                "entropy_verdict": ev,
                "evidence": f"{text}; {etext}",
            }
        )
    return out


# --------------------------------------------------------------------------------------------- outputs


def plot_panels(results: dict, path: str | Path, key: str = "curve") -> Path:
    """One panel per method: its arms (alone, and with top-20% selection) beside the two baselines
    (`all`, `top20`, dashed), the mean over seeds shaded mean ± std. ``key``: ``"curve"`` = held-out
    accuracy, ``"entropy"`` = mean token entropy of the trained samples (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from forkrl.analysis.report import COLORS

    arms = results["arms"]
    methods = list(dict.fromkeys(method_of(a) for a in arms if a not in ("all", "top20")))
    if not methods:  # only baselines: one panel with them
        methods = [""]
    cols = min(3, len(methods))
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=110, squeeze=False, sharex=True, sharey=True
    )
    styles = {"all": ("--", "0.45"), "top20": ("--", "0.1")}
    for ax, method in zip(axes.flat, methods):
        shown = ["all", "top20"] + [a for a in arms if a not in ("all", "top20") and method_of(a) == method]
        for i, arm in enumerate(a for a in shown if a in arms):
            c = arms[arm].get(key) or {"steps": []}
            if not c["steps"]:
                continue
            x, m, sd = np.asarray(c["steps"]), np.asarray(c["mean"]), np.asarray(c["std"])
            ls, color = styles.get(arm, ("-", COLORS[i % len(COLORS)]))
            ax.plot(x, m, ls, color=color, marker="o", ms=2.5, lw=1.3, label=arm)
            lo = np.maximum(m - sd, 1e-6) if key == "entropy" else m - sd
            ax.fill_between(x, lo, m + sd, color=color, alpha=0.12, lw=0)
        ax.set_title(method or "baselines", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
        if key == "entropy":
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(methods) :]:
        ax.set_visible(False)
    st = results["settings"]
    label = (
        "mean token entropy (nats)" if key == "entropy" else f"held-out accuracy ({st['eval_n']} problems)"
    )
    for ax in axes[:, 0]:
        ax.set_ylabel(label, fontsize=9)
    for ax in axes[-1, :]:
        ax.set_xlabel("RL step", fontsize=9)
    fig.suptitle(
        f"each method against the baselines (dashed): mean ± std over {st['seeds']} seed(s)", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_entropy(results: dict, path: str | Path) -> Path:
    """Mean token entropy vs step, a panel per method (`plot_panels`)."""
    return plot_panels(results, path, key="entropy")


def _in_short(found: list[dict], st: dict, arms: dict) -> str:
    """One generated sentence over the verdicts, so the summary cannot drift from the table."""
    by: dict[str, list[str]] = {}
    for f in found:
        by.setdefault(f["verdict"], []).append(f["finding"])
    ent: dict[str, list[str]] = {}
    for f in found:
        if f["entropy_verdict"] != "within noise":
            ent.setdefault(f["entropy_verdict"], []).append(f["finding"])
    parts = [f"{v}: {', '.join(arms)}" for v, arms in by.items()]
    text = (
        f"**In short** (final accuracy after {st['steps']} steps, {st['seeds']} seeds): "
        + "; ".join(parts)
        + "."
    )
    finals = [a["final"]["mean"] for a in arms.values() if a.get("final", {}).get("n")]
    if set(by) == {"within noise"} and finals:
        text += (
            f" No method moved final accuracy beyond noise here: every arm ends between {min(finals):.3f} and "
            f"{max(finals):.3f} after {st['steps']} steps, so differences the papers report at 7B-32B over "
            "hundreds of steps cannot show at this scale; what the study does show is that each method "
            "acted (the last table)."
        )
    if ent:
        text += " Final entropy: " + "; ".join(f"{v} for {', '.join(a)}" for v, a in ent.items()) + "."
    return text


def _metric_cell(s: dict) -> str:
    return _pm(s, ".3g")


def methods_markdown(results: dict, fig: str = "") -> str:
    """RESULTS-methods.md: the command, one verdict per method, accuracy and entropy, the methods' own
    metrics, the curves. `fig`: a prefix for the figure links (e.g. `docs/ablate-methods/`)."""
    st, arms = results["settings"], results["arms"]
    base = " ".join(f"`{o}`" for o in st.get("base", [])) or "none"
    rows = table_rows(results)
    rows[0].append("final entropy")
    for r, a in zip(rows[1:], arms.values()):
        r.append(_pm(a.get("final_entropy", {"n": 0}), ".3f"))
    keys = [k for k in METHOD_METRICS if any(k in a.get("metrics", {}) for a in arms.values())]
    mrows = [["arm", *keys]] + [
        [arm, *(_metric_cell(a["metrics"][k]) if k in a.get("metrics", {}) else "-" for k in keys)]
        for arm, a in arms.items()
    ]
    out = [
        "# Entropy-aware methods at laptop scale",
        "",
        f"Each method forkrl implements, on all tokens against the `all` baseline and combined with the "
        f"paper's top-20% selection against `top20`, on the built-in task from the shipped warm start: "
        f"{len(arms)} arms x {st['seeds']} seed(s), {st['steps']} RL steps each, greedy held-out accuracy on "
        f"{st['eval_n']} fixed test problems every {st['eval_every']} steps. Every arm, the baselines "
        f"included, also gets {base}: with one optimizer step per RL step the update is on-policy (ratio 1) "
        "and GSPO, CISPO, Archer's clip ranges and KL-Cov's penalty would give `all`'s gradient exactly "
        f"(forkrl/analysis/ablate_arms.py). Generated by `forkrl ablate --study methods` on {results['date']}; "
        "every number below comes from `results.json`.",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        "## Which methods help here",
        "",
        f"A method's verdict compares its final held-out accuracy (mean over seeds) with its baseline's: "
        f"*holds* when it is higher by more than {Z:g} standard errors (the seeds' std/√n per arm, or with one "
        "seed the binomial error of one evaluation), *does not hold* when lower by as much, else *within "
        "noise*. Final entropy (the last step's mean token entropy) is compared the same way. The claims are "
        "the papers' own, at 7B-32B scale and hundreds of steps; a verdict here says only what holds for a "
        f"small model in {st['steps']} steps on an easy task.",
        "",
        _in_short(results["findings"], st, arms),
        "",
        markdown_table(
            [["arm", "vs", "claim", "verdict (accuracy)", "entropy", "numbers"]]
            + [
                [
                    f["finding"],
                    f["baseline"],
                    f["claim"],
                    f"**{f['verdict']}**",
                    f["entropy_verdict"],
                    f["evidence"],
                ]
                for f in results["findings"]
            ]
        ),
        "",
        "## Held-out accuracy and entropy",
        "",
        markdown_table(rows),
        "",
        f"Wall time: `summary.json`'s `wall_time_s` of each run, {st['jobs']} run(s) in parallel, one torch "
        "thread each.",
        "",
        f"![held-out accuracy vs step, mean ± std over seeds]({fig}curves.png)",
        "",
        f"![mean token entropy vs step, mean ± std over seeds]({fig}entropy.png)",
        "",
        "## Did each method act?",
        "",
        "Each run's mean over steps of the metrics its mode logs (docs/metrics.md), mean ± std over seeds: "
        "`cov_touched_frac` is the share of the selected tokens Clip-Cov detached or KL-Cov penalised, "
        "`seq_clip_frac` the share of sequences GSPO's clip bound, `archer_*` the high-entropy share and each "
        "class's clip fraction, `entropy_adv_*` the mean shaping term and how often its cap bound; `approx_kl` "
        "and `clip_frac_*` show how off-policy the updates were.",
        "",
        markdown_table(mrows),
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
