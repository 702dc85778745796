"""Local data files: DAPO-Math-17k and simple layouts, de-duplication, bad rows named by file/row/field."""

import json
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forkrl.tasks.base import Example
from forkrl.tasks.files import (
    DAPO_TEMPLATE,
    DataError,
    apply_chat_template,
    apply_dapo_template,
    load_examples,
    repeat_examples,
    strip_dapo_template,
    with_template,
)

PROBLEMS = [("What is $1+1$?", "2"), ("Find $\\frac{a}{b}$ if $a=1, b=2$.", "\\frac{1}{2}")]


def dapo_row(problem: str, answer: str, index: int = 0) -> dict:
    """One row as in BytedTsinghua-SIA/DAPO-Math-17k."""
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": apply_dapo_template(problem), "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": f"id-{index}"},
    }


def write_jsonl(path, rows) -> None:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )


def write_parquet(path, rows) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def dapo_rows_with_duplicates() -> list[dict]:
    # the public file repeats each prompt ~100 times; 3 here, interleaved
    return [dapo_row(p, a, i) for i in range(3) for p, a in PROBLEMS]


# ---------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_dapo_layout_with_duplicates(tmp_path, fmt):
    path = tmp_path / f"dapo.{fmt}"
    (write_jsonl if fmt == "jsonl" else write_parquet)(path, dapo_rows_with_duplicates())

    examples = load_examples(path)
    assert [e.answer for e in examples] == ["2", "\\frac{1}{2}"]
    assert examples[0].prompt == apply_dapo_template(PROBLEMS[0][0])
    assert strip_dapo_template(examples[1].prompt) == PROBLEMS[1][0]
    assert examples[0].fields == {"data_source": "math_dapo", "ability": "MATH"}

    assert len(load_examples(path, dedupe=False)) == 6


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("prompt_key", ["problem", "prompt"])
def test_simple_layouts(tmp_path, fmt, prompt_key):
    rows = [
        {prompt_key: "1+1?", "answer": 2, "level": "easy"},
        {prompt_key: "2+2?", "answer": "4", "level": "easy"},
        {prompt_key: "1+1?", "answer": 2, "level": "easy"},
    ]
    if fmt == "parquet":
        for r in rows:
            r["answer"] = str(r["answer"])
    path = tmp_path / f"simple.{fmt}"
    (write_jsonl if fmt == "jsonl" else write_parquet)(path, rows)
    examples = load_examples(path)
    assert examples == [Example("1+1?", "2", {"level": "easy"}), Example("2+2?", "4", {"level": "easy"})]


def test_custom_field_names_and_multi_turn_prompt(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    path = tmp_path / "custom.jsonl"
    write_jsonl(path, [{"question": messages, "target": "2"}])
    [ex] = load_examples(path, prompt_field="question", answer_field="target")
    assert ex.prompt == "1+1?" and ex.answer == "2" and ex.fields["messages"] == messages


def test_trainer_call_signature_still_works(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"prompt": "p", "answer": "a"}])
    out = load_examples(path, prompt_field="prompt", answer_field="answer", on_error="raise")
    assert isinstance(out, list) and out[0].answer == "a"


# ---------------------------------------------------------------------------------------------- bad rows

GOOD = {"prompt": "1+1?", "answer": "2"}

# (row as written on line 3 of the file, field named in the error, message fragment)
BAD_JSONL_ROWS = [
    ({"answer": "2"}, "prompt", "missing"),
    ({"prompt": 5, "answer": "2"}, "prompt", "must be a string or a list of chat messages, got int"),
    ({"prompt": "   ", "answer": "2"}, "prompt", "is empty"),
    ({"prompt": "\ud800 bad", "answer": "2"}, "prompt", "undecodable text"),
    ({"prompt": [], "answer": "2"}, "prompt", "is an empty list"),
    ({"prompt": ["hi"], "answer": "2"}, "prompt[0]", "must be a chat message"),
    ({"prompt": [{"role": "user", "content": ""}], "answer": "2"}, "prompt[0].content", "is empty"),
    ({"prompt": [{"role": "system", "content": "x"}], "answer": "2"}, "prompt", "has no user message"),
    ({"prompt": "1+1?"}, "answer", "missing (and no reward_model.ground_truth)"),
    ({"prompt": None, "answer": "2"}, "prompt", "is null"),
    ({"prompt": "1+1?", "answer": ""}, "answer", "is empty"),
    ({"prompt": "1+1?", "answer": [2]}, "answer", "must be a string or number, got list"),
    ({"prompt": "1+1?", "answer": True}, "answer", "must be a string or number, got bool"),
    ({"prompt": "1+1?", "reward_model": "2"}, "reward_model", 'must be an object with "ground_truth"'),
    ({"prompt": "1+1?", "reward_model": {"ground_truth": " "}}, "reward_model.ground_truth", "is empty"),
    ({"prompt": "1+1?", "reward_model": {"ground_truth": {"x": 1}}}, "reward_model.ground_truth", "got dict"),
    ('{"prompt": "1+1?", "answer": ', None, "not valid JSON"),
    ("[1, 2]", None, "must be a JSON object, got list"),
]


