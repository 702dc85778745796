"""Checkpoints: everything a run needs to continue bit-identically, written atomically.

A checkpoint is a folder `RUN_DIR/checkpoints/step-000042/` with the model and tokenizer
(`save_pretrained`, safetensors), and `state.pt` (optimizer, scheduler, RNG states, sampler
position, step, metrics-log offset), and for PPO the critic in `critic/` (`ValueModel.save_pretrained`,
safetensors; its optimizer is in `state.pt`). It is written to a hidden temporary folder, flushed, then
renamed into place: a crash mid-write (even `kill -9`) leaves only a `.tmp-*` folder that loading
ignores, and the previous checkpoint intact. The newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^step-(\d{6,})$")


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(generator: torch.Generator) -> dict:
    """RNG states as tensors and plain Python values, so `torch.load(weights_only=True)` can read them."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "selection": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["selection"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model,
    tokenizer,
    state: dict,
    keep: int = 2,
    before_rename=None,
    critic=None,
    state_dict: dict | None = None,
    critic_state_dict: dict | None = None,
) -> Path:
    """Write checkpoint `step` atomically; prune to the newest `keep`. Returns its folder.

    `before_rename` is a fault-injection hook for tests (called once the files are written);
    `critic`, PPO's value model, is saved in `critic/`.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=state_dict)  # state_dict: the gathered weights of a sharded model
    tokenizer.save_pretrained(tmp)
    if critic is not None:
        critic.save_pretrained(tmp / "critic", state_dict=critic_state_dict)
    torch.save(state, tmp / "state.pt")
    _fsync_tree(tmp)
    if before_rename is not None:
        before_rename(tmp)
    if final.exists():  # re-saving the same step (e.g. the final checkpoint): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_tree(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _NAME.match(p.name)) and (p / "state.pt").exists()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_state(ckpt: Path) -> dict:
    """state.pt through `torch.load(weights_only=True)`: a checkpoint from someone else must not run code
    (DESIGN: loading is a trust boundary). An unreadable file is a `DamagedCheckpointError`, one that
    holds code an `UnsafeCheckpointError`, each naming the file."""
    from forkrl.models.io import safe_torch_load

    return safe_torch_load(Path(ckpt) / "state.pt")


def _unreadable(ckpt: Path) -> str | None:
    """Why checkpoint `ckpt` cannot be resumed from (None: it can): an empty, truncated or foreign
    state.pt, or a safetensors file whose header or size is wrong (a write cut short)."""
    from safetensors import safe_open

    from forkrl.models.io import DamagedCheckpointError

    try:  # an UnsafeCheckpointError (code in state.pt) is not skipped: the folder was tampered with
        state = load_state(ckpt)
    except DamagedCheckpointError as e:
        return f"state.pt cannot be read ({e})"
    if not isinstance(state, dict) or "step" not in state:
        return "state.pt is not a forkrl checkpoint state"
    files = sorted(ckpt.rglob("*.safetensors"))
    if not files:
        return "no model weights (*.safetensors)"
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                h.keys()
        except Exception as e:  # safetensors checks the header and that the data fill the file
            return f"{f.relative_to(ckpt)} cannot be read ({type(e).__name__}: {e})"
    return None


def usable_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that can be resumed from, and a line per newer one skipped as unreadable."""
    skipped = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        why = _unreadable(ckpt)
        if why is None:
            return ckpt, skipped
        skipped.append(f"{ckpt}: {why}")
    return None, skipped
