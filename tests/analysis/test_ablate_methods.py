"""`forkrl ablate --study methods`: the method arms resolve to the intended configs, the per-method verdicts
on constructed numbers, the write-up and plots on a fake results dict, and one tiny end-to-end study."""

import json

import pytest

from forkrl.analysis.ablate import ARMS, RESERVED, STUDIES, arm_overrides, plan_runs
from forkrl.analysis.ablate_arms import METHOD_ARMS, baseline_of
from forkrl.analysis.ablate_methods import (
    aggregate_methods,
    method_findings,
    methods_markdown,
    plot_entropy,
    plot_panels,
    run_methods,
)
from forkrl.analysis.ablate_results import markdown_table, mean_std, plot_curves
from forkrl.cli import main
from forkrl.config import ConfigError, load_config

EXPECTED = {  # arm -> (rule, rho, loss.mode, eps_low, eps_high, cov_ratio, entropy_adv_alpha)
    "gspo": ("all", 1.0, "gspo", 3e-4, 4e-4, 2e-4, 0.0),
    "top20_gspo": ("top", 0.2, "gspo", 3e-4, 4e-4, 2e-4, 0.0),
    "cispo": ("all", 1.0, "cispo", 0.2, 0.28, 2e-4, 0.0),
    "top20_cispo": ("top", 0.2, "cispo", 0.2, 0.28, 2e-4, 0.0),
    "clip_cov": ("all", 1.0, "clip_cov", 0.2, 0.28, 2e-4, 0.0),
    "kl_cov": ("all", 1.0, "kl_cov", 0.2, 0.28, 2e-3, 0.0),
    "top20_kl_cov": ("top", 0.2, "kl_cov", 0.2, 0.28, 2e-3, 0.0),
    "archer": ("all", 1.0, "archer", 0.2, 0.28, 2e-4, 0.0),
    "entadv": ("all", 1.0, "clip", 0.2, 0.28, 2e-4, 0.4),
    "top20_entadv": ("top", 0.2, "clip", 0.2, 0.28, 2e-4, 0.4),
}


@pytest.mark.parametrize("arm", METHOD_ARMS)
def test_every_method_arm_loads_with_the_study_settings(arm):
    base = STUDIES["methods"].base
    cfg = load_config(None, arm_overrides(arm, seed=1, steps=5, eval_n=7, base=base, extra=["optim.lr=1e-4"]))
    got = (
        cfg.selection.rule,
        cfg.selection.rho,
        cfg.loss.mode,
        cfg.loss.eps_low,
        cfg.loss.eps_high,
        cfg.loss.cov_ratio,
        cfg.algorithm.entropy_adv_alpha,
    )
    assert got[:3] == EXPECTED[arm][:3]
    assert got[3:] == pytest.approx(EXPECTED[arm][3:])
    assert cfg.preset == "paper" and cfg.optim.mini_batches == 4 and cfg.optim.lr == 1e-4
    assert (cfg.train.seed, cfg.train.steps, cfg.train.eval_n) == (1, 5, 7)
    if arm == "cispo":
        assert not cfg.loss.cispo_clip_low
    if arm == "archer":  # its defaults, the KL on the low-entropy tokens (a reference model)
        assert (cfg.loss.archer_quantile, cfg.loss.archer_kl_coef_low, cfg.loss.archer_kl_coef_high) == (
            0.8,
            1e-3,
            0,
        )


def test_the_studies_arm_lists_and_what_the_arms_reserve():
    assert STUDIES["methods"].arms[:2] == ("top20", "all") and set(METHOD_ARMS) <= set(ARMS)
    assert STUDIES["paper"].base == () and STUDIES["methods"].results_name == "RESULTS-methods.md"
    for arm in STUDIES["methods"].arms:
        for o in ARMS[arm][1]:
            assert o.split("=", 1)[0] in RESERVED, (arm, o)
    with pytest.raises(ConfigError, match="loss.mode"):
        arm_overrides("gspo", extra=["loss.mode=clip"])
    with pytest.raises(ConfigError, match="loss.cov_ratio"):
        arm_overrides("kl_cov", extra=["loss.cov_ratio=0.5"])
    assert [baseline_of(a) for a in ("gspo", "top20_gspo", "top20_entadv")] == ["all", "top20", "top20"]
    specs = plan_runs("/tmp/x", ["all"], 1, base=STUDIES["methods"].base)
    assert "optim.mini_batches=4" in specs[0].args  # the baselines run with the study's settings too


