"""Local training data: `.jsonl` or `.parquet` rows with a prompt and an answer, or a Hugging Face dataset.

Sources read:

- a `.jsonl` or `.parquet` file;
- a folder written by `datasets`' `Dataset.save_to_disk` (read whole) or `DatasetDict.save_to_disk` (one
  split of it: `split`, by default `train`, or the only split there is);
- a dataset name such as `openai/gsm8k` (or `openai/gsm8k:main` for one configuration), read from the
  local Hugging Face datasets cache (`HF_DATASETS_CACHE`, else `HF_HOME/datasets`, else
  `~/.cache/huggingface/datasets`) without any download; a name not in the cache is a `DataError`
  saying where it looked and how to fill the cache.

Every source goes through the same row checks. Layouts read:

- simple rows `{"prompt": "...", "answer": "..."}` or `{"problem": "...", "answer": "..."}` (field names
  configurable; with the default `prompt_field="prompt"`, a row without `prompt` may use `problem`);
- the DAPO-Math-17k layout: `prompt` is a list of chat messages (the last user turn becomes the prompt),
  the answer is `reward_model.ground_truth`, and `data_source` / `ability` are kept in `Example.fields`.

A malformed row (missing or mistyped field, empty prompt or answer, undecodable text, bad JSON) raises
`DataError` naming the file (or the dataset and its split), the 1-based row (the line number for `.jsonl`) and the field;
`on_error="skip"` drops it and logs how many were dropped (`return_skipped=True` returns the count).
A file with no usable row (empty, or every row skipped) raises `DataError` naming it.
Duplicate (prompt, answer) rows are dropped by default: the public DAPO-Math-17k parquet repeats each
of its ~17k prompts about 100 times.
"""

from __future__ import annotations

import json
import logging
import os
import re
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


def _bad(path: Path | str, row: int, field: str | None, what: str) -> DataError:
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


def _need_datasets(source: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source}: reading a Hugging Face dataset needs the datasets package "
            "(pip install 'forkrl[datasets]')"
        ) from None
    return datasets


def _scalar_feature(feature: Any) -> bool:
    dtype = getattr(feature, "dtype", None)  # datasets.Value; lists, dicts and other features have none
    return isinstance(dtype, str) and (
        dtype in ("string", "large_string") or dtype.startswith(("int", "uint", "float"))
    )


def _dataset_rows(ds: Any, wanted: set[str]) -> Iterator[tuple[int, Any]]:
    """1-based (row, dict) of a `datasets.Dataset`: the columns we use and the flat scalar ones."""
    columns = [c for c, f in ds.features.items() if c in wanted or _scalar_feature(f)]
    ds = ds.select_columns(columns).with_format(None)
    i = 0
    for batch in ds.iter(batch_size=1024):
        n = len(next(iter(batch.values()))) if batch else 0
        for j in range(n):
            i += 1
            yield i, {c: batch[c][j] for c in columns}


def _pick_split(source: str, splits: list[str], split: str | None) -> str:
    if split is None:
        split = "train" if "train" in splits or len(splits) != 1 else splits[0]
        if len(splits) > 1 and split in splits:  # say which one, so an evaluation on train shows
            log.warning(
                "%s: reading its split %r of %s (no split was asked for)", source, split, ", ".join(splits)
            )
    if split not in splits:
        raise DataError(
            f"{source}: no split {split!r}; its splits are {', '.join(map(repr, splits)) or 'none'}"
        )
    return split


def _saved_rows(path: Path, split: str | None, wanted: set[str]) -> tuple[str, Iterator[tuple[int, Any]]]:
    """A folder written by `Dataset.save_to_disk` (read whole) or `DatasetDict.save_to_disk` (one split)."""
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise DataError(
            f"{path}: a folder, but not one written by Dataset.save_to_disk or DatasetDict.save_to_disk "
            "(no dataset_dict.json or state.json in it); give a .jsonl or .parquet file or such a folder"
        )
    datasets = _need_datasets(str(path))
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable datasets folder ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        name = _pick_split(str(path), list(ds), split)
        return f"{path} (split {name!r})", _dataset_rows(ds[name], wanted)
    return str(path), _dataset_rows(ds, wanted)


#: `owner/name`, `name`, with an optional `:config`: what `data.path` may name in the datasets cache.
_DATASET_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?")


def looks_like_dataset_name(text: str) -> bool:
    """Whether `text` (that is no file or folder) can name a Hugging Face dataset: `owner/name[:config]`.

    >>> looks_like_dataset_name("openai/gsm8k:main"), looks_like_dataset_name("train.jsonl")
    (True, False)
    """
    return bool(_DATASET_NAME.fullmatch(text)) and Path(text.partition(":")[0]).suffix not in (
        ".jsonl",
        ".parquet",
        ".json",
        ".csv",
    )


