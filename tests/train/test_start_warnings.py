"""`forkrl train` names, before the model loads, settings that by themselves train nothing."""

import pytest

from tests.train.test_smoke import _run


@pytest.mark.slow  # a whole training run (about 10 s)
def test_rho_zero_is_warned_at_start(tiny_model_dir, tmp_path, capsys):
    _run(tiny_model_dir, tmp_path, "train.steps=1", "selection.rho=0")
    err = capsys.readouterr().err
    assert "forkrl: warning: selection.rho=0" in err
    _run(tiny_model_dir, tmp_path / "b", "train.steps=1")
    assert "forkrl: warning" not in capsys.readouterr().err
