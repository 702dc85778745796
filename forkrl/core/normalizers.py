"""Loss denominators: ``TokenCounts`` and the named normalizers (``NORMALIZERS``), shared by the policy
loss and the value loss (see ``forkrl.core.losses`` for the table of names and what each matches)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NORMALIZERS", "TokenCounts", "register_normalizer"]


@dataclass(frozen=True)
class TokenCounts:
    """Denominators of the normalizers, counted over the batch the loss is normalised by.

    Fields are python floats or 0-dim tensors (an all-reduced tensor need not be synced to host).
    ``valid``: tokens in ``loss_mask``; ``selected``: tokens in ``sel_mask``; ``sequences``: rows
    with at least one valid token; ``rows``: every row, a fully masked one included (TRL's
    ``dr_grpo`` counts those; None = ``sequences``).
    """

    valid: float | Tensor
    selected: float | Tensor
    sequences: float | Tensor
    rows: float | Tensor | None = None

    @classmethod
    def from_masks(cls, loss_mask: Tensor, sel_mask: Tensor) -> TokenCounts:
        """This batch's own counts, as float32 0-dim tensors."""
        return cls(
            valid=loss_mask.sum().float(),
            selected=(sel_mask & loss_mask).sum().float(),
            sequences=loss_mask.any(dim=-1).sum().float(),
            rows=torch.tensor(float(loss_mask.shape[0]), device=loss_mask.device),
        )

    @classmethod
    def zero(cls) -> TokenCounts:
        return cls(0.0, 0.0, 0.0, 0.0)

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(*(a + b for a, b in zip(self._values(), other._values())))

    def as_tensor(self, device: torch.device | str | None = None) -> Tensor:
        """``[valid, selected, sequences, rows]`` float32, ready for ``dist.all_reduce``."""
        return torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in self._values()])

    @classmethod
    def from_tensor(cls, t: Tensor) -> TokenCounts:
        return cls(t[0], t[1], t[2], t[3] if t.numel() > 3 else None)

    def _values(self) -> tuple:
        rows = self.sequences if self.rows is None else self.rows
        return (self.valid, self.selected, self.sequences, rows)


# --------------------------------------------------------------------------- normalizers
# fn(terms (B, L) already zero outside the loss, loss_mask (B, L), counts, max_len) -> 0-dim loss.

NormalizerFn = Callable[[Tensor, Tensor, TokenCounts, int | None], Tensor]
NORMALIZERS: dict[str, NormalizerFn] = {}


def register_normalizer(name: str) -> Callable[[NormalizerFn], NormalizerFn]:
    def decorator(fn: NormalizerFn) -> NormalizerFn:
        NORMALIZERS[name] = fn
        return fn

    return decorator


_CONSTANT_NEEDS_MAX_LEN = (
    'normalizer "constant" (Dr. GRPO: sequences · max_len) needs max_len, the token budget'
)


def _safe_div(num: Tensor, denom: float | Tensor) -> Tensor:
    """``num / denom``, and 0 where ``denom <= 0``, with finite gradients either way."""
    denom = torch.as_tensor(denom, dtype=num.dtype, device=num.device)
    positive = denom > 0
    return torch.where(
        positive, num / torch.where(positive, denom, torch.ones_like(denom)), torch.zeros_like(num)
    )


@register_normalizer("all_tokens")
def _norm_all_tokens(terms: Tensor, loss_mask: Tensor, counts: TokenCounts, max_len: int | None) -> Tensor:
    return _safe_div(terms.sum(), counts.valid)


@register_normalizer("selected_tokens")
def _norm_selected_tokens(
    terms: Tensor, loss_mask: Tensor, counts: TokenCounts, max_len: int | None
) -> Tensor:
    return _safe_div(terms.sum(), counts.selected)


@register_normalizer("seq_mean")
def _norm_seq_mean(terms: Tensor, loss_mask: Tensor, counts: TokenCounts, max_len: int | None) -> Tensor:
    # A sequence's length is always its own (local) valid-token count; only the number of
    # sequences comes from `counts`, so micro-batch losses still add up to the batch loss.
    per_seq = _safe_div(terms.sum(dim=-1), loss_mask.sum(dim=-1))  # (B,)
    return _safe_div(per_seq.sum(), counts.sequences)


@register_normalizer("constant")
def _norm_constant(terms: Tensor, loss_mask: Tensor, counts: TokenCounts, max_len: int | None) -> Tensor:
    if max_len is None:
        raise ValueError(_CONSTANT_NEEDS_MAX_LEN)
    sequences = torch.as_tensor(counts.sequences, dtype=terms.dtype, device=terms.device)
    return _safe_div(terms.sum(), sequences * max_len)


@register_normalizer("dr_grpo")
def _norm_dr_grpo(terms: Tensor, loss_mask: Tensor, counts: TokenCounts, max_len: int | None) -> Tensor:
    # TRL's loss_type="dr_grpo": sum / (per_token_loss.size(0) * max_completion_length), every row
    # counted, also one whose tokens are all masked (``constant`` counts only rows with a valid token).
    if max_len is None:
        raise ValueError(_CONSTANT_NEEDS_MAX_LEN)
    rows = counts._values()[3]
    return _safe_div(terms.sum(), torch.as_tensor(rows, dtype=terms.dtype, device=terms.device) * max_len)
