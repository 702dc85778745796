import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from forkrl.core.losses import KL_ESTIMATORS, NORMALIZERS, KLPenalty, TokenCounts, policy_loss
from tests.reference.losses_ref import policy_loss_ref

ALL_NORMALIZERS = ["all_tokens", "selected_tokens", "seq_mean", "constant", "dr_grpo"]


def one_token(log_ratio: float, adv: float, **kw):
    """Loss and metrics of a single selected token with old_logp = -1."""
    old = torch.tensor([[-1.0]])
    logp = (old + log_ratio).requires_grad_()
    mask = torch.tensor([[True]])
    loss, metrics = policy_loss(logp, old, torch.tensor([adv]), mask, mask, **kw)
    loss.backward()
    return loss.item(), metrics, logp.grad.item()


# ----------------------------------------------------------------------------- the surrogate


def test_positive_advantage_clipped_high():
    # r = 1.5 > 1 + 0.28: -min(1.5 · 1, 1.28 · 1) = -1.28, no gradient through the clipped ratio
    loss, m, grad = one_token(math.log(1.5), 1.0)
    assert loss == pytest.approx(-1.28)
    assert grad == 0.0
    assert m["clip_frac_high"].item() == 1.0 and m["clip_frac_low"].item() == 0.0
    # approx_kl = (r - 1) - log r = 0.5 - 0.405465
    assert m["approx_kl"].item() == pytest.approx(0.5 - math.log(1.5))


def test_positive_advantage_below_one_is_not_clipped():
    # A = 2, r = 0.5: -min(0.5 · 2, 0.8 · 2) = -1.0; d/dlogp (-A r) = -A r = -1.0
    loss, m, grad = one_token(math.log(0.5), 2.0)
    assert loss == pytest.approx(-1.0)
    assert grad == pytest.approx(-1.0)
    assert m["clip_frac_low"].item() == 0.0 and m["clip_frac_high"].item() == 0.0


def test_negative_advantage_clipped_low():
    # A = -1, r = 0.5 < 0.8: -min(-0.5, -0.8) = 0.8, clipped, no gradient
    loss, m, grad = one_token(math.log(0.5), -1.0)
    assert loss == pytest.approx(0.8)
    assert grad == 0.0
    assert m["clip_frac_low"].item() == 1.0


def test_negative_advantage_large_ratio_without_and_with_dual_clip():
    # A = -1, r = 5: plain loss -min(-5, -1.28) = 5 with gradient -A r = 5
    loss, m, grad = one_token(math.log(5.0), -1.0)
    assert loss == pytest.approx(5.0) and grad == pytest.approx(5.0)
    assert "dual_clip_frac" not in m
    # dual clip c = 3 caps it at -c A = 3, constant in logp
    loss, m, grad = one_token(math.log(5.0), -1.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0) and grad == 0.0
    assert m["dual_clip_frac"].item() == 1.0
    # c = 10 leaves r = 5 alone
    loss, m, grad = one_token(math.log(5.0), -1.0, dual_clip=10.0)
    assert loss == pytest.approx(5.0) and m["dual_clip_frac"].item() == 0.0


def test_dual_clip_ignores_positive_advantages():
    # A = +1, r = 5: clipped at 1.28 by the ordinary clip; the dual clip applies only to A < 0
    loss, m, _ = one_token(math.log(5.0), 1.0, dual_clip=3.0)
    assert loss == pytest.approx(-1.28) and m["dual_clip_frac"].item() == 0.0


def test_log_ratio_is_clamped_at_20_like_verl():
    # A = -1, log r = 30: the ratio is taken at exp(20) (finite in float32), with no gradient
    loss, _, grad = one_token(30.0, -1.0)
    assert loss == pytest.approx(math.exp(20.0), rel=1e-5) and grad == 0.0


def test_eps_low_and_high_are_used():
    # r = 1.1, A = 1, eps_high = 0.05: -min(1.1, 1.05) = -1.05
    loss, m, _ = one_token(math.log(1.1), 1.0, eps_low=0.1, eps_high=0.05)
    assert loss == pytest.approx(-1.05) and m["clip_frac_high"].item() == 1.0


# ----------------------------------------------------------------------------- normalizers


