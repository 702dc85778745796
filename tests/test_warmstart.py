"""`forkrl warmstart` trains the tiny model on traces; the shipped checkpoint loads as plain HF objects."""

import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.cli import main
from forkrl.models.loading import DEFAULT_MODEL


def test_warmstart_learns_the_trace_format(tmp_path, capsys):
    # A few steps of SFT must already cut the loss well below the uniform-guess level ln(98) = 4.58.
    out = tmp_path / "ws"
    assert (
        main(
            [
                "warmstart",
                "--out",
                str(out),
                "steps=30",
                "warmup=5",
                "batch_size=16",
                "n_traces=500",
                "eval_n=16",
                "hidden_size=32",
                "num_layers=1",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    metrics = json.loads(text[text.index("{") : text.rindex("}") + 1])
    assert metrics["sft_loss"] < 3.5 and 0.0 <= metrics["greedy_acc"] <= 1.0
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


def test_shipped_warm_start_is_a_plain_hf_checkpoint():
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    assert (
        model.config.model_type == "qwen3"
        and tok.decode(tok("17+?=42 in 9,25:").input_ids) == "17+?=42 in 9,25:"
    )
    assert sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir()) < 20 * 2**20  # ships under 20 MB
