"""`forkrl ablate`: arms resolve to valid configs, aggregation and verdicts on constructed numbers, and one
end-to-end study on the tiny random model that a second call skips."""

import json
import math

import numpy as np
import pytest

from forkrl.analysis.ablate import STUDIES, RunSpec, arm_overrides, run_state, run_study
from forkrl.analysis.ablate_results import (
    aggregate_arm,
    entropy_concentration,
    findings,
    markdown_table,
    mean_se,
    mean_std,
    plot_curves,
    results_markdown,
    run_result,
    verdict,
)
from forkrl.cli import main
from forkrl.config import ConfigError, load_config

EXPECTED = {  # arm -> (preset, rule, rho)
    "top20": ("paper", "top", 0.2),
    "all": ("paper", "all", 1.0),
    "bottom80": ("paper", "bottom", 0.8),
    "random20": ("paper", "random", 0.2),
    "top10": ("paper", "top", 0.1),
    "top50": ("paper", "top", 0.5),
    "official": ("official", "top", 0.2),
    "trl": ("trl", "top", 0.2),
}


@pytest.mark.parametrize("arm", STUDIES["paper"].arms)  # the methods arms: test_ablate_methods.py
def test_every_arm_loads_with_load_config(arm):
    cfg = load_config(
        None, arm_overrides(arm, seed=2, steps=7, eval_every=3, eval_n=11, extra=["optim.lr=1e-4"])
    )
    assert (cfg.preset, cfg.selection.rule, cfg.selection.rho) == EXPECTED[arm]
    assert (cfg.train.seed, cfg.train.steps, cfg.train.eval_every, cfg.train.eval_n) == (2, 7, 3, 11)
    assert cfg.train.threads == 1 and not cfg.train.progress and cfg.optim.lr == 1e-4
    if arm == "official":
        assert (cfg.selection.scope, cfg.selection.entropy_source, cfg.loss.normalizer) == (
            "micro_batch",
            "current",
            "selected_tokens",
        )
    if arm == "trl":
        assert cfg.selection.count == "quantile" and not cfg.sampling.dynamic


def test_overrides_that_would_break_the_ablation_are_refused():
    with pytest.raises(ConfigError, match="selection.rho"):
        arm_overrides("top20", extra=["selection.rho=0.3"])
    with pytest.raises(ConfigError, match="--seeds"):
        arm_overrides("top20", extra=["train.seed=4"])
    with pytest.raises(ConfigError, match="unknown arm"):
        arm_overrides("top30")


def _write_run(run_dir, curve: dict, wall: float) -> None:
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(max(curve) + 1):
        m = {"step": step, "reward_mean": 0.5}
        if step in curve:
            m["eval_accuracy"] = curve[step]
        lines.append(json.dumps(m))
    lines.append(json.dumps({"step": 9, "eval_accuracy": None}))  # a NaN logged as null is ignored
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"wall_time_s": wall}))


def test_aggregation_over_seeds(tmp_path):
    curves = [{0: 0.5, 4: 0.6, 8: 0.7}, {0: 0.5, 4: 0.8, 8: 0.75}, {0: 0.5, 4: 0.7, 8: 0.9}]
    for i, c in enumerate(curves):
        _write_run(tmp_path / f"seed{i}", c, wall=10.0 * (i + 1))
    runs = [run_result(tmp_path / f"seed{i}") for i in range(3)]
    assert [r["final"] for r in runs] == [0.7, 0.75, 0.9]
    assert [r["best"] for r in runs] == [0.7, 0.8, 0.9]  # over steps >= 1: the warm start's 0.5 never counts
    assert runs[0]["curve_mean"] == pytest.approx(0.65)
    a = aggregate_arm(runs)
    assert a["final"]["mean"] == pytest.approx(np.mean([0.7, 0.75, 0.9]))
    assert a["final"]["std"] == pytest.approx(np.std([0.7, 0.75, 0.9], ddof=1)) and a["final"]["n"] == 3
    assert a["best"]["mean"] == pytest.approx(0.8) and a["wall_s"]["mean"] == pytest.approx(20.0)
    assert a["curve"]["steps"] == [0, 4, 8]
    assert a["curve"]["mean"] == pytest.approx([0.5, 0.7, np.mean([0.7, 0.75, 0.9])])
    assert a["curve"]["std"] == pytest.approx([0.0, 0.1, np.std([0.7, 0.75, 0.9], ddof=1)])
    one = aggregate_arm(runs[:1])
    assert one["final"] == {"mean": 0.7, "std": 0.0, "n": 1}
    assert mean_std([])["n"] == 0 and math.isnan(mean_std([])["mean"])


