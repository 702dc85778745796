"""`forkrl ablate`: ablation studies at laptop scale, several seeds per arm, written up with verdicts.

Each arm is a set of dotted overrides on the shipped warm start and the built-in task (`ARMS`); a study
(`STUDIES`, forkrl.analysis.ablate_arms) is a default arm list with its own write-up: `paper`, the paper's
ablations (RESULTS.md), or `methods`, GSPO, CISPO, Clip-Cov, KL-Cov, Archer and the entropy-shaped
advantage against the all/top20 baselines (RESULTS-methods.md). Every (arm, seed) is one `forkrl train`
subprocess (`train.threads=1`, its stdout and stderr in `RUN_DIR/ablate.log`; the trainer keeps its own
`train.log` there), `--jobs` at a time. A run whose folder holds `summary.json` is skipped and an
interrupted one resumes from its checkpoint, so rerunning the command continues a study; a failed run
is reported with its log and the study goes on. The analyses after the runs are kept too
(`warmstart_entropy/analysis.json`, `overlap.json`, the smollm2 study's `sampled.json` files) and
reused while their inputs are unchanged, so a rerun only rewrites the write-up.

Then, in `--out`: `results.json`, `curves.png` (held-out accuracy vs step, mean ± std over seeds) and the
write-up, whose verdicts are computed from those numbers, and `entropy.png` (the rollouts' mean token
entropy vs step). The paper study adds the entropy statistics
of the warm start's samples (`warmstart_entropy/`, `forkrl.analysis.stats`) and the overlap of top-20%
entropy positions between the warm start and each final model (`forkrl.analysis.overlap`); the methods
study the entropy curves (`entropy.png`) and each method's own metrics (`forkrl.analysis.ablate_methods`).

Defaults (20 steps, greedy evaluation every 2 steps on 500 fixed held-out problems): the default task
goes from 0.57 to about 0.99 by step 40, so arms differ most early. One run took 30-60 s of wall time
(plus ~8 s of process start) on a shared 2-core CPU, so 8 arms x 3 seeds with `--jobs 2` takes
roughly 10-30 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from forkrl.analysis.ablate_analysis import _analysis_cached, _fingerprint, forking_overlap, warmstart_entropy
from forkrl.analysis.ablate_arms import ARMS, RESERVED, STUDIES
from forkrl.analysis.ablate_methods import (
    aggregate_methods,
    method_findings,
    methods_markdown,
    plot_entropy,
    plot_panels,
    run_methods,
)
from forkrl.analysis.ablate_results import (
    aggregate_arm,
    findings,
    plot_curves,
    print_table,
    run_result,
    write_results_md,
)
from forkrl.analysis.ablate_sampled import sampled_findings, sampled_results
from forkrl.config import ConfigError, load_config

__all__ = [
    "ARMS",
    "RESERVED",
    "STUDIES",
    "RunSpec",
    "ablate",
    "arm_overrides",
    "plan_runs",
    "run_state",
    "run_study",
]


@dataclass
class RunSpec:
    arm: str
    seed: int
    dir: Path
    args: list[str]  # the `forkrl train` overrides, train.out_dir excluded


def arm_overrides(
    arm: str, *, seed: int = 0, steps: int = 20, eval_every: int = 2, eval_n: int = 500, extra=(), base=()
) -> list[str]:
    """The `forkrl train` overrides of one run of `arm` (load_config accepts them): the arm's, the
    study's `base`, ablate's own, then the user's `extra`."""
    if arm not in ARMS:
        raise ConfigError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    for o in extra:
        key = o.split("=", 1)[0].strip()
        if key in RESERVED:
            raise ConfigError(f"override {o!r}: {key} cannot be set for an ablation ({RESERVED[key]})")
    fixed = [f"train.seed={seed}", f"train.steps={steps}", f"train.eval_every={eval_every}"]
    fixed += [f"train.eval_n={eval_n}", "train.threads=1", "train.progress=false", "train.tensorboard=false"]
    return [*ARMS[arm][1], *base, *fixed, *extra]


