"""Bad models and data are refused before training starts, with a message that says what to do."""

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer, BertConfig, ViTConfig

from forkrl.cli import main
from forkrl.config import ConfigError, load_config
from forkrl.models.loading import load_model_and_tokenizer
from forkrl.training.trainer import train


def _copy_model(src, dst, **tok_changes):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if tok_changes:
        tok = AutoTokenizer.from_pretrained(src)
        for k, v in tok_changes.items():
            setattr(tok, k, v)
        tok.save_pretrained(dst)
    return dst


def test_not_a_causal_lm(tmp_path):
    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(
        tmp_path
    )
    with pytest.raises(
        ConfigError, match=r"\(ViTConfig\) is not a causal LM; give a checkpoint that AutoModelForCausalLM"
    ):
        load_model_and_tokenizer(tmp_path)
    (tmp_path / "x").mkdir()
    BertConfig(vocab_size=10).save_pretrained(tmp_path / "x")  # a causal-LM architecture, but no weights
    with pytest.raises(ConfigError, match="cannot load the weights"):
        load_model_and_tokenizer(tmp_path / "x")


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder; give a local Hugging Face checkpoint folder"):
        load_model_and_tokenizer(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no usable config.json"):
        load_model_and_tokenizer(tmp_path)


def test_tokenizer_without_eos_or_pad(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="has no EOS token: completions could never end"):
        load_model_and_tokenizer(_copy_model(tiny_model_dir, tmp_path / "noeos", eos_token=None))
    nopad = _copy_model(tiny_model_dir, tmp_path / "nopad", pad_token=None)
    with pytest.raises(
        ConfigError, match="has no pad token; set model.pad_token to one it has \\(its EOS token '<eos>'"
    ):
        load_model_and_tokenizer(nopad)
    _, tok = load_model_and_tokenizer(nopad, pad_token="<eos>")
    assert tok.pad_token_id == tok.eos_token_id


def test_prompt_longer_than_the_context(tiny_model_dir, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=" * 70, "answer": "2"}) + "\n")  # 280 chars > 256 positions
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.path={data}",
            "rollout.max_new_tokens=8",
            f"train.out_dir={tmp_path / 'run'}",
            "train.progress=false",
        ],
    )
    with pytest.raises(
        ConfigError, match=r"prompt #1 \(280 tokens.*exceeds the model's context of 256 tokens"
    ):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before anything ran


def test_core_imports_without_optional_dependencies():
    code = (
        "import sys, forkrl, forkrl.core.selection, forkrl.core.losses, forkrl.core.advantages, "
        "forkrl.core.entropy, forkrl.core.sampling, forkrl.config, forkrl.cli\n"
        "bad = [m for m in ('math_verify', 'matplotlib', 'pyarrow', 'trl', 'vllm') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_train_prints_a_data_error_naming_the_file_before_loading_the_model(tmp_path, capsys):
    from forkrl.cli import main

    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\nnot json\n')
    # model.path does not exist: the data are checked first, so their error is the one reported
    args = [
        f"model.path={tmp_path / 'no-model'}",
        f"train.out_dir={tmp_path / 'run'}",
        "train.progress=false",
    ]
    assert main(["train", *args, f"data.path={data}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"forkrl: data error: {data}") and "Traceback" not in err
    assert main(["train", *args, f"data.path={data}", "data.on_error=skip", "reward.fn=no_such_mod:fn"]) == 2
    assert "forkrl: config error: reward.fn='no_such_mod:fn'" in capsys.readouterr().err
    assert main(["train", *args]) == 2  # only now the model
    assert f"{tmp_path / 'no-model'}" in capsys.readouterr().err


def test_train_names_a_damaged_model_file_as_a_checkpoint_error(tiny_model_dir, tmp_path, capsys):
    from forkrl.cli import main

    model = _copy_model(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert (
        main(["train", f"model.path={model}", f"train.out_dir={tmp_path / 'run'}", "train.progress=false"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("forkrl: checkpoint error: ") and str(model) in err and "Traceback" not in err


def test_the_default_budget_is_cut_to_the_models_context_with_a_note(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    args = [
        f"model.path={tiny_model_dir}",
        f"train.out_dir={out}",
        f"data.path={data}",
        "train.steps=1",
        "train.eval_n=2",
        "train.progress=false",
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "sampling.dynamic=false",
        "reward.fn=math",
        "reward.isolate=false",
    ]
    assert main(["train", *args]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert (
        "the default completion budget of 512 tokens plus the longest prompt (4 tokens) exceeds the model's "
        "context of 256; sampling up to 252 new tokens" in err
    ), err
    assert main(["train", *args, "rollout.max_new_tokens=512", "--overwrite"]) == 2  # the user's own: refused
    assert "exceeds the model's context of 256 tokens" in capsys.readouterr().err