def test_verdicts_and_standard_errors():
    assert verdict(0.05, 0.02) == "holds" and verdict(-0.05, 0.02) == "does not hold"
    assert verdict(0.039, 0.02) == "within noise" and verdict(math.nan, 0.1) == "not tested"
    assert mean_se({"mean": 0.8, "std": 0.03, "n": 3}, 500) == pytest.approx(0.03 / math.sqrt(3))
    assert mean_se({"mean": 0.8, "std": 0.0, "n": 1}, 400) == pytest.approx(0.02)  # sqrt(.8 * .2 / 400)


def _arm(mean, std, n=3):
    return {"final": {"mean": mean, "std": std, "n": n}}


def _results(arms, share=0.7, share_se=0.01, overlaps=(0.9, 0.92, 0.94)):
    return {
        "settings": {"eval_n": 500, "seeds": 3, "steps": 20, "eval_every": 4, "jobs": 2},
        "arms": arms,
        "warmstart_entropy": {
            "share_top": share,
            "share_top_se": share_se,
            "tokens_for_80pct": 0.1,
            "percentiles": {"frac_below_0.01": 0.8, "p80": 0.01},
        },
        "overlap": {"top20": {"overlap": mean_std(overlaps), "values": list(overlaps)}},
    }


def test_findings_from_constructed_numbers():
    sd = 0.01  # SE of one arm 0.0058, of a difference 0.0082: 2 SE = 0.016
    arms = {
        "top20": _arm(0.90, sd),
        "all": _arm(0.85, sd),
        "bottom80": _arm(0.89, sd),
        "top10": _arm(0.95, sd),
        "top50": _arm(0.80, sd),
    }
    f = {x["finding"]: x for x in findings(_results(arms))}
    assert f["top20_vs_all"]["verdict"] == "holds"  # +0.05
    assert f["bottom80_worse"]["verdict"] == "within noise"  # +0.01
    assert f["rho_trend"]["verdict"] == "does not hold"  # top10 is better
    assert f["entropy_minority"]["verdict"] == "holds" and f["overlap_high"]["verdict"] == "holds"
    assert "0.900" in f["top20_vs_all"]["evidence"] and "0.850" in f["top20_vs_all"]["evidence"]

    arms.update(all=_arm(0.95, sd), bottom80=_arm(0.60, sd), top10=_arm(0.85, sd), top50=_arm(0.89, sd))
    f = {x["finding"]: x for x in findings(_results(arms, share=0.45, overlaps=(0.5, 0.55, 0.6)))}
    assert f["top20_vs_all"]["verdict"] == "does not hold"
    assert f["bottom80_worse"]["verdict"] == "holds"
    assert f["rho_trend"]["verdict"] == "within noise"  # beats top10 clearly, top50 only within noise
    assert (
        f["entropy_minority"]["verdict"] == "does not hold"
        and f["overlap_high"]["verdict"] == "does not hold"
    )

    f = {x["finding"]: x for x in findings(_results({"top20": _arm(0.9, sd)}, overlaps=()))}
    assert {f[k]["verdict"] for k in ("top20_vs_all", "bottom80_worse", "rho_trend", "overlap_high")} == {
        "not tested"
    }


def test_entropy_concentration():
    h = np.array([0.0] * 8 + [1.0, 3.0])
    c = entropy_concentration(h, rho=0.2, thresholds=(0.5, 2.0))
    assert c["share_top"] == 1.0 and c["tokens_for_80pct"] == pytest.approx(0.2)
    assert c["frac_above_0.5"] == pytest.approx(0.2) and c["frac_above_2"] == pytest.approx(0.1)
    assert math.isnan(entropy_concentration(np.zeros(3))["share_top"])


def test_results_markdown_is_filled_from_the_numbers(tmp_path):
    arms = {"top20": _arm(0.9, 0.01), "all": _arm(0.85, 0.01)}
    for a in arms.values():
        a.update(what="x", best=a["final"], curve_mean=a["final"], wall_s={"mean": 60.0, "std": 1.0, "n": 3})
    res = _results(arms)
    res.update(command="forkrl ablate --seeds 3", date="2026-01-01", failures=[])
    res["warmstart_entropy"].update(responses=8, percentiles={"n": 100, "p80": 0.01, "frac_below_0.01": 0.8})
    res["overlap"]["top20"].update(
        tokens=100,
        high_entropy_before=0.5,
        high_entropy_after=0.4,
        low_entropy_before=0.01,
        low_entropy_after=0.01,
    )
    res["findings"] = findings(res)
    md = results_markdown(res)
    assert "forkrl ablate --seeds 3" in md and "| top20_vs_all |" in md and "**holds**" in md
    assert "0.900 ± 0.010" in md and "curves.png" in md and "Forking positions after RL" in md
    assert "warmstart_entropy/wordcloud_low.png" in md
    assert markdown_table([["a"], ["1"]]) == "| a |\n|---|\n| 1 |"
    assert "## Entropy over training" not in md  # no arm logged an entropy curve
    arms["top20"]["entropy"] = {"steps": [1, 2], "mean": [0.9, 0.75], "std": [0.01, 0.05]}
    md = results_markdown(res, figures="docs/x/")
    assert "| top20 | 0.900 ± 0.010 (step 1) | 0.750 ± 0.050 (step 2) | -0.150 |" in md
    assert (
        "](docs/x/entropy.png)" in md
        and "| all |" not in md.split("## Entropy over training")[1].split("##")[0]
    )
    assert plot_curves(res, tmp_path / "entropy.png", key="entropy").read_bytes()[:4] == b"\x89PNG"


