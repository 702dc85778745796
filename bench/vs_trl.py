"""forkrl vs TRL's GRPOTrainer: seconds per RL step and peak memory, same model, task and settings.

Both frameworks train the same tiny model on the built-in `pick` task with the same batch
(16 prompts x 8 samples = 128 completions, at most the task's 31 new tokens, T = 1.0, no top-k/top-p),
the same forking-token objective (top 20% entropy tokens of the batch; DAPO clip 0.2/0.28, loss over
all completion tokens, no KL) and the same optimizer (AdamW, lr 1e-4, betas 0.9/0.99, no weight decay,
constant lr, grad clip 1.0), one optimizer step per RL step over one 128-sequence micro-batch:

- TRL: `GRPOTrainer` with `GRPOConfig(top_entropy_quantile=0.2, loss_type="dapo", beta=0, ...)`
  (`bench/_trl_side.py`); gradient checkpointing off, as in forkrl (TRL's own default is on).
- forkrl: `preset=trl` (the same selection conventions: per-micro-batch quantile on the current
  forward's entropy), dynamic sampling off (`bench/_forkrl_side.py`).

Each run is its own process (so its peak RSS, `ru_maxrss`, is its own; "RSS at start" is the
resident set just before the first step, after imports and model load), with the same torch thread
count (`--threads`) for training; sampling runs at 1 thread on both sides by default (forkrl's
`rollout.threads` auto setting for a model this small, see `bench/decode.py`; TRL's `_generate` is
wrapped to match, `--trl-sample-threads 0` leaves it at `--threads`; "checks" prints what each side ran
with), `OMP_WAIT_POLICY=PASSIVE` (libgomp's spinning barriers make 2 threads on 2 busy cores up to
20x slower) and the same seed; the runs alternate trl, forkrl, trl, forkrl, ... so that load on a
shared machine hits both. A step is timed from the start of generation to the end of the optimizer
step (TRL: `on_step_begin` to `on_step_end`, generation included; forkrl: the `time_step` metric),
and evaluation is outside it. The tables show medians over the steps after the warm-up, pooled over
rounds, in wall seconds and in process CPU seconds (steadier when other jobs share the machine);
the phase table splits the same steps into generation, reward, other preparation, training forward
(with loss and entropy mask), backward, and clip + optimizer step.

    python bench/vs_trl.py                  # 8 timed steps after 2 warm-up, 2 rounds (~3 min on 2 CPUs)
    python bench/vs_trl.py --quick          # 4 timed steps, 1 round
    python bench/vs_trl.py --model PATH     # another local HF folder (default: shipped warm start)
    python bench/vs_trl.py --profile        # one cProfile'd run per side: top functions by self time

Without `--model` and without the shipped warm start, a random tiny model is built: the timings
still compare, but its rewards stay at 0 (nothing to learn from).
Needs the `bench` extra (`pip install -e .[bench]`, which brings `trl`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIDES = ("trl", "forkrl")

# Phase names shared by both children, in display order.
PHASES = ("generate", "reward", "prep_other", "forward", "backward", "optimizer", "other")
PHASE_DOCS = {
    "generate": "sampling the completions (tokenize, decode loop, detokenize)",
    "reward": "grading the completions",
    "prep_other": "padding, advantages, (scoring pass if any)",
    "forward": "training forward: backbone, LM head, entropy, selection, loss",
    "backward": "loss.backward()",
    "optimizer": "gradient clip + AdamW step",
    "other": "the rest of the step (bookkeeping, metrics)",
}


# ---------------------------------------------------------------- helpers used by the child processes


def rss_mib() -> float:
    """Current resident set size of this process (VmRSS), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pin_threads(n: int) -> None:
    """Same intra-op thread count on both sides; call before any heavy torch work."""
    import torch

    torch.set_num_threads(n)


