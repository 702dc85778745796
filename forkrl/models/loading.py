"""Loading a model: the device, a local Hugging Face causal LM and its tokenizer, gradient checkpointing.

Training (`forkrl train`), evaluation (`forkrl eval`) and the analysis tools load models through here,
with the same checks: a folder that is not a causal LM, or a tokenizer without EOS or pad token, fails
before any work starts.

Loading is a trust boundary (DESIGN: Traps worth a test). Weights come from safetensors; code in a
model folder (`auto_map`) never runs unless the user opts in with `model.trust_remote_code`
(transformers would otherwise ask "run the custom code? [y/N]" on a terminal); and every tensor the
model needs must be in the folder, with no tensor left over: a checkpoint that lost a tensor, or a
`config.json` that is not the weights' own, would otherwise load with random values where the
weights are missing (transformers prints a load report and goes on).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from forkrl.errors import ConfigError
from forkrl.models.io import DamagedCheckpointError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: a folder holding none of these has no tokenizer (fast tokenizers, SentencePiece, BPE and WordPiece vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "vocab.txt")
DEFAULT_MODEL = ASSETS / "warmstart-pick"


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when there is a GPU, else the CPU; any other name as torch reads it (`cuda:1`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N (model.device, --device)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: torch sees no CUDA GPU here; use auto or cpu")
    return device


def _shown(keys, n: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def check_loading_info(path: str | Path, info: dict) -> None:
    """Refuse a load whose tensors do not match the model: `info` is transformers' loading info
    (`from_pretrained(..., output_loading_info=True)`).

    transformers has already removed what it legitimately fills in itself: tied weights whose source
    was loaded (`lm_head.weight` under `tie_word_embeddings`), each class's `_keys_to_ignore_on_load_*`
    patterns, old `rotary_emb.inv_freq` and `position_ids` buffers. Whatever is left is a tensor that
    would start from random values (missing, or loaded with another shape) or one the model ignores
    (unexpected: the config describes another model than the weights).
    """
    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    mismatched = [
        f"{key} (file {tuple(ckpt)}, config {tuple(model)})"
        for key, ckpt, model in info.get("mismatched_keys") or ()
    ]
    if not (missing or unexpected or mismatched):
        return
    found = []
    if missing:
        found.append(f"missing from the weights (they would start from random values): {_shown(missing)}")
    if mismatched:
        found.append(f"with another shape than config.json gives: {_shown(mismatched, 3)}")
    if unexpected:
        found.append(f"in the weights but not in the model config.json describes: {_shown(unexpected)}")
    raise DamagedCheckpointError(
        f"model folder {str(path)!r}: its weights do not match its config.json; tensors "
        + "; tensors ".join(found)
        + ". Use the config.json saved with these weights, or a complete checkpoint (a forkrl checkpoint "
        "that lost a tensor is damaged: resume from an earlier one)"
    )


def remote_code_error(path: Path, e: Exception) -> ConfigError | None:
    """transformers' refusal to run a folder's code (it says to pass trust_remote_code=True) in forkrl's terms."""
    if "trust_remote_code" not in str(e):
        return None
    return ConfigError(
        f"model folder {str(path)!r} needs its own Python code to load (auto_map in its config), which "
        "forkrl does not run by default; read that code, and set model.trust_remote_code=true only if "
        "you trust it (it runs with your permissions)"
    )


