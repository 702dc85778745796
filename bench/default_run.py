"""The main job's claim: default `forkrl train` on CPU raises held-out accuracy within a time budget.

Runs `forkrl train` (the defaults: paper preset, built-in task, shipped warm start) in a fresh
process per seed, and prints wall time and greedy held-out accuracy at the start (the warm start,
measured in the same run: the baseline) and at the end.

    python bench/default_run.py                 # seed 0
    python bench/default_run.py --seeds 0 1 2   # reproducibility across seeds
    python bench/default_run.py -- selection.rho=1.0   # extra overrides after --
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--budget-min", type=float, default=10.0, help="wall-time budget to check against")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides")
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        out = Path(tempfile.mkdtemp(prefix=f"forkrl-default-{seed}-"))
        cmd = [
            sys.executable,
            "-m",
            "forkrl",
            "train",
            f"train.seed={seed}",
            f"train.out_dir={out}",
            "train.progress=false",
            *args.overrides,
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        s = json.loads((out / "summary.json").read_text())
        rows.append((seed, wall, s["eval_accuracy_start"], s["eval_accuracy_end"]))
    print(
        f"\n{'seed':>4} {'wall s':>8} {'acc start':>10} {'acc end':>8} {'gain (pts)':>10}  within {args.budget_min:g} min"
    )
    for seed, wall, a0, a1 in rows:
        print(
            f"{seed:>4} {wall:>8.0f} {a0:>10.3f} {a1:>8.3f} {100 * (a1 - a0):>10.1f}  {wall <= 60 * args.budget_min}"
        )
    print("accuracy: greedy decoding, held-out split of the built-in task (500 problems, fixed)")


if __name__ == "__main__":
    main()
