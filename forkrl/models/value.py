"""PPO's critic: a causal LM's transformer body with a scalar value head, ``V(s_t)`` per position.

The body is the policy checkpoint's (or any local causal-LM folder's) transformer without its LM
head; the head is ``nn.Linear(hidden, 1)``, initialised like the HF reward/critic heads
(``AutoModelForTokenClassification``'s ``score``, the head verl's critic uses): weights
``N(0, initializer_range)``, bias 0, so a fresh critic predicts values near 0. The head is kept in
float32 whatever the body's dtype (values are regression targets near 0..1, where bfloat16's three
significant digits would be the critic's resolution).

A saved critic is a folder: the body as ``save_pretrained`` writes it (``config.json``,
``model.safetensors``) plus ``value_head.safetensors``. Loading reads safetensors only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["VALUE_HEAD_FILE", "ValueModel"]

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueModel(nn.Module):
    """``values = head(body(x))``: ``(B, T)`` float32 values from a transformer body.

    ``base_model_prefix`` names the body as Hugging Face causal LMs do, so
    ``forkrl.training.forward.response_hidden`` runs it exactly as it runs the policy's body (position
    ids of left-padded prompts, a prompt shared by a group run once).
    """

    base_model_prefix = "model"

    def __init__(self, body: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.model = body
        self.config = body.config
        if head is None:
            head = nn.Linear(self.config.hidden_size, 1, dtype=torch.float32)
            nn.init.normal_(head.weight, std=getattr(self.config, "initializer_range", 0.02))
            nn.init.zeros_(head.bias)
        self.value_head = head.to(device=next(body.parameters()).device, dtype=torch.float32)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
    ) -> ValueModel:
        """A saved critic folder (body and head), or any local causal-LM folder (its body, a fresh head).

        The body's tensors must match its config (`forkrl.models.loading.check_loading_info`); the
        folder's own code runs only with `trust_remote_code`."""
        from safetensors import SafetensorError
        from transformers import AutoModel, AutoModelForCausalLM

        from forkrl.models.io import DamagedCheckpointError
        from forkrl.models.loading import check_loading_info, remote_code_error

        path = Path(path)
        saved = (path / VALUE_HEAD_FILE).is_file()
        kw = dict(dtype=dtype, local_files_only=True, trust_remote_code=bool(trust_remote_code))
        try:
            loaded, info = (AutoModel if saved else AutoModelForCausalLM).from_pretrained(
                path, output_loading_info=True, ignore_mismatched_sizes=True, **kw
            )
        except ValueError as e:
            if (err := remote_code_error(path, e)) is not None:
                raise err from None
            raise
        except SafetensorError as e:
            raise DamagedCheckpointError(
                f"critic folder {str(path)!r}: a weights file is damaged ({e})"
            ) from None
        check_loading_info(path, info)
        if saved:
            from safetensors.torch import load_file

            state = load_file(path / VALUE_HEAD_FILE)
            head = nn.Linear(state["weight"].shape[1], 1, dtype=torch.float32)
            head.load_state_dict(state)
            return cls(loaded.to(device), head)
        return cls(getattr(loaded, loaded.base_model_prefix).to(device))

    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """The body as a HF folder plus the head's safetensors; `state_dict`: this module's full weights
        (e.g. gathered from FSDP2 shards), else its own."""
        from safetensors.torch import save_file

        path = Path(path)
        body = head = None
        if state_dict is not None:
            body = {k[len("model.") :]: v for k, v in state_dict.items() if k.startswith("model.")}
            head = {k[len("value_head.") :]: v for k, v in state_dict.items() if k.startswith("value_head.")}
        self.model.save_pretrained(path, state_dict=body)
        head = head if head is not None else self.value_head.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, path / VALUE_HEAD_FILE)

    def values_from_hidden(self, hidden: Tensor) -> Tensor:
        """``(..., d)`` last hidden states -> ``(...)`` float32 values."""
        return self.value_head(hidden.float()).squeeze(-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kw) -> Tensor:
        """Values at every position of ``input_ids``: ``(B, T)`` float32."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
        return self.values_from_hidden(out.last_hidden_state)  # (B, T)
