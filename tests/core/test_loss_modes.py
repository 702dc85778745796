"""GSPO and CISPO (forkrl.core.loss_modes) against TRL 1.16's own `_compute_loss` and transcribed verl.

TRL runs on the stand-in trainer of tests/reference/trl_harness.py with `importance_sampling_level=
"sequence"` (GSPO) and `loss_type="cispo"`, its entropy mask on; verl's functions are transcribed in
tests/reference/verl_ref.py. Losses and gradients wrt logp must agree to 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch

from forkrl.core.losses import POLICY_LOSSES, KLPenalty, LossMode, TokenCounts, policy_loss
from forkrl.core.selection import select_tokens
from tests.reference import verl_ref

RHO = 0.2


def _batch(B=4, L=7, seed=0, spread=0.6):
    """(logp0, old, ref, adv (B,), entropy, mask) with a ragged mask and garbage at padding."""
    g = torch.Generator().manual_seed(seed)
    logp0 = -2 * torch.rand(B, L, generator=g)
    old = logp0 + spread * torch.randn(B, L, generator=g)
    ref = logp0 + 0.5 * torch.randn(B, L, generator=g)
    adv = torch.randn(B, generator=g)
    entropy = torch.rand(B, L, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 5:], mask[2, 2:] = False, False
    return logp0, old, ref, adv, entropy, mask


def _grad(fn, logp0):
    logp = logp0.clone().requires_grad_()
    loss = fn(logp)
    (g,) = torch.autograd.grad(loss, logp)
    return loss.detach(), g


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- TRL


def _trl(logp0, old, ref, adv, entropy, mask, **overrides):
    pytest.importorskip("trl")
    from tests.reference.trl_harness import trl_loss, trl_trainer

    B, L = mask.shape
    fake = trl_trainer(**overrides)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, L, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum().float(),
    }
    return _grad(lambda logp: trl_loss(fake, logp, entropy, inputs), logp0)


def _forkrl(logp0, old, adv, mask, sel, mode, **kw):
    return _grad(lambda logp: policy_loss(logp, old, adv, mask, sel, mode=mode, **kw)[0], logp0)


@pytest.mark.parametrize("beta", [0.0, 0.3])
@pytest.mark.parametrize("rho", [RHO, 1.0])
def test_gspo_valid_tokens_matches_trl_sequence_level(beta, rho):
    """TRL: log s_i over every valid token, the (B, 1) loss times its entropy mask, sum / N."""
    logp0, old, ref, adv, entropy, mask = _batch()
    theirs = _trl(
        logp0,
        old,
        ref,
        adv,
        entropy,
        mask,
        importance_sampling_level="sequence",
        loss_type="dapo",
        top_entropy_quantile=rho,
        beta=beta,
    )
    sel = select_tokens(entropy, mask, rho=rho, count="quantile") if rho < 1 else mask
    mode = LossMode("gspo", gspo_tokens="valid", gspo_log_ratio_max=None)
    kl = KLPenalty(ref, beta, "k3_unclamped") if beta else None
    ours = _forkrl(logp0, old, adv, mask, sel, mode, dual_clip=None, log_ratio_clamp=None, kl=kl)
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    if rho < 1:  # the sequence ratio carries gradient to valid tokens that are not selected
        assert (ours[1][mask & ~sel] != 0).any()


@pytest.mark.parametrize("trl_eps_high", [1.28, 5.0])
@pytest.mark.parametrize("rho", [RHO, 1.0])
def test_cispo_matches_trl(trl_eps_high, rho):
    """TRL: -clamp(r, max=epsilon_high).detach() * A * logp, times the entropy mask, sum / N."""
    logp0, old, ref, adv, entropy, mask = _batch(seed=1)
    theirs = _trl(
        logp0,
        old,
        ref,
        adv,
        entropy,
        mask,
        loss_type="cispo",
        epsilon_high=trl_eps_high,
        top_entropy_quantile=rho,
    )
    sel = select_tokens(entropy, mask, rho=rho, count="quantile") if rho < 1 else mask
    mode = LossMode("cispo", cispo_clip_low=False)  # TRL's epsilon_high is the bound: 1 + eps_high
    ours = _forkrl(logp0, old, adv, mask, sel, mode, eps_high=trl_eps_high - 1, log_ratio_clamp=None)
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    assert not ours[1][~sel].any()


# ----------------------------------------------------------------------------- verl


def test_gspo_matches_verl_on_the_forks_folded_mask():
    """verl's gspo (seq-mean-token-mean, GSPO-token, clamp 10) with response_mask = sel_mask."""
    logp0, old, _, adv, entropy, mask = _batch(seed=2)
    adv_tok = adv[:, None] + 0.3 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(5))
    for sel in (mask, select_tokens(entropy, mask, rho=0.5)):
        theirs = _grad(lambda lp, sel=sel: verl_ref.gspo(old, lp, adv_tok, sel.float())[0], logp0)
        ours = _forkrl(
            logp0, old, adv_tok, sel, sel, "gspo", normalizer="seq_mean", dual_clip=None, log_ratio_clamp=None
        )
        _close(ours[0], theirs[0])
        _close(ours[1], theirs[1])


