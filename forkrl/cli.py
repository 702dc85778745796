"""`forkrl` command line: train | warmstart | eval | config."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from forkrl.config import ConfigError, describe, load_config

EPILOG_TRAIN = """\
Overrides are dotted keys, applied after the preset and the --config file, e.g.
  forkrl train selection.rho=0.1 rollout.temperature=0.8
  forkrl train preset=trl train.steps=20
  forkrl train model.path=/models/Qwen3-0.6B data.path=train.jsonl
  forkrl train --resume runs/forkrl train.steps=200
Run `forkrl config` for every key with its default and meaning.
"""


def _cmd_train(args) -> int:
    from forkrl.train.trainer import TrainingInterrupted, train

    if args.resume:
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there; is it a forkrl run folder?")
        # The saved, resolved config; overrides may extend the run (e.g. train.steps=200).
        cfg = load_config(saved, [*args.overrides, f"train.out_dir={args.resume}"])
    else:
        cfg = load_config(args.config, args.overrides)
    try:
        run_dir, summary = train(cfg, resume=bool(args.resume))
    except TrainingInterrupted as e:
        print(f"forkrl: {e}", file=sys.stderr)
        return 128 + e.signum
    print(f"run folder: {run_dir}")
    print(
        f"held-out accuracy (greedy): {summary['eval_accuracy_start']:.3f} -> {summary['eval_accuracy_end']:.3f} "
        f"in {summary['wall_time_s']:.0f} s"
    )
    return 0


def _cmd_warmstart(args) -> int:
    from forkrl.models.warmstart import WarmstartConfig, warmstart

    cfg = WarmstartConfig()
    for o in args.overrides:
        key, _, raw = o.partition("=")
        if not hasattr(cfg, key):
            raise ConfigError(f"unknown warmstart key {key!r}; keys are {', '.join(vars(cfg))}")
        setattr(cfg, key, type(getattr(cfg, key))(raw))
    metrics = warmstart(cfg, args.out, log_every=100)
    print(json.dumps(metrics, indent=2))
    print(f"saved to {args.out}")
    return 0


def _cmd_eval(args) -> int:
    from forkrl.evaluate import evaluate_task
    from forkrl.tasks.pick import get_task
    from forkrl.train.trainer import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    task = get_task(args.task)
    examples = task.examples("test", args.n, seed=1234)
    if args.t_high is not None or args.t_low is not None:
        # Dual-temperature decoding (the paper's decoding experiment): hotter or colder at forking tokens.
        from forkrl.analysis.dual_temp import calibrate_threshold, dual_temperature_eval

        budget = args.max_new_tokens or task.default_max_new_tokens
        threshold = args.threshold
        if threshold is None:
            threshold = calibrate_threshold(model, tokenizer, examples[:64], max_new_tokens=budget)
        res = dual_temperature_eval(
            model,
            tokenizer,
            task,
            examples,
            args.t_high or 1.0,
            args.t_low or 1.0,
            threshold,
            k=max(1, args.k),
            max_new_tokens=budget,
        )
        res["threshold"] = threshold
    else:
        res = evaluate_task(
            model,
            tokenizer,
            task,
            examples,
            greedy=args.k == 0,
            k=max(1, args.k),
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens or None,
        )
    print(json.dumps(res, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forkrl", description="RLVR on the forking (high-entropy) tokens.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser(
        "train",
        help="RL-train a model (default: the paper preset on the built-in task)",
        description="RL-train a model on its highest-entropy tokens.",
        epilog=EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--config", help="YAML file of sections (applied after the preset)")
    t.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint"
    )
    t.add_argument("overrides", nargs="*", help="section.field=value")
    t.set_defaults(func=_cmd_train)
    w = sub.add_parser("warmstart", help="SFT the tiny model on the built-in task's traces")
    w.add_argument("--out", default="runs/warmstart", help="output folder for model and tokenizer")
    w.add_argument("overrides", nargs="*", help="key=value for WarmstartConfig (steps, lr, seed, ...)")
    w.set_defaults(func=_cmd_warmstart)
    e = sub.add_parser("eval", help="held-out accuracy, avg@k and pass@k of a model on a task")
    e.add_argument("--model", default=None, help="local model folder (default: the shipped warm start)")
    e.add_argument("--task", default="pick", help="built-in task")
    e.add_argument("--n", type=int, default=500, help="held-out problems")
    e.add_argument("--k", type=int, default=0, help="samples per problem (0 = greedy)")
    e.add_argument("--temperature", type=float, default=1.0, help="sampling temperature when k > 0")
    e.add_argument("--max-new-tokens", type=int, default=0, help="completion budget (0 = the task's)")
    e.add_argument(
        "--t-high", type=float, default=None, help="dual-temperature decoding: T where H >= threshold"
    )
    e.add_argument(
        "--t-low", type=float, default=None, help="dual-temperature decoding: T where H < threshold"
    )
    e.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="entropy threshold (default: the 80th percentile of T=1 entropies, as in the paper)",
    )
    e.set_defaults(func=_cmd_eval)
    c = sub.add_parser("config", help="print every configuration key with its default and meaning")
    c.add_argument("overrides", nargs="*", help="section.field=value to resolve first")
    c.set_defaults(func=lambda a: print(describe(load_config(None, a.overrides))) or 0)
    from forkrl.analysis.cli import add_analyze_commands, add_report_command

    add_analyze_commands(sub)
    add_report_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin while waiting make small CPU ops 10-20x slower on a busy machine;
    # passive waiting costs nothing measurable otherwise. Must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"forkrl: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
