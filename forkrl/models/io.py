"""Reading torch files a run wrote (`state.pt`) without ever running code from them, and the errors
for checkpoint files forkrl cannot use (`forkrl.models.loading` raises them for model folders too).

`torch.load(weights_only=True)` refuses a pickle that would import or call anything (DESIGN: loading
is a trust boundary), but its message advises re-running with `weights_only=False`, which would run
the payload. `safe_torch_load` says instead what the file is, and what to do.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from forkrl.errors import ConfigError

__all__ = ["CheckpointError", "DamagedCheckpointError", "UnsafeCheckpointError", "safe_torch_load"]


class CheckpointError(ConfigError):
    """A checkpoint file forkrl cannot use; the message names the file and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds code or objects (a pickle that imports or calls something): never loaded, and
    not a reason to fall back silently, since forkrl does not write such files."""


class DamagedCheckpointError(CheckpointError):
    """A file of the checkpoint (or model folder) is empty, truncated, unreadable or missing a tensor
    (e.g. a write cut short): an earlier checkpoint may be used instead."""


def _reason(e: Exception) -> str:
    # torch's own explanation, without its advice to load with weights_only=False.
    lines = [
        line.strip()
        for line in str(e).splitlines()
        if line.strip() and "weights_only" not in line and "torch.load" not in line
    ]
    return " ".join(lines)[:300] or type(e).__name__


def safe_torch_load(path: str | Path, *, map_location=None) -> Any:
    """`torch.load(path, weights_only=True)`, with errors that name the file and never advise running it.

    Raises `UnsafeCheckpointError` for a file that holds code or objects, `DamagedCheckpointError`
    for an empty, truncated or unreadable one, and lets `FileNotFoundError` through.
    """
    path = Path(path)
    try:
        return torch.load(path, weights_only=True, map_location=map_location)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise UnsafeCheckpointError(
                f"{path} is not a forkrl checkpoint (it holds code or objects forkrl does not load: "
                f"{_reason(e)}); forkrl writes only tensors and plain values there. Do not load it "
                "with other tools unless you trust where it came from; resume from a checkpoint forkrl wrote"
            ) from None
        raise DamagedCheckpointError(_damaged(path, e)) from None
    except (EOFError, RuntimeError, KeyError, ValueError, OSError, IndexError, TypeError) as e:
        raise DamagedCheckpointError(_damaged(path, e)) from None


def _damaged(path: Path, e: Exception) -> str:
    size = path.stat().st_size if path.is_file() else 0
    what = "empty" if size == 0 else "truncated or not a torch file"
    return (
        f"{path} is {what} ({size} bytes; {_reason(e)}); a write was probably cut short: resume from an "
        "earlier checkpoint, or delete this one"
    )
