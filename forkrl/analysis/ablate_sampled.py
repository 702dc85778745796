"""Sampled held-out accuracy for `forkrl ablate` studies on a real model (`--study smollm2`, issue 26).

The paper study judges arms by greedy accuracy on the tiny model's task. On a pretrained model the
figure that matters is sampled accuracy at the rollout temperature: avg@k over a fixed held-out list of
at least 200 problems, for the base model once and for every run's final model. Each evaluation is
written next to what it evaluates (`OUT/base_sampled.json`, `RUN/sampled.json`) and skipped when it is
there, so a study interrupted during its evaluations continues where it stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from forkrl.analysis.ablate_results import Z, markdown_table, mean_se, mean_std, verdict
from forkrl.config import load_config


def _evaluate(model_path: str, args: list[str], *, k: int, n: int) -> dict:
    """avg@k and pass@k of `model_path` on the first `n` held-out problems of the study's task, prompts
    formatted and sampled as the runs' rollouts are (chat template, temperature, top-p, budget)."""
    from forkrl.analysis.ablate_analysis import load_quietly
    from forkrl.evaluate import Benchmark, evaluate_benchmarks, format_prompts, task_scorer
    from forkrl.tasks.registry import task_from_config

    cfg = load_config(None, args)
    task = task_from_config(cfg.task)
    model, tok = load_quietly(model_path)
    bench = [Benchmark(task.name, task.examples("test", n, seed=1234))]
    bench = format_prompts(bench, tok, chat_template=cfg.model.chat_template, dapo_template=False)
    summary, _ = evaluate_benchmarks(
        model,
        tok,
        bench,
        task_scorer(task),
        n=k,
        greedy=False,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        max_new_tokens=cfg.rollout.max_new_tokens or task.default_max_new_tokens,
        batch_size=64,
        seed=0,
        progress=False,
    )
    overall = summary["overall"]
    return {
        "model": model_path,
        "k": k,
        "n": overall["problems"],
        "avg": overall[f"avg@{k}"],
        "pass": overall[f"pass@{k}"],
        "mean_length": overall["mean_length"],
    }


def _cached(path: Path, make) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    result = make()
    path.write_text(json.dumps(result, indent=2))
    return result


def sampled_results(specs, out: Path, *, k: int, n: int, console=None) -> dict:
    """{"base": {...}, "arms": {arm: {"avg": mean_std, "pass": mean_std, "runs": [...]}}} for the finished runs."""
    if not specs:
        return {}
    args = specs[0].args
    path = load_config(None, args).model.path
    say = console.print if console is not None else (lambda *_: None)
    say(f"sampled avg@{k} on {n} held-out problems: the base model ...")
    base = _cached(out / "base_sampled.json", lambda: _evaluate(path, args, k=k, n=n))
    arms: dict = {}
    for spec in specs:
        if not (spec.dir / "summary.json").is_file():
            continue
        say(f"  {spec.arm} seed {spec.seed} ...")
        r = _cached(
            spec.dir / "sampled.json", lambda s=spec: _evaluate(str(s.dir / "final"), s.args, k=k, n=n)
        )
        arms.setdefault(spec.arm, []).append(r)
    return {
        "k": k,
        "n": n,
        "base": base,
        "arms": {
            arm: {
                "avg": mean_std([r["avg"] for r in rs]),
                "pass": mean_std([r["pass"] for r in rs]),
                "runs": rs,
            }
            for arm, rs in arms.items()
        },
    }


SAMPLED_KEYS = ("top20_improves", "top20_vs_all_sampled", "bottom80_worse_sampled", "top20_beats_random20")


