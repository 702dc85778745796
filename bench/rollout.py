"""Rollout speed of the HF backend vs the vLLM backend on this machine, and one RL step's time split.

Run it in the venv that has vLLM (its CPU build: `bash scripts/setup.sh --vllm`):

    OMP_WAIT_POLICY=PASSIVE /work/venv-vllm/bin/python bench/rollout.py            # ~5 min on 2 CPUs
    OMP_WAIT_POLICY=PASSIVE /work/venv-vllm/bin/python bench/rollout.py --reps 5 --train-steps 4
    ... bench/rollout.py --skip-train          # part 1 only

Part 1, rollout tokens/s. The same prompts (the built-in `pick` task's train split, seed 0), the same
group size, temperature 1.0, top_p 1.0 and max_new_tokens budget, through

- `hf`: `forkrl.rollout.hf.generate` on the float32 HF model (lean decode step, the trainer's default);
- `vllm`: `forkrl.rollout.vllm.VLLMRollout`, float32, `max_model_len` 256, a 0.5 GiB KV cache, one
  engine per model and mode, built twice: eager (`enforce_eager=True`, as tests/test_rollout_vllm.py
  builds it on the CPU) and compiled (vLLM's default torch.compile, as the trainer builds it),

for the shipped warm start and for a ~30M-parameter Qwen3 built here (random init, seed 0, the shipped
tokenizer; saved to a temporary folder so that vLLM loads it from a local path). Extra rows: the
shipped model at a tiny batch (1 prompt x 1 sample), which shows the per-call cost, and the large
model at `--big-threads` threads. Tokens are generated response tokens (`ro.response_mask.sum()`, EOS
included) per second of wall time. Each backend's first call is a warm-up and is not counted; the
timed calls alternate hf, vllm, hf, vllm, ... so that load on a shared machine hits both, and each
row's HF figure is measured alongside that row's engine. Both run at the same torch thread count
(`--threads`; default: the trainer's own choice for the hf backend, `rollout.threads=0` with
`train.threads=1`, i.e. 1 here).

Columns: "ms/step" is the call's wall time over its decode steps (the longest response); "cpu/wall" is
process CPU seconds per wall second during the call, hf/vllm (how many cores each kept busy); "1st s"
is the warm-up call; "vllm start s" is building the engine: "eager" (`enforce_eager=True`, as the tests
build it) or "compiled" (vLLM's default, torch.compile; the trainer builds its engine this way, through
`VLLMRollout.from_config`, which passes no `enforce_eager`).

Part 2, one RL step with each backend: the real trainer (`forkrl.training.trainer.train`) on the shipped
model, `rollout.backend=hf` and `=vllm`, each in a process of its own, `--train-steps` steps, and the
median per-step seconds of each timed part from the run's metrics.jsonl (steps after the first; the
first vLLM step pays the engine's warm-up). "run wall s" is the whole process, engine start-up and
evaluations included. "per round" is the rollout time over the step's dynamic-sampling rounds
(`ds_rounds`: the trainer samples again when too few groups carry signal). A combination the trainer
refuses is printed with its reason.
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning OpenMP barriers on a shared machine
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the engine's INFO lines would bury the tables

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("time_rollout", "time_reward", "time_scoring", "time_update", "time_selection", "time_step")


def build_qwen3(path: Path, tokenizer, *, hidden: int, layers: int, seed: int = 0) -> int:
    """A random Qwen3 (hidden, layers; MLP 3x hidden, 64-wide heads, half as many KV heads), saved to `path`."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    heads = hidden // 64
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=64,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).float()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