def _write_run(run_dir, entropy: list[float], extra: dict) -> None:
    run_dir.mkdir(parents=True)
    lines = [json.dumps({"step": 0, "eval_accuracy": 0.5})]
    for step, h in enumerate(entropy, start=1):
        lines.append(json.dumps({"step": step, "entropy_mean": h, "selected_tokens": 100.0, **extra}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_entropy_curves_and_method_metrics_over_seeds(tmp_path):
    _write_run(tmp_path / "s0", [0.3, 0.2, 0.1], {"cov_touched_frac": 0.01})
    _write_run(tmp_path / "s1", [0.5, 0.4, 0.3], {"cov_touched_frac": 0.03})
    runs = [run_methods(tmp_path / s) for s in ("s0", "s1")]
    assert runs[0]["entropy"] == {"steps": [1, 2, 3], "values": [0.3, 0.2, 0.1]}
    assert runs[0]["metrics"] == {"selected_tokens": 100.0, "cov_touched_frac": 0.01}
    a = aggregate_methods(runs)
    assert a["entropy"]["steps"] == [1, 2, 3] and a["entropy"]["mean"] == pytest.approx([0.4, 0.3, 0.2])
    assert a["entropy"]["std"] == pytest.approx([0.1414214] * 3)
    assert a["final_entropy"]["mean"] == pytest.approx(0.2) and a["final_entropy"]["n"] == 2
    assert a["metrics"]["cov_touched_frac"]["mean"] == pytest.approx(0.02)


def _arm(acc, ent, n=3, sd=0.01):
    curve = {"steps": [0, 2], "mean": [0.5, acc], "std": [0.0, sd]}
    return {
        "what": "x",
        "final": {"mean": acc, "std": sd, "n": n},
        "best": {"mean": acc, "std": sd, "n": n},
        "curve_mean": {"mean": acc, "std": sd, "n": n},
        "wall_s": {"mean": 30.0, "std": 1.0, "n": n},
        "curve": curve,
        "entropy": {"steps": [1, 2], "mean": [0.2, ent], "std": [0.01, 0.01]},
        "final_entropy": {"mean": ent, "std": 0.01, "n": n},
        "metrics": {"cov_touched_frac": mean_std([0.001, 0.0012])},
    }


def _results(arms):
    settings = {
        "study": "methods",
        "eval_n": 500,
        "seeds": 3,
        "steps": 20,
        "eval_every": 2,
        "jobs": 2,
        "base": ["optim.mini_batches=4"],
    }
    res = {
        "settings": settings,
        "arms": arms,
        "command": "forkrl ablate --study methods",
        "date": "2026-01-01",
        "failures": [],
    }
    res["findings"] = method_findings(res)
    return res


def test_method_verdicts_against_the_matching_baseline():
    # SE of one arm 0.01/sqrt(3) = 0.0058, of a difference 0.0082: 2 SE = 0.016
    arms = {
        "top20": _arm(0.90, 0.10),
        "all": _arm(0.85, 0.10),
        "gspo": _arm(0.90, 0.10),
        "top20_gspo": _arm(0.85, 0.10),
        "kl_cov": _arm(0.86, 0.30),
        "top20_kl_cov": _arm(0.90, 0.05),
        "cispo": _arm(0.80, 0.10),
    }
    f = {x["finding"]: x for x in _results(arms)["findings"]}
    assert set(f) == {"gspo", "top20_gspo", "kl_cov", "top20_kl_cov", "cispo"}  # the baselines are no finding
    assert (f["gspo"]["baseline"], f["gspo"]["verdict"]) == ("all", "holds")  # +0.05 vs all
    assert (f["top20_gspo"]["baseline"], f["top20_gspo"]["verdict"]) == ("top20", "does not hold")  # -0.05
    assert f["kl_cov"]["verdict"] == "within noise" and f["kl_cov"]["entropy_verdict"] == "higher"
    assert f["top20_kl_cov"]["verdict"] == "within noise" and f["top20_kl_cov"]["entropy_verdict"] == "lower"
    assert f["cispo"]["verdict"] == "does not hold" and f["cispo"]["entropy_verdict"] == "within noise"
    assert "gspo 0.900 vs all 0.850" in f["gspo"]["evidence"] and "top-20%" in f["top20_gspo"]["claim"]
    assert "GSPO" in f["gspo"]["claim"]
    f = {x["finding"]: x for x in method_findings(_results({"gspo": _arm(0.9, 0.1)}))}
    assert f["gspo"]["verdict"] == "not tested" and f["gspo"]["entropy_verdict"] == "not tested"
    one = {
        "all": _arm(0.85, 0.1, n=1),
        "clip_cov": _arm(0.86, 0.2, n=1),
    }  # one seed: binomial SE, no entropy SE
    f = {x["finding"]: x for x in method_findings(_results(one))}
    assert f["clip_cov"]["verdict"] == "within noise" and f["clip_cov"]["entropy_verdict"] == "not tested"


def test_methods_markdown_and_plots_from_a_fake_study(tmp_path):
    res = _results({"top20": _arm(0.9, 0.1), "all": _arm(0.85, 0.1), "kl_cov": _arm(0.9, 0.3)})
    md = methods_markdown(res, fig="docs/ablate-methods/")
    assert "forkrl ablate --study methods" in md and "| kl_cov | all |" in md and "**holds**" in md
    assert "0.900 ± 0.010" in md and "0.300 ± 0.010" in md and "`optim.mini_batches=4`" in md
    assert "**In short**" in md and "holds: kl_cov" in md  # the generated summary follows the verdicts
    assert "](docs/ablate-methods/curves.png)" in md and "](docs/ablate-methods/entropy.png)" in md
    assert "| arm | cov_touched_frac |" in md and "| kl_cov | 0.0011 ± 0.000141 |" in md
    assert markdown_table([["a"], ["|log r|"]]).endswith("| \\|log r\\| |")  # a cell's "|" is escaped
    for fn, name in ((plot_curves, "curves.png"), (plot_entropy, "entropy.png"), (plot_panels, "panels.png")):
        assert fn(res, tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # end to end, > 5 s
def test_ablate_methods_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "abl"
    argv = [
        "ablate",
        "--study",
        "methods",
        "--arms",
        "all,kl_cov",
        "--seeds",
        "1",
        "--steps",
        "2",
        "--eval-every",
        "1",
        "--eval-n",
        "4",
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
        "sampling.dynamic=false",
    ]
    assert main(argv) == 0
    for name in ("results.json", "curves.png", "entropy.png", "RESULTS-methods.md"):
        assert (out / name).is_file(), name
    assert not (out / "warmstart_entropy").exists() and not (out / "RESULTS.md").exists()
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["study"] == "methods" and not res["failures"]
    assert res["arms"]["kl_cov"]["entropy"]["steps"] == [1, 2]
    assert "cov_touched_frac" in res["arms"]["kl_cov"]["metrics"]
    assert "cov_touched_frac" not in res["arms"]["all"]["metrics"]
    assert [f["finding"] for f in res["findings"]] == ["kl_cov"]
    args = json.loads((out / "runs" / "all" / "seed0" / "ablate.json").read_text())["args"]
    assert "optim.mini_batches=4" in args and "selection.rule=all" in args
    md = (out / "RESULTS-methods.md").read_text()
    assert "Which methods help here" in md and "--study methods" in md and "rollout.group_size=2" in md
