"""PPO's token-level math: token rewards, GAE, whitening, the clipped value loss, explained variance."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from forkrl.core.advantages import (
    TOKEN_ADVANTAGES,
    compute_advantages,
    gae_advantages,
    token_rewards,
    whiten,
)
from forkrl.core.losses import TokenCounts, explained_variance, value_loss
from tests.reference.gae_ref import gae_ref, monte_carlo_ref, whiten_ref


def _close(actual: torch.Tensor, expected, atol: float = 1e-6) -> bool:
    return torch.allclose(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


def _random_batch(B, L, seed, holes=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (B,), generator=g)  # variable lengths, empty rows included
    mask = torch.arange(L)[None, :] < lengths[:, None]  # (B, L)
    if holes:  # interior masked tokens too (e.g. tool output inside a response)
        mask &= torch.rand(B, L, generator=g) > 0.3
    rewards = torch.randn(B, L, generator=g)
    values = torch.randn(B, L, generator=g)
    return rewards, values, mask


@given(
    B=st.integers(1, 5),
    L=st.integers(1, 9),
    seed=st.integers(0, 10_000),
    gamma=st.sampled_from([1.0, 0.99, 0.5, 0.0]),
    lam=st.sampled_from([1.0, 0.95, 0.5, 0.0]),
    holes=st.booleans(),
)
def test_gae_matches_the_slow_loop(B, L, seed, gamma, lam, holes):
    rewards, values, mask = _random_batch(B, L, seed, holes)
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = gae_ref(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == (B, L)
    assert _close(adv, ref_adv, 1e-5)
    assert _close(ret, ref_ret, 1e-5)


@given(B=st.integers(1, 4), L=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_gamma_one_lambda_one_is_return_minus_value(B, L, seed):
    # Outcome reward on the last valid token only: A_t = R - V_t at every valid token.
    _, values, mask = _random_batch(B, L, seed)
    outcome = torch.randn(B, generator=torch.Generator().manual_seed(seed + 1))
    r = token_rewards(outcome, mask)
    adv, ret = gae_advantages(r, values, mask, gamma=1.0, lam=1.0)
    expected = torch.where(mask, outcome[:, None] - values, 0.0)
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret, torch.where(mask, outcome[:, None].expand(B, L), 0.0), atol=1e-6)
    # and with arbitrary per-token rewards: the rest-of-row reward sum minus V_t
    rewards, values, mask = _random_batch(B, L, seed, holes=True)
    adv, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    ref = monte_carlo_ref(rewards.tolist(), values.tolist(), mask.tolist())
    assert _close(adv, ref, 1e-5)


def test_gae_by_hand():
    # One row of 3 valid tokens and a masked tail; gamma = 1, lam = 0.5; reward 1 on the last token.
    # deltas: t2: 1 + 0 - 0.5 = 0.5; t1: 0 + 0.5 - 0.4 = 0.1; t0: 0 + 0.4 - 0.2 = 0.2
    # adv: t2 = 0.5; t1 = 0.1 + 0.5 * 0.5 = 0.35; t0 = 0.2 + 0.5 * 0.35 = 0.375
    mask = torch.tensor([[True, True, True, False]])
    r = token_rewards(torch.tensor([1.0]), mask)
    assert r.tolist() == [[0.0, 0.0, 1.0, 0.0]]
    values = torch.tensor([[0.2, 0.4, 0.5, 7.0]])
    adv, ret = gae_advantages(r, values, mask, gamma=1.0, lam=0.5)
    assert _close(adv, [[0.375, 0.35, 0.5, 0.0]])
    assert _close(ret, [[0.575, 0.75, 1.0, 0.0]])


def test_padding_garbage_does_not_leak():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    values = torch.tensor([[0.1, 0.2, float("nan")], [float("inf"), float("nan"), 1.0]])
    rewards = torch.tensor([[0.0, 1.0, float("nan")], [float("nan"), 0.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert adv[1].tolist() == [0.0, 0.0, 0.0] and adv[0, 2] == 0.0
    assert whiten(adv, mask)[1].tolist() == [0.0, 0.0, 0.0]


def test_token_rewards_kl_penalty():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    old = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, 9.0, 9.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    r = token_rewards(torch.tensor([1.0, 0.0]), mask, old_logp=old, ref_logp=ref, kl_coef=0.1)
    # reward -= 0.1 * (old - ref) on valid tokens: t0: -0.05; t1: 1 + 0.1 = 1.1
    assert _close(r, [[-0.05, 1.1, 0.0], [0.0, 0.0, 0.0]])
    assert token_rewards(torch.tensor([1.0, 0.0]), mask, old_logp=old, ref_logp=ref).tolist() == [
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0],
    ]
    with pytest.raises(ValueError, match=r"rewards must be \(B,\)"):
        token_rewards(torch.zeros(3), mask)


@given(B=st.integers(1, 5), L=st.integers(1, 8), seed=st.integers(0, 10_000), holes=st.booleans())
def test_whiten_matches_reference(B, L, seed, holes):
    x, _, mask = _random_batch(B, L, seed, holes)
    out = whiten(x * 3 + 2, mask)
    ref = whiten_ref((x * 3 + 2).tolist(), mask.tolist())
    assert _close(out, ref, 1e-4)
    if mask.sum() > 1:
        valid = out[mask].double()
        assert abs(valid.mean().item()) < 1e-5 and valid.std().item() == pytest.approx(1.0, abs=1e-3)


def test_whiten_edge_cases():
    mask = torch.tensor([[True, True, True, False]])
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    # mean 2, unbiased var 1
    assert _close(whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]], 1e-6)
    assert _close(whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], 1e-6)
    assert whiten(torch.full((1, 4), 0.3), mask).tolist() == [[0.0] * 4]  # no spread: all zero
    one = torch.tensor([[False, True, False, False]])
    assert whiten(x, one).tolist() == [[0.0] * 4]  # a single token has variance 0
    assert whiten(x, torch.zeros_like(one)).tolist() == [[0.0] * 4]
    # a reduce hook sees [n, sum], then [sum of squares]: here an identity "all-reduce" of one worker
    seen = []
    whiten(x, mask, reduce=lambda t: seen.append(t.tolist()))
    assert seen == [[3.0, 6.0], [2.0]]


def test_gae_is_registered_as_token_level():
    assert TOKEN_ADVANTAGES["gae"] is gae_advantages
    with pytest.raises(ValueError, match="token-level and needs a critic"):
        compute_advantages("gae", torch.zeros(4), 2)
    with pytest.raises(ValueError, match="gamma"):
        gae_advantages(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), gamma=1.5)
    with pytest.raises(ValueError, match="shape"):
        gae_advantages(torch.zeros(1, 3), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool))


# ----------------------------------------------------------------------------- value loss

# Row 0: V=[0.5, 0.9, -], V_old=[0.2, 0.8, -], R=[1, 0, -]; row 1: V=V_old=0.1, R=0.5 on one token.
#   t(0,0): (0.5-1)^2 = 0.25; clipped V = 0.2 + 0.2 = 0.4 -> (0.4-1)^2 = 0.36; max 0.36 -> 0.18 (clipped)
#   t(0,1): (0.9-0)^2 = 0.81; clipped V = 0.9 (inside the range) -> 0.81 -> 0.405
#   t(1,0): (0.1-0.5)^2 = 0.16 -> 0.08
VALUES = torch.tensor([[0.5, 0.9, 3.0], [0.1, 0.1, 0.1]])
OLD = torch.tensor([[0.2, 0.8, 3.0], [0.1, 0.1, 0.1]])
RET = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
MASK = torch.tensor([[True, True, False], [True, False, False]])


@pytest.mark.parametrize(
    ("normalizer", "expected"),
    [
        ("all_tokens", (0.18 + 0.405 + 0.08) / 3),
        ("selected_tokens", (0.18 + 0.405 + 0.08) / 3),  # the critic's selection is every valid token
        ("seq_mean", ((0.18 + 0.405) / 2 + 0.08 / 1) / 2),
        ("constant", (0.18 + 0.405 + 0.08) / (2 * 3)),
    ],
)
def test_value_loss_by_hand(normalizer, expected):
    v = VALUES.clone().requires_grad_(True)
    loss, m = value_loss(v, OLD, RET, MASK, clip=0.2, normalizer=normalizer, max_len=3)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["value_clip_frac"].item() == pytest.approx(1 / 3)
    assert m["value_loss"].item() == pytest.approx(expected, abs=1e-6)
    assert m["value_tokens"].item() == 3
    if normalizer == "all_tokens":
        loss.backward()
        # clipped token: no gradient; others: (V - R) / 3; masked: 0
        assert _close(v.grad, [[0.0, 0.9 / 3, 0.0], [(0.1 - 0.5) / 3, 0.0, 0.0]])


def test_value_loss_without_clip_and_on_a_selection():
    loss, m = value_loss(VALUES, OLD, RET, MASK, clip=None)
    assert loss.item() == pytest.approx((0.125 + 0.405 + 0.08) / 3, abs=1e-6)
    assert m["value_clip_frac"].item() == 0.0
    # the actor's selection (one token) with the selected-token normalizer: that token's term alone
    sel = torch.tensor([[False, True, False], [False, False, False]])
    loss, m = value_loss(VALUES, OLD, RET, MASK, sel, normalizer="selected_tokens")
    assert loss.item() == pytest.approx(0.405, abs=1e-6) and m["value_tokens"].item() == 1
    loss, _ = value_loss(VALUES, OLD, RET, MASK, sel, normalizer="all_tokens")
    assert loss.item() == pytest.approx(0.405 / 3, abs=1e-6)


def test_value_loss_micro_batches_add_up_to_the_batch():
    full, _ = value_loss(VALUES, OLD, RET, MASK)
    counts = TokenCounts.from_masks(MASK, MASK)
    parts = [
        value_loss(VALUES[i : i + 1], OLD[i : i + 1], RET[i : i + 1], MASK[i : i + 1], token_counts=counts)[0]
        for i in range(2)
    ]
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), abs=1e-7)


def test_value_loss_bad_inputs_are_named():
    with pytest.raises(ValueError, match="value clip must be > 0"):
        value_loss(VALUES, OLD, RET, MASK, clip=0.0)
    with pytest.raises(ValueError, match="returns must have"):
        value_loss(VALUES, OLD, RET[:, :2], MASK)
    with pytest.raises(ValueError, match="values must be a floating"):
        value_loss(VALUES[0], OLD, RET, MASK)
    with pytest.raises(ValueError, match="unknown normalizer"):
        value_loss(VALUES, OLD, RET, MASK, normalizer="mean")


def test_explained_variance():
    mask = torch.tensor([[True, True, True, False]])
    ret = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.0), ret, mask).item() == pytest.approx(0.0)
    # V = [1, 1, 1]: residual [0, 1, 2] has variance 2/3 against Var(R) = 2/3 -> 0
    assert explained_variance(torch.ones(1, 4), ret, mask).item() == pytest.approx(0.0, abs=1e-6)
    # V = [3, 2, 1]: residual [-2, 0, 2], variance 8/3 -> 1 - 4 = -3
    assert explained_variance(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), ret, mask).item() == pytest.approx(-3.0)
    assert math.isnan(explained_variance(ret, torch.ones(1, 4), mask).item())
