"""forkrl vs TRL's GRPOTrainer at real shapes: Qwen3's vocabulary (V = 151,936), long responses.

At the shipped warm start's 98 tokens the LM head costs nothing; at Qwen3's V it dominates a step:
full logits over B x L response tokens are B x L x V floats (64 x 512 x 151,936 fp32 = 20 GB). This
runs one RL step through both frameworks on `forkrl.models.real_shapes` (Qwen3 architecture, random
weights from a fixed seed, tied embeddings, hidden 512, 8 layers, byte-level BPE tokenizer padded to
V; built locally once and cached), as `bench/vs_trl.py` does on the tiny model:

- the same batch (default 8 prompts x 8 samples, responses up to 512 tokens, T = 1.0, no top-k/top-p)
  and the same objective (top rho = 0.2 entropy tokens per micro-batch, DAPO clip 0.2/0.28, loss over
  all completion tokens, no KL), one optimizer step per RL step;
- forkrl: `preset=trl` through `forkrl.training.trainer.train` (`bench/_forkrl_side.py`) with a token
  budget per micro-batch, `optim.micro_batch_tokens` (default 4,608 = 8 rows of 512 + prompt);
  the selective LM head on (its default);
- TRL: `GRPOTrainer(top_entropy_quantile=0.2, loss_type="dapo")` (`bench/_trl_side.py`); TRL has
  no token budget, so its micro-batch is the largest power-of-two row count whose prompt + response
  tokens fit the same budget (`per_device_train_batch_size`, with `gradient_accumulation_steps =
  steps_per_generation` = batch / micro-batch: one generation, one optimizer step, no old-log-prob pass).

A random-weight model almost never emits EOS, so responses run to the length budget: the lengths are
fixed, as a speed benchmark wants; rewards are 0 (the timings do not depend on them). Each run is its
own process (peak RSS = its `ru_maxrss`; "RSS at start" is the resident set just before the first
step), `OMP_WAIT_POLICY=PASSIVE`, `--threads` torch threads on both sides for training and sampling,
held-out evaluation stubbed out (it would generate full-length responses outside the step).
The stage split is vs_trl.py's: generate, reward, prep_other (padding, advantages, scoring pass if
any), forward (backbone, LM head, entropy, selection, loss), backward, optimizer (clip + AdamW), other.

Then the same forkrl step with responses of 256, 1k, 2k and 4k tokens (`--sweep`) at the same token
budget, to show peak memory against response length, TRL alongside up to `--trl-max-len` (its full
logits grow with the micro-batch's tokens and its step time with the length; longer TRL runs are
skipped and marked so). `--sweep-prompts/--sweep-samples` shrink the sweep's batch (the sampler's KV
cache and the rollout tensors grow with rows x length; the budget bounds only the update).

    python bench/real_shapes.py                 # main comparison + length sweep (long on a CPU)
    python bench/real_shapes.py --quick         # smoke configuration, ~2 minutes on 2 CPUs
    python bench/real_shapes.py --sweep ''      # the main comparison only
    python bench/real_shapes.py --prompts 2 --sweep-prompts 2 --sweep 256,1024   # a smaller batch

Needs the `bench` extra (`pip install -e .[bench]`, which brings `trl`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from _real_shapes_tables import SIDES, _print_main, _print_sweep, _side_summary  # noqa: E402


def _child(side: str, settings_json: str, out_path: str) -> None:
    """One framework's run: vs_trl's child with the micro-batch layout of this benchmark."""
    s = json.loads(settings_json)
    sys.argv = [sys.argv[0], settings_json, out_path]
    if side == "forkrl":
        import _forkrl_side

        import forkrl.training.trainer as trainer_mod

        base = _forkrl_side.overrides
        _forkrl_side.overrides = lambda st: base(st) + st["forkrl_overrides"]
        # Held-out evaluation (step 0 and the last step) would generate full-length responses outside
        # the timed step; it measures nothing here.
        trainer_mod.evaluate_held_out = lambda *a, **k: 0.0
        from vs_trl import child_main

        child_main(_forkrl_side.run)
        return
    import _trl_side
    import trl

    original = trl.GRPOConfig
    mb, accum = s["trl_micro_batch"], s["trl_accum"]

    def config(**kw):
        kw.update(
            per_device_train_batch_size=mb, gradient_accumulation_steps=accum, steps_per_generation=accum
        )
        return original(**kw)

    trl.GRPOConfig = config
    from vs_trl import child_main

    child_main(_trl_side.run)


# ---------------------------------------------------------------- the parent


def _run_child(side: str, settings: dict, workdir: Path, tag: str, timeout: float) -> dict:
    """Run one child; returns its result, or {"failed": why} (timeout, crash, out of memory)."""
    out = workdir / f"{tag}.json"
    env = dict(os.environ)
    threads = str(settings["threads"])
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    s = dict(settings, workdir=str(workdir / tag))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, json.dumps(s), str(out)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"over {timeout:.0f} s (--timeout)"}
    if proc.returncode != 0 or not out.exists():
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        return {
            "failed": f"exit {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode < 0 else "")
        }
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def _trl_layout(rows: int, length: int, prompt_tokens: int, budget: int) -> tuple[int, int]:
    """TRL's (micro-batch rows, accumulation steps): the most rows (a divisor of `rows`, a power of
    two) whose prompt + response tokens fit `budget`, at least 1."""
    mb = 1
    while mb * 2 <= rows and rows % (mb * 2) == 0 and mb * 2 * (prompt_tokens + length) <= budget:
        mb *= 2
    return mb, rows // mb


def _prompt_tokens(model: str, n: int, task: str = "pick") -> int:
    """Left-padded prompt width of the task's prompts under the model's tokenizer (the widest of `n`;
    `arith` prompts inside the chat template, as both sides send them)."""
    from transformers import AutoTokenizer

    from forkrl.tasks.files import apply_chat_template
    from forkrl.tasks.registry import get_task

    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    exs = get_task(task, **({"level": "add1"} if task == "arith" else {})).examples("train", n, seed=0)
    texts = [apply_chat_template(tok, e.prompt) if task == "arith" else e.prompt for e in exs]
    return max(len(tok(t, add_special_tokens=False).input_ids) for t in texts)


def _settings(args, model: str, prompts: int, samples: int, length: int, p_tokens: int) -> dict:
    mb, accum = _trl_layout(prompts * samples, length, p_tokens, args.budget)
    forkrl_overrides = [
        f"optim.micro_batch_tokens={args.budget}",
        "train.eval_n=1",
        f"train.threads={args.threads}",
        f"rollout.threads={args.threads}",
    ]
    if args.checkpointing:
        forkrl_overrides.append("model.gradient_checkpointing=true")
    if args.bf16:
        forkrl_overrides.append("model.update_dtype=bfloat16")
    forkrl_overrides += args.forkrl_override
    return {
        "model": model,
        "steps": args.warmup + args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "trl_sample_threads": 0,  # = threads: at 100M parameters more threads help sampling too
        "seed": args.seed,
        "prompts_per_step": prompts,
        "group_size": samples,
        "max_new_tokens": length,
        "task": args.task,
        "temperature": args.temperature
        if args.temperature is not None
        else (0.7 if args.task == "arith" else 1.0),
        "top_p": 1.0,
        "rho": args.rho,
        "eps_low": 0.2,
        "eps_high": 0.28,
        "lr": 1e-6,
        "beta1": 0.9,
        "beta2": 0.99,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "micro_batch_size": prompts * samples,  # unused by forkrl once micro_batch_tokens is set
        "mask_truncated": False,
        "profile": False,
        "forkrl_overrides": forkrl_overrides,
        "trl_micro_batch": mb,
        "trl_accum": accum,
        "gradient_checkpointing": args.checkpointing,  # TRL's GRPOConfig (bench/_trl_side.py)
        "bf16": args.bf16,  # TRL's GRPOConfig(bf16=...); forkrl: model.update_dtype=bfloat16
    }


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="local HF folder (default: build forkrl.models.real_shapes)"
    )
    ap.add_argument(
        "--cache",
        default=os.path.join(tempfile.gettempdir(), "forkrl-real-shapes"),
        help="where the built model is kept",
    )
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument(
        "--task",
        default="pick",
        choices=("pick", "arith"),
        help="prompts: pick (plain text) or arith (one-digit addition in words inside the chat template, "
        "for a pretrained instruct model: responses end at its EOS)",
    )
    ap.add_argument("--temperature", type=float, default=None, help="sampling T (default 1.0; arith 0.7)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per RL step")
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt")
    ap.add_argument("--length", type=int, default=512, help="max response tokens of the main comparison")
    ap.add_argument("--rho", type=float, default=0.2)
    ap.add_argument(
        "--budget", type=int, default=4608, help="tokens per micro-batch (optim.micro_batch_tokens)"
    )
    ap.add_argument(
        "--sweep", default="256,1024,2048,4096", help="response lengths of the memory sweep ('' = none)"
    )
    ap.add_argument(
        "--sweep-prompts", type=int, default=None, help="prompts per step in the sweep (default --prompts)"
    )
    ap.add_argument(
        "--sweep-samples", type=int, default=None, help="samples per prompt in the sweep (default --samples)"
    )
    ap.add_argument(
        "--sweep-tokens",
        type=int,
        default=0,
        help="response tokens per sweep step: prompts per step = this / (L x samples), at least 1, so every "
        "length trains on about as many tokens (0 = --sweep-prompts at every length)",
    )
    ap.add_argument(
        "--trl-max-len", type=int, default=1024, help="longest sweep length TRL runs at (longer: skipped)"
    )
    ap.add_argument(
        "--checkpointing",
        action="store_true",
        help="gradient checkpointing on both sides (TRL's GRPOConfig default; forkrl "
        "model.gradient_checkpointing=true); default off on both",
    )
    ap.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast in the update on both sides (TRL: GRPOConfig(bf16=True), its default; forkrl: "
        "model.update_dtype=bfloat16); default float32 on both",
    )
    ap.add_argument(
        "--forkrl-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra forkrl config override (repeatable), e.g. train.mmap_threshold_mib=0",
    )
    ap.add_argument("--no-trl", action="store_true", help="forkrl only")
    ap.add_argument("--no-main", action="store_true", help="the length sweep only")
    ap.add_argument("--steps", type=int, default=1, help="timed RL steps per run")
    ap.add_argument("--warmup", type=int, default=0, help="untimed RL steps before them")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before a run is given up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 layers, 2x4 rows, L=64, sweep 32,128 (TRL at 32 only), budget 1024",
    )
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.prompts, args.samples, args.length = 2, 2, 4, 64
        args.sweep, args.budget, args.trl_max_len = "32,128", 1024, 32
    from rich.console import Console

    con = Console(width=180)
    if args.model:
        model, note = str(Path(args.model).resolve()), f"--model {args.model}"
    else:
        from forkrl.models.real_shapes import build_real_shapes

        folder = Path(args.cache) / f"L{args.layers}-H{args.hidden}-s{args.seed}"
        t0 = time.perf_counter()
        model = str(build_real_shapes(folder, seed=args.seed, layers=args.layers, hidden=args.hidden))
        note = f"forkrl.models.real_shapes (layers {args.layers}, hidden {args.hidden}) in {folder} ({time.perf_counter() - t0:.0f} s)"
    info_path = Path(model) / "real_shapes.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    p_tokens = _prompt_tokens(model, args.prompts * 4, args.task)
    sides = ("forkrl",) if args.no_trl else SIDES
    workdir = Path(tempfile.mkdtemp(prefix="forkrl-real-shapes-"))
    results: dict = {"model": model, "model_info": info, "args": vars(args)}
    try:
        st = _settings(args, model, args.prompts, args.samples, args.length, p_tokens)
        results["main_settings"] = st
        main_res = {}
        for side in () if args.no_main else sides:
            print(f"main L={args.length}: {side} ...", flush=True)
            res = _run_child(side, st, workdir, f"main-{side}", args.timeout)
            main_res[side] = res if "failed" in res else _side_summary(res, args.warmup)
            print(f"  {res.get('wall_s', float('nan')):.0f} s wall {res.get('failed', '')}", flush=True)
        results["main"] = main_res
        sweep = []
        sp, ss = args.sweep_prompts or args.prompts, args.sweep_samples or args.samples
        for length in [int(x) for x in args.sweep.split(",") if x.strip()]:
            if args.sweep_tokens:
                sp = max(1, args.sweep_tokens // (length * ss))
            sst = _settings(args, model, sp, ss, length, p_tokens)
            row = {"length": length, "rows": sp * ss, "trl_micro_batch": sst["trl_micro_batch"]}
            for side in sides:
                if side == "trl" and length > args.trl_max_len:
                    row["trl"] = {"skipped": "skipped"}
                    continue
                print(f"sweep L={length}: {side} ...", flush=True)
                res = _run_child(side, sst, workdir, f"sweep-{length}-{side}", args.timeout)
                row[side] = res if "failed" in res else _side_summary(res, args.warmup)
                print(f"  {res.get('wall_s', float('nan')):.0f} s wall {res.get('failed', '')}", flush=True)
            sweep.append(row)
        results["sweep"] = sweep
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:  # before the tables: a printing error must not lose an hour of measurements
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    con.print(
        f"model: {note}; {info.get('params', '?')} parameters, V = {info.get('vocab_size', '?')} "
        f"({info.get('trained_tokens', '?')} trained BPE tokens + {info.get('padded_tokens', '?')} unused entries)\n"
        f"main: {args.prompts} prompts x {args.samples} samples, responses up to {args.length} tokens "
        f"(prompt {p_tokens} tokens), rho {args.rho}, micro_batch_tokens {args.budget}, {args.threads} threads, "
        f"{args.steps} timed step(s) after {args.warmup} warm-up step(s) per run"
    )
    if results["main"]:
        _print_main(con, results["main"], st)
    if results["sweep"]:
        con.print(
            (
                f"sweep: about {args.sweep_tokens} response tokens per step ({ss} samples per prompt; rows per length "
                "in the table)"
                if args.sweep_tokens
                else f"sweep: {sp} prompts x {ss} samples per step"
            )
            + f"; TRL runs up to L={args.trl_max_len} "
            "(longer: skipped, --trl-max-len)"
        )
        _print_sweep(con, results["sweep"], args.budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