def test_gspo_verl_clamps_the_sequence_log_ratio_at_10():
    old = torch.full((1, 2), -15.0)
    logp0 = torch.tensor([[-1.0, -3.0]])  # log s = 13 > 10: clamped, no gradient
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.tensor([[-1.0, -1.0]])
    theirs = _grad(lambda lp: verl_ref.gspo(old, lp, adv, mask.float())[0], logp0)
    ours = _forkrl(logp0, old, adv, mask, mask, "gspo", normalizer="seq_mean", dual_clip=None)
    _close(ours[0], theirs[0])
    assert ours[0].item() == pytest.approx(math.exp(10.0), rel=1e-6)
    assert not ours[1].any() and not theirs[1].any()


@pytest.mark.parametrize("selected", [False, True])
def test_cispo_matches_verl(selected):
    """verl's cispo, token-mean; on the fork's mask it is forkrl's selected_tokens normalizer."""
    logp0, old, _, adv, entropy, mask = _batch(seed=3)
    adv_tok = adv[:, None].expand_as(mask).clone()
    sel = select_tokens(entropy, mask, rho=0.4) if selected else mask
    theirs = _grad(lambda lp: verl_ref.cispo(old, lp, adv_tok, sel.float())[0], logp0)
    ours = _forkrl(logp0, old, adv_tok, mask, sel, "cispo", normalizer="selected_tokens")
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    _, m = policy_loss(logp0, old, adv_tok, mask, sel, mode="cispo", normalizer="selected_tokens")
    _, m_verl = verl_ref.cispo(old, logp0, adv_tok, sel.float())
    _close(m["cispo_clip_frac"], m_verl["pg_clipfrac"].float())
    assert 0 < m["cispo_clip_frac"] < 1


# ----------------------------------------------------------------------------- the math, one row


def test_gspo_ratio_is_the_geometric_mean_over_the_selected_tokens():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.1, 0.4, 5.0]], requires_grad=True)  # the unselected token's drift is ignored
    mask = torch.ones(1, 3, dtype=torch.bool)
    sel = torch.tensor([[True, True, False]])
    loss, m = policy_loss(
        logp, old, torch.tensor([1.0]), mask, sel, mode="gspo", normalizer="selected_tokens"
    )
    s = math.exp(0.25)  # 1.284 > 1.28: clipped for A > 0
    assert loss.item() == pytest.approx(-1.28)
    assert m["clip_frac_high"].item() == 1.0 and m["seq_clip_frac"].item() == 1.0
    assert m["seq_ratio_mean"].item() == pytest.approx(s)
    loss.backward()
    assert not logp.grad.any()


