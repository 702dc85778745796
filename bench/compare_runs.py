"""Are two runs the same run? Every metrics.jsonl field but timings and memory, row by row, and every
tensor of final/model.safetensors (issue 27: `forkrl train` gives the same metrics for the same seed
before and after a refactoring).

    forkrl train train.threads=1 train.progress=false train.out_dir=/tmp/before   # at the old commit
    forkrl train train.threads=1 train.progress=false train.out_dir=/tmp/after    # at the new one
    python bench/compare_runs.py /tmp/before /tmp/after

Exit status 0 when identical, 1 otherwise; the differing rows are printed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file

MACHINE = ("time", "tokens_per_s", "wall_time_s", "rss", "mem")  # what the machine's speed and load change


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(MACHINE) and "rss" not in k} for r in rows]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = map(Path, argv)
    ra, rb = _rows(a), _rows(b)
    differing = [
        (x.get("step"), sorted(k for k in x.keys() | y.keys() if x.get(k) != y.get(k)))
        for x, y in zip(ra, rb)
        if x != y
    ]
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    same_weights = wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)
    fields = max((len(r) for r in ra), default=0)
    print(f"{'rows':>6} {'fields':>7} {'rows differing':>15} {'final weights':>14}")
    print(
        f"{len(ra):>3}/{len(rb):<3}{fields:>6} {len(differing) + abs(len(ra) - len(rb)):>15} {'identical' if same_weights else 'differ':>14}"
    )
    for step, keys in differing:
        print(f"  step {step}: {', '.join(keys)}")
    return 0 if not differing and len(ra) == len(rb) and same_weights else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
