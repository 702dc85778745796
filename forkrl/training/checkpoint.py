"""Checkpoints: everything a run needs to continue bit-identically, written atomically.

A checkpoint is a folder `RUN_DIR/checkpoints/step-000042/` with the model and tokenizer
(`save_pretrained`, safetensors), and `state.pt` (optimizer, scheduler, RNG states, sampler
position, step, metrics-log offset), and for PPO the critic in `critic/` (`ValueModel.save_pretrained`,
safetensors; its optimizer is in `state.pt`). It is written to a hidden temporary folder, flushed, then
renamed into place: a crash mid-write (even `kill -9`) leaves only a `.tmp-*` folder that loading
ignores, and the previous checkpoint intact. The newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from forkrl.errors import TrainingError

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
    need = _checkpoint_bytes(run_dir, model, state, state_dict, critic, critic_state_dict)
    free = shutil.disk_usage(root).free
    if free < need:
        raise DiskFullError(
            _disk_full(run_dir, step, f"{free / 2**20:,.0f} MiB free, it needs about {need / 2**20:,.0f} MiB")
        )
    try:
        # state_dict: the gathered weights of a sharded model
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if critic is not None:
            critic.save_pretrained(tmp / "critic", state_dict=critic_state_dict)
        # The tensors written, by file: a checkpoint that later loses one is damaged (_unreadable), and a
        # resume falls back to the one before it instead of stopping at the model's load.
        torch.save({**state, "tensors": tensor_names(tmp)}, tmp / "state.pt")
        _fsync_tree(tmp)
    except Exception as e:  # safetensors and torch.save wrap ENOSPC in their own errors
        if not _out_of_space(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFullError(_disk_full(run_dir, step, "no space left on the device")) from None
    if before_rename is not None:
        before_rename(tmp)
    if final.exists():  # re-saving the same step (e.g. the final checkpoint): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_tree(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


class DiskFullError(TrainingError):
    """A checkpoint did not fit on the disk; the previous one is intact (the message names it)."""


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _checkpoint_bytes(run_dir, model, state, state_dict, critic, critic_state_dict) -> int:
    """About how many bytes the checkpoint will take, with 5% to spare: the previous one's size, else its
    tensors' (a PEFT model writes its adapters only) and 16 MiB for the tokenizer and headers."""
    prev = latest_checkpoint(run_dir)
    if prev is not None:
        return int(1.05 * sum(f.stat().st_size for f in prev.rglob("*") if f.is_file()))
    if state_dict is None:
        peft = hasattr(model, "peft_config")
        state_dict = {n: p for n, p in model.named_parameters() if p.requires_grad or not peft}
    critic_sd = (
        critic_state_dict if critic_state_dict is not None else (critic.state_dict() if critic else {})
    )
    return int(1.05 * (_nbytes(state_dict) + _nbytes(state) + _nbytes(critic_sd))) + (16 << 20)


def _out_of_space(e: BaseException) -> bool:
    return (
        (isinstance(e, OSError) and e.errno == errno.ENOSPC)
        or "No space left on device" in str(e)
        or (
            "inline_container" in str(e) and "enforce fail" in str(e)  # torch.save's writer on a full disk
        )
    )


def _disk_full(run_dir: Path, step: int, why: str) -> str:
    kept = latest_checkpoint(run_dir)
    intact = f"{kept} is intact" if kept is not None else "no earlier checkpoint exists"
    return (
        f"disk full at step {step}'s checkpoint in {Path(run_dir) / 'checkpoints'} ({why}); nothing was "
        f"written for it and {intact}: free space (or move the run folder), then "
        f"`forkrl train --resume {run_dir}`"
    )


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


def tensor_names(folder: Path) -> list[str]:
    """`FILE:TENSOR` for every tensor of the folder's safetensors files (critic/ included), sorted."""
    from safetensors import safe_open

    names = []
    for f in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            names += [f"{f.relative_to(folder).as_posix()}:{k}" for k in h.keys()]
    return sorted(names)


def _unreadable(ckpt: Path) -> str | None:
    """Why checkpoint `ckpt` cannot be resumed from (None: it can): an empty, truncated or foreign
    state.pt, a safetensors file whose header or size is wrong (a write cut short), or a tensor that
    was written with it and is gone (a file replaced or deleted)."""
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
    written = state.get("tensors")  # absent in checkpoints of forkrl before it recorded them
    if written is not None:
        missing = sorted(set(written) - set(tensor_names(ckpt)))
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            return f"tensors written with it are missing: {', '.join(missing[:3])}{more}"
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
