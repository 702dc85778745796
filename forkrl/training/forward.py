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
from forkrl.rollout.lean import STATIC_ROPE, SUPPORTED_TYPES, rope_type, sliding_window


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

    With `group_size` G > 1 and rows in groups of G that share a prompt (GRPO's layout), the prompt
    runs once per group (``model.share_prompt``): on the models `packable` accepts, each group as one
    packed sequence without padding (`packed_hidden`, also under gradient checkpointing); on others
    the prompt's KV cache is repeated G times and the padded responses run on top of it (not under
    gradient checkpointing, whose layers drop the cache: there every row runs whole). The same values
    up to float rounding, with gradients flowing into the prompt positions.
    """
    B, T = input_ids.shape
    L = T - prompt_len
    body = backbone(model)
    shared = L > 0 and _shared_prompts(input_ids, prompt_len, group_size)
    checkpointed = _checkpointed(body)
    if (
        shared
        and packable(model) is None
        and packing_pays(body.config, attention_mask, prompt_len, group_size, checkpointed)
    ):
        return packed_hidden(body, input_ids, attention_mask, prompt_len, group_size)
    if shared and not checkpointed:
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


PACKABLE_TYPES = tuple(SUPPORTED_TYPES)  # transformers' llama, qwen2/3, mistral: a 4D mask is used as given
PACKABLE_ATTENTION = (None, "sdpa", "eager")  # a dense mask; flash and flex attention take none


def packable(model) -> str | None:
    """Why a group cannot run as one packed sequence under a block mask (`packed_hidden`), or None.

    The packed forward hands the model its own 4D attention mask and position ids, which transformers'
    llama, qwen2, qwen3 and mistral models use as given with sdpa or eager attention. Sliding windows
    (the mask would replace them) and rotary scalings that depend on the sequence length (the packed
    sequence is longer than a row) rule it out; so does a model of any other kind."""
    config = getattr(unwrap(model), "config", None)
    if config is None or getattr(config, "model_type", None) not in PACKABLE_TYPES:
        return f"model_type {getattr(config, 'model_type', None)!r} is not one of {PACKABLE_TYPES}"
    if getattr(config, "_attn_implementation", None) not in PACKABLE_ATTENTION:
        return f"attention implementation {config._attn_implementation!r} takes no 4D mask"
    if sliding_window(config):
        return "sliding-window attention"
    if rope_type(config) not in STATIC_ROPE:
        return f"rope type {rope_type(config)!r} depends on the sequence length"
    return None


PACK_MASK_BYTES = 256 << 20  # the packed micro-batch's (n, S, S) mask, at most


def _group_lengths(attention_mask: Tensor, prompt_len: int, G: int) -> tuple[Tensor, Tensor, Tensor]:
    """Real prompt tokens per group (n,), real response tokens per row (B,) and each group's packed
    length (n,): left-padded prompts of width `prompt_len` shared by groups of G rows, right-padded
    responses."""
    real = attention_mask.bool()
    p_len, r_len = real[::G, :prompt_len].sum(-1), real[:, prompt_len:].sum(-1)
    return p_len, r_len, p_len + r_len.view(-1, G).sum(-1)


def packing_pays(config, attention_mask: Tensor, prompt_len: int, G: int, checkpointed: bool) -> bool:
    """Whether packed groups cost fewer FLOPs than the other way to run these rows, and their mask fits.

    Packing removes the prompt's repeats and all padding, but attends over the whole group: S^2 for a
    sequence of S = prompt + the responses' tokens, against G L (P + L) with the prompt's KV cache
    repeated (or G (P + L)^2 as rows, under gradient checkpointing). Short responses (SmolLM2 on
    `arith`: S about 500) gain; long ones of equal length lose about G times the attention. Per token,
    the projections and MLP cost 2 (d (2 d + 2 d_kv) + 3 d d_ff) FLOPs and each query-key pair 4 d.
    """
    d = config.hidden_size
    heads = config.num_attention_heads
    d_kv = getattr(config, "head_dim", None) or d // heads
    d_kv *= getattr(config, "num_key_value_heads", None) or heads
    per_token = 2 * (d * (2 * d + 2 * d_kv) + 3 * d * getattr(config, "intermediate_size", 4 * d))
    per_pair = 4 * d
    B, T = attention_mask.shape
    P, L, n = prompt_len, T - prompt_len, B // G
    S = int(_group_lengths(attention_mask, P, G)[2].max())  # the longest packed group
    if n * S * S > PACK_MASK_BYTES:
        return False
    packed = n * S * per_token + n * S * S * per_pair
    if checkpointed:  # every row whole
        other = B * T * per_token + B * T * T * per_pair
    else:  # the prompt once, its KV cache repeated for the padded responses
        other = n * (P + G * L) * per_token + B * L * T * per_pair
    return packed <= other


def packed_hidden(body, input_ids: Tensor, attention_mask: Tensor, prompt_len: int, G: int) -> Tensor:
    """`response_hidden` for rows in groups of G sharing a prompt, each group as one packed sequence.

    A group's sequence is its prompt's real tokens, then each response's real tokens one after the
    other, without padding: [prompt | r_1 | r_2 | ... | r_G]. A block mask lets a prompt token see the
    prompt before it and a response token the prompt and its own response before it; position ids
    restart after the prompt for every response. So every token sees exactly what it sees in its own
    padded row (the same values up to float rounding; tests/train/test_forward.py), the prompt runs
    once per group, no padding runs at all, and the forward is an ordinary one: gradient checkpointing
    applies (the repeated KV cache of the other path cannot go through checkpointed layers).
    Groups are padded to the longest; a pad position sees only itself. Returns (B, L, d); positions
    past a response's end hold some real position's state (the loss masks them).
    """
    B, T = input_ids.shape
    P, L, n = prompt_len, T - prompt_len, B // G
    device = input_ids.device
    p_len, r_len, seq_len = _group_lengths(attention_mask, P, G)  # (n,), (B,), (n,)
    S = int(seq_len.max())
    # Where each packed position comes from (row, column of input_ids), its segment and position id.
    src_row, src_col, seg, pos, at = [], [], [], [], []
    for g in range(n):
        p = int(p_len[g])
        rows = torch.arange(g * G, (g + 1) * G, device=device)
        lens = r_len[g * G : (g + 1) * G]
        first = torch.cumsum(lens, 0) - lens  # (G,) each response's first token among the responses'
        owner = torch.repeat_interleave(torch.arange(G, device=device), lens)  # each token's response
        j = torch.arange(int(lens.sum()), device=device) - first[owner]  # its index in its response
        starts = p + first  # (G,) where each response begins in the sequence
        pad = S - int(seq_len[g])
        src_row.append(torch.cat([rows.new_full((p,), g * G), rows[owner], rows.new_zeros(pad)]))
        src_col.append(torch.cat([torch.arange(P - p, P, device=device), P + j, rows.new_zeros(pad)]))
        seg.append(torch.cat([rows.new_zeros(p), owner + 1, rows.new_full((pad,), -1)]))
        pos.append(torch.cat([torch.arange(p, device=device), p + j, rows.new_zeros(pad)]))
        # Response token t of row i is predicted at the prompt's last position (t = 0), else at its
        # own position t - 1 in the sequence; past the response's end any position will do.
        t = torch.arange(L, device=device)
        where = torch.where(t[None] == 0, p - 1, starts[:, None] + t[None] - 1)  # (G, L)
        at.append((g * S + where.clamp(max=S - 1)).clamp(min=0))
    ids = input_ids[torch.stack(src_row), torch.stack(src_col)]  # (n, S)
    seg = torch.stack(seg)  # (n, S): 0 prompt, i + 1 response i, -1 padding
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    mask = causal & (k >= 0) & ((k == q) | (k == 0))  # (n, S, S)
    mask |= torch.eye(S, dtype=torch.bool, device=device) & (q < 0)  # a pad position sees itself
    mask = mask[:, None]  # (n, 1, S, S)
    if getattr(body.config, "_attn_implementation", None) == "eager":
        dtype = body.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    out = body(input_ids=ids, attention_mask=mask, position_ids=torch.stack(pos), use_cache=False)
    hidden = out.last_hidden_state.reshape(n * S, -1)
    return hidden[torch.cat(at)]  # (B, L, d)


def _checkpointed(body) -> bool:
    """Whether this forward runs under transformers' gradient checkpointing, whose layers drop a KV cache."""
    return bool(getattr(body, "gradient_checkpointing", False)) and body.training and torch.is_grad_enabled()


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