def normalizer_batch():
    """3 rows; the last is fully masked and holds garbage in logp.

    logp == old_logp (r = 1), so each selected token's term is -A:
    row 0 (A = 1): valid t0..t2, selected t0, t2 -> terms -1, -1
    row 1 (A = -3): valid t0, selected t0       -> term +3
    row 2: no valid tokens
    total 1; valid 4; selected 3; sequences 2
    """
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    logp = old.clone()
    logp[2] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    logp.requires_grad_()
    loss_mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    sel_mask = torch.tensor([[True, False, True], [True, False, False], [False, False, False]])
    adv = torch.tensor([1.0, -3.0, float("nan")])
    return logp, old, adv, loss_mask, sel_mask


@pytest.mark.parametrize(
    ("normalizer", "expected"),
    [
        ("all_tokens", 1 / 4),  # Σ terms / valid tokens
        ("selected_tokens", 1 / 3),  # Σ terms / selected tokens
        ("seq_mean", (-2 / 3 + 3 / 1) / 2),  # per-row Σ / row length, mean over 2 sequences = 7/6
        ("constant", 1 / (2 * 5)),  # Σ terms / (sequences · max_len = 2 · 5)
        ("dr_grpo", 1 / (3 * 5)),  # Σ terms / (rows · max_len = 3 · 5): the masked row counts (TRL)
    ],
)
def test_normalizers_by_hand(normalizer, expected):
    logp, old, adv, loss_mask, sel_mask = normalizer_batch()
    loss, metrics = policy_loss(logp, old, adv, loss_mask, sel_mask, normalizer=normalizer, max_len=5)
    assert loss.item() == pytest.approx(expected)
    assert metrics["pg_loss"].item() == pytest.approx(expected)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert torch.equal(logp.grad[2], torch.zeros(3))


def test_registry_names_match_design():
    assert set(ALL_NORMALIZERS) == set(NORMALIZERS)
    assert {"k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k3_unclamped"} == set(KL_ESTIMATORS)


@pytest.mark.parametrize("normalizer", ALL_NORMALIZERS)
def test_empty_selection_and_empty_batch_give_zero_not_nan(normalizer):
    logp = torch.zeros(2, 3, requires_grad=True)
    old = torch.zeros(2, 3)
    none = torch.zeros(2, 3, dtype=torch.bool)
    for loss_mask in (none, ~none):  # nothing valid; everything valid but nothing selected
        loss, metrics = policy_loss(
            logp, old, torch.ones(2), loss_mask, none, normalizer=normalizer, max_len=3
        )
        assert loss.item() == 0.0
        loss.backward()  # the loss stays attached to logp
        assert torch.equal(logp.grad, torch.zeros(2, 3))
        assert all(torch.isfinite(v) for v in metrics.values())
        logp.grad = None


def test_zero_external_counts_give_zero():
    logp, old, adv, loss_mask, sel_mask = normalizer_batch()
    loss, _ = policy_loss(logp, old, adv, loss_mask, sel_mask, token_counts=TokenCounts(0.0, 0.0, 0.0))
    assert loss.item() == 0.0


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    # logp = 0, ref = ln 0.5: k1 = ln 2 = 0.693147; k2 = 0.5 · ln²2 = 0.240227;
    # k3 = exp(ref - logp) - (ref - logp) - 1 = 0.5 + ln 2 - 1 = 0.193147
    logp, ref = torch.zeros(1, 1), torch.full((1, 1), math.log(0.5))
    assert KL_ESTIMATORS["k1"](logp, ref).item() == pytest.approx(math.log(2))
    assert KL_ESTIMATORS["k2"](logp, ref).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert KL_ESTIMATORS["k3"](logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1)
    assert KL_ESTIMATORS["low_var_kl"](logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1)
    assert KL_ESTIMATORS["k3_unclamped"](logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1)
    # k3 / low_var_kl clamp the result at 10 (verl: one function); TRL's k3_unclamped does not
    far = torch.full((1, 1), 30.0)
    assert KL_ESTIMATORS["low_var_kl"](logp, far).item() == 10.0
    assert KL_ESTIMATORS["k3"](logp, far).item() == 10.0
    assert KL_ESTIMATORS["k3_unclamped"](logp, far).item() > 1e12


