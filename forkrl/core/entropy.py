"""Token log-probs and entropies, from logits (chunked) or from hidden states + the LM head (streamed).

Entropy follows the paper: H_t = -Σ_j p_tj ln p_tj with p_t = softmax(z_t / T) at the rollout
temperature T (Wang et al. 2025, arXiv 2506.01939, Sec. 2). Every output is float32 (float64 only
for float64 inputs) whatever the model dtype; bf16/fp16 inputs are upcast chunk by chunk, so results
are those of float32 math on the same values.

- `token_logprobs_and_entropy(logits, tokens)`: from full logits (B, L, V), one chunk of rows at a
  time; differentiable (the "selective head off" fallback).
- `score_from_hidden(hidden, weight, tokens)`: the no-grad scoring pass from hidden states, streamed
  over token and vocabulary tiles (never an (N, V) tensor).
- `selected_logprobs(hidden_sel, weight, tokens_sel)`: the training head on the k selected tokens,
  with autograd, memory and time scaling with k.
- `lm_head_params(model)`: (weight, bias) of a Hugging Face causal LM's output head.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from forkrl.core.lm_head import (
    TOKEN_CHUNK,
    VOCAB_CHUNK,
    check_chunk,
    check_temperature,
    compute_dtype,
    fold_tile,
    lm_head_params,
    score_from_hidden,
    scratch,
    selected_logprobs,
)

__all__ = [
    "ROW_CHUNK",
    "TOKEN_CHUNK",
    "VOCAB_CHUNK",
    "lm_head_params",
    "score_from_hidden",
    "selected_logprobs",
    "token_logprobs_and_entropy",
]

# Rows of (B*L, V) logits per chunk: 256 rows x 151,936 vocab x 4 B = 155 MB of float32 scratch (x2).
ROW_CHUNK = 256


def _row_blocks(x: Tensor) -> list[Tensor]:
    """2-D (rows, V) views covering x (..., V) in row-major order. Unlike x.reshape(-1, V), never
    copies: a slice such as logits[:, :-1] cannot be flattened to a view, so it is split along dim 0."""
    if x.dim() <= 2:
        return [x.reshape(-1, x.shape[-1])]  # a view for 1-D and 2-D tensors
    try:
        return [x.view(-1, x.shape[-1])]
    except RuntimeError:
        return [block for sub in x.unbind(0) for block in _row_blocks(sub)]


def _row_chunks(x: Tensor, chunk_size: int):
    """(i, j, rows) for chunks of at most chunk_size rows: rows (j - i, V) is a view of the flat rows i:j."""
    offset = 0
    for block in _row_blocks(x):
        for start in range(0, block.shape[0], chunk_size):
            stop = min(start + chunk_size, block.shape[0])
            yield offset + start, offset + stop, block[start:stop]
        offset += block.shape[0]


def _row_stats(
    logits: Tensor, tokens: Tensor, temperature: float, chunk_size: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, log Z, entropy), each (N,), of logits (..., V) with N rows, one chunk of rows at a time."""
    vocab = logits.shape[-1]
    n_rows = tokens.numel()
    logp = torch.empty(n_rows, dtype=dtype, device=logits.device)  # (N,)
    log_z = torch.empty_like(logp)  # (N,)
    ent = torch.empty_like(logp)  # (N,)
    if n_rows == 0:
        return logp, log_z, ent
    # Two reusable float32 chunk buffers: the upcast copy (never a full float32 (N, V)) and exp scratch
    z_buf = torch.empty(min(n_rows, chunk_size) * vocab, dtype=dtype, device=logits.device)
    e_buf = torch.empty_like(z_buf)
    for i, j, rows in _row_chunks(logits, chunk_size):
        z = scratch(z_buf, j - i, vocab).copy_(rows)  # (n, V)
        if temperature != 1.0:
            z.div_(temperature)
        m = torch.full((j - i,), float("-inf"), dtype=dtype, device=logits.device)
        s = torch.zeros_like(m)
        a = torch.zeros_like(m)
        target = torch.full_like(m, float("nan"))
        fold_tile(z, scratch(e_buf, j - i, vocab), tokens[i:j], m, s, a, target)
        log_s = s.log()
        log_z[i:j] = m + log_s
        logp[i:j] = target - log_z[i:j]
        ent[i:j] = log_s - a / s
    logp.clamp_(max=0.0)
    ent.clamp_(min=0.0)
    return logp, log_z, ent


