"""`data.path` as a `datasets` folder (`Dataset` / `DatasetDict.save_to_disk`) or a name in the local
Hugging Face datasets cache: the same rows as the jsonl loader, the same row checks and error style."""

import json
import logging

import pytest

datasets = pytest.importorskip("datasets")

from forkrl.tasks.files import DataError, load_examples  # noqa: E402

ROWS = [
    {"prompt": "What is 1+1?", "answer": "2", "data_source": "toy", "level": 1},
    {"prompt": "What is 2+3?", "answer": "5", "data_source": "toy", "level": 2},
    {
        "prompt": [{"role": "user", "content": "What is 4*4?"}],
        "answer": "16",
        "data_source": "toy",
        "level": 3,
    },
]
TEST_ROWS = [{"prompt": "What is 9-1?", "answer": "8", "data_source": "toy", "level": 1}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _columns(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


def _dataset(rows):
    # a column must have one type: chat-message prompts and string prompts go in separate datasets
    return datasets.Dataset.from_dict(_columns(rows))


def test_dataset_folder_rows_equal_the_jsonl_loaders(tmp_path):
    plain = ROWS[:2]
    _dataset(plain).save_to_disk(str(tmp_path / "ds"))
    want = load_examples(_jsonl(tmp_path / "rows.jsonl", plain))
    assert load_examples(tmp_path / "ds") == want
    assert load_examples(str(tmp_path / "ds"), split="whatever") == want  # one Dataset: read whole
    assert want[0].fields == {"data_source": "toy", "level": 1}


def test_chat_message_prompts_from_a_dataset_folder(tmp_path):
    rows = [
        ROWS[2],
        {
            **ROWS[2],
            "answer": "17",
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 17?"},
            ],
        },
    ]
    _dataset(rows).save_to_disk(str(tmp_path / "ds"))
    got = load_examples(tmp_path / "ds")
    assert got == load_examples(_jsonl(tmp_path / "rows.jsonl", rows))
    assert [e.prompt for e in got] == ["What is 4*4?", "What is 17?"]
    assert got[1].fields["messages"][0] == {"role": "system", "content": "Be brief."}


def test_dataset_dict_splits(tmp_path, caplog):
    dd = datasets.DatasetDict({"train": _dataset(ROWS[:2]), "test": _dataset(TEST_ROWS)})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_examples(tmp_path / "dd") == load_examples(_jsonl(tmp_path / "a.jsonl", ROWS[:2]))
    with caplog.at_level(logging.WARNING, logger="forkrl.tasks.files"):
        assert load_examples(tmp_path / "dd", split="train") == load_examples(tmp_path / "dd")
    assert "reading its split 'train' of train, test (no split was asked for)" in caplog.text
    assert load_examples(tmp_path / "dd", split="test") == load_examples(
        _jsonl(tmp_path / "b.jsonl", TEST_ROWS)
    )
    with pytest.raises(DataError, match=r"no split 'validation'; its splits are 'train', 'test'") as e:
        load_examples(tmp_path / "dd", split="validation")
    assert str(tmp_path / "dd") in str(e.value)


def test_a_dataset_dict_without_train_uses_its_only_split(tmp_path):
    datasets.DatasetDict({"test": _dataset(TEST_ROWS)}).save_to_disk(str(tmp_path / "dd"))
    assert [e.answer for e in load_examples(tmp_path / "dd")] == ["8"]


@pytest.mark.parametrize(
    "bad, field, fragment",
    [
        ({"prompt": "", "answer": "1"}, "prompt", "is empty"),
        ({"prompt": "q", "answer": None}, "answer", "is null"),
        ({"prompt": None, "answer": "1"}, "prompt", "is null"),
    ],
)
def test_a_bad_row_names_source_split_row_and_field(tmp_path, bad, field, fragment):
    rows = [{"prompt": "ok", "answer": "1"}, {"prompt": "ok 2", "answer": "2"}, bad]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError) as e:
        load_examples(tmp_path / "dd")
    msg = str(e.value)
    assert f"{tmp_path / 'dd'} (split 'train'): row 3: field {field!r}: {fragment}" in msg
    kept, skipped = load_examples(tmp_path / "dd", on_error="skip", return_skipped=True)
    assert (len(kept), skipped) == (2, 1)


