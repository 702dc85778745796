"""The character tokenizer (built, and shipped with the warm start) takes any text: a character outside
its vocabulary becomes `?`, an ordinary token, without changing the vocabulary (issue 16, item 21)."""

import json

import pytest

from forkrl.config import load_config
from forkrl.models.loading import DEFAULT_MODEL, load_model_and_tokenizer
from forkrl.models.tiny import UNK, build_char_tokenizer

TEXT = "café\tau lait\r\n"  # é, a tab and a carriage return: none is in the vocabulary


@pytest.fixture(params=["built", "shipped"])
def tokenizer(request):
    if request.param == "built":
        return build_char_tokenizer()
    model, tok = load_model_and_tokenizer(DEFAULT_MODEL)
    assert len(tok) == model.config.vocab_size == model.get_input_embeddings().weight.shape[0]
    return tok


def test_unknown_characters_become_an_existing_token(tokenizer):
    n = len(tokenizer)
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert len(ids) == len(TEXT) and len(tokenizer) == n  # one token per character, no new token
    unk = tokenizer.convert_tokens_to_ids(UNK)
    assert [i for i, c in zip(ids, TEXT) if c in "é\t\r"] == [unk] * 3
    assert tokenizer.decode(ids, skip_special_tokens=True) == "caf??au lait?\n"  # not dropped as special
    plain = "12+?=20 in 3,8: 8\n"
    assert tokenizer.decode(tokenizer(plain, add_special_tokens=False).input_ids) == plain  # unchanged


def test_a_data_file_row_outside_the_vocabulary_trains(tmp_path):
    # The shipped warm start on a file whose rows hold é and a tab (they crashed with "Missing [UNK]
    # token" in the first tokenizer call).
    from forkrl.training.trainer import train

    rows = [{"prompt": f"Caf\u00e9 {a}+2=?\t", "answer": str(a + 2)} for a in range(1, 9)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        f"data.path={data}",
        f"data.eval_path={data}",
        f"train.out_dir={tmp_path / 'run'}",
        "train.steps=1",
        "train.eval_n=2",
        "train.progress=false",
        "train.tensorboard=false",
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "rollout.max_new_tokens=4",
        "sampling.dynamic=false",
        "reward.isolate=false",
    ]
    run_dir, _ = train(
        load_config(None, overrides), reward_fn=lambda prompts, completions, **kw: [0.0] * len(prompts)
    )
    assert (run_dir / "final" / "model.safetensors").exists()


def test_eval_on_a_file_row_outside_the_vocabulary(tmp_path, capsys):
    from forkrl.cli import main

    data = tmp_path / "bench.jsonl"
    data.write_text(json.dumps({"prompt": "Qu'est-ce que 2+2 ?\tR\u00e9ponse: ", "answer": "4"}) + "\n")
    assert main(["eval", "--data", str(data), "--max-new-tokens", "4", "--no-progress"]) == 0