def test_kl_scope_all_vs_selected():
    # one row, two valid tokens, the first selected; r = 1, A = 1 -> pg terms [-1, 0]
    # k1 = ln 2 per token, coef 0.1, all_tokens (÷ 2):
    #   scope all:      (-1 + 0.1 · 2 ln 2) / 2 = -0.430685
    #   scope selected: (-1 + 0.1 · ln 2) / 2   = -0.465343
    logp = torch.zeros(1, 2, requires_grad=True)
    mask, sel = torch.tensor([[True, True]]), torch.tensor([[True, False]])
    ref = torch.full((1, 2), math.log(0.5))
    for scope, expected in (
        ("all", (-1 + 0.2 * math.log(2)) / 2),
        ("selected", (-1 + 0.1 * math.log(2)) / 2),
    ):
        kl = KLPenalty(ref, coef=0.1, estimator="k1", scope=scope)
        loss, m = policy_loss(logp, torch.zeros(1, 2), torch.ones(1), mask, sel, kl=kl)
        assert loss.item() == pytest.approx(expected)
        assert m["kl"].item() == pytest.approx(math.log(2))
        assert m["kl_loss"].item() == pytest.approx(expected + 0.5)
        assert m["pg_loss"].item() == pytest.approx(-0.5)
        logp.grad = None
        loss.backward()
        # d k1 / d logp = 1, times coef / 2; the unselected token gets it only under scope "all"
        assert logp.grad[0, 1].item() == pytest.approx(0.05 if scope == "all" else 0.0)


# ----------------------------------------------------------------------------- metrics


def test_metrics_by_hand():
    # row 0: t0 selected (r = 1.5, A = 1: clipped high), t1 selected (r = 0.5, A = -1: clipped low),
    #        t2 valid, dropped; row 1: t0 valid, dropped; t1 padding
    old = torch.zeros(2, 3)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0], [0.0, 0.0, 0.0]])
    adv = torch.tensor([[1.0, -1.0, 1.0], [2.0, 2.0, 2.0]])
    loss_mask = torch.tensor([[True, True, True], [True, False, False]])
    sel = torch.tensor([[True, True, False], [False, False, False]])
    entropy = torch.tensor([[2.0, 4.0, 1.0], [0.5, 9.0, 9.0]])
    _, m = policy_loss(logp, old, adv, loss_mask, sel, entropy=entropy)
    assert m["clip_frac_high"].item() == pytest.approx(0.5)  # 1 of 2 selected
    assert m["clip_frac_low"].item() == pytest.approx(0.5)
    assert m["kept_frac"].item() == pytest.approx(2 / 4)
    assert m["entropy_kept"].item() == pytest.approx(3.0)  # (2 + 4) / 2
    assert m["entropy_dropped"].item() == pytest.approx(0.75)  # (1 + 0.5) / 2; padding excluded
    # approx_kl = mean over selected of (r - 1) - ln r
    k = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2
    assert m["approx_kl"].item() == pytest.approx(k)
    assert m["valid_tokens"].item() == 4 and m["selected_tokens"].item() == 2
    for name, value in m.items():
        assert value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad, name


def test_per_sequence_and_per_token_advantages_agree():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 4, generator=g)
    old = logp + 0.3 * torch.randn(3, 4, generator=g)
    mask = torch.rand(3, 4, generator=g) < 0.8
    sel = mask & (torch.rand(3, 4, generator=g) < 0.5)
    adv = torch.randn(3, generator=g)
    a, _ = policy_loss(logp, old, adv, mask, sel, dual_clip=3.0)
    b, _ = policy_loss(logp, old, adv[:, None].expand(3, 4).contiguous(), mask, sel, dual_clip=3.0)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- gradients


