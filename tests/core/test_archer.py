"""Archer (forkrl.core.archer) against ArcherCodeR's code (tests/reference/archer_ref.py), and by hand.

Upstream runs token-mean over ``response_mask``: forkrl's ``all_tokens`` with every token selected
(``archer_tokens="valid"``), or ``selected_tokens`` on the official fork's folded mask
(``response_mask = sel_mask``, ``archer_tokens="selected"``). Dual clip 10 and log-ratio clamp 20, as the
script and upstream's compute_policy_loss.
"""

from __future__ import annotations

import math

import pytest
import torch

from forkrl.core.archer import high_entropy_mask
from forkrl.core.losses import KLPenalty, LossMode, policy_loss
from tests.reference import archer_ref

UPSTREAM = dict(dual_clip=10.0, log_ratio_clamp=20.0)


def _batch(B=8, L=12, seed=0):
    """(logp0, old, ref, adv (B, L), entropy, mask): per-sequence advantages, ragged rows."""
    g = torch.Generator().manual_seed(seed)
    logp0 = -3 * torch.rand(B, L, generator=g)
    old = logp0 + 0.4 * torch.randn(B, L, generator=g)
    ref = logp0 + 0.3 * torch.randn(B, L, generator=g)
    adv = (2 * torch.randn(B, 1, generator=g)).expand(B, L).clone()
    entropy = 3 * torch.rand(B, L, generator=g)
    mask = torch.arange(L)[None] < torch.randint(3, L + 1, (B, 1), generator=g)
    return logp0, old, ref, adv, entropy, mask


