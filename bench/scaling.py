"""One process vs two data-parallel ranks (torchrun, gloo) on the tiny model: time per step and selection.

    python bench/scaling.py               # 8 steps per run (2 warm-up), prints a table
    python bench/scaling.py --steps 12

Runs the default `paper` preset (batch-scope selection: across ranks it is the distributed exact radix
select of forkrl/core/selection.py) from the shipped warm start, one torch thread per process:

- `1 process`: `python -m forkrl train ...`
- `2 ranks`: `python -m torch.distributed.run --nproc_per_node 2 -m forkrl train ... train.parallel=ddp`
  (each rank samples, scores and trains half of the groups; gradients are averaged)

and reports medians over the steps after the warm-up of `time_step` and `time_selection` (the
token selection, with its all-reduces when there are two ranks) from each run's metrics.jsonl. On
this 2-core machine two ranks have twice the cores of one single-threaded process, so the speed-up
is bounded by 2; what matters for scaling is that the selection's collectives stay a small fraction
of a step. The end of the output is the paper-scale calculation of docs/scale.md's "Data parallel" section.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _overrides(out: Path, steps: int) -> list[str]:
    return [
        f"train.out_dir={out}",
        f"train.steps={steps}",
        "train.eval_every=0",
        "train.eval_n=8",
        "train.progress=false",
        "train.tensorboard=false",
        "train.threads=1",
        "reward.isolate=false",
    ]


def _run(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def _medians(run_dir: Path, warmup: int) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("step", 0) > warmup]
    step = statistics.median(r["time_step"] for r in rows)
    sel = statistics.median(r["time_selection"] for r in rows)
    return {
        "time_step": step,
        "time_selection": sel,
        "selection_share": sel / step,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        "kept_groups": statistics.median(r["kept_groups"] for r in rows),
    }


def paper_scale() -> str:
    """Selection traffic at the paper's scale: radix select vs gathering every entropy."""
    tokens = 512 * 16 * 20_000  # prompts x responses x max tokens (upper bound: every response full)
    ranks = 128
    gather_bytes = tokens * 4  # fp32 entropies, all of them on every rank
    bins = 1 << 16  # bits_per_pass=16 for large inputs: 2 passes
    radix_bytes = 2 * bins * 8 + 8  # two int64 histograms + the valid count, all-reduced
    return "\n".join(
        [
            f"paper scale: {tokens / 1e6:.0f}M response tokens on {ranks} GPUs ({tokens / ranks / 1e6:.2f}M per rank)",
            f"  gather all entropies: every rank receives {gather_bytes / 2**20:,.0f} MiB "
            f"(and holds it: {gather_bytes / 2**30:.2f} GiB of memory)",
            f"  radix select:         2 all-reduces of {bins:,} int64 counts = {radix_bytes / 2**20:.2f} MiB per rank, "
            f"{gather_bytes / radix_bytes:,.0f}x less, O(1) in the token count",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="extra section.field=value for both runs")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        single, ranks = Path(tmp) / "single", Path(tmp) / "ranks"
        walls = {}
        walls["1 process"] = _run(
            [sys.executable, "-m", "forkrl", "train", *_overrides(single, args.steps), *args.overrides]
        )
        walls["2 ranks"] = _run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
            + ["-m", "forkrl", "train", *_overrides(ranks, args.steps), "train.parallel=ddp", *args.overrides]
        )
        results["1 process"] = _medians(single, args.warmup)
        results["2 ranks"] = _medians(ranks, args.warmup)
    print(
        f"tiny model, paper preset, 16 prompts x 8 samples; medians over steps {args.warmup + 1}..{args.steps}"
    )
    print(f"{'':>10} {'s/step':>8} {'selection s':>12} {'share':>7} {'tokens/s':>9} {'run wall s':>11}")
    for name, r in results.items():
        print(
            f"{name:>10} {r['time_step']:>8.3f} {r['time_selection']:>12.4f} {r['selection_share']:>6.1%}"
            f" {r['tokens_per_s']:>9.0f} {walls[name]:>11.1f}"
        )
    speed = results["1 process"]["time_step"] / results["2 ranks"]["time_step"]
    print(f"speed-up 2 ranks vs 1 process: {speed:.2f}x")
    print(paper_scale())


if __name__ == "__main__":
    main()
