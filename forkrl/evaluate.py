"""Held-out evaluation: avg@k and unbiased pass@k per benchmark, or greedy accuracy.

A *benchmark* is a named list of problems: a built-in task's test split, or the rows of local files
(one benchmark per file, or per `data_source` value in the DAPO layout). Each problem is answered n
times (or once, greedily), each answer is graded, and every benchmark (and all problems pooled) gets

- avg@n: the share of correct samples (the paper's validation metric; its scripts use avg@32 on AIME);
- pass@k for k = 1, 2, 4, ... below n, and n: the unbiased estimator of Chen et al. (2021),
  averaged over problems (pass@1 equals avg@n).

A sample is correct when `forkrl.rewards.is_correct(grade)`: a grade >= 0.5, so 1/0 graders and
DAPO's +1/-1 reward both count right, in evaluation as in training.

Seeds: each benchmark's problems go to the sampler in chunks of `batch_size // n` problems, and the
chunk whose first problem is the i-th problem overall (benchmarks in order, 0-based) is sampled with
`generator_seed = seed + i`. The same model, data, batch size and seed give the same completions.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import Any

import torch

from forkrl.errors import ConfigError
from forkrl.rewards import call_reward, is_correct, task_reward
from forkrl.rewards.registry import CORRECT, REWARDS  # noqa: F401  (forkrl.evaluate.CORRECT, .REWARDS: as before)
from forkrl.rollout.hf import generate
from forkrl.tasks.base import Example
from forkrl.tasks.files import (
    DataError,
    apply_chat_template,
    apply_dapo_template,
    load_examples,
    strip_dapo_template,
)

#: grades one chunk: (examples, their completions with n in a row per example, n) -> a grade per completion
Scorer = Callable[[list[Example], list[str], int], list[float]]

GROUP_BY = ("source", "file")
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(4, 0, 2)
    (0.25, 1.0, 0.0)
    """
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def k_values(n: int) -> list[int]:
    """The k of the pass@k reported for n samples per problem: powers of two below n, then n.

    >>> k_values(16), k_values(6), k_values(1)
    ([1, 2, 4, 8, 16], [1, 2, 4, 6], [1])
    """
    if n < 1:
        raise ValueError(f"samples per problem n={n} must be >= 1")
    return [1 << i for i in range(n.bit_length()) if 1 << i < n] + [n]


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Benchmark:
    """Problems reported together. `examples` hold the prompts exactly as the model sees them."""

    name: str
    examples: list[Example]
    problems: list[str] | None = None  # the problem as shown in the results (default: the prompt)
    files: list[str] | None = None  # where each problem came from

    def __post_init__(self):
        self.problems = self.problems or [e.prompt for e in self.examples]
        self.files = self.files or [""] * len(self.examples)


def _file_names(paths: list[Path]) -> dict[Path, str]:
    """Benchmark name of each file: its stem, or `folder/stem` where two stems are the same."""
    if len(set(paths)) < len(paths):
        twice = next(str(p) for p in paths if paths.count(p) > 1)
        raise DataError(f"data file {twice!r} is given twice")
    stems = [p.stem for p in paths]
    names = {p: p.stem if stems.count(p.stem) == 1 else f"{p.parent.name}/{p.stem}" for p in paths}
    if len(set(names.values())) < len(names):
        raise DataError(
            f"data files {', '.join(map(str, paths))} do not have distinct names; rename or move them"
        )
    return names


def load_benchmarks(
    paths: Sequence[str | Path],
    *,
    group_by: str = "source",
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    limit: int | None = None,
) -> list[Benchmark]:
    """Benchmarks from local `.jsonl` / `.parquet` files (both layouts of `forkrl.tasks.files`).

    `group_by="source"`: a row's benchmark is its `data_source` (the DAPO layout), else its file's
    stem; `"file"`: always the file's stem. `limit` keeps the first problems of each benchmark. A bad
    row raises `DataError` naming the file, the row and the field.
    """
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by={group_by!r}; allowed: {', '.join(GROUP_BY)}")
    if not paths:
        raise DataError("no data files given")
    paths = [Path(p) for p in paths]
    names = _file_names(paths)
    groups: dict[str, Benchmark] = {}
    for path in paths:
        examples = load_examples(path, prompt_field=prompt_field, answer_field=answer_field)
        if not examples:
            raise DataError(f"{path}: no rows")
        for e in examples:
            source = e.fields.get("data_source")
            name = str(source) if group_by == "source" and source not in (None, "") else names[path]
            b = groups.setdefault(name, Benchmark(name, [], [], []))
            b.examples.append(e)
            b.problems.append(strip_dapo_template(e.prompt))
            b.files.append(str(path))
    if limit is not None:
        for b in groups.values():
            b.examples, b.problems, b.files = b.examples[:limit], b.problems[:limit], b.files[:limit]
    return list(groups.values())


