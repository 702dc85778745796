"""Loading is a trust boundary: tensors must match the model, and a folder's own code never runs
unless the user opts in (issue 16, items 13 and 16)."""

import builtins
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from forkrl.config import ConfigError
from forkrl.models.loading import DEFAULT_MODEL, load_model_and_tokenizer
from forkrl.models.tiny import build_char_tokenizer


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder, edit):
    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _llama(path, tied: bool):
    tok = build_char_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
        pad_token_id=0,
        eos_token_id=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_complete_folders_load(tiny_model_dir, tmp_path):
    # The shipped warm start, a tied random Qwen3, and random Llamas with and without tied embeddings
    # (lm_head.weight absent from a tied checkpoint is filled by tying, not refused).
    for folder in (
        DEFAULT_MODEL,
        tiny_model_dir,
        _llama(tmp_path / "tied", True),
        _llama(tmp_path / "untied", False),
    ):
        model, _ = load_model_and_tokenizer(folder)
        assert model.get_output_embeddings().weight.isfinite().all()
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")


def test_a_missing_tensor_is_refused_by_name(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path / "ckpt")
    _edit_weights(folder, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ConfigError) as e:
        load_model_and_tokenizer(folder)
    msg = str(e.value)
    assert str(folder) in msg and "missing from the weights" in msg
    assert "model.layers.1.mlp.down_proj.weight" in msg
    untied = _llama(tmp_path / "untied", False)
    _edit_weights(untied, lambda sd: sd.pop("lm_head.weight"))  # not tied: nothing can stand in for it
    with pytest.raises(ConfigError, match=r"missing from the weights .*: lm_head\.weight"):
        load_model_and_tokenizer(untied)


def test_an_unexpected_tensor_is_refused_by_name(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path / "ckpt")
    _edit_weights(folder, lambda sd: sd.update({"model.extra.weight": sd["model.norm.weight"].clone()}))
    with pytest.raises(
        ConfigError, match=r"in the weights but not in the model config.json describes: model\.extra"
    ):
        load_model_and_tokenizer(folder)


def test_a_foreign_config_over_the_weights_is_refused(tiny_model_dir, tmp_path):
    fewer = _copy(tiny_model_dir, tmp_path / "fewer")
    _edit_config(fewer, num_hidden_layers=1, layer_types=["full_attention"])  # layer 1's tensors unused
    with pytest.raises(ConfigError, match=r"not in the model config.json describes: model\.layers\.1\."):
        load_model_and_tokenizer(fewer)
    wider = _copy(tiny_model_dir, tmp_path / "wider")
    _edit_config(wider, intermediate_size=48)
    with pytest.raises(
        ConfigError, match=r"with another shape than config.json gives: model\.layers\.0\.mlp"
    ):
        load_model_and_tokenizer(wider)
    other = _copy(tiny_model_dir, tmp_path / "other")
    shutil.copy(_llama(tmp_path / "llama", False) / "config.json", other / "config.json")
    with pytest.raises(ConfigError, match="its weights do not match its config.json"):
        load_model_and_tokenizer(other)


def _custom_code_folder(path, marker):
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps({"model_type": "mystery", "auto_map": {"AutoConfig": "mystery.MysteryConfig"}})
    )
    (path / "mystery.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n\n\n"
        "class MysteryConfig(PretrainedConfig):\n    model_type = 'mystery'\n"
    )
    return path


def test_a_folders_own_code_never_runs_or_asks(tmp_path, monkeypatch):
    # transformers asks "run the custom code? [y/N]" when trust_remote_code is left unset; a user
    # answering "y" ran the folder's code. forkrl must never ask, and never run it.
    asked = []
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "y")
    marker = tmp_path / "ran"
    folder = _custom_code_folder(tmp_path / "custom", marker)
    with pytest.raises(
        ConfigError, match=r"needs its own Python code .* model\.trust_remote_code=true only if"
    ):
        load_model_and_tokenizer(folder)
    assert not asked and not marker.exists()


def test_trust_remote_code_is_the_users_choice(tmp_path):
    marker = tmp_path / "ran"
    folder = _custom_code_folder(tmp_path / "custom", marker)
    with pytest.raises(ConfigError, match="is not a causal LM"):  # its code ran: it declares no causal LM
        load_model_and_tokenizer(folder, trust_remote_code=True)
    assert marker.exists()


def test_a_critic_missing_a_tensor_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    from forkrl.models.value import ValueModel

    ValueModel.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "critic")
    assert ValueModel.from_pretrained(tmp_path / "critic").value_head.weight.shape[0] == 1  # complete: loads
    _edit_weights(tmp_path / "critic", lambda sd: sd.pop("layers.0.self_attn.q_proj.weight"))
    with pytest.raises(
        ConfigError, match=r"missing from the weights .*: layers\.0\.self_attn\.q_proj\.weight"
    ):
        ValueModel.from_pretrained(tmp_path / "critic")
    policy = _copy(tiny_model_dir, tmp_path / "policy")
    _edit_weights(policy, lambda sd: sd.pop("model.norm.weight"))
    with pytest.raises(ConfigError, match=r"model\.norm\.weight"):
        ValueModel.from_pretrained(policy)
    asked = []
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "y")
    custom = _custom_code_folder(tmp_path / "custom", tmp_path / "ran")
    with pytest.raises(ConfigError, match="model.trust_remote_code"):
        ValueModel.from_pretrained(custom)
    assert not asked and not (tmp_path / "ran").exists()


def test_damaged_files_and_bad_devices_are_named(tiny_model_dir, tmp_path):
    from forkrl.models.io import DamagedCheckpointError
    from forkrl.models.loading import resolve_device

    cut = _copy(tiny_model_dir, tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(DamagedCheckpointError, match=rf"^model folder '{cut}': a weights file is damaged"):
        load_model_and_tokenizer(cut)
    notok = _copy(tiny_model_dir, tmp_path / "notok")
    (notok / "tokenizer.json").unlink()  # transformers suggested installing sentencepiece
    with pytest.raises(DamagedCheckpointError, match=r"no usable tokenizer \(tokenizer.json is missing"):
        load_model_and_tokenizer(notok)
    with pytest.raises(
        ConfigError, match=r"device 'tpu' is not a torch device; use auto, cpu, cuda or cuda:N"
    ):
        resolve_device("tpu")
    assert resolve_device("cpu").type == "cpu"


def test_a_model_name_is_read_from_the_local_hub_cache_never_downloaded(
    tiny_model_dir, tmp_path, monkeypatch
):
    import huggingface_hub.constants as hub

    from forkrl.models.loading import resolve_model_path

    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-model" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--tiny-org--tiny-model" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-model" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("tiny-org/tiny-model") == snapshot
    model, tok = load_model_and_tokenizer("tiny-org/tiny-model")
    assert model.config.vocab_size == len(tok)
    with pytest.raises(ConfigError, match="never downloads") as err:
        resolve_model_path("tiny-org/not-cached")
    assert str(cache) in str(err.value)


def test_a_folder_without_tokenizer_files_is_named(tmp_path):
    # transformers builds an empty tokenizer from config.json alone; the first forward then failed with
    # "cannot reshape tensor of 0 elements" (issue 28, item 10)
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(DEFAULT_MODEL / name, folder / name)
    with pytest.raises(ConfigError, match=r"has no tokenizer \(tokenizer.json.*tokenizer.save_pretrained"):
        load_model_and_tokenizer(folder)