def datasets_cache_dir() -> Path:
    """The Hugging Face datasets cache folder, as `datasets` finds it (read now, not at import)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "datasets"


def _cached_rows(spec: str, split: str | None, wanted: set[str]) -> tuple[str, Iterator[tuple[int, Any]]]:
    """Rows of dataset `owner/name[:config]` from the local datasets cache, never downloading."""
    name, _, config = spec.partition(":")
    _need_datasets(repr(name))
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.cache.cache import Cache

    parts = name.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    cache = datasets_cache_dir()
    folder = cache / "___".join(parts)  # where load_dataset(name) keeps its prepared Arrow files
    if not folder.is_dir():
        fetch = f"datasets.load_dataset({name!r}" + (f", {config!r}" if config else "") + ")"
        raise DataError(
            f"{spec!r} is not a file or folder, and dataset {name!r} is not in the local Hugging Face datasets "
            f'cache (looked for {folder}); forkrl never downloads: run `python -c "import datasets; {fetch}"` '
            "once where there is network (with the same HF_HOME / HF_DATASETS_CACHE), or point "
            "HF_DATASETS_CACHE at a cache that has it, or give a .jsonl/.parquet file or a save_to_disk folder"
        )
    try:
        builder = Cache(
            cache_dir=str(cache),
            repo_id=name if "/" in name else None,
            dataset_name=parts[-1],
            config_name=config or None,
            version="auto",
            hash="auto",
        )
        splits = list(builder.info.splits or {})
        source = f"{name}" + (f":{config}" if config else "")
        picked = _pick_split(source, splits, split)
        ds = builder.as_dataset(split=picked)
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = " ".join(str(e).split())
        if "multiple" in msg and "configurations" in msg:
            msg += f"; give one as data.path={name}:CONFIG"
        raise DataError(f"dataset {spec!r} in the datasets cache {folder}: {msg}") from None
    return f"{source} (split {picked!r})", _dataset_rows(ds, wanted)


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
    path: str | Path | Any,
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    on_error: str = "raise",
    dedupe: bool = True,
    return_skipped: bool = False,
    split: str | None = None,
) -> list[Example] | tuple[list[Example], int]:
    """Examples from a local `.jsonl` or `.parquet` file, a `save_to_disk` folder, a cached dataset, or
    rows in memory (a `datasets.Dataset`, a list of dicts), checked and named alike.

    Args:
        path: the file, the folder, a dataset name `owner/name[:config]` in the local datasets cache, or
            a `datasets.Dataset` / list of dicts.
        prompt_field: the prompt column (a string or a list of chat messages).
        answer_field: the answer column; DAPO rows fall back to `reward_model.ground_truth`.
        on_error: `"raise"` (`DataError` on the first bad row) or `"skip"` (drop bad rows, log the count).
        dedupe: drop repeated (prompt, answer) rows, keeping the first.
        return_skipped: return `(examples, n_skipped)` instead of the list.
        split: the split of a `DatasetDict` folder or a cached dataset (None: `train`, or its only split);
            a `Dataset.save_to_disk` folder and a file have one and ignore it.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; allowed: {', '.join(ON_ERROR)}")
    wanted = {prompt_field, "problem", answer_field, "reward_model"}
    if not isinstance(path, (str, Path)):  # a datasets.Dataset or a list of dicts (forkrl.Trainer)
        return _from_rows(
            *_in_memory_rows(path, wanted), prompt_field, answer_field, on_error, dedupe, return_skipped
        )
    spec, path = str(path), Path(path)
    source: Path | str = path
    if path.is_dir():
        source, rows = _saved_rows(path, split, wanted)
    elif path.is_file():
        if path.suffix == ".jsonl":
            rows = _jsonl_rows(path)
        elif path.suffix == ".parquet":
            rows = _parquet_rows(path, wanted)
        else:
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .parquet (or a save_to_disk folder)"
            )
    elif looks_like_dataset_name(spec):
        source, rows = _cached_rows(spec, split, wanted)
    else:
        raise DataError(f"data file {spec!r} does not exist")
    return _from_rows(source, rows, prompt_field, answer_field, on_error, dedupe, return_skipped)


def _in_memory_rows(data: Any, wanted: set[str]) -> tuple[str, Iterator[tuple[int, Any]]]:
    """(name for messages, 1-based rows) of a `datasets.Dataset` or a list of dicts."""
    if hasattr(data, "features") and hasattr(data, "select_columns"):  # datasets.Dataset
        return f"the {type(data).__name__} of {len(data):,} rows", _dataset_rows(data, wanted)
    if isinstance(data, (list, tuple)):
        return f"the list of {len(data):,} rows", iter(enumerate(data, 1))
    raise DataError(
        f"a dataset must be a path (.jsonl, .parquet, a save_to_disk folder), a datasets.Dataset or a list "
        f"of dicts; got {type(data).__name__} (a DatasetDict: pick a split, e.g. ds['train'])"
    )


def _from_rows(source, rows, prompt_field, answer_field, on_error, dedupe, return_skipped):
    examples: list[Example] = []
    seen: set[tuple[str, str]] = set()
    skipped = duplicates = 0
    first_error = None
    for i, row in rows:
        try:
            ex = _example(source, i, row, prompt_field, answer_field)
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
                f"{source}: every row is malformed ({skipped} skipped, data.on_error=skip); the first: {first_error}"
            )
        raise DataError(f"{source}: no rows; give a file with one example a row")
    if skipped:
        log.warning("%s: skipped %d malformed row(s) (data.on_error=skip)", source, skipped)
    if duplicates:
        log.info("%s: dropped %d duplicate row(s), kept %d", source, duplicates, len(examples))
    return (examples, skipped) if return_skipped else examples
