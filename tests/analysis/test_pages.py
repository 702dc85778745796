"""The token view and the training report: valid, self-contained HTML with the expected tokens and runs;
and (when Chromium is installed) pages that load without console errors."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from forkrl.analysis.report import render_report, write_report
from forkrl.analysis.view import render_view, write_view

from .conftest import check_html

CHROMIUM = "/usr/bin/chromium"


def _fake_run(path: Path, steps: int = 4, shift: float = 0.0) -> Path:
    path.mkdir(parents=True)
    rows = [{"step": 0, "eval_accuracy": 0.4 + shift}]
    for s in range(1, steps + 1):
        rows.append(
            {
                "step": s,
                "reward_mean": 0.3 + 0.05 * s + shift,
                "accuracy": 0.3 + 0.05 * s,
                "tau": 1.1 - 0.1 * s,
                "kept_frac": 0.2,
                "entropy_kept": 1.4,
                "entropy_dropped": 0.05,
                "clip_frac_low": 0.0,
                "clip_frac_high": 0.01 * s,
                "response_len_mean": 20 - s,
                "time_rollout": 1.0,
                "time_reward": 0.1,
                "time_scoring": 0.2,
                "time_update": 0.5,
                "eval_accuracy": None,
            }
        )
    rows[-1]["eval_accuracy"] = 0.6 + shift
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"eval_accuracy_end": 0.6}))
    return path


def test_token_view_shows_every_token(tiny_dump, tmp_path):
    page = render_view(tiny_dump)
    tags = check_html(page)
    n_tokens = sum(len(r["tokens"]) for r in tiny_dump.rows)
    spans = re.findall(r'<span id="t(\d+)" class="t( s)?( m)?"', page)
    assert len(spans) == n_tokens and [int(i) for i, *_ in spans] == list(range(n_tokens))
    n_sel = sum(sum(r["sel"]) for r in tiny_dump.rows)
    assert sum(1 for _, s, _ in spans if s) == n_sel > 0
    assert page.count("data-alt=") == n_tokens  # top alternatives stored by `analyze generate`
    first = tiny_dump.rows[0]
    assert f'data-h="{first["entropy"][0]:.4f}"' in page
    assert "<eos>" not in page  # token text is escaped
    assert html.escape(first["prompt"]) in page
    assert tags["script"] == 1 and tags["style"] == 1
    assert not re.search(r'(src|href)="(https?:)?//', page)  # self-contained
    write_view(tiny_dump, tmp_path / "v.html", max_rows=1)
    assert (tmp_path / "v.html").read_text().count('class="resp"') == 1


def test_report_overlays_runs(tmp_path):
    a = _fake_run(tmp_path / "run_a")
    b = _fake_run(tmp_path / "run_b", steps=3, shift=0.1)
    page = render_report([a, b], labels=["paper", "trl run"])
    tags = check_html(page)
    assert "paper" in page and "trl run" in page and "run_a" in page  # labels, and the folders in the configs
    assert tags["img"] == 9  # 8 metric panels + the time split, all embedded
    assert page.count('src="data:image/png;base64,') == 9
    assert "0.4 → 0.6" in page and "0.5 → 0.7" in page  # eval accuracy first -> last, per run
    with pytest.raises(ValueError, match="2 labels for 1 run"):
        render_report([a], labels=["x", "y"])
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        render_report([tmp_path])


def _chromium_errors(url: str, profile: Path) -> tuple[str, list[str]]:
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [ln for ln in out.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    return out.stdout, errors


@pytest.mark.skipif(
    not Path(CHROMIUM).exists() or shutil.which("chromium") is None, reason="needs /usr/bin/chromium"
)
def test_pages_load_in_chromium_without_console_errors(tiny_dump, tmp_path):
    view = write_view(tiny_dump, tmp_path / "view.html")
    report = write_report([_fake_run(tmp_path / "run")], tmp_path / "report.html")
    dom, errors = _chromium_errors(f"file://{view}#tip=2", tmp_path / "profile1")
    assert not errors, errors
    # The inline script ran: the tooltip of token 2 is filled with its entropy and alternatives.
    shown = re.search(r'data-tip-shown="([^"]*)"', dom)
    assert shown and "H = " in shown.group(1) and "%" in shown.group(1)
    dom, errors = _chromium_errors(f"file://{report}", tmp_path / "profile2")
    assert not errors, errors
    assert dom.count("<img") == 9
    # The check itself sees errors.
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>undefinedThing();</script></body></html>")
    assert _chromium_errors(f"file://{bad}", tmp_path / "profile3")[1]


def test_token_view_escapes_every_value_of_a_crafted_dump(tmp_path):
    # A dump from someone else: every string that reaches the page (step, meta keys and values,
    # prompt, tokens, alternatives, reward) tries to close the page's markup and run a script.
    from forkrl.analysis.dump import Dump, read_dump
    from forkrl.training.dump import META_KEY

    evil = "</script><script>alert(1)</script>"
    row = {
        "step": evil,
        "reward": evil,
        "adv": evil,
        "prompt": evil,
        "tokens": [evil, "ok", '"><b>'],
        "entropy": [0.5, 0.1, 0.2],
        "logp": [-0.1, -0.2, -0.3],
        "sel": [True, False, False],
        "loss": [True, True, True],
        "top_tokens": [[evil, "a"], ["ok", evil], ["b", "c"]],
        "top_probs": [[0.6, 0.4], [0.9, 0.1], [0.5, 0.5]],
    }
    path = tmp_path / "evil.jsonl"
    numeric = {**row, "reward": 1.0, "adv": 0.5}  # the step and meta alone inject today
    path.write_text("".join(json.dumps(x) + "\n" for x in ({META_KEY: {evil: evil, "n": 2}}, numeric, row)))
    for dump in (read_dump(path), Dump(rows=[numeric], meta={evil: evil})):
        page = render_view(dump, title=evil)
        tags = check_html(page)
        assert tags["script"] == 1 and "alert(1)</script>" not in page and "<b>" not in page
        assert html.escape(evil) in page  # shown as text, not dropped
