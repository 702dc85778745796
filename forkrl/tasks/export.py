"""A built-in task as TRL-format jsonl files: `prompt` as chat messages, `answer`, and the row's fields.

The same files train in forkrl (`data.path=.../train.jsonl data.eval_path=.../test.jsonl
model.chat_template=true`) and in TRL (`load_dataset("json", data_files=...)`, conversational
`prompt`, `answer` passed to reward functions as a keyword argument), so a comparison runs on
identical problems.
"""

from __future__ import annotations

import json
from pathlib import Path


def task_rows(examples) -> list[dict]:
    """One TRL-format row per example: `{"prompt": [{"role": "user", "content": ...}], "answer": ..., **fields}`.

    >>> from forkrl.tasks.base import Example
    >>> task_rows([Example("What is 1 plus 1?", "2", {"a": 1})])
    [{'prompt': [{'role': 'user', 'content': 'What is 1 plus 1?'}], 'answer': '2', 'a': 1}]
    """
    return [
        {"prompt": [{"role": "user", "content": e.prompt}], "answer": e.answer, **e.fields} for e in examples
    ]


def export_task(task, out_dir: str | Path, *, n_train: int, n_test: int, seed: int = 0) -> list[Path]:
    """`out_dir/train.jsonl` (`n_train` seeded training problems) and `out_dir/test.jsonl` (the first
    `n_test` of the task's fixed held-out list, the one `forkrl train` and `forkrl eval` use)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, examples in (
        ("train", task.examples("train", n_train, seed=seed)),
        ("test", task.examples("test", n_test, seed=1234)),  # the seed train.eval_n and forkrl eval use
    ):
        path = out / f"{name}.jsonl"
        with open(path, "w") as f:
            for row in task_rows(examples):
                f.write(json.dumps(row) + "\n")
        written.append(path)
    return written
