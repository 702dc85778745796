"""The HF backend sampling from a copy of the policy in a lower precision (``rollout.dtype``).

On a CPU with AMX/AVX512-BF16 a bfloat16 copy of SmolLM2's weights decodes 1.8x faster than the
float32 policy, and 1.4x faster than the float32 policy under bf16 autocast, which casts the weights
for every matmul (one thread: 311 against 173 and 228 tokens/s; docs/DESIGN.md, "Precision"). The
copy costs half the weights' memory and is refreshed from the policy after each optimizer step
(`sync_weights`, called by `forkrl.training.step.sync_sampler`), so every rollout samples the current
policy, rounded to bfloat16. The rollout's log-probs and entropies are then the copy's: with
`rollout.reuse_logprobs` they are the update's old log-probs and the paper preset's selection
entropies, within the tolerance that docs/DESIGN.md states and bench/bf16.py measures.
"""

from __future__ import annotations

import copy

import torch

from forkrl.rollout.base import Rollout
from forkrl.rollout.hf import generate

__all__ = ["CastSampler"]


class CastSampler:
    """`generate` on a copy of `model` in `dtype`: the rollout backend of ``rollout.dtype=bfloat16``.

    Called as the collect loop calls any backend, with the prompts' own seeds (`seeded`), so a run
    resumes bit-exactly. Full-parameter models only (no LoRA adapters, no FSDP2 shards)."""

    seeded = True  # takes `prompt_seeds` as the HF backend does

    def __init__(self, model: torch.nn.Module, tokenizer, dtype: torch.dtype):
        self.tokenizer, self.dtype = tokenizer, dtype
        self.model = copy.deepcopy(model).to(dtype).eval()
        self.model.requires_grad_(False)
        if getattr(self.model.config, "use_cache", True) is False:
            self.model.config.use_cache = True

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Sample from `model`'s current parameters (rounded to `dtype`) from the next call on."""
        mine = dict(self.model.named_parameters())
        for name, p in model.named_parameters():
            mine[name].copy_(p)

    def __call__(self, prompts: list[str], **kw) -> Rollout:
        return generate(self.model, self.tokenizer, prompts, **kw)

    def close(self) -> None:
        self.model = None
