"""A tiny Qwen3-architecture causal LM and a character-level tokenizer, built offline.

Both are ordinary Hugging Face objects: `save_pretrained` writes them, and
`AutoModelForCausalLM` / `AutoTokenizer` load them back from a local folder.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

PAD, EOS = "<pad>", "<eos>"
# Printable ASCII and newline: any plain-text prompt can be written with it.
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
# A character outside CHARS (é, a tab) is read as `?`: an ordinary token of the vocabulary, so the
# shipped warm start's embedding matrix stays as it is, and `?` is not a special token that decoding
# with skip_special_tokens would drop. (The WordLevel model refuses such text when it has no unknown token.)
UNK = "?"


def build_char_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """One token per character (any other character reads as `UNK`, i.e. `?`); `<pad>` (id 0) and
    `<eos>` (id 1) are the only specials."""
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        model_max_length=model_max_length,
        padding_side="left",  # prompts are left-padded for batched generation
    )
    return fast


def build_tiny_model(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    max_positions: int = 256,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    seed: int = 0,
) -> Qwen3ForCausalLM:
    """A small Qwen3 (the paper's model family) built from a config, with tied embeddings."""
    import torch

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        rope_theta=10000.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model