@pytest.mark.parametrize(
    "bad, field, fragment", BAD_JSONL_ROWS, ids=[f"{f}:{m[:20]}" for _, f, m in BAD_JSONL_ROWS]
)
def test_bad_jsonl_row_names_file_row_and_field(tmp_path, bad, field, fragment):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [GOOD, "", bad, {"prompt": "2+2?", "answer": "4"}])  # line 2 blank: row 3 is line 3
    with pytest.raises(DataError) as err:
        load_examples(path)
    msg = str(err.value)
    assert str(path) in msg and "row 3" in msg and fragment in msg
    if field is not None:
        assert f"field {field!r}" in msg

    examples, skipped = load_examples(path, on_error="skip", return_skipped=True)
    assert [e.answer for e in examples] == ["2", "4"] and skipped == 1


def test_undecodable_bytes(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        json.dumps(GOOD).encode() + b"\n" + '{"prompt": "caf\u00e9", "answer": "1"}\n'.encode("latin-1")
    )
    with pytest.raises(DataError, match=re.escape(f"{path}: row 2: undecodable text, not UTF-8")):
        load_examples(path)


def test_skip_logs_count(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, [GOOD, {"prompt": ""}, "not json", {"prompt": "3+3?", "answer": "6"}])
    with caplog.at_level(logging.WARNING, logger="forkrl.tasks.files"):
        examples = load_examples(path, on_error="skip")
    assert len(examples) == 2
    assert "skipped 2 malformed row(s)" in caplog.text and "row 2" in caplog.text


def test_bad_parquet_rows(tmp_path):
    path = tmp_path / "bad.parquet"
    rows = [dapo_row(*PROBLEMS[0]), dapo_row(*PROBLEMS[1]), dapo_row("What is 3?", "")]
    rows[1]["reward_model"] = {"ground_truth": None, "style": "rule"}
    write_parquet(path, rows)
    with pytest.raises(
        DataError, match=re.escape(f"{path}: row 2: field 'reward_model.ground_truth': is null")
    ):
        load_examples(path)
    examples, skipped = load_examples(path, on_error="skip", return_skipped=True)
    assert len(examples) == 1 and skipped == 2

    typed = tmp_path / "typed.parquet"
    write_parquet(typed, [{"prompt": "1+1?", "answer": 2.5}, {"prompt": "x", "answer": None}])
    with pytest.raises(DataError, match=re.escape(f"{typed}: row 2: field 'answer': is null")):
        load_examples(typed)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("prompt,answer\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'; use .jsonl or .parquet"):
        load_examples(tmp_path / "d.csv")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="broken.parquet: not a readable parquet file"):
        load_examples(tmp_path / "broken.parquet")
    (tmp_path / "ok.jsonl").write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(ValueError, match="on_error='ignore'; allowed: raise, skip"):
        load_examples(tmp_path / "ok.jsonl", on_error="ignore")


# ---------------------------------------------------------------------------------------------- templates


def test_dapo_template_text():
    assert DAPO_TEMPLATE == (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    )
    problem = "Let $f(x) = x^{2}$. Find $f(3)$."  # braces must survive (no str.format)
    prompt = apply_dapo_template(problem)
    assert prompt == DAPO_TEMPLATE.replace("{problem}", problem)
    assert apply_dapo_template(prompt) == prompt
    assert strip_dapo_template(prompt) == problem and strip_dapo_template(problem) == problem
    [ex] = with_template([Example(problem, "9", {"k": 1})])
    assert ex.prompt == prompt and ex.answer == "9" and ex.fields == {"k": 1}


def test_repeat_examples():
    a, b = Example("a", "1"), Example("b", "2")
    assert repeat_examples([a, b], 3) == [a, a, a, b, b, b]
    assert repeat_examples([a], 1) == [a]
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            repeat_examples([a], k)


def test_apply_chat_template_with_a_real_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    with pytest.raises(ValueError, match="has no chat template.*model.chat_template=false"):
        apply_chat_template(tok, "1+1?")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert apply_chat_template(tok, "1+1?") == "<user>1+1?<assistant>"
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert apply_chat_template(tok, msgs) == "<system>S<user>Q<assistant>"


def test_a_file_with_no_usable_row_is_named(tmp_path):
    # An empty file, or one whose every row is skipped, used to give [] and fail later without a file.
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=re.escape(f"{empty}: no rows; give a file with one example a row")):
        load_examples(empty)
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"question": "1+1?"}, {"prompt": "", "answer": "1"}])
    with pytest.raises(
        DataError,
        match=re.escape(f"{bad}: every row is malformed (2 skipped, data.on_error=skip); the first: "),
    ):
        load_examples(bad, on_error="skip")