class Phases:
    """Wall time of named phases, accumulated per RL step by wrappers and hooks."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def new_step(self) -> None:
        self.steps.append({})

    def add(self, name: str, dt: float) -> None:
        if self.steps:
            d = self.steps[-1]
            d[name] = d.get(name, 0.0) + dt

    def timed(self, name: str, fn):
        """`fn` wrapped so that its wall time is added to phase `name` (works for methods too)."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t0)

        return wrapper

    def install_torch_hooks(self) -> None:
        """Time every `Tensor.backward`, gradient clip and optimizer step, the same way on both sides."""
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        torch.Tensor.backward = self.timed("backward", torch.Tensor.backward)
        torch.nn.utils.clip_grad_norm_ = self.timed("optimizer", torch.nn.utils.clip_grad_norm_)
        start: list[float] = []
        register_optimizer_step_pre_hook(lambda *a: start.append(time.perf_counter()))
        register_optimizer_step_post_hook(lambda *a: self.add("optimizer", time.perf_counter() - start.pop()))


class StagePeaks:
    """Peak resident set per named stage, sampled by a background thread every `interval` seconds.

    Sampling /proc/self/status leaves the process's own `ru_maxrss` untouched (resetting the
    high-water mark through clear_refs would not), and torch's kernels release the GIL, so the
    thread keeps sampling during them. A stage shorter than `interval` may be missed: its peak is
    then at least the RSS at its start and end, which `stage()` records too.
    """

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self.interval, self.peaks, self._label = interval, {}, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _note(self) -> None:
        label = self._label  # read once: the main thread may change it meanwhile
        if label is not None:
            r = rss_mib()
            if r > self.peaks.get(label, 0.0):
                self.peaks[label] = r

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._note()

    def stage(self, name: str, fn):
        """`fn` wrapped so that the RSS while it runs counts toward stage `name`'s peak."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            outer, self._label = self._label, name
            self._note()
            try:
                return fn(*args, **kwargs)
            finally:
                self._note()
                self._label = outer

        return wrapper

    def enter(self, name: str) -> None:
        """Start counting toward `name` (for code reached through hooks rather than a call to wrap)."""
        self._outer, self._label = self._label, name
        self._note()

    def exit(self) -> None:
        self._note()
        self._label = self._outer

    def close(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return dict(self.peaks)


def run_profiled(enabled: bool, fn):
    """fn() under cProfile when enabled; returns (result, top functions by self time as text)."""
    if not enabled:
        return fn(), None
    import cProfile
    import io
    import pstats
    import site

    prof = cProfile.Profile()
    result = prof.runcall(fn)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    text = buf.getvalue()
    for prefix in [*site.getsitepackages(), str(ROOT)]:
        text = text.replace(prefix + "/", "")
    return result, text


def child_main(run) -> None:
    """Entry point of a child: `python bench/_X_side.py SETTINGS_JSON OUT_JSON`."""
    settings = json.loads(sys.argv[1])
    out_path = sys.argv[2]
    result = run(settings)
    result["peak_rss_mib"] = peak_rss_mib()
    Path(out_path).write_text(json.dumps(result))


# ---------------------------------------------------------------- the parent


def _resolve_model(path: str | None, workdir: Path) -> tuple[str, str]:
    """(model folder, how it was chosen): --model, else the shipped warm start, else a random tiny model."""
    if path:
        return str(Path(path).resolve()), f"--model {path}"
    from forkrl.models.loading import DEFAULT_MODEL

    if DEFAULT_MODEL.is_dir():
        return str(DEFAULT_MODEL), "shipped warm start (forkrl/assets/warmstart-pick)"
    from forkrl.models.tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok))
    out = workdir / "random-tiny"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out), "RANDOM tiny model (no shipped warm start found; rewards stay ~0)"


def _run_child(side: str, settings: dict, workdir: Path, tag: str) -> dict:
    out = workdir / f"{tag}.json"
    env = dict(os.environ)
    threads = str(settings["threads"])
    # libgomp's default active wait spins at every parallel-region barrier: with as many threads as
    # cores on a machine shared with other jobs, a descheduled thread stalls the others (measured: 128x31
    # sampling with the tiny model took 15 s instead of 0.6 s at 2 threads). Passive waiting avoids it.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    s = dict(settings, workdir=str(workdir / tag))
    cmd = [sys.executable, str(HERE / f"_{side}_side.py"), json.dumps(s), str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{side} run {tag} failed (exit {proc.returncode})")
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def side_table(title: str, first: str = "stage"):
    """A rich table of one row per stage: `first`, TRL, forkrl, what."""
    from rich.table import Table

    tab = Table(title=title)
    for col in (first, "TRL", "forkrl", "what"):
        tab.add_column(col, justify="right" if col in ("TRL", "forkrl") else "left")
    return tab


def summarize(runs: list[dict], warmup: int) -> dict:
    """Pool the timed steps (after warm-up) of every run of one side."""
    step_s, cpu_s, rewards, kept, ent = [], [], [], [], []
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    for r in runs:
        for st in r["steps"][warmup:]:
            step_s.append(st["time_step"])
            cpu_s.append(st["cpu_step"])
            rewards.append(st.get("reward", float("nan")))
            kept.append(st.get("kept_frac", float("nan")))
            ent.append(st.get("entropy", float("nan")))
            for p in PHASES:
                phases[p].append(st["phases"].get(p, 0.0))
    med = _median(step_s)
    return {
        "n_steps": len(step_s),
        "s_per_step": med,
        "steps_per_s": 1.0 / med if med else float("nan"),
        "cpu_s_per_step": _median(cpu_s),
        "round_medians": [_median([st["time_step"] for st in r["steps"][warmup:]]) for r in runs],
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "rss_before_train_mib": max(r["rss_before_train_mib"] for r in runs),
        "reward_mean": _mean(rewards),
        "kept_frac": _mean(kept),
        "entropy": _mean(ent),
        "phases": {p: _median(v) for p, v in phases.items()},
        "checks": runs[0].get("checks", {}),
        "wall_s": [round(r["wall_s"], 1) for r in runs],
    }


def _print_tables(summary: dict, settings: dict, model_note: str) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=130)
    t, f = summary["trl"], summary["forkrl"]
    con.print(
        f"model: {model_note}\n"
        f"{settings['prompts_per_step']} prompts x {settings['group_size']} samples, "
        f"max {settings['max_new_tokens']} new tokens, rho {settings['rho']}, lr {settings['lr']}, "
        f"{settings['threads']} torch threads; medians over {t['n_steps']} (TRL) / {f['n_steps']} (forkrl) "
        f"steps after {settings['warmup']} warm-up steps per run"
    )
    tab = Table(title="seconds per RL step and peak memory (RSS, MiB)")
    for col in (
        "",
        "s/step",
        "steps/s",
        "CPU s/step",
        "round medians",
        "RSS at start",
        "peak",
        "growth",
        "reward",
        "kept",
        "entropy",
    ):
        tab.add_column(col, justify="right", no_wrap=True)
    for name, s in (("TRL", t), ("forkrl", f)):
        tab.add_row(
            name,
            f"{s['s_per_step']:.3f}",
            f"{s['steps_per_s']:.3f}",
            f"{s['cpu_s_per_step']:.3f}",
            " ".join(f"{x:.3f}" for x in s["round_medians"]),
            f"{s['rss_before_train_mib']:.0f}",
            f"{s['peak_rss_mib']:.0f}",
            f"{s['peak_rss_mib'] - s['rss_before_train_mib']:.0f}",
            f"{s['reward_mean']:.3f}",
            f"{s['kept_frac']:.3f}",
            f"{s['entropy']:.3f}",
        )
    con.print(tab)
    speedup = t["s_per_step"] / f["s_per_step"]
    cpu_speedup = t["cpu_s_per_step"] / f["cpu_s_per_step"]
    mem = f["peak_rss_mib"] / t["peak_rss_mib"]
    growth = (f["peak_rss_mib"] - f["rss_before_train_mib"]) / max(
        1e-9, t["peak_rss_mib"] - t["rss_before_train_mib"]
    )
    con.print(
        f"speed-up forkrl vs TRL (TRL s/step / forkrl s/step): [bold]{speedup:.2f}x[/bold] "
        f"(process CPU time: {cpu_speedup:.2f}x)   "
        f"peak RSS forkrl/TRL: [bold]{mem:.2f}[/bold]   growth forkrl/TRL: {growth:.2f}   "
        f"(target: >= 1.5x at <= 1.00 peak)"
    )
    ph = side_table("where a step's time goes (median seconds per phase over the timed steps)", "phase")
    for p in PHASES:
        ph.add_row(p, f"{t['phases'][p]:.3f}", f"{f['phases'][p]:.3f}", PHASE_DOCS[p])
    ph.add_row("step (median)", f"{t['s_per_step']:.3f}", f"{f['s_per_step']:.3f}", "")
    con.print(ph)
    con.print("checks:", json.dumps({"trl": t["checks"], "forkrl": f["checks"]}, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local HF model folder (default: the shipped warm start)")
    ap.add_argument("--steps", type=int, default=8, help="timed RL steps per run (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed RL steps at the start of each run")
    ap.add_argument("--rounds", type=int, default=2, help="trl, forkrl alternations")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each run")
    ap.add_argument(
        "--trl-sample-threads",
        type=int,
        default=1,
        help="torch threads for TRL's sampling (default 1, as forkrl's auto setting for this model; 0 = --threads)",
    )
    ap.add_argument("--quick", action="store_true", help="--steps 4 --rounds 1")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (both)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--profile",
        action="store_true",
        help="one cProfile'd run per side; prints its top functions (its timings are inflated by the profiler)",
    )
    ap.add_argument("--json", default=None, help="also write the summary to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 4, 1
    if args.profile:
        args.rounds = 1
    from forkrl.tasks.pick import PickTask

    workdir = Path(tempfile.mkdtemp(prefix="forkrl-vs-trl-"))
    model, model_note = _resolve_model(args.model, workdir)
    settings = {
        "model": model,
        "steps": args.warmup + args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "trl_sample_threads": args.trl_sample_threads,
        "seed": args.seed,
        "prompts_per_step": 16,
        "group_size": 8,
        "max_new_tokens": PickTask().default_max_new_tokens,
        "temperature": 1.0,
        "top_p": 1.0,
        "rho": 0.2,
        "eps_low": 0.2,
        "eps_high": 0.28,
        "lr": args.lr,
        "beta1": 0.9,
        "beta2": 0.99,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "micro_batch_size": 128,  # the whole RL batch in one forward/backward on both sides
        "mask_truncated": False,  # TRL's default; forkrl's `trl` preset turns it on, overridden here
        "profile": args.profile,
    }
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    try:
        for r in range(args.rounds):
            for side in SIDES:
                print(f"round {r + 1}/{args.rounds}: {side} ...", flush=True)
                res = _run_child(side, settings, workdir, f"{side}-{r}")
                runs[side].append(res)
                steps = [round(st["time_step"], 3) for st in res["steps"]]
                print(f"  {res['wall_s']:.0f} s wall; s/step {steps}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # run folders, checkpoints, the random model
    summary = {side: summarize(runs[side], args.warmup) for side in SIDES}
    summary["speedup"] = summary["trl"]["s_per_step"] / summary["forkrl"]["s_per_step"]
    summary["cpu_speedup"] = summary["trl"]["cpu_s_per_step"] / summary["forkrl"]["cpu_s_per_step"]
    summary["peak_ratio"] = summary["forkrl"]["peak_rss_mib"] / summary["trl"]["peak_rss_mib"]
    summary["settings"] = settings
    summary["model_note"] = model_note
    if args.profile:
        print("NOTE: cProfile was on; it slows Python-heavy code unevenly, so these timings do not compare.")
    _print_tables(summary, settings, model_note)
    if args.profile:
        for side in SIDES:
            print(f"\n===== cProfile, {side} (whole child run incl. model load and eval; by self time) =====")
            print(runs[side][0].get("profile") or "(none)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
