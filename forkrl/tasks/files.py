"""Local training files: `.jsonl` or `.parquet` rows with a prompt and an answer.

Two layouts are read: simple rows `{"prompt": "...", "answer": "..."}` (field names configurable),
and the DAPO-Math-17k layout (`prompt` as a list of chat messages, `reward_model.ground_truth`).
Every malformed row is reported with the file, the row number (1-based) and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from forkrl.tasks.base import Example


class DataError(ValueError):
    """A row that cannot be used; the message names the file, the row and the field."""


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    if path.suffix == ".jsonl":
        rows = []
        with open(path, "rb") as fh:
            for i, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    rows.append((i, DataError(f"{path}:{i}: undecodable text ({e})")))
                    continue
                if not line.strip():
                    continue
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    rows.append((i, DataError(f"{path}:{i}: not valid JSON ({e.msg})")))
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")


def _prompt_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        # DAPO layout: chat messages; the user turn is the prompt.
        users = [m["content"] for m in value if m.get("role", "user") == "user"]
        return users[-1] if users else None
    return None


def _answer_text(row: dict, field: str) -> Any:
    if field in row:
        return row[field]
    rm = row.get("reward_model")
    if isinstance(rm, dict) and "ground_truth" in rm:
        return rm["ground_truth"]
    return None


def load_examples(path: str | Path, *, prompt_field: str = "prompt", answer_field: str = "answer",
                  on_error: str = "raise", dedupe: bool = True) -> list[Example]:
    """Examples from a local file; `on_error="skip"` drops bad rows and reports how many."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    examples: list[Example] = []
    seen: set[tuple[str, str]] = set()
    skipped = 0
    for i, row in _read_rows(path):
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected an object, got {type(row).__name__}")
            if prompt_field not in row:
                raise DataError(f"{path}:{i}: missing field {prompt_field!r}")
            prompt = _prompt_text(row[prompt_field])
            if prompt is None:
                raise DataError(f"{path}:{i}: field {prompt_field!r} must be a string or a list of chat messages, "
                                f"got {type(row[prompt_field]).__name__}")
            answer = _answer_text(row, answer_field)
            if answer is None:
                raise DataError(f"{path}:{i}: missing field {answer_field!r} (or reward_model.ground_truth)")
            if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
                raise DataError(f"{path}:{i}: field {answer_field!r} must be a string or number, "
                                f"got {type(answer).__name__}")
            if not prompt.strip():
                raise DataError(f"{path}:{i}: field {prompt_field!r} is empty")
            if not str(answer).strip():
                raise DataError(f"{path}:{i}: field {answer_field!r} is empty")
        except DataError:
            if on_error == "skip":
                skipped += 1
                continue
            raise
        key = (prompt, str(answer))
        if dedupe and key in seen:
            continue  # DAPO-Math-17k repeats each prompt ~100 times
        seen.add(key)
        extra = {k: v for k, v in row.items() if k not in (prompt_field, answer_field) and isinstance(v, (str, int, float))}
        examples.append(Example(prompt=prompt, answer=str(answer), fields=extra))
    if skipped:
        print(f"{path}: skipped {skipped} malformed row(s) (data.on_error=skip)")
    return examples