class Backends:
    """The HF model of one checkpoint folder and, while open, a vLLM engine for it; `call` runs either."""

    def __init__(self, path: Path, max_new_tokens: int):
        from forkrl.models.loading import load_model_and_tokenizer
        from forkrl.rollout.hf import decode_threads

        self.path = path
        self.model, self.tok = load_model_and_tokenizer(path, dtype="float32", device="cpu")
        self.params = sum(p.numel() for p in self.model.parameters())
        self.trainer_threads = decode_threads(self.model, 0, 1)  # rollout.threads=0 with train.threads=1
        self.max_new_tokens = max_new_tokens
        self.engine = None

    def open_engine(self, compiled: bool) -> float:
        """Build the vLLM engine (eager, or vLLM's default torch.compile as the trainer builds it); seconds."""
        from forkrl.rollout.vllm import VLLMRollout

        t0 = time.perf_counter()
        self.engine = VLLMRollout(
            self.path,
            self.tok,
            dtype="float32",
            cpu_kv_cache_gib=0.5,
            seed=0,
            max_model_len=256,
            **({} if compiled else {"enforce_eager": True}),
        )
        return time.perf_counter() - t0

    def close_engine(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def call(self, backend: str, prompts: list[str], n: int, seed: int) -> tuple[int, float, int, float]:
        """(generated tokens, wall seconds, decode steps, process CPU seconds) of one rollout."""
        import torch

        from forkrl.rollout.hf import generate

        kw = dict(n=n, temperature=1.0, top_p=1.0, max_new_tokens=self.max_new_tokens)
        with torch.no_grad():
            t0, c0 = time.perf_counter(), time.process_time()
            if backend == "hf":
                ro = generate(self.model, self.tok, prompts, generator_seed=seed, **kw)
            else:
                ro = self.engine(prompts, seed=seed, **kw)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return int(ro.response_mask.sum()), dt, int(ro.lengths.max()), cpu


def measure(backends: Backends, prompts: list[str], n: int, reps: int, threads: int) -> dict:
    """Warm-up call per backend, then `reps` alternating timed calls; medians and the first call's time."""
    import torch

    from forkrl.rollout.hf import torch_threads

    out = {b: {"tps": [], "sec": [], "tok": [], "step_ms": [], "cores": []} for b in ("hf", "vllm")}
    with torch_threads(threads):
        assert torch.get_num_threads() == threads
        for b in ("hf", "vllm"):
            out[b]["first_s"] = backends.call(b, prompts, n, seed=10_000)[1]
        for r in range(reps):
            for b in ("hf", "vllm"):
                tok, dt, steps, cpu = backends.call(b, prompts, n, seed=r)
                out[b]["tps"].append(tok / dt)
                out[b]["sec"].append(dt)
                out[b]["tok"].append(tok)
                out[b]["step_ms"].append(dt / max(steps, 1) * 1e3)  # per decode step (the longest row's)
                out[b]["cores"].append(cpu / dt)  # CPU seconds per wall second: the cores it kept busy
    return {
        b: {
            "tokens_per_s": statistics.median(d["tps"]),
            "s_per_call": statistics.median(d["sec"]),
            "tokens": statistics.median(d["tok"]),
            "step_ms": statistics.median(d["step_ms"]),
            "cores": statistics.median(d["cores"]),
            "first_s": d["first_s"],
        }
        for b, d in out.items()
    }


def part1(args) -> list[dict]:
    from transformers import AutoTokenizer

    from forkrl.models.loading import DEFAULT_MODEL
    from forkrl.tasks.pick import get_task

    task = get_task("pick")
    max_new = args.max_new_tokens or task.default_max_new_tokens
    prompts = [e.prompt for e in task.examples("train", args.prompts, seed=0)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "qwen3-big"
        n_params = build_qwen3(
            big, AutoTokenizer.from_pretrained(DEFAULT_MODEL), hidden=args.hidden, layers=args.layers
        )
        print(f"random Qwen3 h{args.hidden} x{args.layers}: {n_params:,} parameters", flush=True)
        big_name = f"random Qwen3 h{args.hidden} x{args.layers}"
        for name, path in (("shipped warm start", DEFAULT_MODEL), (big_name, big)):
            backends = Backends(path, max_new)
            threads = args.threads or backends.trainer_threads
            # (prompts, n, threads) per engine mode: the trainer's batch; for the tiny model also 1 x 1,
            # for the large one also --big-threads (vLLM's kernels may scale differently).
            batches = [(prompts, args.n, threads)]
            if path == DEFAULT_MODEL:
                batches.append((prompts[:1], 1, threads))
            elif args.big_threads and args.big_threads != threads:
                batches.append((prompts, args.n, args.big_threads))
            for mode in ("eager", "compiled"):
                startup = backends.open_engine(compiled=mode == "compiled")
                print(f"{name}: vLLM engine ({mode}) start-up {startup:.1f} s", flush=True)
                try:
                    for ps, n, thr in batches:
                        res = measure(backends, ps, n, args.reps, thr)
                        rows.append(
                            dict(
                                model=name,
                                params=backends.params,
                                batch=f"{len(ps)}x{n}",
                                threads=thr,
                                mode=mode,
                                startup_s=startup,
                                **{f"{b}_{k}": v for b, d in res.items() for k, v in d.items()},
                            )
                        )
                        tps = {b: round(d["tokens_per_s"]) for b, d in res.items()}
                        print(f"  {len(ps)}x{n}, {thr} thread(s): tokens/s {json.dumps(tps)}", flush=True)
                finally:
                    backends.close_engine()
    return rows


def print_part1(rows: list[dict], args, max_new: int) -> list[str]:
    widths = (22, 10, 5, 3, 8, 6, 8, 10, 7, 10, 10, 9, 8, 10, 12)
    heads = ("model", "params", "batch", "thr", "vllm", "tokens", "hf tok/s", "vllm tok/s", "vllm/hf")
    heads += ("hf ms/step", "vl ms/step", "cpu/wall", "hf 1st s", "vllm 1st s", "vllm start s")
    lines = [
        f"rollout tokens/s: pick prompts, T=1.0, top_p=1.0, max_new_tokens={max_new}; medians of "
        f"{args.reps} timed calls per backend after 1 warm-up call each (1st s), hf and vllm alternating",
        "| "
        + " | ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(heads, widths)))
        + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']:<22} | {r['params']:>10,} | {r['batch']:>5} | {r['threads']:>3} | {r['mode']:>8} "
            f"| {r['hf_tokens']:>6.0f} | {r['hf_tokens_per_s']:>8.0f} | {r['vllm_tokens_per_s']:>10.0f} "
            f"| {r['vllm_tokens_per_s'] / r['hf_tokens_per_s']:>6.2f}x | {r['hf_step_ms']:>10.2f} "
            f"| {r['vllm_step_ms']:>10.2f} | {r['hf_cores']:>4.1f}/{r['vllm_cores']:<4.1f} "
            f"| {r['hf_first_s']:>8.2f} | {r['vllm_first_s']:>10.2f} "
            f"| {r['startup_s']:>12.1f} |"
        )
    return lines


# ---------------------------------------------------------------- part 2: the trainer, one process per backend


def train_child(backend: str, out_dir: str, steps: int) -> None:
    """In a child process: train the shipped model `steps` steps with `backend`; exit 3 with the reason if refused."""
    from forkrl.config import load_config
    from forkrl.errors import ConfigError
    from forkrl.training.trainer import train

    overrides = [
        f"rollout.backend={backend}",
        f"train.steps={steps}",
        "train.progress=false",
        "train.tensorboard=false",
        "train.eval_every=0",
        "train.eval_n=8",
        "model.device=cpu",
        "model.dtype=float32",
        f"train.out_dir={out_dir}",
    ]
    try:
        train(load_config(None, overrides))
    except ConfigError as e:
        print(f"REFUSED: {e}", file=sys.stderr)
        sys.exit(3)


def part2(args) -> dict:
    from forkrl.training.metrics import read_metrics

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("hf", "vllm"):
            run_dir = Path(tmp) / backend
            cmd = [sys.executable, __file__, "--train-child", backend, str(run_dir), str(args.train_steps)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - t0
            if proc.returncode:
                tail = [x for x in proc.stderr.strip().splitlines() if x.strip()]
                reason = next((x for x in tail if x.startswith("REFUSED:")), tail[-1] if tail else "?")
                print(f"trainer with rollout.backend={backend} failed (exit {proc.returncode}): {reason}")
                results[backend] = {"error": reason}
                continue
            rows = [r for r in read_metrics(run_dir) if r.get("step", 0) > 0 and "time_step" in r]
            timed = [r for r in rows if r["step"] > 1] or rows
            res = {
                "wall": wall,
                "steps": len(timed),
                "first_step": rows[0]["time_step"] if rows else float("nan"),
            }
            for k in PARTS + ("ds_rounds", "kept_groups"):
                vals = [r[k] for r in timed if k in r]
                res[k] = statistics.median(vals) if vals else None
            # Dynamic sampling may sample again in a step (ds_rounds): the rollout time of one round.
            per_round = [r["time_rollout"] / r["ds_rounds"] for r in timed if r.get("ds_rounds")]
            res["rollout_round"] = statistics.median(per_round) if per_round else None
            res["other"] = res["time_step"] - sum(
                res[k] or 0.0 for k in ("time_rollout", "time_reward", "time_scoring", "time_update")
            )
            results[backend] = res
    return results


def print_part2(results: dict, steps: int) -> list[str]:
    cols = (
        "time_rollout",
        "rollout_round",
        "time_reward",
        "time_scoring",
        "time_update",
        "time_selection",
        "other",
        "time_step",
    )
    names = [c.removeprefix("time_").replace("rollout_round", "per round") for c in cols]
    lines = [
        f"one RL step of the trainer (shipped model, default paper preset, 16 prompts x 8, float32, CPU): "
        f"median seconds over steps 2..{steps} (step 1 apart); other = step - rollout - reward - scoring - "
        "update; selection is timed where it runs (update or other), not added",
        "| backend | " + " | ".join(f"{n:>9}" for n in names) + " | ds_rounds | step 1 s | run wall s |",
        "|---------|" + "|".join("-" * 11 for _ in names) + "|-----------|----------|------------|",
    ]
    for b, r in results.items():
        if "error" in r:
            lines.append(f"| {b:<7} | refused or failed: {r['error']} |")
            continue
        cells = " | ".join(f"{r[c]:>9.3f}" if r.get(c) is not None else f"{'-':>9}" for c in cols)
        ds = f"{r['ds_rounds']:>9.1f}" if r.get("ds_rounds") is not None else f"{'-':>9}"
        lines.append(f"| {b:<7} | {cells} | {ds} | {r['first_step']:>8.2f} | {r['wall']:>10.1f} |")
    return lines


def conclusion(rows: list[dict], train: dict) -> str:
    """Which backend is faster here, with the measured reasons."""
    if not rows:
        return "nothing measured"
    ratios = [r["vllm_tokens_per_s"] / r["hf_tokens_per_s"] for r in rows]
    lo, hi = min(ratios), max(ratios)
    faster = "HF" if hi < 1 else "vLLM" if lo > 1 else "neither backend throughout"
    text = (
        f"{faster} is faster here: vLLM/HF rollout tokens/s {lo:.2f}x to {hi:.2f}x over {len(rows)} settings."
    )
    tiny = {(r["batch"], r["mode"]): r for r in rows if r["model"] == rows[0]["model"]}
    for mode in ("eager", "compiled"):
        one, full = (
            tiny.get(("1x1", mode)),
            next((r for (b, m), r in tiny.items() if m == mode and b != "1x1"), None),
        )
        if one and full:
            text += (
                f" Shipped model, {mode}: ms per decode step at 1 row / at {full['batch']} rows: "
                f"vLLM {one['vllm_step_ms']:.1f} / {full['vllm_step_ms']:.1f}, "
                f"HF {one['hf_step_ms']:.1f} / {full['hf_step_ms']:.1f}."
            )
    text += " (A tiny model's step is engine overhead, per call and per request, not arithmetic.)"
    big = [r for r in rows if r["model"] != rows[0]["model"]]
    if big:
        br = [r["vllm_tokens_per_s"] / r["hf_tokens_per_s"] for r in big]
        text += f" {big[0]['model']} ({big[0]['params'] / 1e6:.0f}M, arithmetic-bound): vLLM {min(br):.2f}x to {max(br):.2f}x"
        multi = [r for r in big if r["threads"] > 1]
        if multi:
            m = multi[0]
            text += f"; at {m['threads']} threads vLLM keeps {m['vllm_cores']:.1f} cores busy, HF {m['hf_cores']:.1f}"
        text += "."
    starts = {r["mode"]: r["startup_s"] for r in rows if r["model"] == rows[0]["model"]}
    eager = next((r for r in rows if r["mode"] == "eager"), None)
    text += " vLLM engine start-up, once per run: " + ", ".join(f"{m} {s:.1f} s" for m, s in starts.items())
    if eager:
        text += f"; the eager engine's first call {eager['vllm_first_s']:.2f} s vs HF's {eager['hf_first_s']:.2f} s"
    text += "."
    if {"hf", "vllm"} <= train.keys() and not any("error" in v for v in train.values()):
        h, v = train["hf"], train["vllm"]
        text += (
            f" Trainer step: hf {h['time_step']:.2f} s vs vllm {v['time_step']:.2f} s (rollout per round "
            f"{h['rollout_round']:.2f} vs {v['rollout_round']:.2f} s; scoring {h['time_scoring']:.2f} vs "
            f"{v['time_scoring']:.2f} s: vLLM gives no entropies, so the trainer scores its rollouts again)."
        )
    return text


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--train-child":
        train_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="timed calls per backend and batch, after 1 warm-up")
    ap.add_argument(
        "--prompts", type=int, default=16, help="prompts per rollout (the trainer's prompts_per_step)"
    )
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (group size)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="budget; 0 = the pick task's default (31)")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads for both backends; 0 = the trainer's choice (1)"
    )
    ap.add_argument(
        "--big-threads", type=int, default=2, help="also time the random Qwen3 at this many threads (0 = no)"
    )
    ap.add_argument("--hidden", type=int, default=512, help="hidden size of the random Qwen3")
    ap.add_argument("--layers", type=int, default=10, help="decoder layers of the random Qwen3")
    ap.add_argument("--train-steps", type=int, default=4, help="trainer steps per backend (part 2)")
    ap.add_argument("--skip-train", action="store_true", help="part 1 only")
    args = ap.parse_args()
    try:
        import vllm  # noqa: F401
    except ImportError:
        sys.exit("bench/rollout.py needs vLLM: run it in the venv of `bash scripts/setup.sh --vllm`")
    from forkrl.tasks.pick import get_task

    max_new = args.max_new_tokens or get_task("pick").default_max_new_tokens
    import vllm as _v

    t0 = time.perf_counter()
    rows = part1(args)
    train = {} if args.skip_train else part2(args)
    print()
    print(f"vllm {_v.__version__}, {os.cpu_count()} CPUs, bench wall {time.perf_counter() - t0:.0f} s")
    print("\n".join(print_part1(rows, args, max_new)))
    if train:
        print()
        print("\n".join(print_part2(train, args.train_steps)))
    print()
    print("conclusion: " + conclusion(rows, train))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