def test_run_state_skips_finished_runs_and_refuses_foreign_or_changed_ones(tmp_path):
    spec = RunSpec("top20", 0, tmp_path / "run", arm_overrides("top20", steps=3))
    assert run_state(spec) == "fresh"
    spec.dir.mkdir()
    (spec.dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not written by `forkrl ablate`"):
        run_state(spec)
    (spec.dir / "ablate.json").write_text(json.dumps({"args": spec.args}))
    assert run_state(spec) == "fresh"  # started, no checkpoint: started again
    (spec.dir / "final").mkdir()
    (spec.dir / "summary.json").write_text("{}")
    assert run_state(spec) == "done"
    with pytest.raises(ConfigError, match="other settings"):
        run_state(RunSpec("top20", 0, spec.dir, arm_overrides("top20", steps=4)))
    with pytest.raises(SystemExit) as e:
        main(["ablate", "--help"])
    assert e.value.code == 0


def test_a_failed_run_is_reported_with_its_log(tmp_path):
    bad = RunSpec(
        "top20", 0, tmp_path / "runs" / "top20" / "seed0", ["train.steps=1", f"model.path={tmp_path}/none"]
    )
    report = run_study([bad], progress=False)
    assert report["ran"] == 0 and len(report["failed"]) == 1
    log = report["failed"][0]["log"]
    assert report["failed"][0]["rc"] != 0 and "is not a folder" in open(log).read()


@pytest.mark.slow  # end to end, > 5 s
def test_ablate_end_to_end_then_resume_skips_finished_runs(tiny_model_dir, tmp_path):
    out = tmp_path / "abl"
    argv = [
        "ablate",
        "--arms",
        "top20,all",
        "--seeds",
        "1",
        "--steps",
        "1",
        "--eval-every",
        "1",
        "--eval-n",
        "4",
        "--analysis-n",
        "2",
        "--analysis-k",
        "2",
        "--jobs",
        "2",
        "--out",
        str(out),
        "--no-progress",
        f"model.path={tiny_model_dir}",
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "rollout.max_new_tokens=8",
        "sampling.max_rounds=1",
        "reward.isolate=false",
    ]
    assert main(argv) == 0
    for name in ("results.json", "curves.png", "RESULTS.md", "warmstart_entropy/entropy_hist.png"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    res = json.loads((out / "results.json").read_text())
    assert set(res["arms"]) == {"top20", "all"} and not res["failures"]
    assert res["arms"]["top20"]["curve"]["steps"] == [0, 1] and res["arms"]["all"]["final"]["n"] == 1
    assert set(res["overlap"]) == {"top20", "all"} and res["warmstart_entropy"]["responses"] == 4
    md = (out / "RESULTS.md").read_text()
    assert "Which findings hold" in md and f"--out {out}" in md and "rollout.group_size=2" in md
    # no group varied in reward here, so no step updated: no entropy curve, no plot, no section
    assert res["arms"]["all"]["entropy"]["steps"] == [] and not (out / "entropy.png").exists()
    run = out / "runs" / "top20" / "seed0"
    assert (run / "train.log").is_file() and (run / "final").is_dir() and not (run / "checkpoints").exists()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed0/summary.json")}
    assert len(stamps) == 2
    stamps[out / "warmstart_entropy" / "dump.jsonl"] = (
        (out / "warmstart_entropy" / "dump.jsonl").stat().st_mtime_ns
    )
    assert main(argv) == 0  # every run finished: nothing retrains or resamples, the outputs are rewritten
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "results.json").read_text())["overlap"] == res["overlap"]


def test_the_analyses_are_reused_until_their_inputs_change(tmp_path):
    from forkrl.analysis.ablate import _analysis_cached, _fingerprint

    model = tmp_path / "final"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x")
    calls = []

    def make():
        calls.append(1)
        return {"mean": len(calls)}

    def key(n):
        return {"n": n, "args": ("a", "b"), "finals": [_fingerprint(str(model))]}

    path = tmp_path / "overlap.json"
    assert _analysis_cached(path, key(2), make) == {"mean": 1}
    assert _analysis_cached(path, key(2), make) == {"mean": 1} and len(calls) == 1  # reused
    assert _analysis_cached(path, key(3), make) == {"mean": 2}  # another analysis size
    (model / "model.safetensors").write_bytes(b"yy")  # the run was trained again
    assert _analysis_cached(path, key(3), make) == {"mean": 3} and len(calls) == 3
