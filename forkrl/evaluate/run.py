"""Sampling and grading: n completions per problem, each graded as training grades it, then summarized.

Seeds: see the `forkrl.evaluate` docstring.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from forkrl.evaluate.data import Benchmark
from forkrl.evaluate.report import RESULTS_FILE, k_values, pass_at_k, summarize
from forkrl.rewards import call_reward, is_correct, task_reward
from forkrl.rollout.base import Rollout
from forkrl.rollout.hf import generate
from forkrl.tasks.base import Example

#: grades one chunk: (examples, their completions with n in a row per example, n) -> a grade per completion
Scorer = Callable[[list[Example], list[str], int], list[float]]


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


class EvalInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during an evaluation: `results` holds the problems graded before it (already
    streamed to results.jsonl), `total` how many were asked for; `summary` (evaluate_benchmarks) the
    summary over them."""

    def __init__(self, results: list, total: int):
        super().__init__(f"interrupted after {len(results)} of {total} problems")
        self.results, self.total, self.summary, self.out_dir = results, total, None, None

    def kept(self) -> str:
        """What the user keeps, for `forkrl: interrupted...`."""
        if not self.results:
            return " (nothing was written)"
        where = (
            f"; their results are in {self.out_dir}/{{results.jsonl,summary.json}}" if self.out_dir else ""
        )
        return f" after grading {len(self.results)} of {self.total} problems{where}"


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
    generate_fn: Callable[..., Rollout] | None = None,
) -> list[ProblemResult]:
    """Sample `n` completions per problem (one if `greedy`) and grade them; seeds as in the module docstring.

    `batch_size` is in sequences (problems per call: `batch_size // n`); `on_batch` sees each chunk's
    results as soon as they are graded (e.g. to stream them to a file). `generate_fn` is a rollout
    backend (`forkrl.rollout.vllm.VLLMRollout`: `fn(prompts, n=, temperature=, top_p=,
    max_new_tokens=, seed=, greedy=)`); None = the HF backend on `model`.
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
    with (
        torch.random.fork_rng(devices=rng_devices),
        _progress_bar(total, progress) as advance,
        _on_interrupt(results, total),
    ):
        offset = 0
        for b in benchmarks:
            for start in range(0, len(b.examples), per_call):
                chunk = b.examples[start : start + per_call]
                prompts, kw = (
                    [e.prompt for e in chunk],
                    dict(n=n, greedy=greedy, max_new_tokens=max_new_tokens),
                )
                kw.update(temperature=temperature, top_p=top_p)
                if generate_fn is None:
                    ro = generate(model, tokenizer, prompts, **kw, generator_seed=seed + offset + start)
                else:
                    ro = generate_fn(prompts, **kw, seed=(seed + offset + start) * n)
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


@contextlib.contextmanager
def _on_interrupt(results: list, total: int):
    try:
        yield
    except EvalInterrupted:
        raise
    except KeyboardInterrupt:
        raise EvalInterrupted(results, total) from None


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
    generate_fn: Callable[..., Rollout] | None = None,
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

        try:
            results = sample_and_grade(
                model,
                tokenizer,
                benchmarks,
                scorer,
                n=n,
                greedy=greedy,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                seed=seed,
                on_batch=on_batch,
                progress=progress,
                generate_fn=generate_fn,
            )
        except EvalInterrupted as e:  # the summary of what was graded, marked as such
            if e.results:
                e.summary = _summary(e.results, n, greedy, settings)
                e.summary.update(interrupted=True, problems_asked=e.total)
            raise
    summary = _summary(results, n, greedy, settings)
    return summary, results


def _summary(results: list[ProblemResult], n: int, greedy: bool, settings) -> dict[str, Any]:
    summary = {"settings": dict(settings or {}), **summarize(results, n)}
    overall = summary["overall"]
    summary.update(accuracy=overall[f"avg@{n}"], n=overall["problems"])
    if not greedy:
        summary[f"pass@{n}"] = overall[f"pass@{n}"]
    return summary


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
    generate_fn=None,
) -> dict:
    """Accuracy of `model` on `examples` graded by `task.grade`.

    "accuracy" is the fraction of correct answers (`forkrl.rewards.is_correct`), not the mean grade:
    greedy, one completion each; sampled, avg@k over the k completions of each problem, with "pass@k"
    the unbiased estimator averaged over problems.
    """
    n = 1 if greedy else k
    results = sample_and_grade(
        model,
        tokenizer,
        [Benchmark(task.name, list(examples))],
        task_scorer(task),
        n=n,
        greedy=greedy,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens or task.default_max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        generate_fn=generate_fn,
    )
    samples = sum(len(r.scores) for r in results)
    out = {"accuracy": sum(r.n_correct for r in results) / max(1, samples), "n": len(examples)}
    if not greedy:
        out[f"pass@{k}"] = sum(pass_at_k(n, r.n_correct, k) for r in results) / max(1, len(results))
    return out
