"""Slow, obviously-correct references for forkrl.core.entropy: one row at a time.

Forward values use Python floats (math.exp / math.log, float64); gradients come from autograd through
plain torch ops on one row at a time. Small sizes only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def row_logp_entropy(logits_row: list[float], token: int, temperature: float = 1.0) -> tuple[float, float]:
    """log p[token] and H = -Σ p ln p of softmax(logits_row / T), in Python floats."""
    z = [x / temperature for x in logits_row]
    m = max(z)
    log_z = m + math.log(sum(math.exp(x - m) for x in z))
    logp = z[token] - log_z
    entropy = -sum(math.exp(x - log_z) * (x - log_z) for x in z)
    return logp, entropy


def ref_token_logprobs_and_entropy(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(logp, entropy) float64 shaped like tokens, looping over the rows of logits (..., V)."""
    rows = logits.detach().double().reshape(-1, logits.shape[-1]).tolist()
    toks = tokens.reshape(-1).tolist()
    out = [row_logp_entropy(row, t, temperature) for row, t in zip(rows, toks, strict=True)]
    logp = torch.tensor([o[0] for o in out], dtype=torch.float64).view(tokens.shape)
    entropy = torch.tensor([o[1] for o in out], dtype=torch.float64).view(tokens.shape)
    return logp, entropy


def ref_score_from_hidden(
    hidden: Tensor, weight: Tensor, tokens: Tensor, bias: Tensor | None = None, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(logp, entropy) float64 from hidden (..., d): per row, logits = weight @ h + bias, then softmax."""
    w = weight.detach().double()
    b = bias.detach().double() if bias is not None else None
    rows = []
    for h in hidden.detach().double().reshape(-1, hidden.shape[-1]):
        z = w @ h  # (V,)
        rows.append((z + b if b is not None else z).tolist())
    toks = tokens.reshape(-1).tolist()
    out = [row_logp_entropy(row, t, temperature) for row, t in zip(rows, toks, strict=True)]
    logp = torch.tensor([o[0] for o in out], dtype=torch.float64).view(tokens.shape)
    entropy = torch.tensor([o[1] for o in out], dtype=torch.float64).view(tokens.shape)
    return logp, entropy


def ref_selected_logprobs(
    hidden_sel: Tensor,
    weight: Tensor,
    tokens_sel: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Differentiable logp (k,) of the selected tokens, one row at a time with plain torch ops.

    Builds each row's full logits z = (W h + b) / T and takes z[t] - logsumexp(z), so autograd gives
    the naive full-softmax gradient w.r.t. hidden_sel, weight and bias. Works in the inputs' dtype.
    """
    out = []
    for h, t in zip(hidden_sel, tokens_sel.tolist(), strict=True):
        z = weight @ h  # (V,)
        if bias is not None:
            z = z + bias
        z = z / temperature
        out.append(z[t] - torch.logsumexp(z, dim=0))
    if not out:
        return (hidden_sel.sum() * 0 + weight.sum() * 0).expand(0)
    return torch.stack(out)


def ref_logits_logp_entropy_autograd(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Differentiable (logp, entropy) from logits (..., V), row by row with plain torch ops."""
    flat = logits.reshape(-1, logits.shape[-1])
    logps, ents = [], []
    for z, t in zip(flat, tokens.reshape(-1).tolist(), strict=True):
        z = z / temperature
        log_p = z - torch.logsumexp(z, dim=0)  # (V,)
        logps.append(log_p[t])
        ents.append(-(log_p.exp() * log_p).sum())
    return torch.stack(logps).view(tokens.shape), torch.stack(ents).view(tokens.shape)
