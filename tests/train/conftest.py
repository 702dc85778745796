import pytest

from forkrl.models.tiny import build_char_tokenizer, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Qwen3 + char tokenizer saved as a local HF checkpoint (seconds to build)."""
    path = tmp_path_factory.mktemp("tiny")
    tok = build_char_tokenizer()
    model = build_tiny_model(
        len(tok), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