def plan_runs(out, arms, seeds: int, **kw) -> list[RunSpec]:  # kw: arm_overrides' settings
    """One `RunSpec` per (arm, seed), every configuration validated before anything runs."""
    specs = []
    for arm in arms:
        for seed in range(seeds):
            args = arm_overrides(arm, seed=seed, **kw)
            load_config(None, args)  # a bad extra override fails here, naming the field
            specs.append(RunSpec(arm, seed, Path(out) / "runs" / arm / f"seed{seed}", args))
    return specs


def run_state(spec: RunSpec) -> str:
    """`done` (summary.json written), `resume` (an interrupted run with a checkpoint) or `fresh`."""
    from forkrl.training.checkpoint import latest_checkpoint

    d, marker = spec.dir, spec.dir / "ablate.json"
    if not d.exists() or not any(d.iterdir()):
        return "fresh"
    if not marker.is_file():
        raise ConfigError(
            f"{d} exists but was not written by `forkrl ablate`; remove it or choose another --out"
        )
    same = json.loads(marker.read_text()).get("args") == spec.args
    finished = (d / "summary.json").is_file() and (d / "final").is_dir()
    if finished and not same:
        raise ConfigError(
            f"{d} holds a finished run with other settings than this study's (see {marker}); "
            "choose another --out or remove that folder"
        )
    if finished:
        return "done"
    return "resume" if same and latest_checkpoint(d) is not None else "fresh"


def _launch(spec: RunSpec, state: str):
    if state == "fresh":
        shutil.rmtree(spec.dir, ignore_errors=True)
        spec.dir.mkdir(parents=True)
        (spec.dir / "ablate.json").write_text(
            json.dumps({"arm": spec.arm, "seed": spec.seed, "args": spec.args})
        )
        cmd = [sys.executable, "-m", "forkrl", "train", *spec.args, f"train.out_dir={spec.dir}"]
    else:
        # A resume imports a user's reward module only when the command names it (forkrl.training.run_folder).
        named = [a for a in spec.args if a.startswith("reward.fn=")]
        cmd = [
            sys.executable,
            "-m",
            "forkrl",
            "train",
            "--resume",
            str(spec.dir),
            "train.progress=false",
            *named,
        ]
    log = open(spec.dir / "ablate.log", "ab")
    log.write(f"$ {shlex.join(cmd)}\n".encode())
    log.flush()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # Own session: a Ctrl-C reaches only this process, which then stops each run once (it checkpoints).
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, log


def _steps_done(run_dir: Path) -> int:
    try:
        with open(run_dir / "metrics.jsonl", "rb") as fh:
            return max(0, sum(1 for _ in fh) - 1)  # the first line is the step-0 evaluation
    except OSError:
        return 0


class StudyInterrupted(Exception):
    """Ctrl-C/SIGTERM: the running runs were stopped at a checkpoint; rerun the command to continue."""