def test_gspo_selected_gradient_stays_on_selected_tokens():
    logp0, old, _, adv, entropy, mask = _batch(seed=4, spread=0.05)
    sel = select_tokens(entropy, mask, rho=0.3)
    _, g = _forkrl(logp0, old, adv, mask, sel, "gspo")
    assert not g[~sel].any() and g[sel].abs().sum() > 0
    # unclipped, sequence advantages: d loss / d logp_t = -A_i s_i / D on each selected token
    s = torch.exp(((logp0 - old) * sel).sum(-1) / sel.sum(-1).clamp(min=1))
    want = torch.where(sel, -(adv * s)[:, None] / mask.sum(), torch.zeros(()))
    _close(g, want)


def test_cispo_weight_is_clipped_and_carries_no_gradient():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[math.log(0.5), 0.0, math.log(2.0)]], requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, m = policy_loss(logp, old, torch.tensor([1.0]), mask, mask, mode="cispo", normalizer="all_tokens")
    w = torch.tensor([0.8, 1.0, 1.28])  # clip(r, 0.8, 1.28)
    assert loss.item() == pytest.approx(float(-(w * logp.detach()).sum() / 3), rel=1e-6)
    loss.backward()
    _close(logp.grad, -w[None] / 3)
    assert m["cispo_clip_frac"].item() == pytest.approx(2 / 3)
    # no lower bound: the weight of r = 0.5 stays 0.5
    logp.grad = None
    loss, _ = policy_loss(
        logp, old, torch.tensor([1.0]), mask, mask, mode=LossMode("cispo", cispo_clip_low=False)
    )
    loss.backward()
    _close(logp.grad, -torch.tensor([[0.5, 1.0, 1.28]]) / 3)


@pytest.mark.parametrize("mode", sorted(POLICY_LOSSES))
def test_every_mode_is_finite_with_garbage_padding_and_composes_with_normalizers(mode):
    logp0, old, ref, adv, entropy, mask = _batch(seed=6)
    logp0, old = logp0.clone(), old.clone()
    logp0[~mask], old[~mask] = float("nan"), float("inf")
    sel = select_tokens(entropy, mask, rho=0.5)
    for normalizer in ("all_tokens", "selected_tokens", "seq_mean"):
        logp = logp0.clone().requires_grad_()
        kl = KLPenalty(ref, 0.1, scope="selected")
        loss, m = policy_loss(
            logp,
            old,
            adv,
            mask,
            sel,
            mode=LossMode(mode, cov_ratio=0.2, clip_cov_lb=-1e9, clip_cov_ub=1e9),
            normalizer=normalizer,
            kl=kl,
            token_counts=TokenCounts.from_masks(mask, sel),
            entropy=entropy,
        )
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
        assert not logp.grad[~sel].any()
        assert all(torch.isfinite(v) and v.dim() == 0 and not v.requires_grad for v in m.values())


def test_clip_mode_is_the_default():
    logp0, old, _, adv, entropy, mask = _batch(seed=7)
    sel = select_tokens(entropy, mask, rho=0.5)
    a = _forkrl(logp0, old, adv, mask, sel, "clip")
    b = _grad(lambda lp: policy_loss(lp, old, adv, mask, sel)[0], logp0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_mode_options_name_the_option():
    logp0, old, _, adv, _, mask = _batch()
    with pytest.raises(ValueError, match="unknown policy-loss mode 'nope'"):
        policy_loss(logp0, old, adv, mask, mask, mode="nope")
    with pytest.raises(ValueError, match="gspo_tokens"):
        policy_loss(logp0, old, adv, mask, mask, mode=LossMode("gspo", gspo_tokens="all"))
    with pytest.raises(ValueError, match="clip_cov_lb < clip_cov_ub"):
        policy_loss(logp0, old, adv, mask, mask, mode=LossMode("clip_cov", clip_cov_lb=2.0, clip_cov_ub=1.0))