@given(seed=st.integers(0, 2**16), dual=st.booleans(), normalizer=st.sampled_from(ALL_NORMALIZERS))
def test_unselected_tokens_get_exactly_zero_gradient(seed, dual, normalizer):
    g = torch.Generator().manual_seed(seed)
    logp = (-3 * torch.rand(3, 5, generator=g)).requires_grad_()
    old = logp.detach() + torch.randn(3, 5, generator=g)
    loss_mask = torch.rand(3, 5, generator=g) < 0.8
    sel = loss_mask & (torch.rand(3, 5, generator=g) < 0.4)
    ref = logp.detach() + torch.randn(3, 5, generator=g)
    kl = KLPenalty(ref, coef=0.2, estimator="k3", scope="selected")
    loss, _ = policy_loss(
        logp,
        old,
        torch.randn(3, generator=g),
        loss_mask,
        sel,
        dual_clip=3.0 if dual else None,
        normalizer=normalizer,
        max_len=5,
        kl=kl,
    )
    loss.backward()
    assert torch.equal(logp.grad[~sel], torch.zeros(int((~sel).sum())))


def test_garbage_outside_the_mask_does_not_leak():
    logp = torch.tensor([[-1.0, float("nan")], [float("inf"), -float("inf")]], requires_grad=True)
    old = torch.tensor([[-1.2, float("nan")], [-float("inf"), 3.0]])
    adv = torch.tensor([[1.0, float("nan")], [float("inf"), 1.0]])
    mask = torch.tensor([[True, False], [False, False]])
    ent = torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")]])
    kl = KLPenalty(torch.tensor([[-1.0, float("nan")], [1.0, float("nan")]]), coef=0.1)
    loss, metrics = policy_loss(logp, old, adv, mask, mask, kl=kl, entropy=ent, dual_clip=3.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


# ----------------------------------------------------------------------------- against the reference


@st.composite
def loss_case(draw):
    B, L = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    logp = -3 * torch.rand(B, L, generator=g)
    old = logp + draw(st.sampled_from([0.05, 0.5, 2.0])) * torch.randn(B, L, generator=g)
    loss_mask = torch.rand(B, L, generator=g) < draw(st.sampled_from([0.0, 0.5, 0.8, 1.0]))
    if draw(st.booleans()):
        loss_mask[draw(st.integers(0, B - 1))] = False  # an all-masked row
    sel = loss_mask & (torch.rand(B, L, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0])))
    adv = torch.randn(B, L, generator=g) if draw(st.booleans()) else torch.randn(B, generator=g)
    kw = {
        "eps_low": draw(st.sampled_from([0.1, 0.2])),
        "eps_high": draw(st.sampled_from([0.2, 0.28])),
        "dual_clip": draw(st.sampled_from([None, 1.5, 3.0])),
        "normalizer": draw(st.sampled_from(ALL_NORMALIZERS)),
        "max_len": L + draw(st.integers(0, 3)),
        "entropy": torch.rand(B, L, generator=g) * 2 if draw(st.booleans()) else None,
    }
    if draw(st.booleans()):
        kw["kl"] = KLPenalty(
            logp + 0.5 * torch.randn(B, L, generator=g),
            coef=draw(st.sampled_from([0.01, 0.5])),
            estimator=draw(st.sampled_from(sorted(KL_ESTIMATORS))),
            scope=draw(st.sampled_from(["all", "selected"])),
        )
    if draw(st.booleans()):
        local = TokenCounts.from_masks(loss_mask, sel)
        kw["token_counts"] = TokenCounts(
            local.valid + 3, local.selected + 2, local.sequences + 1, local.rows + 2
        )
    return (logp, old, adv, loss_mask, sel), kw


@given(loss_case())
def test_matches_reference(case):
    args, kw = case
    loss, metrics = policy_loss(*args, **kw)
    ref_loss, ref_metrics = policy_loss_ref(*args, **kw)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-4, abs=1e-5)
    assert set(metrics) == set(ref_metrics)
    for name, value in ref_metrics.items():
        assert metrics[name].item() == pytest.approx(value, rel=1e-4, abs=1e-5), name


# ----------------------------------------------------------------------------- micro-batch accumulation


