#!/usr/bin/env bash
# The SmolLM2 recipe end to end, with the figure that says whether it worked: held-out sampled accuracy
# (avg@4 at the recipe's T = 0.7, 200 held-out arith problems) of the base model, RL with
# `forkrl train --config smollm2`, then the same evaluation of the trained model.
#   bash scripts/setup.sh --smollm2 && bash scripts/smollm2_recipe.sh [OUT_DIR] [extra train overrides...]
set -euo pipefail
OUT=${1:-runs/smollm2}
shift || true
EVAL=(--task arith --level add1 --chat-template --k 4 --temperature 0.7 --n 200 --no-progress)
start=$SECONDS
mkdir -p "$OUT-eval"
if [ ! -f "$OUT-eval/base/summary.json" ]; then
  forkrl eval --model smollm2-135m-instruct "${EVAL[@]}" --out "$OUT-eval/base" >/dev/null
fi
t0=$SECONDS
if [ -f "$OUT/summary.json" ] && [ $# -eq 0 ]; then
  echo "forkrl: $OUT holds a finished run: evaluating it (remove the folder to train again)" >&2
elif [ -f "$OUT/config.yaml" ]; then
  forkrl train --resume "$OUT" "$@"       # a run cut short continues (bit-exact resume)
else
  forkrl train --config smollm2 train.out_dir="$OUT" "$@"
fi
train_s=$((SECONDS - t0))
forkrl eval --model "$OUT" "${EVAL[@]}" --out "$OUT-eval/final" >/dev/null
python - "$OUT-eval" "$train_s" "$((SECONDS - start))" <<'PY'
import json, sys
out, train_s, total_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
a, b = (json.load(open(f"{out}/{k}/summary.json"))["overall"] for k in ("base", "final"))
print(f"held-out sampled accuracy (avg@4, T=0.7, {a['problems']} problems): {a['avg@4']:.3f} -> {b['avg@4']:.3f} "
      f"({100 * (b['avg@4'] - a['avg@4']):+.1f} points); pass@4 {a['pass@4']:.3f} -> {b['pass@4']:.3f}")
print(f"training {train_s / 60:.1f} min, everything {total_s / 60:.1f} min")
PY
