"""Held-out evaluation: avg@k and unbiased pass@k per benchmark, or greedy accuracy.

Modules: `data` (benchmarks from files, prompt formatting, context check), `run` (sampling and
grading: `sample_and_grade`, `evaluate_benchmarks`, `evaluate_task`) and `report` (pass@k, summaries,
the table). Everything public is importable from `forkrl.evaluate`.

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
`generator_seed = seed + i` (HF backend). Through vLLM (`generate_fn`, `forkrl eval --backend vllm`)
each of that chunk's rows is sampled with its own seed, `(seed + i) * n + r` for its r-th row, so no
two rows share one. The same model, data, batch size, seed and backend give the same completions;
the two backends' samples differ (their kernels and samplers are not the same).
"""

from forkrl.evaluate.data import GROUP_BY, Benchmark, check_context, format_prompts, load_benchmarks
from forkrl.evaluate.report import (
    RESULTS_FILE,
    SUMMARY_FILE,
    k_values,
    pass_at_k,
    summarize,
    summary_table,
    write_summary,
)
from forkrl.evaluate.run import (
    EvalInterrupted,
    ProblemResult,
    Scorer,
    evaluate_benchmarks,
    evaluate_task,
    reward_scorer,
    sample_and_grade,
    task_scorer,
)
from forkrl.rewards.registry import CORRECT, REWARDS  # the threshold and the `--reward` names

__all__ = [
    "CORRECT",
    "GROUP_BY",
    "RESULTS_FILE",
    "REWARDS",
    "SUMMARY_FILE",
    "Benchmark",
    "EvalInterrupted",
    "ProblemResult",
    "Scorer",
    "check_context",
    "evaluate_benchmarks",
    "evaluate_task",
    "format_prompts",
    "k_values",
    "load_benchmarks",
    "pass_at_k",
    "reward_scorer",
    "sample_and_grade",
    "summarize",
    "summary_table",
    "task_scorer",
    "write_summary",
]