def test_custom_fields_and_the_dapo_layout(tmp_path):
    rows = [
        {"question": "Q1", "solution": 3, "reward_model": {"ground_truth": "x"}},
        {"question": "Q2", "solution": 4, "reward_model": {"ground_truth": "y"}},
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    got = load_examples(tmp_path / "ds", prompt_field="question", answer_field="solution")
    assert [(e.prompt, e.answer) for e in got] == [("Q1", "3"), ("Q2", "4")]
    dapo = load_examples(tmp_path / "ds", prompt_field="question", answer_field="missing")
    assert [e.answer for e in dapo] == ["x", "y"]  # the DAPO fallback, as for files


def test_a_plain_folder_is_refused_clearly(tmp_path):
    (tmp_path / "notads").mkdir()
    with pytest.raises(DataError, match="not one written by Dataset.save_to_disk"):
        load_examples(tmp_path / "notads")


# ---------------------------------------------------------------------------------------------- the cache


def _point_cache_at(monkeypatch, folder):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(folder))
    monkeypatch.setenv("HF_HOME", str(folder / "home"))


def test_a_name_not_in_the_cache_is_a_clear_error(tmp_path, monkeypatch):
    _point_cache_at(monkeypatch, tmp_path / "cache")
    with pytest.raises(DataError) as e:
        load_examples("openai/gsm8k")
    msg = str(e.value)
    assert "'openai/gsm8k'" in msg and str(tmp_path / "cache" / "openai___gsm8k") in msg
    assert "datasets.load_dataset('openai/gsm8k')" in msg and "never downloads" in msg
    with pytest.raises(DataError, match=r"load_dataset\('openai/gsm8k', 'main'\)"):
        load_examples("openai/gsm8k:main")


def test_a_missing_file_is_still_named_as_a_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")


def _cache_entry(cache, tmp_path, repo_id, splits, config="default"):
    """A prepared dataset laid out as `load_dataset(repo_id)` leaves it in the cache (built offline with the
    packaged json builder, then moved under `{namespace}___{name}`, where the hub's loader puts it)."""
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    files = {s: str(_jsonl(tmp_path / f"{config}-{s}.jsonl", rows)) for s, rows in splits.items()}
    b = Json(
        cache_dir=str(cache),
        dataset_name=name,
        config_name=config,
        config_id=config,
        data_files=files,
        hash="0123abcd",
    )
    b.download_and_prepare()
    target = cache / f"{namespace}___{name}" / config
    target.parent.mkdir(parents=True, exist_ok=True)
    (cache / name / config).rename(target)


def test_a_name_in_the_cache_is_read_offline(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _point_cache_at(monkeypatch, cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _cache_entry(cache, tmp_path, "me/tiny_math", {"train": ROWS[:2], "test": TEST_ROWS})
    assert load_examples("me/tiny_math") == load_examples(_jsonl(tmp_path / "a.jsonl", ROWS[:2]))
    assert load_examples("me/tiny_math", split="test") == load_examples(
        _jsonl(tmp_path / "b.jsonl", TEST_ROWS)
    )
    with pytest.raises(
        DataError, match=r"me/tiny_math: no split 'validation'; its splits are 'train', 'test'"
    ):
        load_examples("me/tiny_math", split="validation")


def test_several_cached_configurations_ask_for_one(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _point_cache_at(monkeypatch, cache)
    _cache_entry(cache, tmp_path, "me/two", {"train": ROWS[:2]}, config="main")
    _cache_entry(cache, tmp_path, "me/two", {"train": TEST_ROWS}, config="socratic")
    with pytest.raises(DataError, match=r"give one as data.path=me/two:CONFIG"):
        load_examples("me/two")
    assert [e.answer for e in load_examples("me/two:socratic")] == ["8"]
    with pytest.raises(DataError, match="me/two:nope"):
        load_examples("me/two:nope")


def test_a_bad_cached_row_names_dataset_split_row_and_field(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _point_cache_at(monkeypatch, cache)
    _cache_entry(
        cache, tmp_path, "me/bad", {"train": [{"prompt": "q", "answer": "1"}, {"prompt": "q2", "answer": ""}]}
    )
    with pytest.raises(DataError, match=r"^me/bad \(split 'train'\): row 2: field 'answer': is empty"):
        load_examples("me/bad")


def test_training_reads_data_split_and_data_eval_split(tmp_path):
    from forkrl.config import load_config
    from forkrl.training.components import data_and_reward

    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": _dataset(ROWS[:2]), "test": _dataset(TEST_ROWS)}).save_to_disk(str(folder))
    cfg = load_config(None, [f"data.path={folder}", f"data.eval_path={folder}", "reward.fn=math"])
    train, held, *_ = data_and_reward(cfg, None)
    assert [e.answer for e in train] == ["2", "5"] and [e.answer for e in held] == ["8"]
    cfg = load_config(None, [f"data.path={folder}", "data.split=test", "reward.fn=math"])
    assert [e.answer for e in data_and_reward(cfg, None)[0]] == ["8"]
