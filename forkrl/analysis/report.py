"""Training report: one self-contained HTML page (PNG plots embedded as base64) for one or more runs.

Reads each run folder's `metrics.jsonl` (and `summary.json` / `config.yaml` when present) and draws
the step metrics of DESIGN.md, runs overlaid with one colour each: reward, accuracy, held-out accuracy,
the selection threshold tau, the kept fraction, the mean entropy of kept vs dropped tokens, clip
fractions, response length, and the mean time split of a step.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from forkrl.training.metrics import read_metrics

# (title, [(metric key, line style, legend suffix)], y label)
PANELS = [
    ("reward", [("reward_mean", "-", "")], "mean reward"),
    ("training accuracy", [("accuracy", "-", "")], "accuracy of the step's samples"),
    ("held-out accuracy", [("eval_accuracy", "o-", "")], "greedy accuracy"),
    ("selection threshold τ", [("tau", "-", "")], "entropy (nats)"),
    ("kept fraction", [("kept_frac", "-", "")], "selected / valid tokens"),
    (
        "entropy of kept vs dropped tokens",
        [("entropy_kept", "-", " kept"), ("entropy_dropped", "--", " dropped")],
        "nats",
    ),
    (
        "clip fractions",
        [("clip_frac_low", "-", " low"), ("clip_frac_high", "--", " high")],
        "fraction of kept tokens",
    ),
    ("response length", [("response_len_mean", "-", "")], "tokens (mean)"),
]
TIME_KEYS = ("time_rollout", "time_reward", "time_scoring", "time_update")
SUMMARY_KEYS = (
    "reward_mean",
    "accuracy",
    "eval_accuracy",
    "tau",
    "kept_frac",
    "entropy_kept",
    "entropy_dropped",
)
COLORS = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb", "#000000"]


def short_labels(paths) -> list[str]:
    """The shortest trailing parts of the paths that tell them apart.

    >>> short_labels(["runs/a/final", "runs/b/final", "base"])
    ['a/final', 'b/final', 'base']
    """
    parts = [Path(p).resolve().parts if Path(p).exists() else Path(p).parts for p in paths]
    for n in range(1, max((len(p) for p in parts), default=1) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            break
    return ["/".join(p[-min(n, len(p)) :]) for p in parts]


def load_run(run_dir: str | Path) -> dict:
    """{"dir", "metrics" (list of step dicts), "summary" (dict or {}), "config" (text or "")}."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(
            f"{str(run_dir)!r} has no metrics.jsonl: give a run folder written by `forkrl train`"
        )
    summary = run_dir / "summary.json"
    config = run_dir / "config.yaml"
    return {
        "dir": str(run_dir),
        "metrics": read_metrics(run_dir),
        "summary": json.loads(summary.read_text()) if summary.is_file() else {},
        "config": config.read_text() if config.is_file() else "",
    }


def series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the steps where `key` is a finite number.

    >>> series([{"step": 0, "a": 1.0}, {"step": 1, "a": None}, {"step": 2, "a": 3}], "a")
    ([0, 2], [1.0, 3.0])
    """
    xs, ys = [], []
    for m in metrics:
        v = m.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(m.get("step", len(xs))))
            ys.append(float(v))
    return xs, ys


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_panels(runs: list[dict], labels: list[str]) -> list[tuple[str, str]]:
    """[(title, base64 PNG)] for every panel with data, then the time split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for title, keys, ylabel in PANELS:
        fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
        any_data = False
        for i, (run, label) in enumerate(zip(runs, labels)):
            for key, style, suffix in keys:
                xs, ys = series(run["metrics"], key)
                if xs:
                    any_data = True
                    ax.plot(xs, ys, style, color=COLORS[i % len(COLORS)], label=label + suffix, ms=4, lw=1.4)
        if not any_data:
            plt.close(fig)
            continue
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out.append((title, _png(fig)))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(runs) + 1.6), dpi=100)
    left = [0.0] * len(runs)
    for j, key in enumerate(TIME_KEYS):
        means = []
        for run in runs:
            _, ys = series(run["metrics"], key)
            means.append(sum(ys) / len(ys) if ys else 0.0)
        ax.barh(range(len(runs)), means, left=left, color=COLORS[j], label=key.removeprefix("time_"))
        left = [a + b for a, b in zip(left, means)]
    ax.set_yticks(range(len(runs)), labels)
    ax.set_xlabel("seconds per step (mean)")
    ax.set_title("time split of a step")
    ax.legend(fontsize=8, ncol=4, loc="lower right")
    fig.tight_layout()
    out.append(("time split", _png(fig)))
    plt.close(fig)
    return out


def _summary_rows(runs: list[dict], labels: list[str]) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ("run", "steps", *SUMMARY_KEYS))
    body = []
    for run, label in zip(runs, labels):
        steps = max((m.get("step", 0) for m in run["metrics"]), default=0)
        cells = [f"<td>{html.escape(label)}</td>", f"<td>{html.escape(str(steps))}</td>"]
        for key in SUMMARY_KEYS:
            _, ys = series(run["metrics"], key)
            cells.append(f"<td>{ys[0]:.3g} → {ys[-1]:.3g}</td>" if ys else "<td>–</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def render_report(
    run_dirs: list[str | Path], labels: list[str] | None = None, *, title: str = "forkrl training report"
) -> str:
    """The HTML report for the runs (labels default to the run folder names)."""
    runs = [load_run(d) for d in run_dirs]
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"--labels gave {len(labels)} labels for {len(runs)} run folders; give one per run")
    labels = labels or short_labels([r["dir"] for r in runs])
    figures = "".join(
        f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{b64}"></figure>'
        for t, b64 in plot_panels(runs, labels)
    )
    configs = "".join(
        f"<details><summary>{html.escape(label)} ({html.escape(run['dir'])}): config.yaml and summary.json</summary>"
        f"<pre>{html.escape(run['config'])}</pre><pre>{html.escape(json.dumps(run['summary'], indent=2))}</pre></details>"
        for run, label in zip(runs, labels)
    )
    css = (
        "body{font-family:system-ui,'DejaVu Sans',sans-serif;margin:1.2em;color:#222;background:#fafafa}"
        "h1{font-size:1.35em}table{border-collapse:collapse;font-size:.85em;margin:.8em 0}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}td:first-child{text-align:left}"
        ".grid{display:flex;flex-wrap:wrap;gap:.6em}figure{margin:0;background:#fff;border:1px solid #ddd}"
        "img{display:block;max-width:100%}pre{background:#fff;border:1px solid #ddd;padding:.5em;font-size:.8em}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{css}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p>{len(runs)} run(s): {', '.join(html.escape(label) for label in labels)}. First → last logged value.</p>"
        f'{_summary_rows(runs, labels)}<div class="grid">{figures}</div>{configs}</body></html>'
    )


def write_report(run_dirs, out: str | Path, labels: list[str] | None = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(run_dirs, labels), encoding="utf-8")
    return out
