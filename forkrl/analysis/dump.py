"""Reading rollout dumps (written by `forkrl.training.dump`: the format is described there).

`read_dump` reads a file, or every dump in a folder in name order (the trainer writes
`rollouts/step_000010.jsonl`, ...); `Dump` holds its rows and run-level metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from forkrl.training.dump import META_KEY, SUFFIXES


@dataclass
class Dump:
    """Rows of a dump (dicts with the fields listed in the module docstring) and run-level metadata."""

    rows: list[dict]
    meta: dict = field(default_factory=dict)

    def flat(self, key: str) -> np.ndarray:
        """One per-token field over every row, concatenated: (N,)."""
        parts = [np.asarray(r[key]) for r in self.rows]
        if not parts:
            return np.zeros(0)
        return np.concatenate(parts)

    def flat_tokens(self) -> list[str]:
        return [t for r in self.rows for t in r["tokens"]]

    @property
    def has_alternatives(self) -> bool:
        return bool(self.rows) and self.rows[0].get("top_tokens") is not None


def _read_one(path: Path) -> Dump:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise RuntimeError(f"reading {path} needs pyarrow (pip install 'forkrl[parquet]')") from None
        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(META_KEY.encode())
        return Dump(rows=table.to_pylist(), meta=json.loads(raw) if raw else {})
    rows, meta = [], {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
            if META_KEY in obj:
                meta = obj[META_KEY]
            else:
                rows.append(obj)
    return Dump(rows=rows, meta=meta)


def read_dump(path: str | Path) -> Dump:
    """A dump file, or every `*.parquet` / `*.jsonl` dump in a folder (name order, metadata of the first)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no .parquet or .jsonl dumps in folder {str(path)!r}")
        parts = [_read_one(p) for p in files]
        return Dump(rows=[r for d in parts for r in d.rows], meta=parts[0].meta)
    if not path.is_file():
        raise FileNotFoundError(f"dump {str(path)!r} does not exist")
    if path.suffix not in SUFFIXES:
        raise ValueError(f"dump {str(path)!r} must be a .parquet or .jsonl file (or a folder of them)")
    return _read_one(path)


def as_tensors(dump: Dump, key: str) -> tuple[Tensor, Tensor]:
    """A per-token field as a right-padded (B, L) float32 tensor and its validity mask (B, L)."""
    rows = [r[key] for r in dump.rows]
    L = max((len(r) for r in rows), default=0)
    values = torch.zeros(len(rows), L)
    valid = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.tensor([float(v) for v in r])
        valid[i, : len(r)] = True
    return values, valid
