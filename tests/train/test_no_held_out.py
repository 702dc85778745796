"""`forkrl train data.path=FILE` without data.eval_path (issue 28, item 2): no held-out evaluation runs,
and the run says so; summary.json stays valid JSON (it held NaN) and the CLI prints no `nan -> nan`."""

import json

from forkrl.cli import main


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_no_eval_path_is_said_and_the_summary_is_valid_json(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(
        "\n".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) for a in range(1, 9)) + "\n"
    )
    run = tmp_path / "run"
    argv = [
        "train",
        f"data.path={data}",
        f"train.out_dir={run}",
        "train.steps=1",
        "train.progress=false",
        "train.tensorboard=false",
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "rollout.max_new_tokens=6",
        "sampling.dynamic=false",
        "reward.isolate=false",
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "nan" not in out
    assert "held-out accuracy: not measured (no held-out data: data.eval_path is empty)" in out
    assert "forkrl: warning: data.path without data.eval_path" in err
    summary = _strict((run / "summary.json").read_text())
    assert summary["eval_accuracy_start"] is None and summary["eval_accuracy_end"] is None
    rows = [_strict(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 0, "eval_accuracy": None} or rows[0]["eval_accuracy"] is None
