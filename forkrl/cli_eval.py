"""`forkrl eval`: the command's body (its arguments are built in `forkrl.cli`)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from forkrl.config import ConfigError


def _model_folder(path: str | None) -> str | None:
    """A model folder, or a run folder (`forkrl train`'s `train.out_dir`): its `final/`."""
    if path is None or (Path(path) / "config.json").exists() or not (Path(path) / "final").is_dir():
        return path
    print(
        f"forkrl: {path} is a run folder: evaluating its final model, {Path(path) / 'final'}", file=sys.stderr
    )
    return str(Path(path) / "final")


def cmd_eval(args) -> int:
    """`forkrl eval`: a model (or a run's final/) on benchmarks or a built-in task; a table, a JSON summary.

    In order: the arguments, the data (before the model: a bad row is reported at once), the model, the
    problems in their prompt format, the sampler (HF or vLLM), the grader, the evaluation, the report."""
    from forkrl.config.sections import TrainConfig
    from forkrl.evaluate import check_context, format_prompts, load_benchmarks
    from forkrl.models.loading import load_model_and_tokenizer, resolve_device
    from forkrl.tasks.files import DataError
    from forkrl.training.memory import set_mmap_threshold

    set_mmap_threshold(TrainConfig().mmap_threshold_mib)  # training's default, one value (train.memory)
    args.model = _model_folder(args.model)
    dual = _check_arguments(args)
    benchmarks = None
    if args.data:
        try:
            benchmarks = load_benchmarks(
                args.data,
                group_by=args.group_by,
                prompt_field=args.prompt_field,
                answer_field=args.answer_field,
                limit=args.n,
            )
        except DataError as e:
            print(f"forkrl: data error: {e}", file=sys.stderr)
            return 2
    device = "cpu" if args.backend == "vllm" else str(resolve_device(args.device))
    model, tokenizer = load_model_and_tokenizer(
        args.model, dtype=args.dtype, device=device, pad_token=args.pad_token
    )
    task, budget = None, args.max_new_tokens or 512
    if benchmarks is None:  # a built-in task's held-out problems
        task, benchmarks, budget = _task_problems(args)
        if dual:
            return _dual_temperature(args, model, tokenizer, task, benchmarks[0].examples, budget)
    try:
        benchmarks = format_prompts(
            benchmarks, tokenizer, chat_template=args.chat_template, dapo_template=args.dapo_template
        )
    except ValueError as e:  # a tokenizer without a chat template
        raise ConfigError(f"--chat-template: {e}") from None
    generate_fn = _vllm_sampler(args, tokenizer, check_context(tokenizer, model, benchmarks, budget))
    reward = args.reward or (None if task is not None else "math")
    settings = _settings(args, budget, reward)
    summary = _evaluate(args, model, tokenizer, benchmarks, task, reward, budget, settings, generate_fn)
    if summary is None:
        return 1
    _report(args, summary, budget, settings)
    return 0


def _check_arguments(args) -> bool:
    """Refuse what cannot run, before any work; whether dual-temperature decoding was asked for."""
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if args.k < 0 or (args.n is not None and args.n < 1) or args.batch_size < 1:
        raise ConfigError("--k must be >= 0 (0 = greedy); --n and --batch-size must be >= 1")
    dual = args.t_high is not None or args.t_low is not None
    if dual and args.data:
        raise ConfigError("--t-high/--t-low (dual-temperature decoding) work with --task, not with --data")
    if dual and args.backend != "hf":
        raise ConfigError("--t-high/--t-low (dual-temperature decoding) run on --backend hf")
    if args.backend == "vllm":
        from forkrl.rollout.vllm import require_vllm

        require_vllm(None, what="--backend")  # the package and a device it can use
    return dual


def _task_problems(args):
    """(the task, its held-out problems as one benchmark, the completion budget)."""
    from forkrl.evaluate import Benchmark
    from forkrl.tasks.registry import get_task

    try:
        task = get_task(args.task, level=args.level)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    examples = task.examples("test", args.n or 500, seed=1234)
    budget = args.max_new_tokens or task.default_max_new_tokens
    return task, [Benchmark(task.name, examples, files=[f"task:{task.name}"] * len(examples))], budget


def _dual_temperature(args, model, tokenizer, task, examples, budget: int) -> int:
    """The paper's decoding experiment: hotter or colder at the forking tokens; prints its JSON."""
    from forkrl.analysis.dual_temp import calibrate_threshold, dual_temperature_eval

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
        batch_size=args.batch_size,
        seed=args.seed,
    )
    res["threshold"] = threshold
    print(json.dumps(res, indent=2))
    return 0


