"""Reporting: pass@k, the metrics of graded problems per benchmark, the table and the summary file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from math import comb
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forkrl.evaluate.run import ProblemResult

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


def write_summary(out_dir: str | Path, summary: dict[str, Any]) -> Path:
    """`summary.json` in `out_dir`."""
    path = Path(out_dir) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return path
