"""Token-budgeted micro-batches: which rows of a mini-batch share a forward (``optim.micro_batch_tokens``).

Two packings of rows with token counts ``lengths`` (prompt + response tokens, ``attention_mask.sum``):

* ``in_order``: consecutive rows while their total fits the budget (a longer row alone still makes
  a micro-batch). Groups stay together, so a group's prompt can run once (``model.share_prompt``).
* ``balanced``: verl's ``rearrange_micro_batches`` (``verl/utils/seqlen_balancing.py``, as the official
  fork runs it with ``use_dynamic_bsz=True``): ``n = min(rows, ceil(total / budget))`` micro-batches
  (raised to the most of any rank, ``at_least``), rows split by the Karmarkar-Karp largest-differencing
  heuristic into ``n`` sets of near-equal token sums, each set's indices sorted, the sets ordered by
  ``(Σ length², smallest index)`` descending. Matches the fork's partition and order exactly
  (``tests/core/test_packing.py`` against ``tests/reference/official_ref.py``).
"""

from __future__ import annotations

import heapq

__all__ = ["PACKINGS", "balanced", "in_order", "karmarkar_karp"]


def in_order(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive rows while their token total stays within ``budget``.

    >>> in_order([3, 4, 5, 2, 9], 8)
    [[0, 1], [2, 3], [4]]
    """
    parts: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if parts and total + n <= budget:
            parts[-1].append(i)
            total += n
        else:
            parts.append([i])
            total = n
    return parts


class _Set:
    """One partition of the differencing method: its rows and their token sum."""

    __slots__ = ("sum", "items")

    def __init__(self):
        self.sum, self.items = 0, []

    def key(self):  # verl's Set.__lt__: sum, then size, then the (index, length) items
        return (self.sum, len(self.items), self.items)


class _State:
    """k sets, kept sorted largest first; a state's spread is its largest minus its smallest sum."""

    def __init__(self, idx: int, length: int, k: int):
        self.sets = [_Set() for _ in range(k)]
        self.sets[0].items.append((idx, length))
        self.sets[0].sum = length
        self._sort()

    def _sort(self):
        self.sets.sort(key=_Set.key, reverse=True)

    def merge(self, other: _State) -> None:
        # the largest set of one with the smallest of the other, and so on (differencing)
        for mine, theirs in zip(self.sets, reversed(other.sets)):
            mine.items += theirs.items
            mine.sum += theirs.sum
        self._sort()

    def spread(self) -> int:
        return self.sets[0].sum - self.sets[-1].sum

    def __lt__(self, other: _State) -> bool:  # heapq pops the largest spread first
        if self.spread() != other.spread():
            return self.spread() > other.spread()
        return self.sets[0].key() > other.sets[0].key()


def karmarkar_karp(lengths: list[int], k: int) -> list[list[int]]:
    """Split row indices into ``k`` sets of near-equal token sums (verl's ``karmarkar_karp``,
    ``equal_size=False``; the same heap order and tie-breaks). Sets in the heap's final order."""
    heap: list[_State] = []
    for n, i in sorted((n, i) for i, n in enumerate(lengths)):  # pushed one by one, as verl does
        heapq.heappush(heap, _State(i, n, k))
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        a.merge(b)
        heapq.heappush(heap, a)
    return [[i for i, _ in s.items] for s in heap[0].sets]


def balanced_count(lengths: list[int], budget: int) -> int:
    """verl's ``num_micro_batches = min(len(seq_len_effective), ceildiv(total_seqlen, max_token_len))``."""
    return min(len(lengths), -(-sum(lengths) // budget)) if lengths else 0


def balanced(lengths: list[int], budget: int, at_least: int = 0) -> list[list[int]]:
    """verl's ``rearrange_micro_batches``: ``max(balanced_count, at_least)`` sets (``at_least``: the
    all-reduced MAX over ranks), each sorted, longest (by Σ length²) first."""
    if not lengths:
        return []
    n = min(len(lengths), max(balanced_count(lengths, budget), at_least))
    parts = [sorted(p) for p in karmarkar_karp(lengths, n)]
    parts.sort(key=lambda p: (sum(lengths[i] ** 2 for i in p), min(p)), reverse=True)
    return parts


PACKINGS = ("in_order", "balanced")
