"""LoRA adapters (PEFT) on the policy: what the trainer needs beyond `peft.get_peft_model`.

With `model.lora_rank` > 0 the policy is a `peft.PeftModel` whose adapters are the only trainable
parameters. The rest of forkrl sees it through these helpers:

- `unwrap(model)`: the Hugging Face model inside (its LoRA layers active), for code that reaches the
  transformer body or calls the forward with cache arguments (scoring, generation);
- `AdaptersOff(model)`: the reference policy for a KL term, the same weights with the adapters
  disabled (`PeftModel.disable_adapter()`), so no second copy of the model is held;
- `merged_state(model)`: the weights with every adapter merged in, under the base model's own names,
  computed without touching the model (what the vLLM engine loads, and `final/`).

Checkpoints hold the adapters only (`PeftModel.save_pretrained`: adapter_config.json and
adapter_model.safetensors, a few MB); a resumed run loads the base from `model.path` and the adapters
from the checkpoint (`load_adapters`), and refuses a checkpoint whose adapter tensors do not match the
model's. `final/` is the merged model (loadable by anything, e.g. `forkrl eval --model RUN_DIR`), and
`final-adapter/` the adapters alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from forkrl.errors import ConfigError
from forkrl.models.io import CheckpointError

INSTALL = "pip install 'forkrl[lora]'"


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def unwrap(model):
    """The Hugging Face model inside a PEFT model (adapters still active), or `model` itself."""
    return model.get_base_model() if is_peft(model) else model


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ConfigError(f"model.lora_rank > 0 needs peft ({e}); install it with `{INSTALL}`") from None
    return peft


def lora_config(rank: int, alpha: float, dropout: float, targets: str):
    peft = _peft()
    modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    return peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_adapters(model, rank: int, alpha: float, dropout: float, targets: str):
    """`model` with fresh LoRA adapters (PEFT's initialisation: B = 0, so it starts as the base)."""
    try:
        return _peft().get_peft_model(model, lora_config(rank, alpha, dropout, targets))
    except ValueError as e:  # e.g. target modules not found in the model
        raise ConfigError(f"model.lora_targets={targets!r}: {e}") from None


def load_adapters(model, checkpoint: Path):
    """The base `model` with the trainable adapters saved in `checkpoint`, every tensor accounted for."""
    peft = _peft()
    from safetensors.torch import load_file

    path = Path(checkpoint)
    files = sorted(path.glob("adapter_model.safetensors"))
    if not files or not (path / "adapter_config.json").exists():
        raise CheckpointError(
            f"{path}: no LoRA adapters (adapter_config.json, adapter_model.safetensors); it was not written "
            "by a run with model.lora_rank > 0"
        )
    wrapped = peft.PeftModel.from_pretrained(model, path, is_trainable=True)
    saved = set(load_file(str(files[0])).keys())
    expected = set(peft.get_peft_model_state_dict(wrapped).keys())
    if saved != expected:
        missing, extra = sorted(expected - saved), sorted(saved - expected)
        raise CheckpointError(
            f"{files[0]}: its adapter tensors do not match the model's (missing {missing[:4]}, unexpected "
            f"{extra[:4]}); resume from a checkpoint of this run"
        )
    return wrapped


class AdaptersOff:
    """The base policy under a PEFT model: `with ref.active(): ...` runs the model with its adapters
    disabled (the reference policy for KL), in eval mode."""

    def __init__(self, model):
        self.model = model

    def active(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            was = self.model.training
            self.model.eval()
            try:
                with self.model.disable_adapter():
                    yield self.model
            finally:
                self.model.train(was)

        return ctx()


@torch.no_grad()
def merged_state(model) -> dict[str, torch.Tensor]:
    """The base model's state dict with each LoRA layer's weight replaced by W + ΔW (new tensors; the
    model is not changed). Keys are the base model's own (`...q_proj.weight`)."""
    base = unwrap(model)
    out: dict[str, torch.Tensor] = {}
    for name, t in base.state_dict().items():
        if "lora_" not in name:
            out[name.replace(".base_layer.", ".")] = t
    for name, module in base.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            active = [a for a in module.active_adapters if a in getattr(module, "lora_A", {})]
            weight = module.base_layer.weight
            for a in active:
                weight = weight + module.get_delta_weight(a).to(weight.dtype)
            out[f"{name}.weight"] = weight
    return out
