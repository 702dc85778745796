"""The command line: help everywhere, and bad overrides refused with the field and what is allowed."""

import subprocess
import sys

import pytest

from forkrl.cli import main
from forkrl.config import ConfigError, load_config, parse_override


def test_help_everywhere():
    for args in (
        ["--help"],
        ["train", "--help"],
        ["warmstart", "--help"],
        ["eval", "--help"],
        ["config", "--help"],
        ["analyze", "--help"],
        ["analyze", "stats", "--help"],
        ["report", "--help"],
    ):
        out = subprocess.run([sys.executable, "-m", "forkrl", *args], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: forkrl" in out.stdout, args


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "selection.rule=highest",
            "selection.rule='highest' is not allowed; choose one of top, bottom, random, all",
        ),
        ("selection.rho=1.5", "selection.rho=1.5 is out of range [0.0, 1.0]"),
        (
            "selection.rhoo=0.1",
            "unknown config key 'selection.rhoo'; did you mean `selection.rho=0.1`?; fields of 'selection' are rho",
        ),
        (
            "selektion.rho=0.1",
            "unknown config key 'selektion.rho'; did you mean `selection.rho=0.1`?; sections are model, task",
        ),
        ("rollout.group_size=two", "rollout.group_size='two': expected int"),
        ("rollout.group_size=2.5", "rollout.group_size=2.5: expected int"),
        ("preset=verl", "preset='verl' is not allowed; choose one of paper, official, trl"),
        ("sampling.dynamic=maybe", "sampling.dynamic='maybe': expected bool"),
        ("loss.normalizer=mean", "choose one of all_tokens, selected_tokens, seq_mean, constant"),
        ("train.steps", "override 'train.steps' must look like section.field=value"),
    ],
)
def test_bad_overrides_name_the_field(override, message, capsys):
    assert main(["train", override]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_overrides_are_typed_and_win_over_the_preset():
    cfg = load_config(
        None, ["preset=trl", "selection.count=exact", "loss.dual_clip=null", "rollout.top_p=0.7"]
    )
    assert cfg.selection.count == "exact"  # explicit value beats the preset's quantile
    assert cfg.selection.scope == "micro_batch"  # the rest of the trl row stays
    assert cfg.loss.dual_clip is None and cfg.rollout.top_p == 0.7
    assert parse_override("selection.rho=0.1") == ("selection.rho", 0.1)


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: official\nselection:\n  rho: 0.1\ntrain:\n  steps: 7\n")
    cfg = load_config(path, ["train.steps=9"])
    assert (cfg.preset, cfg.selection.rho, cfg.selection.scope, cfg.train.steps) == (
        "official",
        0.1,
        "micro_batch",
        9,
    )
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(path)


def test_config_command_prints_every_field(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for key in (
        "selection.rho = 0.2",
        "selection.scope = 'batch'",
        "loss.normalizer = 'all_tokens'",
        "optim.lr",
    ):
        assert key in out


def test_eval_dual_temperature_at_one_equals_plain_sampling(capsys):
    # T_high = T_low = 1 is plain sampling: the same avg@k as `forkrl eval --k` at T = 1 with the same seeds.
    import json

    assert main(["eval", "--n", "16", "--k", "2", "--t-high", "1", "--t-low", "1", "--threshold", "0.5"]) == 0
    dual = json.loads(capsys.readouterr().out)
    assert main(["eval", "--n", "16", "--k", "2", "--temperature", "1"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert dual["accuracy"] == plain["accuracy"] and dual["threshold"] == 0.5


def test_import_makes_a_users_registered_rule_selectable(tmp_path, monkeypatch, capsys):
    # `--import MODULE` runs the user's register_* calls before the config is read (issue 15).
    (tmp_path / "my_forkrl_rules.py").write_text(
        "from forkrl.core.selection import RULES, register_rule\nregister_rule('top_copy')(RULES['top'])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from forkrl.cli import main
    from forkrl.core.selection import RULES

    try:
        assert main(["config", "selection.rule=top_copy"]) == 2  # unknown without the import
        assert "top_copy" not in capsys.readouterr().out
        assert main(["config", "--import", "my_forkrl_rules", "selection.rule=top_copy"]) == 0
        out = capsys.readouterr().out
        assert "selection.rule = 'top_copy'" in out and "top_copy" in out.split("selection.rule")[1]
        assert main(["config", "--import", "no_such_module_xyz"]) == 2
        assert "--import no_such_module_xyz: cannot import it" in capsys.readouterr().err
    finally:
        RULES.pop("top_copy", None)


def test_version_and_did_you_mean_for_flags_and_misspelt_keys(capsys):
    import pytest

    from forkrl import __version__
    from forkrl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"forkrl {__version__}"
    for argv, hint in [
        (["train", "--steps", "5"], "did you mean `train.steps=5`?"),
        (["train", "--lr=1e-5"], "did you mean `optim.lr=1e-5`?"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and hint in capsys.readouterr().err
    assert main(["train", "trian.steps=5"]) == 2
    assert "did you mean `train.steps=5`?" in capsys.readouterr().err
