"""Loading a model: the device, a local Hugging Face causal LM and its tokenizer, gradient checkpointing.

Training (`forkrl train`), evaluation (`forkrl eval`) and the analysis tools load models through here,
with the same checks: a folder that is not a causal LM, or a tokenizer without EOS or pad token, fails
before any work starts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from forkrl.errors import ConfigError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = ASSETS / "warmstart-pick"


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when there is a GPU, else the CPU; any other name as torch reads it (`cuda:1`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model_and_tokenizer(
    path: str | Path | None, *, dtype: str = "float32", device: str = "cpu", pad_token: str | None = None
):
    """A local HF causal LM and its tokenizer, with the checks that must pass before training starts."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path else DEFAULT_MODEL
    if not path.is_dir():
        raise ConfigError(
            f"model.path={str(path)!r} is not a folder; give a local Hugging Face checkpoint folder"
        )
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path={str(path)!r}: no usable config.json ({e})") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if hf_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(
            f"model.path={str(path)!r} ({type(hf_config).__name__}) is not a causal LM; "
            "give a checkpoint that AutoModelForCausalLM loads (Qwen3, Llama, ...)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path={str(path)!r}: cannot load the weights ({e})") from None
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer in {path} has no EOS token: completions could never end")
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    if tokenizer.pad_token_id is None:
        raise ConfigError(
            f"the tokenizer in {path} has no pad token; set model.pad_token to one it has "
            f"(its EOS token {tokenizer.eos_token!r} works: padding is masked out)"
        )
    return model.to(device), tokenizer


def enable_gradient_checkpointing(model) -> None:
    """transformers' gradient checkpointing (non-reentrant), with a clear error for models without it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"model.gradient_checkpointing=true: {type(model).__name__} does not support gradient checkpointing"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
