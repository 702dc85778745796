import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from forkrl.core.sampling import dynamic_sampling_keep, overlong_filter_mask, overlong_penalty
from tests.reference.losses_ref import (
    dynamic_sampling_keep_ref,
    overlong_filter_mask_ref,
    overlong_penalty_ref,
)

# ----------------------------------------------------------------------------- dynamic sampling


def test_keeps_only_mixed_groups():
    # groups [1, 1] all correct, [0, 1] mixed, [0, 0] all wrong
    keep = dynamic_sampling_keep(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2)
    assert keep.tolist() == [False, True, False]
    assert keep.dtype == torch.bool


def test_equality_is_exact():
    # a difference of 1e-12 is a real difference: no tolerance
    rewards = torch.tensor([0.5, 0.5 + 1e-12, 0.25, 0.25], dtype=torch.float64)
    assert dynamic_sampling_keep(rewards, 2).tolist() == [True, False]


def test_group_of_one_is_kept_like_verl():
    assert dynamic_sampling_keep(torch.tensor([1.0, 0.0, 1.0]), 1).tolist() == [True, True, True]


def test_integer_rewards_are_accepted():
    assert dynamic_sampling_keep(torch.tensor([1, 1, 1, 0]), 2).tolist() == [False, True]


@pytest.mark.parametrize(
    ("rewards", "group_size", "match"),
    [
        (torch.zeros(5), 2, "not a multiple of group_size=2"),
        (torch.zeros(2, 2), 2, r"1-D \(B·G,\) tensor"),
        (torch.zeros(4), 0, "group_size must be a positive int"),
        (torch.tensor([0.0, float("inf")]), 2, r"rewards\[1\] is inf"),
    ],
)
def test_dynamic_sampling_errors(rewards, group_size, match):
    with pytest.raises(ValueError, match=match):
        dynamic_sampling_keep(rewards, group_size)


@given(group_size=st.integers(1, 4), num_groups=st.integers(1, 5), data=st.data())
def test_dynamic_sampling_matches_reference(group_size, num_groups, data):
    values = data.draw(
        st.lists(
            st.sampled_from([0.0, 0.5, 1.0]),
            min_size=group_size * num_groups,
            max_size=group_size * num_groups,
        )
    )
    rewards = torch.tensor(values)
    assert dynamic_sampling_keep(rewards, group_size).tolist() == dynamic_sampling_keep_ref(
        rewards, group_size
    )


# ----------------------------------------------------------------------------- overlong penalty


def test_overlong_penalty_small_numbers():
    # max_len 20, buffer 4 -> expected 16: <= 16 -> 0; 17 -> -1/4; 18 -> -2/4; 20 -> -1; beyond -> -1
    lengths = torch.tensor([0, 10, 16, 17, 18, 20, 21, 99])
    out = overlong_penalty(lengths, max_len=20, buffer=4, factor=1.0)
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0])
    assert out.dtype == torch.float32


def test_overlong_penalty_factor_scales():
    out = overlong_penalty(torch.tensor([18, 25]), max_len=20, buffer=4, factor=0.5)
    assert out.tolist() == pytest.approx([-0.25, -0.5])


def test_overlong_penalty_dapo_numbers_match_verl():
    # DAPO runs: max 20480, buffer 4096, factor 1. verl's reward manager for L <= max_len:
    # min(-(L - (max_len - buffer)) / buffer * factor, 0)
    lengths = torch.tensor([1000, 16384, 16385, 18432, 20480])
    out = overlong_penalty(lengths, max_len=20480, buffer=4096, factor=1.0)
    verl = [min(-(n - 16384) / 4096 * 1.0, 0.0) for n in lengths.tolist()]
    assert out.tolist() == pytest.approx(verl)
    assert out.tolist() == pytest.approx([0.0, 0.0, -1 / 4096, -0.5, -1.0])


def test_zero_buffer_is_a_hard_cutoff():
    out = overlong_penalty(torch.tensor([19, 20, 21]), max_len=20, buffer=0, factor=2.0)
    assert out.tolist() == [0.0, 0.0, -2.0]


@pytest.mark.parametrize(
    ("lengths", "kw", "match"),
    [
        (torch.tensor([1]), {"max_len": 10, "buffer": 11}, r"buffer must be an int in \[0, max_len=10\]"),
        (torch.tensor([1]), {"max_len": 10, "buffer": -1}, r"buffer must be an int"),
        (torch.tensor([1]), {"max_len": 0, "buffer": 0}, "max_len must be a positive int"),
        (torch.tensor([1]), {"max_len": 10, "buffer": 2, "factor": -1.0}, "factor must be >= 0"),
        (torch.tensor([[1]]), {"max_len": 10, "buffer": 2}, r"lengths must be a 1-D"),
        (torch.tensor([True]), {"max_len": 10, "buffer": 2}, "lengths must hold token counts"),
    ],
)
def test_overlong_penalty_errors(lengths, kw, match):
    with pytest.raises(ValueError, match=match):
        overlong_penalty(lengths, **kw)


@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    max_len=st.integers(1, 30),
    data=st.data(),
)
def test_overlong_penalty_matches_reference(lengths, max_len, data):
    buffer = data.draw(st.integers(1, max_len))
    factor = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    t = torch.tensor(lengths)
    expected = overlong_penalty_ref(t, max_len, buffer, factor)
    assert overlong_penalty(t, max_len, buffer, factor).tolist() == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------- overlong filtering


def test_overlong_filter_masks_whole_rows():
    loss_mask = torch.tensor([[True, True, False], [True, True, True]])
    out = overlong_filter_mask(loss_mask, torch.tensor([False, True]))
    assert out.tolist() == [[True, True, False], [False, False, False]]
    assert out.tolist() == overlong_filter_mask_ref(loss_mask, torch.tensor([False, True]))
    assert loss_mask[1].all()  # the input is not modified


@pytest.mark.parametrize(
    ("loss_mask", "truncated", "match"),
    [
        (torch.ones(2, 3), torch.tensor([False, True]), "loss_mask must be a bool"),
        (torch.ones(2, 3, dtype=torch.bool), torch.tensor([0, 1]), "truncated must be a bool"),
        (torch.ones(2, 3, dtype=torch.bool), torch.tensor([False]), r"truncated must have shape \(2,\)"),
    ],
)
def test_overlong_filter_errors(loss_mask, truncated, match):
    with pytest.raises(ValueError, match=match):
        overlong_filter_mask(loss_mask, truncated)
