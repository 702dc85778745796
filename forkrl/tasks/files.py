"""Local training files: `.jsonl` or `.parquet` rows with a prompt and an answer.

Layouts read:

- simple rows `{"prompt": "...", "answer": "..."}` or `{"problem": "...", "answer": "..."}` (field names
  configurable; with the default `prompt_field="prompt"`, a row without `prompt` may use `problem`);
- the DAPO-Math-17k layout: `prompt` is a list of chat messages (the last user turn becomes the prompt),
  the answer is `reward_model.ground_truth`, and `data_source` / `ability` are kept in `Example.fields`.

A malformed row (missing or mistyped field, empty prompt or answer, undecodable text, bad JSON) raises
`DataError` naming the file, the 1-based row (the line number for `.jsonl`) and the field;
`on_error="skip"` drops it and logs how many were dropped (`return_skipped=True` returns the count).
A file with no usable row (empty, or every row skipped) raises `DataError` naming it.
Duplicate (prompt, answer) rows are dropped by default: the public DAPO-Math-17k parquet repeats each
of its ~17k prompts about 100 times.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from forkrl.tasks.base import Example

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")

#: The DAPO prompt (DAPO-Math-17k rows carry it already; apply it to plain problems for DAPO's
#: `Answer:` format and `dapo_reward`). Same text as in DAPO-Math-17k and verl's DAPO recipe.
DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    "{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)

_PARQUET_BATCH_ROWS = 65_536


class DataError(ValueError):
    """A row that cannot be used; the message names the file, the row and the field."""


# ---------------------------------------------------------------------------------------------- templates


def apply_dapo_template(problem: str, template: str = DAPO_TEMPLATE) -> str:
    """`problem` inside the template's `{problem}` slot; a prompt that already has the template is returned as is.

    >>> p = apply_dapo_template("What is $1+1$?")
    >>> p.splitlines()[2], apply_dapo_template(p) == p
    ('What is $1+1$?', True)
    """
    head, _, tail = template.partition("{problem}")
    if problem.startswith(head) and problem.endswith(tail):
        return problem
    return head + problem + tail  # not str.format: problems are full of LaTeX braces


def strip_dapo_template(prompt: str, template: str = DAPO_TEMPLATE) -> str:
    """The problem inside a templated prompt (the prompt itself when it does not carry the template)."""
    head, _, tail = template.partition("{problem}")
    if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) >= len(head) + len(tail):
        return prompt[len(head) : len(prompt) - len(tail)]
    return prompt


def with_template(examples: list[Example], template: str = DAPO_TEMPLATE) -> list[Example]:
    """The examples with `template` applied to each prompt (idempotent)."""
    return [Example(apply_dapo_template(e.prompt, template), e.answer, dict(e.fields)) for e in examples]


def apply_chat_template(tokenizer: Any, prompt: str | list[dict]) -> str:
    """The prompt (text, or chat messages) rendered with the tokenizer's chat template, ready for generation."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no chat template: use an instruct/chat model's tokenizer, set "
            "tokenizer.chat_template, or feed raw prompts (model.chat_template=false)"
        )
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def repeat_examples(examples: list[Example], k: int) -> list[Example]:
    """Each example `k` times in a row (e.g. AIME x 32 for avg@32); the same objects, not copies.

    >>> [e.answer for e in repeat_examples([Example("a", "1"), Example("b", "2")], 2)]
    ['1', '1', '2', '2']
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"repeat count k={k!r} must be an integer >= 1")
    return [e for e in examples for _ in range(k)]


# ---------------------------------------------------------------------------------------------- reading


def _bad(path: Path, row: int, field: str | None, what: str) -> DataError:
    where = f"{path}: row {row}" + (f": field {field!r}" if field else "")
    return DataError(f"{where}: {what}")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, _bad(path, i, None, f"undecodable text, not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, _bad(path, i, None, f"not valid JSON ({e.msg} at column {e.colno})")


def _parquet_rows(path: Path, wanted: set[str]) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install 'forkrl[parquet]')") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    # Only the columns we use, plus flat scalar ones kept in Example.fields; never the whole table at once.
    scalar = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_floating)
    columns = [f.name for f in pf.schema_arrow if f.name in wanted or any(t(f.type) for t in scalar)]
    i = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
        for row in batch.to_pylist():
            i += 1
            yield i, row


def _text(path: Path, i: int, field: str, value: Any) -> str:
    """A non-empty, encodable string field."""
    if not isinstance(value, str):
        raise _bad(path, i, field, f"must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(path, i, field, "undecodable text (a lone surrogate escape such as \\ud800)") from None
    if not value.strip():
        raise _bad(path, i, field, "is empty")
    return value


def _prompt(path: Path, i: int, field: str, value: Any) -> tuple[str, list[dict] | None]:
    """(prompt text, the full message list when it had more than the one user turn)."""
    if isinstance(value, str):
        return _text(path, i, field, value), None
    if not isinstance(value, list):
        raise _bad(path, i, field, f"must be a string or a list of chat messages, got {type(value).__name__}")
    if not value:
        raise _bad(path, i, field, "is an empty list of chat messages")
    user = None
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "content" not in m:
            raise _bad(path, i, f"{field}[{j}]", 'must be a chat message {"role": ..., "content": ...}')
        if m.get("role", "user") == "user":
            user = _text(path, i, f"{field}[{j}].content", m["content"])
    if user is None:
        raise _bad(path, i, field, "has no user message")
    return user, (None if len(value) == 1 else value)


def _answer(path: Path, i: int, row: dict, field: str) -> str:
    if row.get(field) is not None:
        name, value = field, row[field]
    elif row.get("reward_model") is not None:  # the DAPO layout
        rm = row["reward_model"]
        if not isinstance(rm, dict) or "ground_truth" not in rm:
            raise _bad(path, i, "reward_model", 'must be an object with "ground_truth" (the DAPO layout)')
        name, value = "reward_model.ground_truth", rm["ground_truth"]
        if value is None:
            raise _bad(path, i, name, "is null")
    else:
        raise _bad(
            path, i, field, ("is null" if field in row else "missing") + " (and no reward_model.ground_truth)"
        )
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _bad(path, i, name, f"must be a string or number, got {type(value).__name__}")
    return _text(path, i, name, str(value))


def _example(path: Path, i: int, row: Any, prompt_field: str, answer_field: str) -> Example:
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise _bad(path, i, None, f"must be a JSON object, got {type(row).__name__}")
    field = prompt_field
    if field not in row and prompt_field == "prompt" and "problem" in row:
        field = "problem"  # the {problem, answer} layout (MATH, AIME files)
    if row.get(field) is None:
        raise _bad(path, i, prompt_field, "is null" if field in row else "missing")
    prompt, messages = _prompt(path, i, field, row[field])
    answer = _answer(path, i, row, answer_field)
    fields = {
        k: v
        for k, v in row.items()
        if k not in (field, answer_field) and isinstance(v, (str, int, float)) and not isinstance(v, bool)
    }  # data_source, ability, ...
    if messages is not None:
        fields["messages"] = messages
    return Example(prompt=prompt, answer=answer, fields=fields)


def load_examples(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    on_error: str = "raise",
    dedupe: bool = True,
    return_skipped: bool = False,
) -> list[Example] | tuple[list[Example], int]:
    """Examples from a local `.jsonl` or `.parquet` file.

    Args:
        path: the file.
        prompt_field: the prompt column (a string or a list of chat messages).
        answer_field: the answer column; DAPO rows fall back to `reward_model.ground_truth`.
        on_error: `"raise"` (`DataError` on the first bad row) or `"skip"` (drop bad rows, log the count).
        dedupe: drop repeated (prompt, answer) rows, keeping the first.
        return_skipped: return `(examples, n_skipped)` instead of the list.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; allowed: {', '.join(ON_ERROR)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix == ".parquet":
        rows = _parquet_rows(path, {prompt_field, "problem", answer_field, "reward_model"})
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")

    examples: list[Example] = []
    seen: set[tuple[str, str]] = set()
    skipped = duplicates = 0
    first_error = None
    for i, row in rows:
        try:
            ex = _example(path, i, row, prompt_field, answer_field)
        except DataError as e:
            if on_error == "raise":
                raise
            if skipped == 0:
                first_error = e
                log.warning("skipping malformed rows (data.on_error=skip); the first: %s", e)
            skipped += 1
            continue
        if dedupe:
            key = (ex.prompt, ex.answer)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
        examples.append(ex)
    if not examples:  # an empty list would fail later, far from the file
        if skipped:
            raise DataError(
                f"{path}: every row is malformed ({skipped} skipped, data.on_error=skip); the first: {first_error}"
            )
        raise DataError(f"{path}: no rows; give a file with one example a row")
    if skipped:
        log.warning("%s: skipped %d malformed row(s) (data.on_error=skip)", path, skipped)
    if duplicates:
        log.info("%s: dropped %d duplicate row(s), kept %d", path, duplicates, len(examples))
    return (examples, skipped) if return_skipped else examples
