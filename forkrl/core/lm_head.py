"""Log-probs and entropy straight from hidden states and the LM head, never building (N, V) logits.

Two paths, both streaming over (token_chunk, vocab_chunk) tiles of z = (h @ W.T + b) / T with an
online log-sum-exp (running max m, s = Σ exp(z - m), a = Σ exp(z - m)(z - m)):

- `score_from_hidden`: the scoring pass, no grad, log-probs and entropy H = log s - a / s of every
  response token (H = log Z - Σ p z, with both terms taken relative to the running max so they do not
  cancel catastrophically).
- `selected_logprobs`: the training head, autograd through a custom `torch.autograd.Function` that saves
  only the selected hidden states, tokens and per-row log Z, and recomputes each tile in backward. Its
  cost and memory scale with the k selected tokens, not with N (DESIGN.md, "Selective LM head").

Getting the inputs from a Hugging Face causal LM: the hidden states the head consumes are the base
model's last hidden state, *after* the final norm (for Llama / Qwen2 / Qwen3 the norm lives inside
`model.model`): `hidden = model.model(input_ids, attention_mask=...).last_hidden_state`, or
`model(..., output_hidden_states=True).hidden_states[-1]` (but that also builds the full logits).
`lm_head_params(model)` returns the head's (weight, bias).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# Tile sizes tuned on CPU float32 with V = 151,936, d = 1024 (bench/lm_head.py). The head is
# matmul-bound (the elementwise folding is ~20% of the scoring pass), so tiles only need to be large
# enough for efficient matmuls; 512-2048 x 8192-32768 all ran within noise of each other. The two
# float32 scratch tiles take 2 x 1024 x 16384 x 4 B = 128 MiB.
TOKEN_CHUNK = 1024
VOCAB_CHUNK = 16384


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float32, or float64 when any input is float64 (so gradcheck can run in double precision)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def no_autocast(like: Tensor):
    """Autocast off on `like`'s device: the head runs in its weights' dtype (float32) even when the
    transformer body runs under `torch.autocast` (model.compute_dtype, docs/DESIGN.md "Precision")."""
    return torch.autocast(like.device.type, enabled=False)


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (the rollout sampling temperature), got {temperature}")


def check_chunk(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def scratch(buf: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous (rows, cols) view at the start of a flat reusable buffer (no allocation per tile)."""
    return buf[: rows * cols].view(rows, cols)


def fold_tile(
    z: Tensor, e: Tensor, local: Tensor, m: Tensor, s: Tensor, a: Tensor | None, target: Tensor
) -> None:
    """Fold one tile of scaled logits into the running online-softmax statistics, all in place.

    z (n, v): the tile (overwritten with z - new max); e (n, v): scratch; local (n,): target index
    inside this tile (outside [0, v) = not in this tile); m, s, target (n,): running max,
    Σ exp(z - m), target logit; a (n,) or None: Σ exp(z - m)(z - m), only needed for the entropy.
    Start with m = -inf, s = a = 0, target = nan (an out-of-range token then gives a nan log-prob).
    """
    v = z.shape[1]
    in_tile = (local >= 0) & (local < v)
    tz = z.gather(1, local.clamp(0, v - 1).unsqueeze(1)).squeeze(1)  # (n,)
    target.copy_(torch.where(in_tile, tz, target))
    m_new = torch.maximum(m, z.amax(1))  # (n,)
    z.sub_(m_new.unsqueeze(1))
    torch.exp(z, out=e)
    shift = m - m_new  # (n,) <= 0; -inf on the first tile, where s = a = 0
    rescale = shift.exp()
    s_tile = e.sum(1)
    if a is not None:
        # Re-base a from the old max to the new one: Σ e_old (z - m_old + shift) = a + s * shift
        shift = torch.where(s > 0, shift, 0.0)
        a.mul_(rescale).add_(rescale * s * shift).add_(e.mul_(z).sum(1))
    s.mul_(rescale).add_(s_tile)
    m.copy_(m_new)


def logit_tile(
    h: Tensor, weight: Tensor, bias: Tensor | None, v0: int, v1: int, temperature: float, out: Tensor
):
    """out (n, v1 - v0) = (h @ weight[v0:v1].T + bias[v0:v1]) / T in h's dtype (the weight upcast per tile)."""
    w = weight[v0:v1].to(h.dtype)
    if bias is None:
        torch.mm(h, w.t(), out=out)
    else:
        torch.addmm(bias[v0:v1].to(h.dtype), h, w.t(), out=out)
    if temperature != 1.0:
        out.div_(temperature)  # divide (not multiply by 1/T) like the sampler's temperature warper
    return w


