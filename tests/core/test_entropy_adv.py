"""Cheng et al.'s entropy-shaped advantage (forkrl.core.advantages.entropy_shaped_advantages) against the
paper's equation as a per-token loop (tests/reference/entropy_adv_ref.py), through the loss against
upstream verl's clipped surrogate (tests/reference/archer_ref.py, one clip range), and by hand."""

from __future__ import annotations

import pytest
import torch

from forkrl.core.advantages import entropy_shaped_advantages
from forkrl.core.losses import policy_loss
from tests.reference import archer_ref, entropy_adv_ref


def _batch(B=8, L=12, seed=0, token_adv=False):
    g = torch.Generator().manual_seed(seed)
    logp0 = -3 * torch.rand(B, L, generator=g)
    old = logp0 + 0.4 * torch.randn(B, L, generator=g)
    adv = torch.randn(B, L, generator=g) if token_adv else 2 * torch.randn(B, generator=g)
    entropy = 4 * torch.rand(B, L, generator=g)
    mask = torch.arange(L)[None] < torch.randint(3, L + 1, (B, 1), generator=g)
    return logp0, old, adv, entropy, mask


@pytest.mark.parametrize("token_adv", [False, True])
@pytest.mark.parametrize("alpha, kappa", [(0.4, 2.0), (1.0, 3.0), (0.05, 1.5)])
def test_matches_the_papers_equation(token_adv, alpha, kappa):
    _, _, adv, entropy, mask = _batch(seed=int(alpha * 100), token_adv=token_adv)
    shaped, psi, capped = entropy_shaped_advantages(adv, entropy, mask, alpha=alpha, kappa=kappa)
    ref_shaped, ref_psi = entropy_adv_ref.shaped_advantages(adv, entropy, mask, alpha, kappa)
    torch.testing.assert_close(shaped, ref_shaped.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(psi, ref_psi.float(), rtol=0, atol=1e-6)
    a = adv[:, None].expand_as(entropy) if adv.dim() == 1 else adv
    assert torch.equal(capped, mask & (a.abs() / kappa < alpha * entropy))
    assert torch.equal(torch.sign(shaped[mask]), torch.sign(a[mask]))  # κ > 1: no sign flips


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradient_equal_upstreams_surrogate_on_the_shaped_advantages(seed):
    logp0, old, adv, entropy, mask = _batch(seed=seed)
    shaped, _, _ = entropy_shaped_advantages(adv, entropy, mask, alpha=0.4, kappa=2.0)
    ref_shaped = entropy_adv_ref.shaped_advantages(adv, entropy, mask)[0].float()

    def grad(fn):
        lp = logp0.clone().requires_grad_()
        loss = fn(lp)
        return loss.detach(), torch.autograd.grad(loss, lp)[0]

    ours = grad(
        lambda lp: policy_loss(lp, old, shaped, mask, mask, eps_low=0.2, eps_high=0.28, dual_clip=10.0)[0]
    )
    theirs = grad(
        lambda lp: archer_ref.compute_policy_loss(
            old, lp, ref_shaped, mask, torch.ones_like(mask), 0.2, 0.28, 0.2, 0.28, clip_ratio_c=10.0
        )[0]
    )
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-6)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_hand_computed():
    # α = 0.4, κ = 2; row A = 1: H = [0.5, 2.0] -> ψ = [min(0.2, 0.5), min(0.8, 0.5)] = [0.2, 0.5 capped]
    # row A = -1: H = [2.0, 0.0] -> ψ = [0.5 capped, 0.0]; a zero advantage stays 0; padding is 0
    adv = torch.tensor([1.0, -1.0, 0.0])
    entropy = torch.tensor([[0.5, 2.0, 9.0], [2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, True, False], [True, True, True]])
    shaped, psi, capped = entropy_shaped_advantages(adv, entropy, mask, alpha=0.4, kappa=2.0)
    _close(shaped, torch.tensor([[1.2, 1.5, 0.0], [-0.5, -1.0, 0.0], [0.0, 0.0, 0.0]]))
    _close(psi, torch.tensor([[0.2, 0.5, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert capped.tolist() == [[False, True, False], [True, False, False], [True, True, True]]


def test_alpha_zero_is_the_identity_and_bad_options_fail():
    _, _, adv, entropy, mask = _batch()
    shaped, psi, _ = entropy_shaped_advantages(adv, entropy, mask, alpha=0.0, kappa=2.0)
    assert torch.equal(shaped, torch.where(mask, adv[:, None].expand_as(mask), 0.0)) and not psi.any()
    with pytest.raises(ValueError, match="kappa > 0"):
        entropy_shaped_advantages(adv, entropy, mask, alpha=0.4, kappa=0.0)
    with pytest.raises(ValueError, match="adv must be"):
        entropy_shaped_advantages(adv[:3], entropy, mask, alpha=0.4, kappa=2.0)
