"""Exact k-th largest value by radix select over float bits, across ranks without gathering values.

DESIGN.md (Selection at scale): `scope=batch` across ranks must be exact without gathering every
entropy. Each pass histograms the next digits of an order-preserving integer key of the float32
bits; only the 2^bits counts are all-reduced. `torch.quantile` stops at 2^24 elements; this has no limit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

RADIX_BITS = (1, 2, 4, 8, 16)
RADIX_16_BIT_FROM = 1 << 16  # valid tokens from which 16-bit radix digits pay off


def kth_largest(score: Tensor, loss_mask: Tensor, ks: list[int], n_valid: int, group) -> list[Tensor]:
    """The k-th largest valid score over the group for each k in ks (1 <= k <= N). 0-dim float32 each.

    Always the radix select, in one process too: one code path for every scope and device, no host
    sync, and on CPU it ran as fast as `torch.kthvalue` (bench/selection.py). 16-bit digits (2 passes)
    for large N; 8-bit (4 passes of 256 bins) below, where 65,536-bin histograms would dominate.
    The choice depends on the global N only, so every rank makes the same collective calls.
    """
    bits_per_pass = 16 if n_valid >= RADIX_16_BIT_FROM else 8
    return radix_select(score, loss_mask, ks, group, bits_per_pass)


def order_keys(values: Tensor) -> Tensor:
    """Map float32 to int32 whose *unsigned* bit pattern sorts like the floats (the classic radix key).

    Positive floats get the sign bit set; negative floats have every bit flipped. -0.0 sorts just
    below 0.0, which never changes the k-th largest *value*.
    """
    bits = values.contiguous().view(torch.int32)  # (n,)
    keys = bits >> 31  # (n,) 0 for x >= 0, all ones for x < 0
    keys |= torch.iinfo(torch.int32).min  # 0x80000000 for x >= 0, all ones for x < 0
    keys ^= bits
    return keys


def key_to_float(key: Tensor) -> Tensor:
    """Inverse of `order_keys` for one unsigned key held in a 0-dim int64. Returns 0-dim float32."""
    bits = torch.where(key >= 2**31, key - 2**31, (2**32 - 1) - key)  # unsigned float bits
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)  # as signed int32
    return bits.reshape(1).view(torch.float32).reshape(()) + 0.0


def radix_select(values: Tensor, valid: Tensor, ks: list[int], group, bits_per_pass: int) -> list[Tensor]:
    """The k-th largest of `values[valid]` over the group for each k, refining `bits_per_pass` bits a pass."""
    n_bins = 1 << bits_per_pass
    # Padding gets key 0, below every valid key, so it never reaches the top k <= N.
    keys = order_keys(values.reshape(-1)).masked_fill_(~valid.reshape(-1), 0)  # (n,)
    top_shift = 32 - bits_per_pass
    top_pass = _radix_histogram(keys, top_shift, n_bins, None, group)  # the same for every k
    results = []
    for k in ks:
        remaining = torch.tensor(k, dtype=torch.long, device=values.device)  # target's rank among candidates
        digit, hist = top_pass
        bin_, remaining = _pick_bin(hist, remaining)
        prefix = bin_  # () the target key's bits found so far
        for shift in range(top_shift - bits_per_pass, -1, -bits_per_pass):
            digit, hist = _radix_histogram(keys, shift, n_bins, digit == bin_, group)
            bin_, remaining = _pick_bin(hist, remaining)
            prefix = (prefix << bits_per_pass) | bin_
        results.append(key_to_float(prefix))
    return results


def _radix_histogram(
    keys: Tensor, shift: int, n_bins: int, candidate: Tensor | None, group
) -> tuple[Tensor, Tensor]:
    """Digits (keys >> shift) mod n_bins, and their histogram over the candidates of every rank."""
    digit = keys >> shift  # (n,)
    digit &= n_bins - 1
    if candidate is not None:
        digit.masked_fill_(~candidate, n_bins)  # park non-candidates in an overflow bin
    hist = torch.bincount(digit, minlength=n_bins + 1)[:n_bins]  # (n_bins,)
    all_reduce_sum(hist, group)  # the only traffic: n_bins counts
    return digit, hist


def _pick_bin(hist: Tensor, remaining: Tensor) -> tuple[Tensor, Tensor]:
    """The bin holding the remaining-th largest candidate, and its rank within that bin (on device)."""
    at_or_above = hist.flip(0).cumsum(0).flip(0)  # (n_bins,) candidates with digit >= d
    bin_ = (at_or_above >= remaining).sum() - 1  # ()
    return bin_, remaining - (at_or_above[bin_] - hist[bin_])


def all_reduce_sum(t: Tensor, group) -> None:
    """In-place sum over the group; a no-op in one process."""
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def all_gather(t: Tensor, group) -> Tensor:
    """Stack `t` from every rank in rank order: (W, *t.shape)."""
    if group is None:
        return t[None]
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts)
