"""Model forwards over rollouts: hidden states at response positions, scoring pass, training log-probs.

Response token j of a row is predicted at position P - 1 + j of `input_ids` (left-padded prompt of
width P, then the response). Position ids follow the attention mask exactly as `generate` builds
them for left-padded prompts, so the scoring pass reproduces the sampler's distribution.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from forkrl.core.entropy import token_logprobs_and_entropy
from forkrl.core.lm_head import lm_head_params, no_autocast, score_from_hidden, selected_logprobs
from forkrl.models.lora import unwrap
from forkrl.rollout.hf import cache_kwarg


def body_autocast(model, dtype: str):
    """`torch.autocast` to `dtype` on the model's device for the training forward (model.update_dtype),
    or nothing for float32. The LM head leaves it (forkrl.core.lm_head.no_autocast): only the body's
    matmuls run in bf16; the backward follows the forward's dtypes, gradients land in the float32
    weights (docs/DESIGN.md, "Precision")."""
    if dtype == "float32":
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=getattr(torch, dtype))


def position_ids(attention_mask: Tensor) -> Tensor:
    """0 at the first real token of each left-padded row, as `generate` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def backbone(model) -> torch.nn.Module:
    """The transformer body of a HF causal LM (everything but the LM head, final norm included); of the
    model inside a PEFT model, its LoRA layers active (forkrl.models.lora)."""
    model = unwrap(model)
    return getattr(model, model.base_model_prefix)


def response_hidden(
    model, input_ids: Tensor, attention_mask: Tensor, prompt_len: int, group_size: int = 1
) -> Tensor:
    """Last hidden states at the positions that predict response tokens: (B, L, d).

    With `group_size` G > 1 and rows in groups of G that share a prompt (GRPO's layout), the prompt is
    run once per group and its KV cache repeated G times, then the responses run on top of it: the
    same values (up to float rounding) for about 1/G of the prompt's compute, with gradients flowing
    into the prompt positions through the repeated cache.
    """
    B, T = input_ids.shape
    L = T - prompt_len
    body = backbone(model)
    if _shared_prompts(input_ids, prompt_len, group_size) and L > 0:
        from transformers import DynamicCache

        G, P = group_size, prompt_len
        p_ids, p_mask = input_ids[::G, :P], attention_mask[::G, :P]  # (B/G, P)
        cache = DynamicCache()
        kw = cache_kwarg(body)
        out_p = body(
            input_ids=p_ids,
            attention_mask=p_mask,
            position_ids=position_ids(p_mask),
            use_cache=True,
            **{kw: cache},
        )
        cache.batch_repeat_interleave(G)
        out_r = body(
            input_ids=input_ids[:, P:],
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask)[:, P:],
            use_cache=True,
            **{kw: cache},
        )
        first = out_p.last_hidden_state[:, -1:].repeat_interleave(G, dim=0)  # (B, 1, d): predicts token 0
        return torch.cat([first, out_r.last_hidden_state[:, :-1]], dim=1)  # (B, L, d)
    out = body(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state[:, prompt_len - 1 : prompt_len - 1 + L]  # (B, L, d)


def _shared_prompts(input_ids: Tensor, prompt_len: int, group_size: int) -> bool:
    B = input_ids.shape[0]
    if group_size <= 1 or B % group_size or prompt_len == 0:
        return False
    prompts = input_ids[:, :prompt_len]
    return bool(torch.equal(prompts[::group_size].repeat_interleave(group_size, dim=0), prompts))


def response_logits(
    model, input_ids: Tensor, attention_mask: Tensor, prompt_len: int, group_size: int = 1
) -> Tensor:
    """Full logits at response positions (the path with the selective head off): (B, L, V).

    The body runs as in `response_hidden` (prompt once per group when possible) and the model's own
    head is applied to every position, as TRL and verl do. Models that post-process their logits
    (soft-capping, scaling) run their whole forward instead.
    """
    L = input_ids.shape[1] - prompt_len
    try:
        lm_head_params(model)
    except (NotImplementedError, ValueError):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
        )
        return out.logits[:, prompt_len - 1 : prompt_len - 1 + L]
    hidden = response_hidden(model, input_ids, attention_mask, prompt_len, group_size)  # (B, L, d)
    with no_autocast(hidden):  # the head in the weights' dtype, as the selective head
        return model.get_output_embeddings()(hidden.to(lm_head_params(model)[0].dtype))  # (B, L, V)


@torch.no_grad()
def scoring_pass(
    model,
    input_ids,
    attention_mask,
    prompt_len,
    response_ids,
    *,
    temperature: float,
    selective_head: bool = True,
    group_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """Old log-probs and entropies (float32, (B, L)) of every response token, without grad.

    With the selective head the LM head is streamed over token and vocabulary tiles (no (N, V)
    tensor); without it the full logits are computed, as TRL and verl do.
    """
    if selective_head:
        hidden = response_hidden(model, input_ids, attention_mask, prompt_len, group_size)  # (B, L, d)
        weight, bias = lm_head_params(model)
        return score_from_hidden(hidden, weight, response_ids, bias=bias, temperature=temperature)
    logits = response_logits(model, input_ids, attention_mask, prompt_len, group_size)  # (B, L, V)
    return token_logprobs_and_entropy(logits, response_ids, temperature=temperature)


def train_logprobs(
    model,
    input_ids,
    attention_mask,
    prompt_len,
    response_ids,
    *,
    temperature: float,
    selective_head: bool,
    need_entropy: bool,
    group_size: int = 1,
):
    """One training forward: current entropies (no grad, if asked) and a `finish(sel_mask)` that
    returns log-probs with grad, (B, L) float32.

    The selection may depend on the current entropies, so the log-probs are finished after it is
    made. With the selective head they exist only at `sel_mask` (0 elsewhere, where the loss
    ignores them) and the LM head runs on the k selected positions only.
    """
    if selective_head:
        hidden = response_hidden(model, input_ids, attention_mask, prompt_len, group_size)  # (B, L, d)
        weight, bias = lm_head_params(model)
        entropy = None
        if need_entropy:
            _, entropy = score_from_hidden(
                hidden.detach(), weight, response_ids, bias=bias, temperature=temperature
            )

        def finish(mask: Tensor) -> Tensor:
            logp_sel = selected_logprobs(
                hidden[mask], weight, response_ids[mask], bias=bias, temperature=temperature
            )
            logp = torch.zeros(response_ids.shape, dtype=logp_sel.dtype, device=logp_sel.device)  # (B, L)
            return logp.masked_scatter(mask, logp_sel)

        return entropy, finish
    logits = response_logits(model, input_ids, attention_mask, prompt_len, group_size)  # (B, L, V)
    logp_all, entropy = token_logprobs_and_entropy(logits, response_ids, temperature=temperature)
    entropy = entropy.detach() if need_entropy else None
    return entropy, (lambda mask: logp_all)