def resolve_model_path(path: str | Path | None) -> Path:
    """A local model folder: `path` itself, the shipped warm start for None, or for a Hugging Face name
    (`Qwen/Qwen3-0.6B`) its snapshot in the local hub cache (`HF_HUB_CACHE`, `HF_HOME`), never
    downloaded (`huggingface_hub.snapshot_download(local_files_only=True)`)."""
    if not path:
        return DEFAULT_MODEL
    from forkrl.models.fetch import known_model
    from forkrl.models.gguf import convert_gguf, find_gguf

    name = str(path)
    if not Path(name).exists() and (known := known_model(name)) is not None:
        return known
    p = Path(path)
    if (gguf := find_gguf(p)) is not None:  # converted once into a cached folder (forkrl.models.gguf)
        return convert_gguf(gguf, log=lambda msg: print(msg, file=sys.stderr))
    if p.is_dir():
        return p
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise ConfigError(
                f"model.path={name!r} is neither a folder nor a model in the local Hugging Face cache "
                f"({HF_HUB_CACHE}); forkrl never downloads: fetch it where a network is reachable "
                f"(`huggingface-cli download {name}`) and copy the cache here, or give a local folder"
            ) from None
    raise ConfigError(
        f"model.path={name!r} is not a folder; give a local Hugging Face checkpoint folder, a .gguf file, "
        "or a model forkrl fetches (`forkrl model get smollm2-135m-instruct`, then model.path=smollm2-135m-instruct)"
    )


def load_model_and_tokenizer(
    path: str | Path | None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    pad_token: str | None = None,
    trust_remote_code: bool = False,
):
    """A local HF causal LM and its tokenizer, with the checks that must pass before training starts.

    `trust_remote_code`: let transformers import the folder's own code (`auto_map`); off by default,
    so a folder from someone else cannot run code (`model.trust_remote_code`).
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(path)
    if not sys.stderr.isatty():  # transformers' carriage-return loading bars would fill log files
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    trust = bool(trust_remote_code)  # always passed: left unset, transformers asks on a terminal
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise remote_code_error(path, e) or ConfigError(
            f"model.path={str(path)!r}: no usable config.json ({e})"
        ) from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    custom = trust and "AutoModelForCausalLM" in (getattr(hf_config, "auto_map", None) or {})
    if hf_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not custom:
        raise ConfigError(
            f"model.path={str(path)!r} ({type(hf_config).__name__}) is not a causal LM; "
            "give a checkpoint that AutoModelForCausalLM loads (Qwen3, Llama, ...)"
        )
    try:
        # ignore_mismatched_sizes: report a shape mismatch through the loading info, by name, below.
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=getattr(torch, dtype),
            local_files_only=True,
            trust_remote_code=trust,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError) as e:
        raise remote_code_error(path, e) or ConfigError(
            f"model.path={str(path)!r}: cannot load the weights ({e})"
        ) from None
    except SafetensorError as e:
        raise DamagedCheckpointError(
            f"model folder {str(path)!r}: a weights file is damaged ({e}); copy it again, or resume from "
            "an earlier checkpoint"
        ) from None
    check_loading_info(path, info)
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json alone, and the first forward fails
        # with "cannot reshape tensor of 0 elements" (issue 28, item 10)
        raise ConfigError(
            f"model folder {str(path)!r} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...): save the "
            "model's tokenizer there (tokenizer.save_pretrained(FOLDER)), or copy its tokenizer files from the "
            "model it was trained from"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust)
    except ValueError as e:
        if (err := remote_code_error(path, e)) is not None:
            raise err from None
        if "instantiate the backend tokenizer" in str(e):  # transformers then suggests sentencepiece
            raise DamagedCheckpointError(
                f"model folder {str(path)!r}: no usable tokenizer (tokenizer.json is missing or unreadable); "
                "save the model's tokenizer there (tokenizer.save_pretrained), or resume from an earlier "
                "checkpoint"
            ) from None
        raise
    check_tokenizer(tokenizer, f"the tokenizer in {path}", pad_token)
    return model.to(device), tokenizer


def check_tokenizer(tokenizer, what: str, pad_token: str | None = None) -> None:
    """A tokenizer training can use: an EOS token, and a pad token (`pad_token` set first, when given)."""
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{what} has no EOS token: completions could never end")
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    if tokenizer.pad_token_id is None:
        raise ConfigError(
            f"{what} has no pad token; set model.pad_token to one it has "
            f"(its EOS token {tokenizer.eos_token!r} works: padding is masked out)"
        )


def enable_gradient_checkpointing(model) -> None:
    """transformers' gradient checkpointing (non-reentrant), with a clear error for models without it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"model.gradient_checkpointing=true: {type(model).__name__} does not support gradient checkpointing"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