def _grad(fn, logp0):
    logp = logp0.clone().requires_grad_()
    loss, metrics = fn(logp)
    (g,) = torch.autograd.grad(loss, logp)
    return loss.detach(), g, metrics


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _upstream(logp0, old, adv, mask, entropy, ref=None, **kw):
    def fn(lp):
        return archer_ref.archer_loss(old, lp, adv, mask, entropy, ref_log_prob=ref, **kw)

    return _grad(fn, logp0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_gradient_matches_archercoder(seed):
    logp0, old, _, adv, entropy, mask = _batch(seed=seed)
    mode = LossMode("archer", archer_tokens="valid")
    ours = _grad(
        lambda lp: policy_loss(lp, old, adv, mask, mask, mode=mode, entropy=entropy, **UPSTREAM), logp0
    )
    theirs = _upstream(logp0, old, adv, mask, entropy)
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    # verl's pg_clipfrac over the two classes together, and the class split itself
    m = ours[2]
    n = mask.sum()
    high = high_entropy_mask(entropy, mask, 0.8)
    n_high = high.sum()
    clipped = m["archer_clip_frac_high_entropy"] * n_high + m["archer_clip_frac_low_entropy"] * (n - n_high)
    _close(clipped / n, theirs[2]["pg_clipfrac"].float())
    _close(m["archer_high_entropy_frac"], (high.sum() / n).float())
    assert torch.equal(high, archer_ref.entropy_masks(entropy, mask)[1])
    assert 0 < m["archer_high_entropy_frac"] < 0.5 and m["archer_clip_frac_low_entropy"] > 0


def test_on_the_folded_mask_it_is_upstream_on_the_selected_tokens():
    logp0, old, _, adv, entropy, mask = _batch(seed=3)
    g = torch.Generator().manual_seed(7)
    sel = mask & (torch.rand(mask.shape, generator=g) < 0.5)
    mode = LossMode("archer")  # archer_tokens="selected": the quantile over each row's selected tokens
    ours = _grad(
        lambda lp: policy_loss(
            lp, old, adv, mask, sel, mode=mode, entropy=entropy, normalizer="selected_tokens", **UPSTREAM
        ),
        logp0,
    )
    theirs = _upstream(logp0, old, adv, sel, entropy)
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    assert not ours[1][mask & ~sel].any()  # the mode acts on the selected tokens only


@pytest.mark.parametrize("kl_normalizer", [None, "all_tokens"])
def test_kl_matches_archercoder_with_class_weighted_coefficients(kl_normalizer):
    # upstream: c_low · mean_low(kld) + c_high · mean_high(kld); forkrl: Σ_t c_t kld_t / N, so the
    # coefficients times N / N_class give upstream's loss exactly (forkrl.core.archer's docstring)
    logp0, old, ref, adv, entropy, mask = _batch(seed=4)
    c_low, c_high = 0.3, 0.05
    high = archer_ref.entropy_masks(entropy, mask)[1]
    n, n_high = mask.sum().item(), high.sum().item()
    mode = LossMode(
        "archer",
        archer_tokens="valid",
        archer_kl_coef_low=c_low * n / (n - n_high),
        archer_kl_coef_high=c_high * n / n_high,
    )
    kl = KLPenalty(ref, 1.0, "low_var_kl", normalizer=kl_normalizer)

    def ours_fn(lp):
        return policy_loss(lp, old, adv, mask, mask, mode=mode, entropy=entropy, kl=kl, **UPSTREAM)

    ours = _grad(ours_fn, logp0)
    theirs = _upstream(
        logp0, old, adv, mask, entropy, ref=ref, kl_loss_coef=c_low, high_entropy_kl_loss_scale_coef=c_high
    )
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    _close(ours[2]["archer_kl_low_entropy"], theirs[2]["low_entropy_kl_loss"])
    _close(ours[2]["archer_kl_high_entropy"], theirs[2]["high_entropy_kl_loss"])


def test_defaults_are_archers_script():
    m = LossMode("archer")
    assert (m.archer_quantile, m.archer_low_eps_low, m.archer_low_eps_high) == (0.8, 0.2, 0.2)
    assert (m.archer_high_eps_low, m.archer_high_eps_high) == (0.5, 0.5)
    assert (m.archer_kl_coef_low, m.archer_kl_coef_high) == (0.001, 0.0)


def test_hand_computed():
    # one row of 5 tokens; entropies [0.1, 0.2, 0.3, 0.4, 1.0]: the 0.8 quantile is 0.4 + 0.2·0.6 = 0.52
    # (linear), so only the last token is high-entropy (clip [0.5, 1.5]); the others clip at [0.8, 1.2].
    #   r    = [1.3,  1.1, 0.7, 1.0, 1.3],  A = [1, 1, -1, 1, 1]
    #   term = [-1.2 (clipped), -1.1, 0.8 (clipped), -1.0, -1.3 (inside 1.5)]   sum -3.8, /5 = -0.76
    #   d/dlogp = -A r where unclipped: [0, -1.1, 0, -1.0, -1.3] / 5
    # k1 KL with d = logp - ref = [0.1, 0.2, 0.3, 0.4, 1.0], c_low 0.1, c_high 0: 0.1 · 1.0 / 5 = 0.02
    r = torch.tensor([[1.3, 1.1, 0.7, 1.0, 1.3]])
    logp0, old = torch.log(r), torch.zeros(1, 5)
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0, 1.0]])
    entropy = torch.tensor([[0.1, 0.2, 0.3, 0.4, 1.0]])
    d = torch.tensor([[0.1, 0.2, 0.3, 0.4, 1.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    mode = LossMode("archer", archer_kl_coef_low=0.1, archer_kl_coef_high=0.0)
    loss, g, m = _grad(lambda lp: policy_loss(lp, old, adv, mask, mask, mode=mode, entropy=entropy), logp0)
    assert loss.item() == pytest.approx(-0.76, abs=1e-6)
    _close(g, torch.tensor([[0.0, -1.1, 0.0, -1.0, -1.3]]) / 5)
    assert m["archer_high_entropy_frac"].item() == pytest.approx(0.2)
    assert m["archer_clip_frac_low_entropy"].item() == pytest.approx(0.5)  # tokens 0 and 2 of 4
    assert m["archer_clip_frac_high_entropy"].item() == 0.0
    assert m["clip_frac_high"].item() == pytest.approx(0.2)  # token 0: 1.3 > 1.2; token 4: 1.3 < 1.5
    assert m["clip_frac_low"].item() == pytest.approx(0.2)  # token 2: 0.7 < 0.8

    kl = KLPenalty((logp0 - d), 1.0, "k1")
    loss_kl, _, mk = _grad(
        lambda lp: policy_loss(lp, old, adv, mask, mask, mode=mode, entropy=entropy, kl=kl), logp0
    )
    assert loss_kl.item() == pytest.approx(-0.76 + 0.02, abs=1e-6)
    assert mk["kl_loss"].item() == pytest.approx(0.02, abs=1e-7)
    assert mk["archer_kl_low_entropy"].item() == pytest.approx(0.25, abs=1e-6)
    assert mk["archer_kl_high_entropy"].item() == pytest.approx(1.0, abs=1e-6)
    assert math.isclose(mk["kl"].item(), 0.4, abs_tol=1e-6)


def test_acted_is_the_selected_high_entropy_tokens():
    from forkrl.core.loss_modes import ACTED, ModeInputs
    from forkrl.core.losses import POLICY_LOSSES

    _, old, _, adv, entropy, mask = _batch(seed=5)
    sel = mask & (entropy > 0.5)
    x = ModeInputs(old, old, torch.where(sel, adv, 0.0), mask, sel, 0.2, 0.28, None, 20.0, entropy)
    _, parts, _ = POLICY_LOSSES["archer"](x, LossMode("archer"))
    assert torch.equal(parts["acted"], high_entropy_mask(entropy, sel, 0.8))
    assert parts["acted"].any() and not (parts["acted"] & ~sel).any() and "archer" in ACTED


def test_needs_entropies_and_checks_its_options():
    _, old, _, adv, _, mask = _batch()
    with pytest.raises(ValueError, match="pass policy_loss\\(entropy=...\\)"):
        policy_loss(old, old, adv, mask, mask, mode="archer")
    for bad in (dict(archer_quantile=1.5), dict(archer_tokens="all"), dict(archer_high_eps_low=1.0)):
        with pytest.raises(ValueError):
            policy_loss(old, old, adv, mask, mask, mode=LossMode("archer", **bad), entropy=old.exp())
