"""`forkrl analyze generate | stats | view | overlap | sweep` and `forkrl report`.

`forkrl.cli.build_parser` registers them with `add_analyze_commands(sub)` and `add_report_command(sub)`;
each sub-command sets `func(args) -> int`. Heavy imports (torch models, matplotlib) happen inside the
commands, so `forkrl --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from forkrl.config import ConfigError


class FileTask:
    """Rows of a local .jsonl/.parquet file graded by final-answer equivalence (`math_reward`)."""

    name = "file"

    def __init__(self, path: str, max_new_tokens: int = 512):
        from forkrl.tasks.files import load_examples

        self.rows = load_examples(path)
        self.default_max_new_tokens = max_new_tokens

    def examples(self, split: str, n: int, seed: int = 0):
        return self.rows[:n]

    def grade(self, completion: str, example) -> float:
        from forkrl.rewards.math import math_reward

        return math_reward([example.prompt], [completion], [example.answer])[0]


def _task_and_examples(args, tokenizer=None):
    """(task, examples) from --data (a local file) or --task (built-in, the held-out split)."""
    if args.data:
        task = FileTask(args.data)
        examples = task.examples("test", args.n)
    else:
        from forkrl.tasks.registry import get_task

        try:
            task = get_task(args.task, level=args.level)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        examples = task.examples(args.split, args.n, seed=args.data_seed)
    if args.chat_template:
        import dataclasses

        from forkrl.tasks.files import apply_chat_template

        examples = [
            dataclasses.replace(
                e, prompt=apply_chat_template(tokenizer, e.fields.get("messages") or e.prompt)
            )
            for e in examples
        ]
    return task, examples


def _load(path, device: str = "auto", threads: int = 0):
    from forkrl.models.loading import load_model_and_tokenizer, resolve_device

    if threads > 0:
        import torch

        torch.set_num_threads(threads)

    return load_model_and_tokenizer(path, device=str(resolve_device(device)))


def _budget(args, task) -> int:
    return args.max_new_tokens or getattr(task, "default_max_new_tokens", 64)


# ---------------------------------------------------------------------------------------------- commands


def _cmd_generate(args) -> int:
    from forkrl.analysis.generate import generate_dump

    model, tok = _load(args.model, args.device, args.threads)
    task, examples = _task_and_examples(args, tok)
    dump = generate_dump(
        model,
        tok,
        examples,
        args.out,
        n=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=_budget(args, task),
        rho=args.rho,
        top_k=args.top_alternatives,
        seed=args.seed,
        batch_size=args.batch_size,
        grade=task.grade,
        meta={"model": str(args.model or "shipped warm start"), "task": args.data or args.task},
    )
    n_tok = int(dump.flat("loss").astype(bool).sum())
    print(f"wrote {len(dump.rows)} responses ({n_tok} tokens) to {args.out}")
    return 0


def _cmd_stats(args) -> int:
    from forkrl.analysis.dump import read_dump
    from forkrl.analysis.stats import print_stats, write_stats

    dump = read_dump(args.dump)
    out_dir = Path(args.out_dir or Path(args.dump).with_suffix("").as_posix() + "_stats")
    rho = args.rho if args.rho is not None else float(dump.meta.get("rho", 0.2))
    stats = write_stats(dump, out_dir, rho=rho, top=args.top)
    print_stats(stats)
    print(f"saved stats.json, entropy_hist.png, wordcloud_high.png, wordcloud_low.png in {out_dir}")
    return 0


def _cmd_view(args) -> int:
    from forkrl.analysis.dump import read_dump
    from forkrl.analysis.view import write_view

    out = write_view(read_dump(args.dump), args.out, max_rows=args.max_rows)
    print(f"token view: {out}")
    return 0


def _cmd_overlap(args) -> int:
    from forkrl.analysis.overlap import checkpoint_overlap, plot_overlap

    tok = None
    if args.chat_template:
        from transformers import AutoTokenizer

        from forkrl.models.loading import resolve_model_path

        tok = AutoTokenizer.from_pretrained(
            resolve_model_path(args.checkpoints[0]), local_files_only=True, trust_remote_code=False
        )
    task, examples = _task_and_examples(args, tok)
    result = checkpoint_overlap(
        lambda p: _load(p, args.device, args.threads),
        args.checkpoints,
        [e.prompt for e in examples],
        n=args.k,
        temperature=args.temperature,
        max_new_tokens=_budget(args, task),
        rho=args.rho,
        seed=args.seed,
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overlap.json").write_text(json.dumps(result, indent=2))
    plot_overlap(result, out / "overlap.png", labels=args.labels)
    for r in result["checkpoints"]:
        hi, lo = r["change_vs_first"]["high"], r["change_vs_first"]["low"]
        print(
            f"{r['checkpoint']}: overlap vs first {r['overlap_vs_first']:.2%}, "
            f"high H {hi['entropy_a']:.3f} -> {hi['entropy_b']:.3f}, low H {lo['entropy_a']:.3f} -> {lo['entropy_b']:.3f}"
        )
    print(f"saved overlap.json and overlap.png in {out}")
    return 0


def _cmd_sweep(args) -> int:
    from forkrl.analysis.dual_temp import calibrate_threshold, plot_sweep, sweep

    model, tok = _load(args.model, args.device, args.threads)
    task, examples = _task_and_examples(args, tok)
    budget = _budget(args, task)
    threshold = args.threshold
    if threshold is None:
        threshold = calibrate_threshold(
            model, tok, examples, quantile=0.8, max_new_tokens=budget, seed=args.seed
        )
        print(f"threshold = 80th percentile of the T=1 entropy = {threshold:.4f}")
    result = sweep(
        model,
        tok,
        task,
        examples,
        args.t_high,
        args.t_low,
        threshold,
        args.k,
        max_new_tokens=budget,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    plot_sweep(result, out / "sweep.png")
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"avg@{args.k} on {len(examples)} problems, threshold H = {threshold:.3g}")
    t.add_column("T_high \\ T_low")
    for tl in args.t_low:
        t.add_column(f"{tl:g}", justify="right")
    for th, row in zip(args.t_high, result["grid"]):
        t.add_row(f"{th:g}", *[f"{v:.3f}" for v in row])
    Console().print(t)
    print(f"saved sweep.json and sweep.png in {out}")
    return 0


def _cmd_report(args) -> int:
    from forkrl.analysis.report import write_report

    try:
        out = write_report(args.run_dirs, args.out, labels=args.labels)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    print(f"report: {out}")
    return 0


# ---------------------------------------------------------------------------------------------- parsers


def _data_args(p: argparse.ArgumentParser, n: int) -> None:
    p.add_argument("--task", default="pick", help="built-in task, pick or arith (ignored with --data)")
    p.add_argument("--level", default="add1", help="arith: add1, add2, mul1, word or mix")
    p.add_argument("--data", default=None, help="local .jsonl/.parquet file with prompt and answer fields")
    p.add_argument(
        "--chat-template", action="store_true", help="wrap prompts with the tokenizer's chat template"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--split", default="test", help="built-in task split")
    p.add_argument("--data-seed", type=int, default=1234, help="seed of the built-in task's problems")
    p.add_argument("--n", type=int, default=n, help="problems")
    p.add_argument("--max-new-tokens", type=int, default=0, help="completion budget (0 = the task's)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def add_analyze_commands(subparsers) -> argparse.ArgumentParser:
    """Register `analyze` and its sub-commands on `forkrl`'s sub-parsers."""
    a = subparsers.add_parser(
        "analyze", help="entropy statistics, token view, checkpoint overlap, dual-temperature sweep"
    )
    sub = a.add_subparsers(dest="analyze_cmd", required=True)

    g = sub.add_parser("generate", help="sample responses and dump per-token entropy, log-prob, top-rho flag")
    g.add_argument("--model", default=None, help="local model folder (default: the shipped warm start)")
    _data_args(g, 32)
    g.add_argument("--k", type=int, default=4, help="samples per problem")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature T (H is at T)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument(
        "--rho", type=float, default=0.2, help="fraction of tokens flagged as selected (top entropy)"
    )
    g.add_argument("--top-alternatives", type=int, default=5, help="most likely tokens stored per position")
    g.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    g.add_argument("--out", default="analysis/dump.parquet", help="dump file (.parquet or .jsonl)")
    g.set_defaults(func=_cmd_generate)

    s = sub.add_parser("stats", help="entropy percentiles, histogram, forking-token tables and word clouds")
    s.add_argument("dump", help="dump file or folder of dumps")
    s.add_argument(
        "--rho", type=float, default=None, help="top/bottom fraction (default: the dump's rho or 0.2)"
    )
    s.add_argument("--top", type=int, default=30, help="rows of each token table")
    s.add_argument("--out-dir", default=None, help="output folder (default: <dump>_stats)")
    s.set_defaults(func=_cmd_stats)

    v = sub.add_parser("view", help="self-contained HTML page of tokens coloured by entropy")
    v.add_argument("dump", help="dump file or folder of dumps")
    v.add_argument("--out", default="view.html", help="HTML file")
    v.add_argument("--max-rows", type=int, default=50, help="responses shown")
    v.set_defaults(func=_cmd_view)

    o = sub.add_parser(
        "overlap", help="overlap of the top-rho entropy positions of checkpoints on the same responses"
    )
    o.add_argument(
        "checkpoints", nargs="+", metavar="CKPT", help="model folders; the first samples the responses"
    )
    _data_args(o, 32)
    o.add_argument("--k", type=int, default=4, help="samples per problem")
    o.add_argument("--temperature", type=float, default=1.0, help="sampling and scoring temperature")
    o.add_argument("--rho", type=float, default=0.2, help="top fraction compared")
    o.add_argument("--labels", nargs="+", default=None, help="plot labels, one per checkpoint")
    o.add_argument("--out-dir", default="analysis/overlap", help="output folder (overlap.json, overlap.png)")
    o.set_defaults(func=_cmd_overlap)

    w = sub.add_parser("sweep", help="accuracy grid of dual-temperature decoding (T_high at forking steps)")
    w.add_argument("--model", default=None, help="local model folder (default: the shipped warm start)")
    _data_args(w, 100)
    w.add_argument(
        "--t-high", type=float, nargs="+", default=[0.7, 1.0, 1.3], help="temperatures where H >= threshold"
    )
    w.add_argument(
        "--t-low", type=float, nargs="+", default=[0.7, 1.0, 1.3], help="temperatures where H < threshold"
    )
    w.add_argument(
        "--threshold", type=float, default=None, help="entropy threshold at T=1 (default: 80th percentile)"
    )
    w.add_argument("--k", type=int, default=4, help="samples per problem (avg@k)")
    w.add_argument("--batch-size", type=int, default=256, help="sequences per generate call")
    w.add_argument("--out-dir", default="analysis/sweep", help="output folder (sweep.json, sweep.png)")
    w.set_defaults(func=_cmd_sweep)
    return a


def add_report_command(subparsers) -> argparse.ArgumentParser:
    """Register `report` on `forkrl`'s sub-parsers."""
    r = subparsers.add_parser("report", help="self-contained HTML report of the training metrics of runs")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (with metrics.jsonl)")
    r.add_argument("--out", default="report.html", help="HTML file")
    r.add_argument("--labels", nargs="+", default=None, help="one label per run (default: folder names)")
    r.set_defaults(func=_cmd_report)
    return r