def _stream_stats(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    tokens: Tensor,
    temperature: float,
    token_chunk: int,
    vocab_chunk: int,
    dtype: torch.dtype,
    entropy: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp, log Z, entropy or None), each (N,) in `dtype`, streamed over tiles; no grad."""
    n_tok, vocab = h.shape[0], weight.shape[0]
    logp = torch.empty(n_tok, dtype=dtype, device=h.device)  # (N,)
    log_z = torch.empty_like(logp)  # (N,)
    ent = torch.empty_like(logp) if entropy else None  # (N,)
    if n_tok == 0:
        return logp, log_z, ent
    tile_numel = min(n_tok, token_chunk) * min(vocab, vocab_chunk)
    tile_buf = torch.empty(tile_numel, dtype=dtype, device=h.device)
    exp_buf = torch.empty_like(tile_buf)
    for i in range(0, n_tok, token_chunk):
        j = min(i + token_chunk, n_tok)
        hc = h[i:j].to(dtype)  # (n, d)
        tok = tokens[i:j]
        m = torch.full((j - i,), float("-inf"), dtype=dtype, device=h.device)
        s = torch.zeros_like(m)
        a = torch.zeros_like(m) if entropy else None
        target = torch.full_like(m, float("nan"))
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            z = scratch(tile_buf, j - i, v1 - v0)  # (n, v)
            logit_tile(hc, weight, bias, v0, v1, temperature, z)
            fold_tile(z, scratch(exp_buf, j - i, v1 - v0), tok - v0, m, s, a, target)
        log_s = s.log()
        log_z[i:j] = m + log_s
        logp[i:j] = target - log_z[i:j]
        if ent is not None:
            ent[i:j] = log_s - a / s
    # Mathematically logp <= 0 and H >= 0; clip the last-ulp rounding
    logp.clamp_(max=0.0)
    if ent is not None:
        ent.clamp_(min=0.0)
    return logp, log_z, ent


def _flatten(hidden: Tensor, weight: Tensor, tokens: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    if hidden.shape[:-1] != tokens.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be tokens.shape + (d,); tokens is {tuple(tokens.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, d) with d = {hidden.shape[-1]}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    return hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)


@torch.no_grad()
def score_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    token_chunk: int = TOKEN_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
) -> tuple[Tensor, Tensor]:
    """Log-prob of `tokens` and entropy of softmax((hidden @ weight.T + bias) / T), without grad.

    hidden (..., d), weight (V, d) (the embedding matrix for a tied head), tokens (...) long,
    bias (V,) or None. Returns (logp, entropy), each shaped like `tokens`, float32 (float64 for
    float64 inputs) whatever the input dtype: bf16/fp16 inputs are upcast per tile, so the result equals
    the float32 computation on their upcast values. Only (token_chunk, vocab_chunk) tiles exist at any
    time, never (N, V). Logits must be finite; tokens outside [0, V) give a nan log-prob.
    """
    check_temperature(temperature)
    check_chunk("token_chunk", token_chunk)
    check_chunk("vocab_chunk", vocab_chunk)
    h, tok = _flatten(hidden, weight, tokens, bias)
    dtype = compute_dtype(hidden, weight, bias)
    with no_autocast(h):
        logp, _, ent = _stream_stats(h, weight, bias, tok, temperature, token_chunk, vocab_chunk, dtype, True)
    return logp.view(tokens.shape), ent.view(tokens.shape)


class _SelectedLogProbs(torch.autograd.Function):
    """logp (k,) of the selected tokens; backward recomputes tiles instead of saving (k, V) softmax."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, token_chunk, vocab_chunk):
        dtype = compute_dtype(hidden, weight, bias)
        with no_autocast(hidden):
            logp, log_z, _ = _stream_stats(
                hidden, weight, bias, tokens, temperature, token_chunk, vocab_chunk, dtype, False
            )
        ctx.save_for_backward(hidden, weight, bias, tokens, log_z)
        ctx.cfg = (temperature, token_chunk, vocab_chunk, dtype)
        return logp

    @staticmethod
    @once_differentiable  # the tile recomputation is not itself differentiable: refuse double backward
    def backward(ctx, grad_logp):
        with no_autocast(grad_logp):
            return _SelectedLogProbs._backward(ctx, grad_logp)

    @staticmethod
    def _backward(ctx, grad_logp):
        hidden, weight, bias, tokens, log_z = ctx.saved_tensors
        temperature, token_chunk, vocab_chunk, dtype = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n_tok, vocab = hidden.shape[0], weight.shape[0]
        # Accumulate in the compute dtype (float32) even for bf16 parameters, cast once at the end
        grad_h = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None
        if n_tok > 0 and (need_h or need_w or need_b):
            # d logp_t / dz_j = 1[j = t] - p_j and z = logits / T, so dL/dlogits = g (onehot - p) / T
            g = grad_logp.to(dtype) / temperature  # (k,)
            tile_buf = torch.empty(
                min(n_tok, token_chunk) * min(vocab, vocab_chunk), dtype=dtype, device=hidden.device
            )
            for i in range(0, n_tok, token_chunk):
                j = min(i + token_chunk, n_tok)
                hc = hidden[i:j].to(dtype)  # (n, d)
                gc = g[i:j].unsqueeze(1)  # (n, 1)
                for v0 in range(0, vocab, vocab_chunk):
                    v1 = min(v0 + vocab_chunk, vocab)
                    gz = scratch(tile_buf, j - i, v1 - v0)  # (n, v)
                    w = logit_tile(hc, weight, bias, v0, v1, temperature, gz)
                    gz.sub_(log_z[i:j].unsqueeze(1)).exp_().mul_(-gc)  # -g p / T
                    local = tokens[i:j] - v0
                    in_tile = ((local >= 0) & (local < v1 - v0)).unsqueeze(1)
                    gz.scatter_add_(
                        1, local.clamp(0, v1 - v0 - 1).unsqueeze(1), torch.where(in_tile, gc, 0.0)
                    )
                    if grad_h is not None:
                        grad_h[i:j].addmm_(gz, w)
                    if grad_w is not None:
                        grad_w[v0:v1].addmm_(gz.t(), hc)
                    if grad_b is not None:
                        grad_b[v0:v1] += gz.sum(0)
        return (
            grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
            None,
        )