def _vllm_sampler(args, tokenizer, context: int):
    """`--backend vllm`: the engine (the whole GPU, or a CPU KV cache just as long as the longest
    problem); None for the HF backend."""
    if args.backend != "vllm":
        return None
    from forkrl.models.loading import resolve_model_path
    from forkrl.rollout.vllm import VLLMRollout

    return VLLMRollout(
        resolve_model_path(args.model),
        tokenizer,
        dtype=args.dtype,
        seed=args.seed,
        sleep=False,
        gpu_memory_utilization=0.9,
        max_model_len=context,
    )


def _settings(args, budget: int, reward: str | None) -> dict:
    """What the summary records of how it was measured."""
    return {
        "model": str(args.model or "shipped warm start"),
        "data": args.data or [f"task:{args.task}"],
        "samples_per_problem": max(1, args.k),
        "greedy": args.k == 0,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": budget,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "reward": reward or f"{args.task} task grader",
        "chat_template": args.chat_template,
        "dapo_template": args.dapo_template,
        "dtype": args.dtype,
        "backend": args.backend,
    }


def _evaluate(args, model, tokenizer, benchmarks, task, reward, budget: int, settings: dict, generate_fn):
    """Sample and grade (a reward in worker processes with a timeout: a pathological answer cannot hang
    the evaluation); the summary, or None after a reward error (said on stderr)."""
    from forkrl.evaluate import (
        EvalInterrupted,
        evaluate_benchmarks,
        reward_scorer,
        task_scorer,
        write_summary,
    )
    from forkrl.rewards.pool import RewardError, RewardPool

    with contextlib.ExitStack() as stack:
        pool = None
        if reward is None:
            scorer = task_scorer(task)
        else:
            try:  # a name of forkrl.rewards.REWARDS, or package.module:function
                pool = stack.enter_context(
                    RewardPool(reward, workers=args.reward_workers or None, timeout=args.reward_timeout)
                )
            except (ValueError, TypeError) as e:
                raise ConfigError(f"--reward {reward}: {e}") from None
            scorer = reward_scorer(pool)
        try:
            summary, _ = evaluate_benchmarks(
                model,
                tokenizer,
                benchmarks,
                scorer,
                n=max(1, args.k),
                greedy=args.k == 0,
                temperature=args.temperature,
                top_p=args.top_p,
                max_new_tokens=budget,
                batch_size=args.batch_size,
                seed=args.seed,
                out_dir=args.out,
                progress=not args.no_progress,
                settings=settings,
                generate_fn=generate_fn,
            )
        except RewardError as e:  # the grader cannot be loaded in its worker processes
            print(f"forkrl: reward error: {e}", file=sys.stderr)
            return None
        except EvalInterrupted as e:  # Ctrl-C: what was graded is kept, with its summary (main says so)
            if args.out and e.summary is not None:
                write_summary(args.out, e.summary)
                e.out_dir = args.out
            raise
        if pool is not None:  # rows that timed out, raised or crashed a worker were graded 0
            summary["grader_failures"] = {k: int(pool.stats[k]) for k in ("timeouts", "errors", "crashes")}
    return summary


def _report(args, summary: dict, budget: int, settings: dict) -> None:
    """Humans read the table on stderr; stdout is the JSON summary (what earlier versions printed, extended)."""
    from rich.console import Console

    from forkrl.evaluate import summary_table, write_summary

    n = max(1, args.k)
    console = Console(stderr=True)
    what = (
        "greedy" if args.k == 0 else f"{n} samples per problem, T={args.temperature:g}, top-p {args.top_p:g}"
    )
    console.print(summary_table(summary, n, title=f"{settings['model']}: {what}, {budget} new tokens"))
    if args.out:
        console.print(f"results: {write_summary(args.out, summary).parent}/{{results.jsonl,summary.json}}")
    print(json.dumps(summary, indent=2))
