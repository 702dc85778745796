"""Metrics sinks: one JSON line per step in `metrics.jsonl`, and TensorBoard when it is installed."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN
    return v


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._fh = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:
                self._tb = None

    def log(self, step: int, metrics: dict) -> None:
        self._fh.write(json.dumps({"step": step, **{k: _clean(v) for k, v in metrics.items()}}) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def flush(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def offset(self) -> int:
        """Bytes written so far: a checkpoint records it, and a resume truncates the log back to it."""
        return self._fh.tell()

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


class NullLog:
    """`MetricsLog`'s interface, writing nothing: the sink of ranks other than 0 (rank 0 writes the metrics)."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def offset(self) -> int:
        return 0

    def close(self) -> None:
        pass