def run_study(specs: list[RunSpec], *, jobs: int = 1, progress: bool = True, console=None) -> dict:
    """Run the unfinished specs, `jobs` at a time. Returns {"ran", "skipped", "failed": [{arm, seed, rc, log}]}."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    states = [(s, run_state(s)) for s in specs]  # all checked before the first run starts
    todo = [(s, st) for s, st in states if st != "done"]
    report = {"ran": 0, "skipped": len(specs) - len(todo), "failed": []}
    if report["skipped"]:
        console.print(f"{report['skipped']} of {len(specs)} runs already finished: skipped")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    running: dict = {}
    with Progress(*columns, console=console, disable=not progress) as bar:
        total = bar.add_task("[bold]runs", total=len(specs), completed=report["skipped"])
        try:
            while todo or running:
                while todo and len(running) < max(1, jobs):
                    spec, state = todo.pop(0)
                    proc, log = _launch(spec, state)
                    label = f"  {spec.arm} seed {spec.seed}" + (" (resumed)" if state == "resume" else "")
                    steps = load_config(None, spec.args).train.steps
                    running[id(spec)] = (spec, proc, log, bar.add_task(label, total=steps))
                time.sleep(0.5)
                for key, (spec, proc, log, task) in list(running.items()):
                    bar.update(task, completed=_steps_done(spec.dir))
                    if proc.poll() is None:
                        continue
                    log.close()
                    bar.remove_task(task)
                    bar.advance(total)
                    del running[key]
                    if proc.returncode == 0 and (spec.dir / "summary.json").is_file():
                        report["ran"] += 1
                        shutil.rmtree(spec.dir / "checkpoints", ignore_errors=True)  # final/ is kept
                    else:
                        path = spec.dir / "ablate.log"
                        report["failed"].append(
                            {"arm": spec.arm, "seed": spec.seed, "rc": proc.returncode, "log": str(path)}
                        )
                        console.print(
                            f"[red]failed[/]: {spec.arm} seed {spec.seed} (exit {proc.returncode}); log: {path}"
                        )
        except KeyboardInterrupt:
            for _, proc, _, _ in running.values():
                proc.send_signal(signal.SIGINT)  # the trainer finishes its step and writes a checkpoint
            for _, proc, log, _ in running.values():
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log.close()
            raise StudyInterrupted(
                "interrupted; the running runs were checkpointed: rerun the same command to continue"
            ) from None
    return report


# ---------------------------------------------------------------------------------------- the study


def ablate(
    out: str | Path | None = None,
    arms=None,
    *,
    study: str = "paper",
    seeds: int = 3,
    steps: int | None = None,
    eval_every: int | None = None,
    eval_n: int | None = None,
    jobs: int = 1,
    extra=(),
    analysis_n: int = 64,
    analysis_k: int = 4,
    results_name: str | None = None,
    figures: str = "",
    progress: bool = True,
    command: str = "",
    console=None,
) -> dict:
    """Run (or continue) `study` (`STUDIES`), then write results.json, curves.png and its write-up
    (`results_name`, default the study's; figure links prefixed with `figures`): for `paper` also
    warmstart_entropy/ and the overlap, for `methods` entropy.png and each method's metrics."""
    from rich.console import Console

    if study not in STUDIES:
        raise ConfigError(f"unknown study {study!r}; choose from {', '.join(STUDIES)}")
    st = STUDIES[study]
    steps, eval_every, eval_n = (
        x if x is not None else d for x, d in zip((steps, eval_every, eval_n), st.defaults)
    )
    console = console or Console(stderr=True)
    arms, out = tuple(arms or st.arms), Path(out or st.out)
    specs = plan_runs(
        out, arms, seeds, steps=steps, eval_every=eval_every, eval_n=eval_n, extra=list(extra), base=st.base
    )
    report = run_study(specs, jobs=jobs, progress=progress, console=console)
    results: dict = {
        "settings": {
            "study": study,
            "arms": list(arms),
            "seeds": seeds,
            "steps": steps,
            "eval_every": eval_every,
            "eval_n": eval_n,
            "jobs": jobs,
            "base": list(st.base),
            "overrides": list(extra),
            "title": st.title,
            "setting": st.setting,
        },
        "command": command or f"forkrl ablate --study {study} --out {out}",
        "date": date.today().isoformat(),
        "arms": {},
        "failures": report["failed"],
    }
    finals: dict[str, list[str]] = {}
    for arm in arms:
        done = [s for s in specs if s.arm == arm and (s.dir / "summary.json").is_file()]  # failed: left out
        results["arms"][arm] = {"what": ARMS[arm][0], **aggregate_arm([run_result(s.dir) for s in done])}
        results["arms"][arm].update(aggregate_methods([run_methods(s.dir) for s in done]))  # entropy curves
        finals[arm] = [str(s.dir / "final") for s in done]
    name = results_name or st.results_name
    if study == "methods":
        results["findings"] = method_findings(results)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        plot_panels(results, out / "curves.png")  # a panel per method: 12 arms on one axis are unreadable
        plot_entropy(results, out / "entropy.png")
        (out / name).write_text(methods_markdown(results, fig=figures), encoding="utf-8")
        return results
    console.print("warm-start entropy statistics and forking-position overlap ...")
    key = {"n": analysis_n, "k": analysis_k, "args": specs[0].args}
    results["warmstart_entropy"] = _analysis_cached(
        out / "warmstart_entropy" / "analysis.json",
        key,
        lambda: warmstart_entropy(specs[0].args, out / "warmstart_entropy", n=analysis_n, k=analysis_k),
    )
    results["overlap"] = _analysis_cached(
        out / "overlap.json",
        {**key, "finals": {arm: [_fingerprint(p) for p in paths] for arm, paths in finals.items()}},
        lambda: forking_overlap(specs[0].args, finals, n=analysis_n, k=analysis_k),
    )
    results["findings"] = findings(results)
    if st.sampled:  # a real model: sampled accuracy of the base and every final model (ablate_sampled)
        k, n = st.sampled
        results["sampled"] = sampled_results(specs, out, k=k, n=n, console=console)
        results["findings"] += sampled_findings(results["sampled"])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_curves(results, out / "curves.png")
    if any((a.get("entropy") or {}).get("steps") for a in results["arms"].values()):
        plot_curves(results, out / "entropy.png", key="entropy")
    write_results_md(results, out, name=name, figures=figures)
    return results


def _cmd_ablate(args) -> int:
    from rich.console import Console

    st = STUDIES[args.study]
    args.steps, args.eval_every, args.eval_n = (
        x if x is not None else d for x, d in zip((args.steps, args.eval_every, args.eval_n), st.defaults)
    )
    arms = [a.strip() for a in (args.arms or ",".join(st.arms)).split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise ConfigError(f"--arms {args.arms!r}: unknown {bad}; choose from {', '.join(ARMS)}")
    if min(args.seeds, args.steps, args.eval_n, args.jobs) < 1 or args.eval_every < 0:
        raise ConfigError("--seeds, --steps, --eval-n and --jobs must be >= 1, --eval-every >= 0")
    out = args.out or st.out
    name = args.results_name or st.results_name
    if Path(name).name != name or not name.endswith(".md"):
        raise ConfigError(f"--results-name {name!r}: a file name ending in .md, no folder (it goes in --out)")
    command = shlex.join(
        [
            "forkrl",
            "ablate",
            "--study",
            args.study,
            "--arms",
            ",".join(arms),
            "--seeds",
            str(args.seeds),
            "--steps",
            str(args.steps),
            "--eval-every",
            str(args.eval_every),
            "--eval-n",
            str(args.eval_n),
            "--jobs",
            str(args.jobs),
            "--out",
            str(out),
        ]
        + (
            ["--analysis-n", str(args.analysis_n), "--analysis-k", str(args.analysis_k)]
            if args.study == "paper"
            else []
        )
        + (["--results-name", name] if args.results_name else [])
        + (["--figures", args.figures] if args.figures else [])
        + list(args.overrides)
    )
    console = Console(stderr=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        results = ablate(
            out,
            arms,
            study=args.study,
            seeds=args.seeds,
            steps=args.steps,
            eval_every=args.eval_every,
            eval_n=args.eval_n,
            jobs=args.jobs,
            extra=args.overrides,
            analysis_n=args.analysis_n,
            analysis_k=args.analysis_k,
            results_name=name,
            figures=args.figures,
            progress=not args.no_progress,
            command=command,
            console=console,
        )
    except StudyInterrupted as e:
        print(f"forkrl: {e}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    print_table(results)
    for f in results["findings"]:
        print(f"{f['finding']}: {f['verdict']} ({f['evidence']})")
    extra_out = "entropy.png" if args.study == "methods" else "warmstart_entropy/"
    print(f"wrote results.json, curves.png, {extra_out} and {name} in {out}")
    for f in results["failures"]:
        print(f"failed: {f['arm']} seed {f['seed']} (exit {f['rc']}); log: {f['log']}", file=sys.stderr)
    return 1 if results["failures"] else 0


def add_ablate_command(subparsers) -> argparse.ArgumentParser:
    """Register `forkrl ablate` on `forkrl`'s sub-parsers."""
    arms = "\n".join(f"  {name:<13} {what}:\n  {'':<13} {' '.join(o)}" for name, (what, o) in ARMS.items())
    studies = "\n".join(
        f"  {name:<8} {s.what}\n  {'':<8} arms {','.join(s.arms)}\n  {'':<8} writes {s.results_name} in {s.out}"
        + (f"; every arm also gets {' '.join(s.base)}" if s.base else "")
        for name, s in STUDIES.items()
    )
    p = subparsers.add_parser(
        "ablate",
        help="ablation studies over seeds: the paper's (selection rules, rho, conventions) or the methods'",
        description="Train every arm of a study for several seeds from the shipped warm start, then write "
        "results.json, curves.png and the write-up with verdicts computed from the numbers. --study paper "
        "(default): the paper's ablations, with the warm start's entropy statistics and the forking-position "
        "overlap, in RESULTS.md. --study methods: GSPO, CISPO, Clip-Cov, KL-Cov, Archer and the entropy-shaped "
        "advantage, alone against `all` and with top-20% selection against `top20`, with entropy curves "
        "(entropy.png) and each method's own metrics, in RESULTS-methods.md. "
        "Rerunning the command skips finished runs and resumes interrupted ones.",
        epilog=f"studies:\n{studies}\n\narms:\n{arms}\n\nExamples:\n"
        "  forkrl ablate --jobs 2                                  # the paper study\n"
        "  forkrl ablate --study methods --jobs 2                  # the methods study\n"
        "  forkrl ablate --arms top20,all --seeds 1 --steps 2 --out /tmp/abl   # a smoke test",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--study", default="paper", choices=list(STUDIES), help="which study (default: paper)")
    p.add_argument("--arms", default=None, help="comma-separated arms (default: the study's)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (0 .. N-1)")
    p.add_argument(
        "--steps", type=int, default=None, help="RL steps per run (default: the study's, 20; smollm2 30)"
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="held-out evaluation every N steps (default: 2; smollm2 10)",
    )
    p.add_argument(
        "--eval-n", type=int, default=None, help="held-out problems per evaluation (default: 500; smollm2 64)"
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="runs in parallel (subprocesses, one torch thread each)"
    )
    p.add_argument(
        "--out", default=None, help="study folder (runs/, results.json, the write-up); default: the study's"
    )
    p.add_argument(
        "--results-name", default=None, help="file name of the write-up in --out (default: the study's)"
    )
    p.add_argument(
        "--figures",
        default="",
        help="prefix of the figure links in the write-up, for committing it elsewhere (e.g. docs/ablate-methods/)",
    )
    p.add_argument(
        "--analysis-n",
        type=int,
        default=64,
        help="paper study: held-out prompts for the entropy and overlap analyses",
    )
    p.add_argument(
        "--analysis-k", type=int, default=4, help="paper study: warm-start samples per analysis prompt"
    )
    p.add_argument("--no-progress", action="store_true", help="no live progress display")
    p.add_argument(
        "overrides", nargs="*", help="section.field=value applied to every arm (e.g. optim.lr=1e-4)"
    )
    p.set_defaults(func=_cmd_ablate)
    return p
