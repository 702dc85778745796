"""`forkrl` command line: train | warmstart | eval | config."""

from __future__ import annotations

import argparse
import json
import os
import sys

from forkrl.cli_eval import cmd_eval
from forkrl.config import ConfigError, describe, load_config, shipped_configs

EPILOG_TRAIN = """\
Overrides are dotted keys, applied after the preset and the --config file, e.g.
  forkrl train selection.rho=0.1 rollout.temperature=0.8
  forkrl train preset=trl train.steps=20
  forkrl train model.path=/models/Qwen3-0.6B data.path=train.jsonl
  forkrl train --resume runs/forkrl train.steps=200
Run `forkrl config` for every key with its default and meaning.
"""


def _import_plugins(modules: list[str]) -> None:
    """`--import MODULE`: modules that register rules, normalizers, KL estimators, advantages or rewards
    (`register_*`), imported before the config is read so that its choices include them."""
    import importlib

    for name in modules or []:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(
                f"--import {name}: cannot import it ({e}); put its folder on PYTHONPATH or install it"
            ) from None


def _cmd_train(args) -> int:
    from forkrl.errors import TrainingError
    from forkrl.models.io import CheckpointError
    from forkrl.rewards.pool import RewardError
    from forkrl.tasks.files import DataError
    from forkrl.training.run_folder import resume_config
    from forkrl.training.trainer import TrainingInterrupted, train

    _import_plugins(args.imports)
    if args.resume and args.config:
        raise ConfigError(
            f"--config applies to a new run; --resume {args.resume} continues under the run's own config "
            "(give changes as overrides, e.g. train.steps=200)"
        )
    cfg = None
    try:
        # --resume: the config the run ran under, then the overrides (e.g. train.steps=200).
        cfg = (
            resume_config(args.resume, args.overrides)
            if args.resume
            else load_config(args.config, args.overrides)
        )
        run_dir, summary = train(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    except TrainingInterrupted as e:
        print(f"forkrl: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # a second Ctrl-C while the first waited for the step to end
        print(
            "forkrl: stopped at once by a second signal, without a checkpoint of the step it was in; "
            f"`forkrl train --resume {args.resume or (cfg.train.out_dir if cfg else 'RUN_DIR')}` continues "
            "from the newest one",
            file=sys.stderr,
        )
        return 130
    except DataError as e:
        print(f"forkrl: data error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # a damaged or unsafe model folder or checkpoint, named
        print(f"forkrl: checkpoint error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"forkrl: training error: {e}", file=sys.stderr)
        return 1
    except RewardError as e:  # the reward failed on every row, call after call (reward.on_error, pool)
        print(f"forkrl: reward error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":  # under torchrun the main rank reports the run
        return 0
    print(f"run folder: {run_dir}")
    start, end = summary["eval_accuracy_start"], summary["eval_accuracy_end"]
    if start is None or end is None:
        print(
            f"held-out accuracy: not measured (no held-out data: data.eval_path is empty); "
            f"trained in {summary['wall_time_s']:.0f} s"
        )
    else:
        print(f"held-out accuracy (greedy): {start:.3f} -> {end:.3f} in {summary['wall_time_s']:.0f} s")
    if summary.get("collapsed"):  # every step ran, and the result is a failed run
        print(f"forkrl: training error: {summary['collapsed']}", file=sys.stderr)
        return 1
    return 0


def _cmd_warmstart(args) -> int:
    from forkrl.evaluate import evaluate_task
    from forkrl.models.warmstart import WarmstartConfig, warmstart

    cfg = WarmstartConfig()
    for o in args.overrides:
        key, _, raw = o.partition("=")
        if not hasattr(cfg, key):
            raise ConfigError(f"unknown warmstart key {key!r}; keys are {', '.join(vars(cfg))}")
        setattr(cfg, key, type(getattr(cfg, key))(raw))
    metrics = warmstart(cfg, args.out, log_every=100, evaluate=evaluate_task)
    print(json.dumps(metrics, indent=2))
    print(f"saved to {args.out}")
    return 0


IMPORT_HELP = (
    "a Python module to import first (repeatable): one that adds selection rules, normalizers, KL "
    "estimators, advantage estimators or rewards with forkrl's register_* functions, so that config "
    "values can name them"
)


def _cmd_metrics(args) -> int:
    """The glossary of metrics.jsonl's keys, or RUN_DIR's last metrics row explained."""
    from forkrl.training.metrics import explain_run, format_glossary, glossary_markdown

    if args.run_dir is None:
        print(glossary_markdown() if args.markdown else format_glossary())
        return 0
    try:
        print(explain_run(args.run_dir))
    except (OSError, ValueError) as e:  # no metrics.jsonl there, or a line that is not JSON
        print(f"forkrl metrics: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forkrl", description="RLVR on the forking (high-entropy) tokens.")
    from forkrl import __version__

    p.add_argument("--version", action="version", version=f"forkrl {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser(
        "train",
        help="RL-train a model (default: the paper preset on the built-in task)",
        description="RL-train a model on its highest-entropy tokens.",
        epilog=EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument(
        "--config",
        help="YAML file of sections (applied after the preset), or the name of a config shipped with "
        f"forkrl: {', '.join(shipped_configs())}",
    )
    t.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest checkpoint, under its own config (overrides "
        "may change only how it runs: train.steps, train.eval_every, train.save_every, ...)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in a non-empty train.out_dir (its checkpoints, log and final model are deleted)",
    )
    t.add_argument("--import", dest="imports", action="append", metavar="MODULE", help=IMPORT_HELP)
    t.add_argument("overrides", nargs="*", help="section.field=value")
    t.set_defaults(func=_cmd_train)
    w = sub.add_parser("warmstart", help="SFT the tiny model on the built-in task's traces")
    w.add_argument("--out", default="runs/warmstart", help="output folder for model and tokenizer")
    w.add_argument("overrides", nargs="*", help="key=value for WarmstartConfig (steps, lr, seed, ...)")
    w.set_defaults(func=_cmd_warmstart)
    e = sub.add_parser(
        "eval",
        help="avg@k and pass@k per benchmark of a model on local files or a built-in task",
        description="Sample k completions per problem (or one, greedily), grade them and report avg@k and "
        "unbiased pass@k per benchmark. Stdout gets the JSON summary, stderr a progress bar and a table.",
        epilog="""\
Examples:
  forkrl eval --k 8                                        # the shipped warm start on the built-in task
  forkrl eval --model /models/Qwen3-1.7B-Base --data aime24.jsonl --data math500.parquet \\
      --k 16 --temperature 1.0 --top-p 0.7 --max-new-tokens 8192 --dtype bfloat16 --out runs/eval
A sample is correct when its grade is >= 0.5; pass@k is reported for k = 1, 2, 4, ... and k.
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument(
        "--model",
        default=None,
        help="local model folder, or a run folder (its final/) (default: the shipped warm start)",
    )
    e.add_argument(
        "--task", default="pick", help="built-in task, used when no --data is given: pick or arith"
    )
    e.add_argument("--level", default="add1", help="arith: add1, add2, mul1, word or mix (task.level)")
    e.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0 = torch's default: every core)"
    )
    e.add_argument(
        "--data",
        action="append",
        metavar="FILE",
        help="local .jsonl/.parquet benchmark file, {problem|prompt, answer} or DAPO layout (repeatable)",
    )
    e.add_argument(
        "--group-by",
        choices=("source", "file"),
        default="source",
        help="benchmark of a row: its data_source column, else its file name (source); the file name (file)",
    )
    e.add_argument(
        "--prompt-field", default="prompt", help="row field holding the prompt ('problem' also read)"
    )
    e.add_argument(
        "--answer-field", default="answer", help="row field holding the answer (DAPO: reward_model)"
    )
    e.add_argument("--n", type=int, default=None, help="problems per benchmark (default: all; a task's: 500)")
    e.add_argument("--k", type=int, default=0, help="samples per problem (0 = one greedy completion)")
    e.add_argument("--temperature", type=float, default=1.0, help="sampling temperature when k > 0")
    e.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when k > 0 (1 = off)")
    e.add_argument(
        "--max-new-tokens", type=int, default=0, help="completion budget (0 = the task's; 512 for --data)"
    )
    e.add_argument("--batch-size", type=int, default=64, help="sequences per generation call")
    e.add_argument("--seed", type=int, default=0, help="sampling seed")
    e.add_argument(
        "--chat-template", action="store_true", help="wrap prompts with the tokenizer's chat template"
    )
    e.add_argument(
        "--dapo-template",
        action="store_true",
        help="put problems in the DAPO prompt (asks for 'Answer: ...')",
    )
    e.add_argument(
        "--reward",
        default=None,
        help="grader: math (final answer, math-verify; default for --data), dapo (DAPO's Answer: rule, "
        "+1/-1) or package.module:function (default for --task: the task's grader)",
    )
    e.add_argument("--reward-workers", type=int, default=0, help="grader processes (0 = half the CPUs)")
    e.add_argument("--reward-timeout", type=float, default=10.0, help="seconds per completion; over = wrong")
    e.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype"
    )
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    e.add_argument("--pad-token", default=None, help="padding token when the tokenizer has none")
    e.add_argument(
        "--backend",
        choices=("hf", "vllm"),
        default="hf",
        help="sampler: hf (transformers' generate, anywhere) or vllm (a vLLM engine: the CUDA build on a "
        "GPU, or vLLM's CPU build, set up with `bash scripts/setup.sh --vllm`); the model is then loaded "
        "on the CPU for its checks only",
    )
    e.add_argument(
        "--out", default=None, help="folder for results.jsonl (a line per problem) and summary.json"
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    e.set_defaults(func=cmd_eval)
    c = sub.add_parser("config", help="print every configuration key with its default and meaning")
    c.add_argument("--config", help="a YAML file or shipped config name to resolve first")
    c.add_argument("--import", dest="imports", action="append", metavar="MODULE", help=IMPORT_HELP)
    c.add_argument("overrides", nargs="*", help="section.field=value to resolve first")
    c.set_defaults(
        func=lambda a: _import_plugins(a.imports) or print(describe(load_config(a.config, a.overrides))) or 0
    )
    mt = sub.add_parser(
        "metrics", help="explain every key of metrics.jsonl (docs/metrics.md), or RUN_DIR's last row"
    )
    mt.add_argument(
        "run_dir", nargs="?", default=None, help="a run folder: print its last metrics row, explained"
    )
    mt.add_argument("--markdown", action="store_true", help="the glossary as a Markdown table")
    mt.set_defaults(func=_cmd_metrics)
    from forkrl.analysis.cli import add_analyze_commands, add_report_command

    add_analyze_commands(sub)
    add_report_command(sub)
    from forkrl.analysis.ablate import add_ablate_command

    add_ablate_command(sub)
    from forkrl.models.commands import add_model_command
    from forkrl.tasks.commands import add_task_command

    add_model_command(sub)
    add_task_command(sub)
    return p


def _unknown_arguments(args, unknown: list[str]) -> str:
    """argparse's message, plus the config override a TRL-style flag means: `--steps 5` ->
    "did you mean `train.steps=5`?" (train and config take `section.field=value` overrides)."""
    msg = f"unrecognized arguments: {' '.join(unknown)}"
    if getattr(args, "cmd", None) not in ("train", "config") or not unknown[0].startswith("--"):
        return msg
    flag, _, value = unknown[0][2:].partition("=")
    following = [*unknown[1:2], *(getattr(args, "overrides", None) or [])[:1]]  # argparse took `5`
    if not value and following and "=" not in following[0] and not following[0].startswith("-"):
        value = following[0]
    from forkrl.config import Config, did_you_mean

    return msg + did_you_mean(Config(), flag, value or None)


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin while waiting make small CPU ops 10-20x slower on a busy machine;
    # passive waiting costs nothing measurable otherwise. Must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(_unknown_arguments(args, unknown))
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"forkrl: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C outside a command's own handling (forkrl train has its own)
        kept = e.kept() if hasattr(e, "kept") else " (nothing was written)"  # EvalInterrupted says more
        print(f"forkrl: interrupted{kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