@given(case=loss_case(), data=st.data())
def test_micro_batch_losses_sum_to_the_batch_loss(case, data):
    (logp, old, adv, loss_mask, sel), kw = case
    kw.pop("token_counts", None)
    B = logp.shape[0]
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(B - 1, 1)), max_size=3)))) if B > 1 else []
    bounds = [0, *[c for c in cuts if 0 < c < B], B]

    full_logp = logp.clone().requires_grad_()
    full_loss, _ = policy_loss(full_logp, old, adv, loss_mask, sel, **kw)
    full_loss.backward()

    # The trainer's view: sum the micro-batches' counts (then all-reduce them under DDP).
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    counts = sum((TokenCounts.from_masks(loss_mask[s], sel[s]) for s in slices), TokenCounts.zero())
    micro_logp = logp.clone().requires_grad_()
    total = torch.zeros(())
    for s in slices:
        micro_kw = dict(kw)
        if kw.get("entropy") is not None:
            micro_kw["entropy"] = kw["entropy"][s]
        if kw.get("kl") is not None:
            k = kw["kl"]
            micro_kw["kl"] = KLPenalty(k.ref_logp[s], k.coef, k.estimator, k.scope)
        loss, _ = policy_loss(
            micro_logp[s], old[s], adv[s], loss_mask[s], sel[s], token_counts=counts, **micro_kw
        )
        loss.backward()
        total = total + loss.detach()
    assert total.item() == pytest.approx(full_loss.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(micro_logp.grad, full_logp.grad, rtol=1e-5, atol=1e-6)


def test_token_counts_round_trip_through_a_tensor():
    counts = TokenCounts(4.0, 2.0, 1.0, 3.0) + TokenCounts(1.0, 1.0, 1.0, 1.0)
    t = counts.as_tensor()
    assert t.tolist() == [5.0, 3.0, 2.0, 4.0]
    back = TokenCounts.from_tensor(t)
    assert (float(back.valid), float(back.selected), float(back.sequences), float(back.rows)) == (5, 3, 2, 4)


# ----------------------------------------------------------------------------- errors


def valid_args():
    mask = torch.ones(2, 3, dtype=torch.bool)
    return torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), mask, mask


@pytest.mark.parametrize(
    ("change", "kw", "match"),
    [
        ({1: torch.zeros(2, 4)}, {}, r"old_logp must have logp's shape \(2, 3\)"),
        ({0: torch.zeros(6)}, {}, r"logp must be a floating \(B, L\) tensor"),
        ({0: torch.zeros(2, 3, dtype=torch.long)}, {}, r"logp must be a floating"),
        ({3: torch.ones(2, 3)}, {}, r"loss_mask must be a bool tensor.*loss_mask.bool\(\)"),
        ({4: torch.ones(2, 3, dtype=torch.int64)}, {}, r"sel_mask must be a bool tensor"),
        ({2: torch.zeros(3)}, {}, r"adv must have shape \(2,\) or \(2, 3\)"),
        ({2: torch.zeros(2, dtype=torch.long)}, {}, r"adv must be a floating tensor"),
        ({3: torch.zeros(2, 3, dtype=torch.bool)}, {}, r"sel_mask selects tokens outside loss_mask"),
        ({}, {"normalizer": "token_mean"}, r"unknown normalizer 'token_mean'.*'all_tokens'.*'seq_mean'"),
        ({}, {"normalizer": "constant"}, r"\"constant\".*needs max_len"),
        ({}, {"max_len": 0}, r"max_len must be a positive int"),
        ({}, {"dual_clip": 1.0}, r"dual_clip must be > 1"),
        ({}, {"eps_low": 1.0}, r"0 <= eps_low < 1"),
        ({}, {"eps_high": -0.1}, r"eps_high >= 0"),
        ({}, {"token_counts": (1, 1, 1)}, r"token_counts must be a TokenCounts"),
        ({}, {"entropy": torch.zeros(2)}, r"entropy must have logp's shape"),
        ({}, {"kl": KLPenalty(torch.zeros(2, 3), 0.1, estimator="k9")}, r"unknown KL estimator 'k9'.*'k1'"),
        ({}, {"kl": KLPenalty(torch.zeros(2, 3), 0.1, scope="valid")}, r"scope must be 'all' or 'selected'"),
        ({}, {"kl": KLPenalty(torch.zeros(3, 3), 0.1)}, r"kl.ref_logp must have logp's shape"),
    ],
)
def test_errors_name_the_problem(change, kw, match):
    args = list(valid_args())
    for i, value in change.items():
        args[i] = value
    with pytest.raises(ValueError, match=match):
        policy_loss(*args, **kw)
