"""The HF backend sampling from a copy of the policy in a lower precision (``rollout.dtype``).

On a CPU with AMX/AVX512-BF16 a bfloat16 copy of SmolLM2's weights decodes 1.8x faster than the
float32 policy, and 1.4x faster than the float32 policy under bf16 autocast, which casts the weights
for every matmul (one thread: 311 against 173 and 228 tokens/s; docs/DESIGN.md, "Precision"). The
copy exists only while it samples: each call casts the policy's current weights (a fraction of a
second for 135M parameters) and frees them afterwards, so the update never holds them and every
rollout samples the current policy, rounded to bfloat16. The rollout's entropies are the copy's (the
paper preset selects on them); its log-probs are not the update's old log-probs (docs/DESIGN.md,
"Precision", says why and what is used instead).
"""

from __future__ import annotations

import contextlib
import copy

import torch

from forkrl.rollout.base import Rollout
from forkrl.rollout.hf import generate

__all__ = ["CastSampler"]


class CastSampler:
    """`generate` on a copy of `model` in `dtype`: the rollout backend of ``rollout.dtype=bfloat16``.

    Called as the collect loop calls any backend, with the prompts' own seeds (`seeded`), so a run
    resumes bit-exactly. Full-parameter models only (no LoRA adapters, no FSDP2 shards). Between
    calls the copy's parameters are empty: only the module structure stays."""

    seeded = True  # takes `prompt_seeds` as the HF backend does

    def __init__(self, model: torch.nn.Module, tokenizer, dtype: torch.dtype):
        self.tokenizer, self.dtype, self.source = tokenizer, dtype, model
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self._release()  # buffers (the rotary frequencies) stay as they are, as in a model loaded in dtype

    def _release(self) -> None:
        for p in self.model.parameters():
            p.data = torch.empty(0, dtype=self.dtype, device=p.device)

    @contextlib.contextmanager
    def weights(self):
        """The copy with the source's current parameters cast to `dtype`, freed on leaving."""
        source = dict(self.source.named_parameters())
        try:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    p.data = source[name].detach().to(self.dtype)
            yield self.model
        finally:
            self._release()

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Sample from `model` from the next call on (each call casts its weights as they are then)."""
        self.source = model

    def __call__(self, prompts: list[str], **kw) -> Rollout:
        with self.weights() as model:
            return generate(model, self.tokenizer, prompts, **kw)

    def close(self) -> None:
        self.model = self.source = None
