"""Torch files from someone else: refused by name, never with advice to run them (issue 16, item 18)."""

import os
import pickle

import pytest
import torch

from forkrl.models.io import DamagedCheckpointError, UnsafeCheckpointError, safe_torch_load


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo payload ran",))


def test_plain_state_loads(tmp_path):
    state = {"step": 3, "rng": torch.arange(4), "opt": {"lr": 0.1, "betas": (0.9, 0.99)}}
    torch.save(state, tmp_path / "state.pt")
    got = safe_torch_load(tmp_path / "state.pt")
    assert got["step"] == 3 and torch.equal(got["rng"], state["rng"]) and got["opt"] == state["opt"]


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_payload_is_not_a_checkpoint(tmp_path, legacy):
    path = tmp_path / "state.pt"
    if legacy:  # a plain pickle, not torch's zip format
        path.write_bytes(pickle.dumps({"step": 1, "x": _Payload()}))
    else:
        torch.save({"step": 1, "x": _Payload()}, path)
    with pytest.raises(UnsafeCheckpointError) as e:
        safe_torch_load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} is not a forkrl checkpoint (it holds code or objects forkrl does not load")
    assert "weights_only" not in msg  # torch's advice to load it anyway is not passed on
    assert legacy or "posix.system" in msg  # what torch refused


@pytest.mark.parametrize("content", [b"", b"hello world" * 10, "half"])
def test_a_damaged_file_says_so(tmp_path, content):
    path = tmp_path / "state.pt"
    if content == "half":
        torch.save({"a": torch.ones(100)}, path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(DamagedCheckpointError, match=rf"^{path} is (empty|truncated or not a torch file)"):
        safe_torch_load(path)
    with pytest.raises(FileNotFoundError):
        safe_torch_load(tmp_path / "nope.pt")
