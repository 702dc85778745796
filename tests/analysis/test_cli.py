"""The analysis commands end to end on a random tiny model, through `forkrl`'s own entry point."""

import argparse
import json

import pytest

from forkrl.analysis.cli import add_analyze_commands, add_report_command
from forkrl.cli import main

from .test_pages import _fake_run


def test_registration_matches_the_forkrl_parser_style():
    p = argparse.ArgumentParser(prog="forkrl")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_analyze_commands(sub)
    add_report_command(sub)
    args = p.parse_args(
        ["analyze", "sweep", "--t-high", "0.7", "1.3", "--t-low", "1.0", "--threshold", "0.67"]
    )
    assert (
        args.t_high == [0.7, 1.3] and args.t_low == [1.0] and args.threshold == 0.67 and callable(args.func)
    )
    args = p.parse_args(["report", "a", "b", "--labels", "x", "y"])
    assert args.run_dirs == ["a", "b"] and args.labels == ["x", "y"]
    for cmd in ("generate", "stats", "view", "overlap", "sweep"):
        with pytest.raises(SystemExit) as e:
            p.parse_args(["analyze", cmd, "--help"])
        assert e.value.code == 0


def test_commands_end_to_end(tiny_model_dir, tmp_path, capsys):
    m = str(tiny_model_dir)
    dump = tmp_path / "d.jsonl"
    common = ["--n", "2", "--max-new-tokens", "8"]
    assert main(["analyze", "generate", "--model", m, *common, "--k", "2", "--out", str(dump)]) == 0
    assert main(["analyze", "stats", str(dump), "--top", "5"]) == 0
    stats = json.loads((tmp_path / "d_stats" / "stats.json").read_text())
    assert stats["responses"] == 4 and stats["percentiles"]["n"] > 0
    assert main(["analyze", "view", str(dump), "--out", str(tmp_path / "v.html")]) == 0
    assert main(["analyze", "overlap", m, m, *common, "--k", "1", "--out-dir", str(tmp_path / "ov")]) == 0
    ov = json.loads((tmp_path / "ov" / "overlap.json").read_text())
    assert ov["checkpoints"][1]["overlap_vs_first"] == 1.0
    sweep_args = ["--t-high", "1.0", "1.3", "--t-low", "1.0", "--k", "1", "--out-dir", str(tmp_path / "sw")]
    assert main(["analyze", "sweep", "--model", m, *common, *sweep_args]) == 0  # threshold calibrated
    sw = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert len(sw["grid"]) == 2 and sw["threshold"] > 0
    assert (tmp_path / "sw" / "sweep.png").exists()
    run = _fake_run(tmp_path / "run")
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r2.html")]) == 2
    out = capsys.readouterr()
    assert "overlap vs first 100.00%" in out.out and "no metrics.jsonl" in out.err


@pytest.mark.slow  # end to end, > 5 s
def test_on_the_shipped_model_and_a_short_training_run(tmp_path):
    # The shipped warm start, two RL steps from it, then the analysis of both.
    from forkrl.models.loading import DEFAULT_MODEL

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                f"train.out_dir={run}",
                "train.steps=2",
                "train.eval_n=8",
                "train.progress=false",
                "train.tensorboard=false",
                "rollout.prompts_per_step=4",
                "reward.isolate=false",
            ]
        )
        == 0
    )
    dump = tmp_path / "shipped.jsonl"
    assert (
        main(
            ["analyze", "generate", "--model", str(DEFAULT_MODEL), "--n", "8", "--k", "2", "--out", str(dump)]
        )
        == 0
    )
    assert main(["analyze", "stats", str(dump), "--top", "5"]) == 0
    stats = json.loads((tmp_path / "shipped_stats" / "stats.json").read_text())
    # The warm start is confident almost everywhere: most tokens have H < 0.01, a minority forks.
    assert stats["percentiles"]["frac_below_0.01"] > 0.5
    out = tmp_path / "ov"
    assert (
        main(
            [
                "analyze",
                "overlap",
                str(DEFAULT_MODEL),
                str(run / "final"),
                "--n",
                "8",
                "--k",
                "1",
                "--out-dir",
                str(out),
            ]
        )
        == 0
    )
    ov = json.loads((out / "overlap.json").read_text())
    assert 0.0 < ov["checkpoints"][1]["overlap_vs_first"] <= 1.0
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert "eval_accuracy" in (tmp_path / "r.html").read_text()
