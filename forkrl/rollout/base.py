"""What every generation backend returns: the `Rollout` (prompts and sampled responses, one row per
sample), and `assemble_rollout`, which builds it from left-padded prompts and sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Rollout:
    """Sampled completions, one row per (prompt, sample). Row i belongs to prompt i // n.

    `input_ids` is the left-padded prompt followed by the right-padded response, so a single
    forward over it scores every response token (see `response_slice`).
    """

    input_ids: torch.Tensor  # (B, P + L) long
    attention_mask: torch.Tensor  # (B, P + L) long, 0 on padding
    prompt_len: int  # P, the padded prompt width
    response_ids: torch.Tensor  # (B, L) long, pad after EOS
    response_mask: torch.BoolTensor  # (B, L) True on generated tokens up to and including EOS
    truncated: torch.BoolTensor  # (B,) no EOS within max_new_tokens
    texts: list[str]  # decoded responses without EOS or padding
    group_size: int
    sampler_logp: torch.Tensor | None = None  # (B, L) float32 log-prob of each sampled token at T
    sampler_entropy: torch.Tensor | None = None  # (B, L) float32 entropy of softmax(logits / T)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)  # (B,)


def assemble_rollout(
    tokenizer,
    prompt_ids: Tensor,
    prompt_attn: Tensor,
    response: Tensor,
    *,
    eos_id: int,
    pad_id: int,
    group_size: int,
    sampler_logp: Tensor | None = None,
    sampler_entropy: Tensor | None = None,
    present: Tensor | None = None,
) -> Rollout:
    """The `Rollout` of left-padded prompts (B, P) and sampled tokens (B, L), for every backend.

    A row is valid up to and including its first EOS (and, with `present`, only where a token was
    sampled); everything after is padding, and the texts are decoded without EOS or padding.
    """
    is_eos = response == eos_id
    if present is not None:
        is_eos &= present
    response_mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # (B, L)
    if present is not None:
        response_mask &= present
    truncated = ~is_eos.any(-1)
    response = response.masked_fill(~response_mask, pad_id)
    texts = tokenizer.batch_decode(response.masked_fill(is_eos, pad_id), skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([prompt_ids, response], dim=1),
        attention_mask=torch.cat([prompt_attn, response_mask.long()], dim=1),
        prompt_len=prompt_ids.shape[1],
        response_ids=response,
        response_mask=response_mask,
        truncated=truncated,
        texts=texts,
        group_size=group_size,
        sampler_logp=sampler_logp.masked_fill(~response_mask, 0.0) if sampler_logp is not None else None,
        sampler_entropy=sampler_entropy.masked_fill(~response_mask, 0.0)
        if sampler_entropy is not None
        else None,
    )