def _format(e: Example, tokenizer, chat_template: bool, dapo_template: bool) -> Example:
    text = apply_dapo_template(e.prompt) if dapo_template else e.prompt
    if not chat_template:
        return Example(text, e.answer, e.fields)
    messages = e.fields.get("messages")
    if messages:  # a DAPO row with several turns (e.g. a system prompt): its last user turn is `text`
        messages = [dict(m) for m in messages]
        last_user = max(i for i, m in enumerate(messages) if m.get("role", "user") == "user")
        messages[last_user]["content"] = text
    return Example(apply_chat_template(tokenizer, messages or text), e.answer, e.fields)


def format_prompts(
    benchmarks: list[Benchmark], tokenizer=None, *, chat_template: bool = False, dapo_template: bool = False
) -> list[Benchmark]:
    """The benchmarks with DAPO's prompt template (idempotent) and then the chat template applied."""
    if not (chat_template or dapo_template):
        return benchmarks
    return [
        Benchmark(
            b.name,
            [_format(e, tokenizer, chat_template, dapo_template) for e in b.examples],
            b.problems,
            b.files,
        )
        for b in benchmarks
    ]


def check_context(tokenizer, model, benchmarks: list[Benchmark], max_new_tokens: int) -> None:
    """Refuse, before sampling, a prompt that leaves no room for `max_new_tokens` in the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return
    for b in benchmarks:
        ids = tokenizer([e.prompt for e in b.examples], add_special_tokens=False).input_ids
        if not ids:
            continue
        i = max(range(len(ids)), key=lambda j: len(ids[j]))
        if len(ids[i]) + max_new_tokens > limit:
            raise ConfigError(
                f"benchmark {b.name!r}: problem {i} ({b.files[i]}, {len(ids[i])} prompt tokens) plus "
                f"--max-new-tokens {max_new_tokens} exceeds the model's context of {limit} tokens; "
                "lower --max-new-tokens"
            )


# ---------------------------------------------------------------------------------------------- grading


def task_scorer(task) -> Scorer:
    """A built-in task's `grade(completion, example)` as a reward (`forkrl.rewards.task_reward`), called
    in this process (it cannot hang)."""
    return reward_scorer(task_reward(task))


def reward_scorer(reward_fn) -> Scorer:
    """A TRL-style reward `(prompts, completions, answer=[...], **row_fields)`, e.g. a `RewardPool`,
    called as training calls it (`forkrl.rewards.call_reward`)."""

    def score(examples: list[Example], completions: list[str], n: int) -> list[float]:
        return call_reward(reward_fn, examples, completions, n)

    return score


# ---------------------------------------------------------------------------------------------- sampling


@dataclass
class ProblemResult:
    """One problem's samples and grades."""

    benchmark: str
    index: int  # position in its benchmark, 0-based
    example: Example
    problem: str
    file: str
    completions: list[str]
    scores: list[float]  # the grader's value per sample
    lengths: list[int]  # response tokens per sample (EOS included)
    truncated: list[bool]  # no EOS within the budget

    @property
    def n_correct(self) -> int:
        return sum(bool(is_correct(s)) for s in self.scores)

    def row(self, ks: Sequence[int]) -> dict[str, Any]:
        """The results-file line: metrics first, the long texts last."""
        n = len(self.scores)
        return {
            "benchmark": self.benchmark,
            "index": self.index,
            "problem": self.problem,
            "answer": self.example.answer,
            "avg": self.n_correct / n,
            **{f"pass@{k}": pass_at_k(n, self.n_correct, k) for k in ks},
            "scores": self.scores,
            "correct": [bool(is_correct(s)) for s in self.scores],
            "lengths": self.lengths,
            "truncated": self.truncated,
            "file": self.file,
            "prompt": self.example.prompt,
            "completions": self.completions,
        }


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Callable[[str, int, float], None]]:
    """A rich bar over problems on stderr (stdout stays for the JSON summary); yields `advance(name, k, avg)`."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]eval[/] {task.fields[bench]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("avg {task.fields[avg]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    ) as p:
        task = p.add_task("eval", total=total, bench="", avg="  -  ")

        def advance(name: str, k: int, avg: float) -> None:
            p.update(task, advance=k, bench=name, avg=f"{avg:.3f}")

        yield advance


@torch.no_grad()
def sample_and_grade(
    model,
    tokenizer,
    benchmarks: list[Benchmark],
    scorer: Scorer,
    *,
    n: int = 1,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 512,
    batch_size: int = 64,
    seed: int = 0,
    on_batch: Callable[[list[ProblemResult]], None] | None = None,
    progress: bool = False,
) -> list[ProblemResult]:
    """Sample `n` completions per problem (one if `greedy`) and grade them; seeds as in the module docstring.

    `batch_size` is in sequences (problems per call: `batch_size // n`); `on_batch` sees each chunk's
    results as soon as they are graded (e.g. to stream them to a file).
    """
    if greedy:
        n = 1
    per_call = max(1, batch_size // n)
    device = next(model.parameters()).device
    results: list[ProblemResult] = []
    n_correct = 0
    # Evaluation must not shift the caller's random stream (generate() reseeds the global generators).
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    total = sum(len(b.examples) for b in benchmarks)
    with torch.random.fork_rng(devices=rng_devices), _progress_bar(total, progress) as advance:
        offset = 0
        for b in benchmarks:
            for start in range(0, len(b.examples), per_call):
                chunk = b.examples[start : start + per_call]
                ro = generate(
                    model,
                    tokenizer,
                    [e.prompt for e in chunk],
                    n=n,
                    greedy=greedy,
                    temperature=temperature,
                    top_p=top_p,
                    max_new_tokens=max_new_tokens,
                    generator_seed=seed + offset + start,
                )
                scores = [float(s) for s in scorer(chunk, ro.texts, n)]
                if len(scores) != len(ro.texts):
                    raise ValueError(
                        f"the grader returned {len(scores)} grades for {len(ro.texts)} completions"
                    )
                lengths, truncated = ro.lengths.tolist(), ro.truncated.tolist()
                batch = [
                    ProblemResult(
                        benchmark=b.name,
                        index=start + i,
                        example=e,
                        problem=b.problems[start + i],
                        file=b.files[start + i],
                        completions=ro.texts[i * n : (i + 1) * n],
                        scores=scores[i * n : (i + 1) * n],
                        lengths=lengths[i * n : (i + 1) * n],
                        truncated=truncated[i * n : (i + 1) * n],
                    )
                    for i, e in enumerate(chunk)
                ]
                results += batch
                n_correct += sum(r.n_correct for r in batch)
                if on_batch is not None:
                    on_batch(batch)
                advance(b.name, len(chunk), n_correct / (len(results) * n))
            offset += len(b.examples)
    return results


# ---------------------------------------------------------------------------------------------- reporting


def _metrics(results: Sequence[ProblemResult], n: int, ks: Sequence[int]) -> dict[str, float]:
    m = max(1, len(results))
    samples = max(1, sum(len(r.scores) for r in results))
    return {
        "problems": len(results),
        f"avg@{n}": sum(r.n_correct for r in results) / samples,
        **{f"pass@{k}": sum(pass_at_k(n, r.n_correct, k) for r in results) / m for k in ks},
        "mean_length": sum(sum(r.lengths) for r in results) / samples,
        "truncated": sum(sum(r.truncated) for r in results) / samples,
    }


def summarize(results: Sequence[ProblemResult], n: int) -> dict[str, Any]:
    """Metrics per benchmark (in order of appearance), over all problems pooled ("overall") and, with
    several benchmarks, the plain mean of the per-benchmark values ("mean_of_benchmarks", the "average"
    column of papers)."""
    ks = k_values(n)
    groups: dict[str, list[ProblemResult]] = {}
    for r in results:
        groups.setdefault(r.benchmark, []).append(r)
    per = {name: _metrics(rs, n, ks) for name, rs in groups.items()}
    out: dict[str, Any] = {"benchmarks": per, "overall": _metrics(results, n, ks)}
    if len(per) > 1:
        keys = [key for key in out["overall"] if key != "problems"]
        out["mean_of_benchmarks"] = {
            "problems": len(results),
            **{key: sum(m[key] for m in per.values()) / len(per) for key in keys},
        }
    return out


def summary_table(summary: dict[str, Any], n: int, title: str | None = None):
    """A rich Table of a `summarize` result: one row per benchmark, then the pooled and mean rows."""
    from rich.table import Table

    ks = [k for k in k_values(n) if k > 1]  # pass@1 is avg@n
    table = Table(title=title, caption="pass@1 = avg@n; pass@k unbiased (Chen et al., 2021)" if ks else None)
    table.add_column("benchmark")
    table.add_column("problems", justify="right")
    table.add_column(f"avg@{n}" if n > 1 else "accuracy", justify="right")
    for k in ks:
        table.add_column(f"pass@{k}", justify="right")
    table.add_column("mean len", justify="right")
    table.add_column("truncated", justify="right")

    def add(name: str, m: dict, **kw) -> None:
        cells = [f"{m[f'avg@{n}']:.3f}", *(f"{m[f'pass@{k}']:.3f}" for k in ks)]
        table.add_row(
            name, str(m["problems"]), *cells, f"{m['mean_length']:.0f}", f"{m['truncated']:.1%}", **kw
        )

    for name, m in summary["benchmarks"].items():
        add(name, m)
    if len(summary["benchmarks"]) > 1:
        table.add_section()
        add("all problems", summary["overall"], style="bold")
        add("mean of benchmarks", summary["mean_of_benchmarks"], style="bold")
    return table


def evaluate_benchmarks(
    model,
    tokenizer,
    benchmarks: list[Benchmark],
    scorer: Scorer,
    *,
    n: int = 1,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 512,
    batch_size: int = 64,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = False,
    settings: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[ProblemResult]]:
    """Sample, grade and summarize. With `out_dir`, `results.jsonl` (a line per problem) is written as
    each chunk is graded; `write_summary` then saves the summary next to it.

    The summary is `{"settings": settings, **summarize(...)}` plus the keys earlier `forkrl eval` output
    had, over all problems: "accuracy" (avg@n), "n" (problems) and, when sampling, "pass@n".
    """
    n = 1 if greedy else n
    ks = k_values(n)
    with contextlib.ExitStack() as stack:
        on_batch = None
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            fh = stack.enter_context(open(out / RESULTS_FILE, "w", encoding="utf-8"))

            def on_batch(batch: list[ProblemResult]) -> None:
                fh.writelines(json.dumps(r.row(ks), ensure_ascii=False) + "\n" for r in batch)
                fh.flush()  # a long evaluation that dies keeps what it has graded

        results = sample_and_grade(
            model, tokenizer, benchmarks, scorer, n=n, greedy=greedy, temperature=temperature,
            top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
            on_batch=on_batch, progress=progress,
        )  # fmt: skip
    summary = {"settings": dict(settings or {}), **summarize(results, n)}
    overall = summary["overall"]
    summary.update(accuracy=overall[f"avg@{n}"], n=overall["problems"])
    if not greedy:
        summary[f"pass@{n}"] = overall[f"pass@{n}"]
    return summary, results


def write_summary(out_dir: str | Path, summary: dict[str, Any]) -> Path:
    """`summary.json` in `out_dir`."""
    path = Path(out_dir) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- built-in task


def evaluate_task(
    model,
    tokenizer,
    task,
    examples,
    *,
    greedy=True,
    k=1,
    temperature=1.0,
    top_p=1.0,
    max_new_tokens=None,
    batch_size=256,
    seed=0,
) -> dict:
    """Accuracy of `model` on `examples` graded by `task.grade`.

    "accuracy" is the fraction of correct answers (`forkrl.rewards.is_correct`), not the mean grade:
    greedy, one completion each; sampled, avg@k over the k completions of each problem, with "pass@k"
    the unbiased estimator averaged over problems.
    """
    n = 1 if greedy else k
    results = sample_and_grade(
        model, tokenizer, [Benchmark(task.name, list(examples))], task_scorer(task), n=n, greedy=greedy,
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens or task.default_max_new_tokens,
        batch_size=batch_size, seed=seed,
    )  # fmt: skip
    samples = sum(len(r.scores) for r in results)
    out = {"accuracy": sum(r.n_correct for r in results) / max(1, samples), "n": len(examples)}
    if not greedy:
        out[f"pass@{k}"] = sum(pass_at_k(n, r.n_correct, k) for r in results) / max(1, len(results))
    return out