class _LogitsLogpEntropy(torch.autograd.Function):
    """Saves only the logits (already alive in the caller) and per-row log Z and H; backward
    recomputes the softmax chunk by chunk and writes the (B, L, V) logits gradient in place."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk_size):
        ctx.set_materialize_grads(False)  # entropy is often used without grad: skip its term
        dtype = compute_dtype(logits)
        logp, log_z, ent = _row_stats(logits, tokens.reshape(-1), temperature, chunk_size, dtype)
        ctx.save_for_backward(logits, tokens, log_z, ent)
        ctx.cfg = (temperature, chunk_size, dtype)
        return logp.view(tokens.shape), ent.view(tokens.shape)

    @staticmethod
    @once_differentiable  # the chunked recomputation is not itself differentiable: refuse double backward
    def backward(ctx, grad_logp, grad_ent):
        logits, tokens, log_z, ent = ctx.saved_tensors
        temperature, chunk_size, dtype = ctx.cfg
        if grad_logp is None and grad_ent is None:
            return None, None, None, None
        vocab = logits.shape[-1]
        tok = tokens.reshape(-1)
        g_lp = grad_logp.reshape(-1).to(dtype) if grad_logp is not None else None
        g_h = grad_ent.reshape(-1).to(dtype) if grad_ent is not None else None
        n_rows = tok.numel()
        # (N, V) contiguous in the logits dtype: the gradient itself, the only full-size allocation
        grad = torch.empty((n_rows, vocab), dtype=logits.dtype, device=logits.device)
        z_buf = torch.empty(min(n_rows, chunk_size) * vocab, dtype=dtype, device=logits.device)
        p_buf = torch.empty_like(z_buf)
        for i, j, rows in _row_chunks(logits, chunk_size):
            lp = scratch(z_buf, j - i, vocab).copy_(rows)  # (n, V)
            if temperature != 1.0:
                lp.div_(temperature)
            lp.sub_(log_z[i:j].unsqueeze(1))  # log p
            p = torch.exp(lp, out=scratch(p_buf, j - i, vocab))
            # d logp_t / dz_j = 1[j = t] - p_j ;  dH / dz_j = -p_j (log p_j + H)
            if g_h is not None:
                gz = lp.add_(ent[i:j].unsqueeze(1)).mul_(g_h[i:j].unsqueeze(1))
                if g_lp is not None:
                    gz.add_(g_lp[i:j].unsqueeze(1))
                gz.mul_(p).neg_()
            else:
                gz = p.mul_(-g_lp[i:j].unsqueeze(1))
            if g_lp is not None:
                gz.scatter_add_(1, tok[i:j].unsqueeze(1), g_lp[i:j].unsqueeze(1))
            if temperature != 1.0:
                gz.div_(temperature)
            grad[i:j] = gz
        return grad.view(logits.shape), None, None, None


def token_logprobs_and_entropy(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int = ROW_CHUNK
) -> tuple[Tensor, Tensor]:
    """Log-prob of `tokens` and entropy of softmax(logits / T), chunked over the B*L rows.

    logits (B, L, V) (any leading shape, any float dtype), tokens (B, L) long. Returns (logp, entropy),
    each (B, L) float32 (float64 for float64 logits). Extra memory is about 2 x chunk_size x V float32:
    each chunk is upcast into a reused buffer, never a full float32 copy of bf16 logits.

    Differentiable when logits require grad: the autograd node keeps only the logits (which the caller
    holds anyway) and per-row log Z and H, and backward recomputes the softmax chunk by chunk, so the
    only new full-size tensor is the logits gradient itself.
    """
    check_temperature(temperature)
    check_chunk("chunk_size", chunk_size)
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be tokens.shape + (V,); tokens is {tuple(tokens.shape)}"
        )
    return _LogitsLogpEntropy.apply(logits, tokens, temperature, chunk_size)
