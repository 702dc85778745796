"""Call TRL's own GRPOTrainer methods on plain tensors: a stand-in trainer and accelerator.

`GRPOTrainer.get_high_entropy_mask` and `GRPOTrainer._compute_loss` (TRL 1.16,
`trl/trainer/grpo_trainer.py`) read a few attributes of the trainer and ask accelerate to pad, gather
and reduce across processes; `FakeAccelerator` does those with torch.distributed (or nothing, in one
process), so the tests run TRL's code itself rather than a restatement of it.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
import torch.distributed as dist


class FakeAccelerator:
    """accelerate's gather / pad_across_processes / reduce over the default process group (if any)."""

    def __init__(self):
        self.on = dist.is_available() and dist.is_initialized()
        self.num_processes = dist.get_world_size() if self.on else 1
        self.sync_gradients = True

    def gather(self, t):
        if not self.on:
            return t
        parts = [torch.empty_like(t) for _ in range(self.num_processes)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts) if t.dim() else torch.stack(parts)

    gather_for_metrics = gather

    def pad_across_processes(self, t, dim=0, pad_index=0):
        most = int(self.gather(torch.tensor([t.shape[0]])).max()) if self.on else t.shape[0]
        return torch.cat([t, t.new_full((most - t.shape[0],), pad_index)])

    def reduce(self, t, reduction="sum"):
        t = t.clone()
        if self.on:
            dist.all_reduce(t)
        return t


def trl_trainer(**overrides) -> SimpleNamespace:
    """A stand-in GRPOTrainer with `get_high_entropy_mask` bound to it (TRL's own method)."""
    from trl import GRPOTrainer

    fake = SimpleNamespace(
        top_entropy_quantile=0.2,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=0.0,
        loss_type="dapo",
        epsilon_low=0.2,
        epsilon_high=0.28,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
        accelerator=FakeAccelerator(),
        max_completion_length=None,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
    )
    for k, v in overrides.items():
        setattr(fake, k, v)
    fake.get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask.__get__(fake)
    return fake


def trl_loss(fake, logp, entropy, inputs) -> torch.Tensor:
    """`GRPOTrainer._compute_loss` with the per-token log-probs and entropies given (not a forward)."""
    from trl import GRPOTrainer

    fake._get_per_token_logps_and_entropies = lambda *a, **k: (logp, entropy, None)
    return GRPOTrainer._compute_loss(fake, fake.model, inputs)
