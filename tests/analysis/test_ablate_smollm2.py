"""`forkrl ablate --study smollm2` (issue 26): the arms run the shipped recipe, the sampled-accuracy
verdicts on constructed numbers, and one tiny study end to end on the real model."""

import dataclasses
import json

import pytest

from forkrl.analysis import ablate_arms
from forkrl.analysis.ablate import STUDIES, ablate, arm_overrides
from forkrl.analysis.ablate_arms import recipe_overrides
from forkrl.analysis.ablate_results import mean_std, results_markdown
from forkrl.analysis.ablate_sampled import sampled_findings, sampled_markdown
from forkrl.config import load_config


@pytest.mark.parametrize(
    "arm,rule,rho",
    [("top20", "top", 0.2), ("all", "all", 1.0), ("bottom80", "bottom", 0.8), ("random20", "random", 0.2)],
)
def test_arms_run_the_recipe_with_their_own_selection(arm, rule, rho):
    st = STUDIES["smollm2"]
    recipe = load_config("smollm2")
    cfg = load_config(None, arm_overrides(arm, seed=1, steps=30, eval_every=10, eval_n=64, base=st.base))
    assert (cfg.selection.rule, cfg.selection.rho) == (rule, rho)
    for section in ("model", "task", "rollout", "sampling", "optim"):
        assert getattr(cfg, section) == getattr(recipe, section), section
    assert (cfg.train.seed, cfg.train.steps, cfg.train.eval_n, cfg.train.threads) == (1, 30, 64, 1)
    assert st.defaults == (30, 10, 64) and st.sampled == (4, 200)
    assert not any(o.startswith(("train.", "selection.", "preset")) for o in recipe_overrides("smollm2"))


def _sampled(base, arms):
    return {
        "k": 4,
        "n": 200,
        "base": {"avg": base, "pass": 0.5},
        "arms": {a: {"avg": mean_std(v), "pass": mean_std(v)} for a, v in arms.items()},
    }


def test_sampled_verdicts_follow_the_two_standard_error_rule():
    s = _sampled(
        0.40, {"top20": [0.55, 0.57], "all": [0.56, 0.54], "bottom80": [0.30, 0.32], "random20": [0.50, 0.60]}
    )
    v = {f["finding"]: f["verdict"] for f in sampled_findings(s)}
    # top20 0.56 vs base 0.40 (SE ~0.036): holds; vs all 0.55: within noise; vs bottom80 0.31: holds;
    # vs random20 0.55 ± 0.05: within noise.
    assert v == {
        "top20_improves": "holds",
        "top20_vs_all_sampled": "within noise",
        "bottom80_worse_sampled": "holds",
        "top20_beats_random20": "within noise",
    }
    s = _sampled(0.40, {"top20": [0.30, 0.31]})
    v = {f["finding"]: f["verdict"] for f in sampled_findings(s)}
    assert v["top20_improves"] == "does not hold" and v["top20_vs_all_sampled"] == "not tested"
    md = sampled_markdown(s, sampled_findings(s))
    assert "| base model | 1 | 0.400 | 0.500 |" in md and "-9.5 points" in md


def test_the_write_up_gives_each_verdict_once_and_names_the_critics():
    s = _sampled(0.40, {"top20": [0.55, 0.57], "all": [0.76, 0.74]})
    results = {
        "settings": {"seeds": 2, "steps": 30, "eval_every": 10, "eval_n": 64, "jobs": 1},
        "date": "2026-12-07",
        "command": "forkrl ablate --study smollm2",
        "arms": {},
        "findings": sampled_findings(s),
        "sampled": s,
    }
    md = results_markdown(results)
    rows = [line for line in md.splitlines() if line.startswith("| top20_vs_all_sampled |")]
    assert len(rows) == 1 and "**does not hold**" in rows[0]
    assert "`top20_vs_all_sampled`" in md.split("## Sampled held-out accuracy")[1]  # the section points to it
    assert all(critic in md for critic in ("Archer", "LESS", "STAPO", "HICRA", "QAE"))


@pytest.mark.slow  # two SmolLM2 runs of one tiny step, their evaluations and analyses (a few minutes)
def test_a_tiny_smollm2_study_end_to_end(smollm2_dir, tmp_path, monkeypatch):
    small = dataclasses.replace(STUDIES["smollm2"], sampled=(2, 6))
    monkeypatch.setitem(ablate_arms.STUDIES, "smollm2", small)
    monkeypatch.setitem(STUDIES, "smollm2", small)
    tiny = ["rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=12"]
    kw = dict(
        study="smollm2",
        seeds=1,
        steps=1,
        eval_every=0,
        eval_n=4,
        jobs=1,
        extra=tiny,
        analysis_n=2,
        analysis_k=2,
        progress=False,
    )
    results = ablate(tmp_path, ["top20", "all"], **kw)
    s = results["sampled"]
    assert set(s["arms"]) == {"top20", "all"} and s["n"] == 6 and 0 <= s["base"]["avg"] <= 1
    first = json.loads((tmp_path / "runs" / "top20" / "seed0" / "sampled.json").read_text())
    assert first["model"].endswith("final") and first["k"] == 2
    md = (tmp_path / "RESULTS-smollm2.md").read_text()
    assert md.startswith("# The paper's ablations on a real model: SmolLM2-135M-Instruct")
    assert "## Sampled held-out accuracy" in md and "overlap" in md.lower()
    stamp = (tmp_path / "base_sampled.json").stat().st_mtime_ns
    again = ablate(tmp_path, ["top20", "all"], **kw)  # finished runs and evaluations are not redone
    assert again["sampled"] == s and (tmp_path / "base_sampled.json").stat().st_mtime_ns == stamp
    assert results_markdown(again).count("## Sampled held-out accuracy") == 1
