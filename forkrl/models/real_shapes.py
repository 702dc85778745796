"""A benchmark model at real shapes, built offline: Qwen3 architecture, Qwen3's vocabulary size.

The shipped warm start has 98 tokens, so its LM head is a rounding error next to the backbone; at
Qwen3-0.6B's vocabulary (V = 151,936) the head dominates a step's time and memory, and that is the
regime the selective LM head is for (issue 20: "Speed and memory at real shapes"). This module builds
such a model without a download:

- the model: `Qwen3ForCausalLM` with random weights from a fixed seed, V = 151,936, tied embeddings as
  in Qwen3-0.6B, default hidden 512 and 8 layers (8 query heads, 4 KV heads, head_dim 64,
  intermediate 3 x hidden), positions up to 8,192 (prompt + 4k-token responses fit);
- the tokenizer: byte-level BPE trained with the `tokenizers` library (ByteLevel pre-tokenizer and
  decoder, `BpeTrainer(vocab_size=V)`) on text of the built-in `pick` task (prompts, solution traces
  as the warm start writes them, answers). That corpus is small and its alphabet is digits and a few
  symbols, so it yields far fewer than V tokens (344 with the defaults: 2 specials, the 256 bytes and
  86 merges; `TOKENIZER_NOTE`). The rest, up to `len(tokenizer) == V`, are unused entries
  `<|unused_N|>` of the BPE model's own vocabulary that no merge produces (ordinary tokens: they
  decode as their text). They are not added tokens: 150k added tokens made transformers take ~11 s
  to load the tokenizer, against ~0.5 s this way. `<|endoftext|>` (id 0) is EOS, `<|pad|>` (id 1) pad.

A random-weight model samples nearly uniformly over V, i.e. mostly unused tokens, and rarely EOS:
responses run to the length budget, which is what a fixed-length speed benchmark wants.

    from forkrl.models.real_shapes import build_real_shapes
    path = build_real_shapes("/tmp/real-shapes")       # built once; later calls reuse the folder
"""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB_SIZE = 151_936  # Qwen3-0.6B's config.vocab_size (embedding rows)
EOS, PAD = "<|endoftext|>", "<|pad|>"
UNUSED = "<|unused_{}|>"
MARKER = "real_shapes.json"  # written last: a folder without it is an interrupted build
TOKENIZER_NOTE = (
    "byte-level BPE trained on pick-task text has only the tokens that corpus yields; the rest of the "
    "vocabulary is unused BPE vocabulary entries <|unused_N|> that no merge produces (not added tokens)"
)


def corpus(n: int = 20_000, seed: int = 0) -> list[str]:
    """Text of the built-in `pick` task: each line a prompt, one solution trace and the answer."""
    from forkrl.tasks.pick import get_task

    task = get_task("pick")
    rng = random.Random(seed)
    return [f"{e.prompt}{task.trace(e, rng)}\n{e.answer}" for e in task.examples("train", n, seed=seed)]


def build_tokenizer(vocab_size: int = VOCAB_SIZE, n_texts: int = 20_000, seed: int = 0):
    """The byte-level BPE tokenizer (a `PreTrainedTokenizerFast` with exactly `vocab_size` entries)
    and how many of them are trained (bytes + merges + specials) rather than padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(corpus(n_texts, seed), trainer=trainer)
    trained = tok.get_vocab_size()
    if trained > vocab_size:
        raise RuntimeError(f"BPE training gave {trained} tokens, more than vocab_size={vocab_size}")
    if trained < vocab_size:
        # Padding entries go into the BPE model's own vocabulary, unreachable by any merge (as the
        # rows of a real vocabulary that a given corpus never produces). As 150k added tokens they
        # would make transformers take ~11 s to load the tokenizer.
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        for i in range(vocab_size - trained):
            vocab[UNUSED.format(i)] = trained + i
        tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=8192,
        padding_side="left",  # prompts are left-padded for batched generation
    )
    if len(fast) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(fast)} entries, expected {vocab_size}")
    return fast, trained


def build_model(
    vocab_size: int = VOCAB_SIZE,
    *,
    hidden: int = 512,
    layers: int = 8,
    eos_token_id: int = 0,
    pad_token_id: int = 1,
    max_positions: int = 8192,
    seed: int = 0,
):
    """A random-weight `Qwen3ForCausalLM` at the given shapes (tied embeddings, as Qwen3-0.6B)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    head_dim = 64 if hidden >= 256 else max(8, hidden // 4)
    heads = max(1, hidden // head_dim)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        rope_theta=1_000_000.0,  # Qwen3's
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model


def build_real_shapes(
    path: str | Path,
    seed: int = 0,
    layers: int = 8,
    hidden: int = 512,
    vocab_size: int = VOCAB_SIZE,
) -> Path:
    """Build the model and tokenizer into `path` (a local HF folder forkrl and TRL load) and return it.

    Cached: a folder whose marker records the same settings is returned as it is.
    """
    path = Path(path)
    want = {"seed": seed, "layers": layers, "hidden": hidden, "vocab_size": vocab_size}
    marker = path / MARKER
    if marker.is_file():
        try:
            if {k: v for k, v in json.loads(marker.read_text()).items() if k in want} == want:
                return path
        except (OSError, ValueError):
            pass
    tokenizer, trained = build_tokenizer(vocab_size, seed=seed)
    model = build_model(
        vocab_size,
        hidden=hidden,
        layers=layers,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seed=seed,
    )
    path.mkdir(parents=True, exist_ok=True)
    if marker.exists():
        marker.unlink()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    marker.write_text(
        json.dumps(
            dict(
                want,
                trained_tokens=trained,
                padded_tokens=vocab_size - trained,
                params=n_params,
                note=TOKENIZER_NOTE,
            ),
            indent=1,
        )
    )
    return path


if __name__ == "__main__":  # python -m forkrl.models.real_shapes [PATH [LAYERS [HIDDEN]]]
    import sys

    args = sys.argv[1:]
    dims = dict(zip(("layers", "hidden"), (int(a) for a in args[1:3])))
    print(build_real_shapes(args[0] if args else "/tmp/forkrl-real-shapes", **dims))
