import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from forkrl.core.advantages import (
    ADVANTAGES,
    compute_advantages,
    dr_grpo_advantages,
    grpo_advantages,
    register_advantage,
    rloo_advantages,
    to_token_advantages,
)
from tests.reference.losses_ref import ADVANTAGES_REF


def test_grpo_two_groups_unbiased_std():
    # group [1, 0]: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = 0.70711 -> ±0.5 / (0.70711 + 1e-6)
    # group [1, 1]: zero variance -> exactly 0
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    expected = 0.5 / (math.sqrt(0.5) + 1e-6)  # 0.7071058
    assert adv.tolist() == pytest.approx([expected, -expected, 0.0, 0.0], abs=1e-7)
    assert adv[2].item() == 0.0 and adv[3].item() == 0.0


def test_grpo_group_of_four():
    # [1, 0, 0, 0]: mean 0.25, unbiased var (0.5625 + 3 · 0.0625) / 3 = 0.25, std 0.5
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    assert adv.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], rel=1e-5)


def test_grpo_eps_is_a_keyword():
    # std 0.5 + eps 0.5 = 1 -> advantages are r - mean
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, eps=0.5)
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_dr_grpo_is_mean_only():
    # [1, 0, 0, 0] -> r - 0.25;  [2, 4] -> ∓1
    adv = dr_grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 3.0, 3.0]), 2)
    assert adv.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0])
    adv4 = dr_grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    assert adv4.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_rloo_leave_one_out():
    # [1, 0, 0]: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5 (= 3/2 · (r - 1/3))
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 0.0]), 3)
    assert adv.tolist() == pytest.approx([1.0, -0.5, -0.5])
    # [3, 1]: 3 - 1 = 2, 1 - 3 = -2
    assert rloo_advantages(torch.tensor([3.0, 1.0]), 2).tolist() == pytest.approx([2.0, -2.0])


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_zero_variance_group_is_exactly_zero(name):
    # mean([0.1] * 3) is not exactly 0.1 in floating point; the advantage must still be exactly 0
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=torch.float64)
    adv = compute_advantages(name, rewards, 3)
    assert torch.equal(adv, torch.zeros(6))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_group_of_one_gives_zero(name):
    adv = compute_advantages(name, torch.tensor([1.0, 0.0, 0.5]), 1)
    assert torch.equal(adv, torch.zeros(3))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_output_is_float32_per_sequence(name):
    adv = compute_advantages(name, torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64), 2)
    assert adv.dtype == torch.float32 and adv.shape == (4,)


def test_registry_holds_the_three_estimators():
    assert {"grpo", "dr_grpo", "rloo"} <= set(ADVANTAGES)
    assert ADVANTAGES["grpo"] is grpo_advantages


def test_register_refuses_a_second_function_under_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("grpo")(lambda rewards, group_size: rewards)


def test_compute_advantages_passes_keywords():
    adv = compute_advantages("grpo", torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, eps=0.5)
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_unknown_estimator_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'.*'dr_grpo'.*'grpo'.*'rloo'"):
        compute_advantages("ppo", torch.zeros(4), 2)


@pytest.mark.parametrize(
    ("rewards", "group_size", "match"),
    [
        (torch.zeros(5), 2, "not a multiple of group_size=2"),
        (torch.zeros(2, 2), 2, r"must be 1-D"),
        (torch.tensor([1, 0]), 2, r"floating-point.*rewards.float\(\)"),
        (torch.tensor([1.0, float("nan")]), 2, r"rewards\[1\] is nan"),
        (torch.zeros(4), 0, "group_size must be a positive int"),
        (torch.zeros(4), 2.0, "group_size must be a positive int"),
    ],
)
def test_bad_inputs_are_named(rewards, group_size, match):
    with pytest.raises(ValueError, match=match):
        grpo_advantages(rewards, group_size)


def test_to_token_advantages_broadcasts_inside_the_mask():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = to_token_advantages(torch.tensor([2.0, -1.0]), mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="expected adv"):
        to_token_advantages(torch.zeros(3), mask)


@given(
    name=st.sampled_from(["grpo", "dr_grpo", "rloo"]),
    group_size=st.integers(1, 5),
    num_groups=st.integers(1, 4),
    data=st.data(),
)
def test_matches_reference(name, group_size, num_groups, data):
    # Binary rewards (ties and all-equal groups are common) or arbitrary floats.
    element = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(-5, 5, allow_nan=False, width=32))
    values = data.draw(st.lists(element, min_size=num_groups * group_size, max_size=num_groups * group_size))
    rewards = torch.tensor(values, dtype=torch.float32)
    fast = compute_advantages(name, rewards, group_size)
    ref = ADVANTAGES_REF[name](rewards, group_size)
    assert fast.tolist() == pytest.approx(ref, rel=1e-4, abs=1e-4)
    # Groups with equal rewards are exactly zero, not 0/eps residue.
    for g in range(num_groups):
        chunk = values[g * group_size : (g + 1) * group_size]
        if len(set(chunk)) == 1:
            assert fast[g * group_size : (g + 1) * group_size].abs().sum().item() == 0.0
