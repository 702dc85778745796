"""Rollouts with a Hugging Face causal LM: batched sampling with a KV cache (`model.generate`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)  # (B,)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    greedy: bool = False,
    generator_seed: int | None = None,
    logits_processor=None,
) -> Rollout:
    """Sample `n` completions per prompt. Pure temperature sampling (no top-k) unless `top_p` < 1.

    The sampler distribution must match the scoring pass: softmax(logits / temperature) over the
    full vocabulary, which is why top-k is switched off explicitly (transformers defaults to 50).
    """
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    expanded = [p for p in prompts for _ in range(n)]
    tokenizer.padding_side = "left"
    enc = tokenizer(expanded, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    was_training = model.training
    model.eval()
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id)
    if greedy:
        kwargs.update(do_sample=False, top_k=None, top_p=None, temperature=None)
    else:
        kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=top_p)
    out = model.generate(**enc, **kwargs, logits_processor=logits_processor)
    model.train(was_training)
    P = enc["input_ids"].shape[1]
    response = out[:, P:]  # (B, L)
    is_eos = response == eos_id
    # Valid = up to and including the first EOS (generate pads after it).
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    response_mask = ~after_eos
    if response.shape[1] == 0:
        response_mask = torch.zeros_like(response, dtype=torch.bool)
    truncated = ~is_eos.any(-1)
    response = response.masked_fill(~response_mask, pad_id)
    attention_mask = torch.cat([enc["attention_mask"], response_mask.long()], dim=1)
    texts = tokenizer.batch_decode(response.masked_fill(is_eos, pad_id), skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([enc["input_ids"], response], dim=1),
        attention_mask=attention_mask,
        prompt_len=P,
        response_ids=response,
        response_mask=response_mask,
        truncated=truncated,
        texts=texts,
        group_size=n,
    )
