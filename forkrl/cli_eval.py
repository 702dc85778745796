"""`forkrl eval`: the command's body (its arguments are built in `forkrl.cli`)."""

from __future__ import annotations

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
    """`forkrl eval`: a model (or a run's final/) on benchmarks or a built-in task; a table, a JSON summary."""
    import contextlib

    from forkrl.config.sections import TrainConfig
    from forkrl.evaluate import (
        Benchmark,
        EvalInterrupted,
        check_context,
        evaluate_benchmarks,
        format_prompts,
        load_benchmarks,
        reward_scorer,
        summary_table,
        task_scorer,
        write_summary,
    )
    from forkrl.models.loading import load_model_and_tokenizer, resolve_device
    from forkrl.rewards.pool import RewardError, RewardPool
    from forkrl.tasks.files import DataError
    from forkrl.training.memory import set_mmap_threshold

    set_mmap_threshold(TrainConfig().mmap_threshold_mib)  # training's default, one value (train.memory)

    args.model = _model_folder(args.model)
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

        require_vllm(None, what="--backend")  # before any work: the package and a device it can use
    benchmarks = None
    if args.data:
        try:  # before loading the model: a bad row is reported at once
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
    task = None
    if benchmarks is None:
        from forkrl.tasks.registry import get_task

        try:
            task = get_task(args.task, level=args.level)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        examples = task.examples("test", args.n or 500, seed=1234)
        budget = args.max_new_tokens or task.default_max_new_tokens
        if dual:
            # Dual-temperature decoding (the paper's decoding experiment): hotter or colder at forking tokens.
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
        benchmarks = [Benchmark(task.name, examples, files=[f"task:{task.name}"] * len(examples))]
    else:
        budget = args.max_new_tokens or 512
    try:
        benchmarks = format_prompts(
            benchmarks, tokenizer, chat_template=args.chat_template, dapo_template=args.dapo_template
        )
    except ValueError as e:  # a tokenizer without a chat template
        raise ConfigError(f"--chat-template: {e}") from None
    context = check_context(tokenizer, model, benchmarks, budget)
    generate_fn = None
    if args.backend == "vllm":
        from forkrl.models.loading import resolve_model_path
        from forkrl.rollout.vllm import VLLMRollout

        generate_fn = VLLMRollout(  # the whole GPU, or a CPU KV cache just as long as the longest problem
            resolve_model_path(args.model),
            tokenizer,
            dtype=args.dtype,
            seed=args.seed,
            sleep=False,
            gpu_memory_utilization=0.9,
            max_model_len=context,
        )
    n = max(1, args.k)
    reward = args.reward or (None if task is not None else "math")
    settings = {
        "model": str(args.model or "shipped warm start"),
        "data": args.data or [f"task:{args.task}"],
        "samples_per_problem": n,
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
    with contextlib.ExitStack() as stack:
        pool = None
        if reward is None:
            scorer = task_scorer(task)
        else:
            try:  # in worker processes with a timeout: a pathological answer cannot hang the evaluation
                pool = stack.enter_context(
                    RewardPool(  # a name of forkrl.rewards.REWARDS, or package.module:function
                        reward,
                        workers=args.reward_workers or None,
                        timeout=args.reward_timeout,
                    )
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
                n=n,
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
            return 1
        except EvalInterrupted as e:  # Ctrl-C: what was graded is kept, with its summary (main says so)
            if args.out and e.summary is not None:
                write_summary(args.out, e.summary)
                e.out_dir = args.out
            raise
        if pool is not None:  # rows that timed out, raised or crashed a worker were graded 0
            summary["grader_failures"] = {k: int(pool.stats[k]) for k in ("timeouts", "errors", "crashes")}
    # Humans read the table on stderr; stdout is the JSON summary (what earlier versions printed, extended).
    from rich.console import Console

    console = Console(stderr=True)
    what = (
        "greedy" if args.k == 0 else f"{n} samples per problem, T={args.temperature:g}, top-p {args.top_p:g}"
    )
    console.print(summary_table(summary, n, title=f"{settings['model']}: {what}, {budget} new tokens"))
    if args.out:
        console.print(f"results: {write_summary(args.out, summary).parent}/{{results.jsonl,summary.json}}")
    print(json.dumps(summary, indent=2))
    return 0
