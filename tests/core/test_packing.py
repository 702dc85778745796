"""Token-budgeted micro-batches: the balanced packing is the official fork's partition, exactly."""

import random

import pytest

from forkrl.core.packing import balanced, in_order
from tests.reference.official_ref import official_dynamic_micro_batches


@pytest.mark.parametrize("seed", range(40))
def test_balanced_equals_the_forks_rearrange_micro_batches(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    lengths = [rng.choice([rng.randint(1, 60), 16, 16, 32]) for _ in range(n)]  # ties are common
    budget = rng.randint(max(lengths), 4 * max(lengths) + 10)
    others = rng.choice([0, 0, 2, 5])
    if others > n:
        others = 0
    assert balanced(lengths, budget, at_least=others) == official_dynamic_micro_batches(
        lengths, budget, others
    )


def test_balanced_by_hand():
    # 35 tokens / budget 12 -> 3 micro-batches of near-equal sums, longest (sum of squares) first
    parts = balanced([10, 3, 7, 5, 2, 8], 12)
    assert sorted(i for p in parts for i in p) == list(range(6)) and len(parts) == 3
    sums = [sum([10, 3, 7, 5, 2, 8][i] for i in p) for p in parts]
    assert max(sums) - min(sums) <= 2


def test_in_order_packs_consecutive_rows_within_the_budget():
    assert in_order([3, 4, 5, 2, 9], 8) == [[0, 1], [2, 3], [4]]
    assert in_order([20], 8) == [[0]]  # a row over the budget still trains, alone
    assert in_order([], 8) == []
