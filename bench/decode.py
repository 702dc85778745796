"""Decoding speed of forkrl's HF backend: the lean decode step vs the model's own forward, 1 vs N threads.

For Qwen3 models of growing size (random weights, no EOS, so every row decodes all tokens; the
shipped warm start as well), `forkrl.rollout.hf.generate` samples the benchmark's batch
(16 prompts of the `pick` task x 8 samples, 31 new tokens) with

- `lean=False`: every decode step through the model's forward (transformers' module stack, as
  `model.generate` does);
- `lean=True`: decode steps through `forkrl.rollout.lean.LeanDecoder` (the same function, checked
  to the logits by tests/rollout/test_lean.py), the default.

at 1 and at --threads torch threads, alternating the four settings within each repeat (the machine's
noise hits all of them). It prints the best and median seconds per `generate`, the lean/plain ratio,
the thread ratio, and the thread count `rollout.threads=0` (auto) picks for that model: the table
is the measurement behind that rule.

    python bench/decode.py                 # 4 sizes, 5 repeats (~2 min on 2 CPUs)
    python bench/decode.py --repeats 9 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench/vs_trl.py: no spinning barriers

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from forkrl.models.tiny import build_char_tokenizer, build_tiny_model  # noqa: E402
from forkrl.rollout.hf import decode_threads, generate  # noqa: E402
from forkrl.tasks.pick import PickTask  # noqa: E402

SIZES = ((128, 4), (256, 6), (384, 8), (512, 8))  # (hidden, layers); heads 4 (kv 2), MLP 3x hidden


def _models(tok):
    from transformers import AutoModelForCausalLM

    from forkrl.models.loading import DEFAULT_MODEL

    yield "shipped warm start", AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)
    for hidden, layers in SIZES:
        m = build_tiny_model(
            len(tok), hidden_size=hidden, num_layers=layers, intermediate_size=3 * hidden, seed=0
        )
        m.generation_config.eos_token_id = m.config.eos_token_id = None  # decode every token
        yield f"random h{hidden} x{layers}", m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="the multi-threaded setting")
    args = ap.parse_args()
    tok = build_char_tokenizer()
    task = PickTask()
    prompts = [e.prompt for e in task.examples("train", 16, seed=3)]
    con = Console()
    table = Table(
        title=f"seconds per generate (128 rows, {task.default_max_new_tokens} new tokens): best / median"
    )
    for col in (
        "model",
        "params",
        "plain, 1 thr",
        f"plain, {args.threads} thr",
        "lean, 1 thr",
        f"lean, {args.threads} thr",
        "lean / plain",
        f"{args.threads} thr / 1 thr (lean)",
        "auto picks",
    ):
        table.add_column(col, justify="right")
    for name, model in _models(tok):
        model.eval()
        settings = [(lean, t) for lean in (False, True) for t in (1, args.threads)]
        times: dict = {s: [] for s in settings}
        with torch.no_grad():
            for r in range(args.repeats + 1):
                for lean, t in settings:
                    torch.set_num_threads(t)
                    t0 = time.perf_counter()
                    generate(
                        model,
                        tok,
                        prompts,
                        n=8,
                        max_new_tokens=task.default_max_new_tokens,
                        prompt_seeds=list(range(r, r + 16)),
                        lean=lean,
                    )
                    if r:  # the first repeat warms up
                        times[(lean, t)].append(time.perf_counter() - t0)
        best = {s: min(v) for s, v in times.items()}
        med = {s: statistics.median(v) for s, v in times.items()}
        cells = [f"{best[s]:.3f} / {med[s]:.3f}" for s in settings]
        lean_ratio = min(med[(True, t)] for t in (1, args.threads)) / min(
            med[(False, t)] for t in (1, args.threads)
        )
        thr_ratio = med[(True, args.threads)] / med[(True, 1)]
        params = sum(p.numel() for p in model.parameters())
        table.add_row(
            name,
            f"{params / 1e6:.1f}M",
            *cells,
            f"{lean_ratio:.2f}",
            f"{thr_ratio:.2f}",
            str(decode_threads(model, 0, args.threads)),
        )
        con.print(f"{name}: done", style="dim")
    con.print(table)
    con.print(
        "lean / plain: best median of each path; < 1 means the lean step is faster. "
        f"{args.threads} thr / 1 thr > 1 means more threads are slower for that model."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