def selected_logprobs(
    hidden_sel: Tensor,
    weight: Tensor,
    tokens_sel: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    token_chunk: int = TOKEN_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
) -> Tensor:
    """Differentiable log-prob of the k selected tokens under softmax((h @ weight.T + bias) / T).

    hidden_sel (..., d) are the hidden states gathered at the selected positions (e.g.
    `hidden[sel_mask]`, an autograd-friendly gather, so the transformer body gets gradient only
    through them), tokens_sel (...) long. Returns logp shaped like tokens_sel, float32 (float64 for
    float64 inputs), with gradients w.r.t. hidden_sel, weight and bias. Forward streams over vocab
    tiles keeping only log Z (k,); backward recomputes each tile and accumulates
    grad_hidden += G @ W_tile and grad_W_tile += G.T @ h. For a tied head pass the embedding matrix as
    `weight`: its gradient from the head adds to the one from the input lookup. k = 0 gives an empty
    result whose backward yields zero gradients.
    """
    check_temperature(temperature)
    check_chunk("token_chunk", token_chunk)
    check_chunk("vocab_chunk", vocab_chunk)
    h, tok = _flatten(hidden_sel, weight, tokens_sel, bias)
    logp = _SelectedLogProbs.apply(h, weight, bias, tok, temperature, token_chunk, vocab_chunk)
    return logp.view(tokens_sel.shape)


def lm_head_params(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight (V, d), bias (V,) or None) of a Hugging Face causal LM's output head.

    Uses `model.get_output_embeddings()`. With tied embeddings (`config.tie_word_embeddings`, e.g. small
    Qwen models) this weight *is* the input embedding matrix, so gradients from the head and from the
    input lookup accumulate into the same parameter. Models that rescale or soft-cap their logits are
    refused, since the streaming head computes plain h @ W.T + b.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no output embedding with a weight (get_output_embeddings() "
            "returned None); pass the LM head's weight and bias explicitly"
        )
    config = getattr(model, "config", None)
    for field in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, field, None)
        if value not in (None, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} sets config.{field} = {value}; the streaming LM head computes plain "
                "h @ W.T + b, so use the full-logits path (token_logprobs_and_entropy) for this model"
            )
    return head.weight, getattr(head, "bias", None)
