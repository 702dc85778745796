"""Model forwards over rollouts: hidden states at response positions, scoring pass, training log-probs.

Response token j of a row is predicted at position P - 1 + j of `input_ids` (left-padded prompt of
width P, then the response). Position ids follow the attention mask exactly as `generate` builds
them for left-padded prompts, so the scoring pass reproduces the sampler's distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor

from forkrl.core.entropy import token_logprobs_and_entropy
from forkrl.core.lm_head import lm_head_params, score_from_hidden, selected_logprobs


def position_ids(attention_mask: Tensor) -> Tensor:
    """0 at the first real token of each left-padded row, as `generate` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def backbone(model) -> torch.nn.Module:
    """The transformer body of a HF causal LM (everything but the LM head, final norm included)."""
    return getattr(model, model.base_model_prefix)


def response_hidden(model, input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
    """Last hidden states at the positions that predict response tokens: (B, L, d)."""
    L = input_ids.shape[1] - prompt_len
    out = backbone(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state[:, prompt_len - 1 : prompt_len - 1 + L]  # (B, L, d)


def response_logits(model, input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
    """Full logits at response positions (the path with the selective head off): (B, L, V)."""
    L = input_ids.shape[1] - prompt_len
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    )
    return out.logits[:, prompt_len - 1 : prompt_len - 1 + L]  # (B, L, V)


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
) -> tuple[Tensor, Tensor]:
    """Old log-probs and entropies (float32, (B, L)) of every response token, without grad.

    With the selective head the LM head is streamed over token and vocabulary tiles (no (N, V)
    tensor); without it the full logits are computed, as TRL and verl do.
    """
    if selective_head:
        hidden = response_hidden(model, input_ids, attention_mask, prompt_len)  # (B, L, d)
        weight, bias = lm_head_params(model)
        return score_from_hidden(hidden, weight, response_ids, bias=bias, temperature=temperature)
    logits = response_logits(model, input_ids, attention_mask, prompt_len)  # (B, L, V)
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
):
    """One training forward: current entropies (no grad, if asked) and a `finish(sel_mask)` that
    returns log-probs with grad, (B, L) float32.

    The selection may depend on the current entropies, so the log-probs are finished after it is
    made. With the selective head they exist only at `sel_mask` (0 elsewhere, where the loss
    ignores them) and the LM head runs on the k selected positions only.
    """
    if selective_head:
        hidden = response_hidden(model, input_ids, attention_mask, prompt_len)  # (B, L, d)
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
    logits = response_logits(model, input_ids, attention_mask, prompt_len)  # (B, L, V)
    logp_all, entropy = token_logprobs_and_entropy(logits, response_ids, temperature=temperature)
    entropy = entropy.detach() if need_entropy else None
    return entropy, (lambda mask: logp_all)