def sampled_findings(sampled: dict) -> list[dict]:
    """The paper's and its critics' claims, judged on sampled held-out accuracy with the 2-SE rule."""
    arms, n, k = sampled.get("arms", {}), sampled.get("n", 0), sampled.get("k", 0)
    base = sampled.get("base", {})
    out = []

    def gap(a: str, b: str) -> tuple[float, float, str]:
        if a not in arms or b not in arms:
            return float("nan"), float("nan"), f"needs arms {a} and {b}"
        fa, fb = arms[a]["avg"], arms[b]["avg"]
        d, se = fa["mean"] - fb["mean"], math.hypot(mean_se(fa, n), mean_se(fb, n))
        return d, se, f"{a} {fa['mean']:.3f} vs {b} {fb['mean']:.3f}: {d:+.3f} ± {se:.3f} (SE)"

    def add(key: str, claim: str, d: float, se: float, text: str) -> None:
        out.append({"finding": key, "claim": claim, "verdict": verdict(d, se), "evidence": text})

    if "top20" in arms and base:
        t = arms["top20"]["avg"]
        se = math.hypot(mean_se(t, n), math.sqrt(max(base["avg"] * (1 - base["avg"]), 0.0) / max(n, 1)))
        add(
            "top20_improves",
            f"RL on the top-20% tokens raises sampled avg@{k} over the base model",
            t["mean"] - base["avg"],
            se,
            f"base {base['avg']:.3f} -> top20 {t['mean']:.3f} ± {mean_se(t, n):.3f} (SE)",
        )
    add(
        "top20_vs_all_sampled",
        "top-20% is at least as good as all tokens (paper: on par at 8B, better at "
        "14B/32B; Archer and LESS predict that low-entropy tokens still need training, and HICRA that a "
        "model still consolidating its procedure gains most on low-entropy execution tokens; STAPO "
        "reports beating the top-20% rule by masking only ~0.01% of tokens)",
        *gap("top20", "all"),
    )
    add(
        "bottom80_worse_sampled",
        "the bottom 80% is worse than the top 20% (paper; STAPO predicts it too: the bottom 80% holds the "
        "rare low-probability, low-entropy tokens whose positive-advantage gradients it finds destabilising)",
        *gap("top20", "bottom80"),
    )
    add(
        "top20_beats_random20",
        "what is selected matters, not only how many: the top 20% beats a random 20% "
        "(HICRA argues token entropy is a misleading proxy for the planning tokens that matter; QAE "
        "that the advantage baseline, not a token-level heuristic, is what drives RLVR)",
        *gap("top20", "random20"),
    )
    return out


def sampled_markdown(sampled: dict, findings: list[dict] | None = None) -> str:
    """The write-up's section on sampled accuracy: the table per arm and the verdicts (`findings`), or,
    with `findings=None`, a pointer to the verdicts table that RESULTS-smollm2.md opens with."""
    if not sampled:
        return ""
    k, n, base = sampled["k"], sampled["n"], sampled["base"]
    rows = [["arm", "runs", f"avg@{k}", f"pass@{k}", f"avg@{k} gain over the base"]]
    rows.append(["base model", "1", f"{base['avg']:.3f}", f"{base['pass']:.3f}", ""])
    for arm, a in sampled["arms"].items():
        rows.append(
            [
                arm,
                str(a["avg"]["n"]),
                f"{a['avg']['mean']:.3f} ± {a['avg']['std']:.3f}",
                f"{a['pass']['mean']:.3f} ± {a['pass']['std']:.3f}",
                f"{100 * (a['avg']['mean'] - base['avg']):+.1f} points",
            ]
        )
    if findings is None:
        verdicts = (
            "Their verdicts are the rows "
            + ", ".join(f"`{k}`" for k in SAMPLED_KEYS)
            + " of the first table."
        )
    else:
        verdicts = markdown_table(
            [["finding", "claim", "verdict", "numbers"]]
            + [[f["finding"], f["claim"], f"**{f['verdict']}**", f["evidence"]] for f in findings]
        )
    return "\n".join(
        [
            "## Sampled held-out accuracy",
            "",
            f"avg@{k} and pass@{k} on the first {n} problems of the task's fixed held-out list (facts never "
            f"trained on), sampled as the rollouts are (temperature, chat template, budget), mean ± std over "
            f"seeds. A difference counts when it exceeds {Z:g} standard errors (std/√seeds per arm, or the "
            "binomial error of one evaluation).",
            "",
            markdown_table(rows),
            "",
            verdicts,
            "",
        ]
    )
