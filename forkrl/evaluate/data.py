"""Benchmarks: the problems of local files (or a task's split), grouped and formatted for the model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from forkrl.errors import ConfigError
from forkrl.tasks.base import Example
from forkrl.tasks.files import (
    DataError,
    load_examples,
    strip_dapo_template,
)
from forkrl.tasks.prompts import format_example

GROUP_BY = ("source", "file")


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


def format_prompts(
    benchmarks: list[Benchmark], tokenizer=None, *, chat_template: bool = False, dapo_template: bool = False
) -> list[Benchmark]:
    """The benchmarks with DAPO's prompt template (idempotent) and then the chat template applied."""
    if not (chat_template or dapo_template):
        return benchmarks
    return [
        Benchmark(
            b.name,
            [
                format_example(e, tokenizer, chat_template=chat_template, dapo_template=dapo_template)
                for e in b.examples
            ],
            b.problems,
            b.files,
        )
        for b in benchmarks
    ]


def check_context(tokenizer, model, benchmarks: list[Benchmark], max_new_tokens: int) -> int:
    """Refuse, before sampling, a prompt that leaves no room for `max_new_tokens` in the model's context.

    Returns the longest sequence sampling will need: the longest prompt plus `max_new_tokens`.
    """
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = 0
    for b in benchmarks:
        ids = tokenizer([e.prompt for e in b.examples], add_special_tokens=False).input_ids
        if not ids:
            continue
        i = max(range(len(ids)), key=lambda j: len(ids[j]))
        longest = max(longest, len(ids[i]) + max_new_tokens)
        if limit and len(ids[i]) + max_new_tokens > limit:
            raise ConfigError(
                f"benchmark {b.name!r}: problem {i} ({b.files[i]}, {len(ids[i])} prompt tokens) plus "
                f"--max-new-tokens {max_new_tokens} exceeds the model's context of {limit} tokens; "
                "lower --max-new-tokens"
            )
    return longest
