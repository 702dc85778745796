"""Token selection: hand-computed cases, properties against the slow reference, and 50M tokens."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from forkrl.core.selection import (
    COUNTS,
    K_RULES,
    RULES,
    _rho_fraction,
    num_selected,
    radix_kth_largest,
    select_tokens,
    select_tokens_with_threshold,
)
from tests.reference.selection_ref import ref_kth_largest, ref_num_selected, ref_select

T, F = True, False
# The running example. Valid tokens in flat (row-major) order:
#   index:   0    1    2    3    4   (5 is padding)
#   H:      0.5  0.1  0.9  0.9  0.3
#   sorted ascending: [0.1, 0.3, 0.5, 0.9, 0.9], N = 5
ENTROPY = torch.tensor([[0.5, 0.1, 0.9], [0.9, 0.3, 0.0]])
MASK = torch.tensor([[T, T, T], [T, T, F]])


def _sel(rho, rule="top", count="exact", per_sequence=False, entropy=ENTROPY, mask=MASK, **kw):
    return select_tokens_with_threshold(
        entropy, mask, rho=rho, rule=rule, count=count, per_sequence=per_sequence, **kw
    )


def _assert_tau(tau, expected):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert torch.allclose(tau, expected, rtol=1e-6, atol=0.0, equal_nan=True), (tau, expected)


@pytest.mark.parametrize(
    ("rho", "rule", "count", "expected_sel", "expected_tau"),
    [
        # k = ceil(0.5 * 5) = 3: 0.9 (idx 2), 0.9 (idx 3), 0.5 (idx 0); tau = 3rd largest = 0.5
        (0.5, "top", "exact", [[T, F, T], [T, F, F]], 0.5),
        # k = ceil(0.2 * 5) = 1: the tie 0.9/0.9 goes to the earlier flat index 2
        (0.2, "top", "exact", [[F, F, T], [F, F, F]], 0.9),
        # k = ceil(0.1 * 5) = ceil(0.5) = 1
        (0.1, "top", "exact", [[F, F, T], [F, F, F]], 0.9),
        # k = 0: nothing, no threshold
        (0.0, "top", "exact", [[F, F, F], [F, F, F]], math.nan),
        # k = 5: every valid token; tau = the smallest valid value
        (1.0, "top", "exact", [[T, T, T], [T, T, F]], 0.1),
        # lowest k = 3: 0.1 (idx 1), 0.3 (idx 4), 0.5 (idx 0); tau = 3rd smallest = 0.5
        (0.5, "bottom", "exact", [[T, T, F], [F, T, F]], 0.5),
        # lowest k = 1: 0.1; the masked 0.0 never counts
        (0.2, "bottom", "exact", [[F, T, F], [F, F, F]], 0.1),
        # quantile p = 1 - 0.5: pos = 0.5 * 4 = 2 -> 0.5; keep H >= 0.5
        (0.5, "top", "quantile", [[T, F, T], [T, F, F]], 0.5),
        # p = 0.8: pos = 3.2 -> lerp(0.9, 0.9, 0.2) = 0.9; both tied 0.9 kept (2 > k = 1)
        (0.2, "top", "quantile", [[F, F, T], [T, F, F]], 0.9),
        # p = 1: pos = 4 -> max; TRL: "0.0 masks all but the highest entropy token" (and its ties)
        (0.0, "top", "quantile", [[F, F, T], [T, F, F]], 0.9),
        # p = 0: pos = 0 -> min 0.1; everything kept
        (1.0, "top", "quantile", [[T, T, T], [T, T, F]], 0.1),
        # bottom, p = 0.5 -> 0.5; keep H <= 0.5
        (0.5, "bottom", "quantile", [[T, T, F], [F, T, F]], 0.5),
        # bottom, p = 0.2: pos = 0.8 -> 0.1 + 0.8 * (0.3 - 0.1) = 0.26; keep H <= 0.26
        (0.2, "bottom", "quantile", [[F, T, F], [F, F, F]], 0.26),
        # all: loss_mask itself, no threshold
        (0.2, "all", "exact", [[T, T, T], [T, T, F]], math.nan),
        (0.2, "all", "quantile", [[T, T, T], [T, T, F]], math.nan),
    ],
)
def test_hand_computed_batch(rho, rule, count, expected_sel, expected_tau):
    sel, tau = _sel(rho, rule, count)
    assert sel.dtype == torch.bool and sel.shape == MASK.shape
    assert sel.tolist() == expected_sel
    assert tau.shape == ()
    _assert_tau(tau, expected_tau)


@pytest.mark.parametrize(
    ("rule", "count", "expected_sel", "expected_tau"),
    [
        # row 0: N = 3, k = ceil(1.5) = 2 -> 0.9, 0.5; row 1: N = 2, k = 1 -> 0.9
        ("top", "exact", [[T, F, T], [T, F, F]], [0.5, 0.9]),
        # row 0: lowest 2 -> 0.1, 0.5; row 1: lowest 1 -> 0.3
        ("bottom", "exact", [[T, T, F], [F, T, F]], [0.5, 0.3]),
        # row 0: [0.1, 0.5, 0.9], pos = 1 -> 0.5; row 1: [0.3, 0.9], pos = 0.5 -> 0.6
        ("top", "quantile", [[T, F, T], [T, F, F]], [0.5, 0.6]),
        # row 0: pos = 1 -> 0.5, keep <= 0.5; row 1: 0.6, keep 0.3
        ("bottom", "quantile", [[T, T, F], [F, T, F]], [0.5, 0.6]),
        ("all", "exact", [[T, T, T], [T, T, F]], [math.nan, math.nan]),
    ],
)
def test_hand_computed_per_sequence(rule, count, expected_sel, expected_tau):
    sel, tau = _sel(0.5, rule, count, per_sequence=True)
    assert sel.tolist() == expected_sel
    assert tau.shape == (2,)
    _assert_tau(tau, expected_tau)


def test_ties_at_the_boundary_take_earlier_positions():
    # All equal, k = ceil(0.5 * 4) = 2: positions 0 and 1, for top and bottom alike.
    flat = torch.ones(1, 4)
    for rule in ("top", "bottom"):
        sel, tau = _sel(0.5, rule, entropy=flat, mask=torch.ones(1, 4, dtype=torch.bool))
        assert sel.tolist() == [[T, T, F, F]] and tau.item() == 1.0
    # Across rows, k = 2: 2.0 at (0, 1) and (1, 0), not (1, 1) (row-major order).
    sel = select_tokens(torch.tensor([[0.0, 2.0], [2.0, 2.0]]), torch.ones(2, 2, dtype=torch.bool), rho=0.5)
    assert sel.tolist() == [[F, T], [T, F]]
    # Bottom, k = 2 of [[3, 1], [1, 1]]: the 1s at (0, 1) and (1, 0).
    sel = select_tokens(
        torch.tensor([[3.0, 1.0], [1.0, 1.0]]), torch.ones(2, 2, dtype=torch.bool), rho=0.5, rule="bottom"
    )
    assert sel.tolist() == [[F, T], [T, F]]
    # -0.0 and 0.0 are the same value: k = 1 picks the earlier one.
    sel, tau = _sel(0.5, entropy=torch.tensor([[-1.0, -0.0, 0.0]]), mask=torch.ones(1, 3, dtype=torch.bool))
    assert sel.tolist() == [[F, T, T]] and tau.item() == 0.0  # k = ceil(1.5) = 2: both zeros


def test_masked_rows_and_empty_batches():
    mask = torch.tensor([[T, T, F], [F, F, F]])
    sel, tau = _sel(0.5, per_sequence=True, mask=mask)  # row 0: N = 2, k = 1 -> 0.5; row 1: nothing
    assert sel.tolist() == [[T, F, F], [F, F, F]]
    _assert_tau(tau, [0.5, math.nan])
    for count in COUNTS:
        for per_sequence in (False, True):
            for entropy, mask in [
                (torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool)),  # B = 0
                (torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool)),  # L = 0
                (torch.rand(2, 4), torch.zeros(2, 4, dtype=torch.bool)),  # all padding
            ]:
                for rule in RULES:
                    sel, tau = _sel(0.2, rule, count, per_sequence, entropy=entropy, mask=mask)
                    assert sel.shape == mask.shape and not sel.any()
                    assert tau.shape == ((mask.shape[0],) if per_sequence else ())
                    assert torch.isnan(tau).all()


@pytest.mark.parametrize(("rho", "k"), [(0, 0), (0.1, 1), (0.2, 2), (0.5, 5), (1, 10)])
def test_exact_count_for_rho(rho, k):
    entropy = torch.arange(10.0).reshape(2, 5)
    sel, tau = _sel(rho, entropy=entropy, mask=torch.ones(2, 5, dtype=torch.bool))
    assert sel.sum().item() == k == num_selected(10, rho)
    assert sel.flatten().tolist() == [i >= 10 - k for i in range(10)]  # the k largest
    _assert_tau(tau, 10.0 - k if k else math.nan)


def test_num_selected_is_robust_to_float_error():
    assert num_selected(10, 0.2) == 2  # 0.2 * 10 is 2.0000000000000004 in floats
    assert num_selected(10, 0.7) == 7
    assert num_selected(10, 0.1 + 0.2) == 3  # rho = 0.30000000000000004
    assert num_selected(10, float(torch.tensor(0.2))) == 2  # a float32 rho: 0.20000000298023224
    assert num_selected(10_000_000, 0.2000001) == 2_000_001  # a real extra token still counts
    assert num_selected(10, 0.2000001) == 3 and num_selected(10**7, 0.20000005) == 2_000_001
    assert num_selected(3, 1 / 3) == 1 and num_selected(3, 2 / 3) == 2
    assert num_selected(7, 1e-12) == 1  # k = 0 only when N = 0 or rho = 0
    assert num_selected(0, 0.5) == 0 and num_selected(7, 0) == 0 and num_selected(7, 1) == 7
    for rho in (0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.5, 0.8, 0.999, 1.0):
        for n in range(0, 300, 7):
            assert num_selected(n, rho) == ref_num_selected(n, rho), (n, rho)


@pytest.mark.parametrize("rho", [0.0, 0.1, 0.2, 0.37, 0.5, 0.8, 1.0])
def test_quantile_matches_torch_quantile(rho):
    g = torch.Generator().manual_seed(1)
    entropy = torch.rand(4, 9, generator=g) * 3
    mask = torch.rand(4, 9, generator=g) > 0.3
    valid = entropy[mask]
    for rule, q, keep in [("top", 1 - rho, torch.ge), ("bottom", rho, torch.le)]:
        expected_tau = torch.quantile(valid, q)  # TRL's get_high_entropy_mask threshold
        sel, tau = _sel(rho, rule, "quantile", entropy=entropy, mask=mask)
        assert torch.allclose(tau, expected_tau, rtol=1e-6), (rule, tau, expected_tau)
        assert torch.equal(sel, mask & keep(entropy, expected_tau)), rule


def test_random_rule_is_seeded_exact_and_documented():
    entropy, mask = torch.rand(3, 8), torch.rand(3, 8) > 0.2
    n, k = int(mask.sum()), num_selected(int(mask.sum()), 0.3)
    sel, tau = _sel(0.3, "random", entropy=entropy, mask=mask, generator=torch.Generator().manual_seed(7))
    again = select_tokens(entropy, mask, rho=0.3, rule="random", generator=torch.Generator().manual_seed(7))
    quantile = select_tokens(
        entropy, mask, rho=0.3, rule="random", count="quantile", generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(sel, again) and torch.equal(sel, quantile)  # quantile is treated as exact
    assert int(sel.sum()) == k and not (sel & ~mask).any() and torch.isnan(tau)
    # The documented contract: the k largest keys of torch.rand((B, L), generator), ties by position.
    keys = torch.rand(3, 8, generator=torch.Generator().manual_seed(7))
    expected, _ = ref_select(entropy.tolist(), mask.tolist(), 0.3, "random", keys=keys.tolist())
    assert sel.tolist() == expected and n > 0


def test_low_precision_entropy_is_compared_in_float32():
    entropy = torch.rand(4, 16)
    mask = torch.rand(4, 16) > 0.25
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        low = entropy.to(dtype)
        for count in COUNTS:
            got = select_tokens_with_threshold(low, mask, rho=0.3, count=count)
            want = select_tokens_with_threshold(low.float(), mask, rho=0.3, count=count)
            assert (
                torch.equal(got[0], want[0])
                and torch.equal(got[1], want[1])
                and got[1].dtype == torch.float32
            )


def test_non_contiguous_inputs_keep_row_major_tie_order():
    # Built transposed: memory order differs from the (B, L) row-major order the tie-break uses.
    entropy = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]).t().contiguous().t()  # (2, 3), strides (1, 2)
    mask = torch.ones(3, 2, dtype=torch.bool).t()  # (2, 3)
    assert not entropy.is_contiguous()
    for count in COUNTS:
        for per_sequence in (False, True):
            got = select_tokens(entropy, mask, rho=0.5, count=count, per_sequence=per_sequence)
            want = select_tokens(
                entropy.contiguous(), mask.contiguous(), rho=0.5, count=count, per_sequence=per_sequence
            )
            assert torch.equal(got, want)
    # k = 3 of six tied values: the whole first row
    assert select_tokens(entropy, mask, rho=0.5).tolist() == [[T, T, T], [F, F, F]]


def test_nan_entropy_is_an_error_only_where_valid():
    entropy = ENTROPY.clone()
    entropy[1, 2] = math.nan  # padding: ignored
    assert torch.equal(select_tokens(entropy, MASK, rho=0.5), select_tokens(ENTROPY, MASK, rho=0.5))
    entropy[0, 1] = math.nan
    for per_sequence in (False, True):
        for count in COUNTS:
            with pytest.raises(ValueError, match="1 NaN values at loss_mask=True"):
                select_tokens(entropy, MASK, rho=0.5, count=count, per_sequence=per_sequence)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": 1.5}, r"rho must be a number in \[0, 1\].*got 1.5"),
        ({"rho": -0.1}, r"rho must be a number in \[0, 1\].*got -0.1"),
        ({"rho": math.nan}, r"rho must be a number in \[0, 1\].*got nan"),
        ({"rho": "0.2"}, r"rho must be a number in \[0, 1\].*got '0.2'"),
        ({"rule": "highest"}, r"rule must be one of \['all', 'bottom', 'random', 'top'\]; got 'highest'"),
        ({"count": "approx"}, r"count must be one of \['exact', 'quantile', 'fork'\]; got 'approx'"),
        ({"per_sequence": "yes"}, r"per_sequence must be a bool; got 'yes'"),
        (
            {"loss_mask": MASK.float()},
            r"loss_mask must be a torch.bool tensor .* got torch.float32.*loss_mask.bool\(\)",
        ),
        ({"loss_mask": MASK.long()}, r"loss_mask must be a torch.bool tensor .* got torch.int64"),
        ({"loss_mask": MASK[:, :2]}, r"loss_mask shape \(2, 2\) must equal entropy shape \(2, 3\)"),
        (
            {"entropy": ENTROPY.flatten(), "loss_mask": MASK.flatten()},
            r"entropy must be a 2-D floating-point.*\(6,\)",
        ),
        (
            {"entropy": ENTROPY.long()},
            r"entropy must be a 2-D floating-point tensor \(B, L\); got torch.int64",
        ),
    ],
)
def test_errors_name_the_argument_and_what_is_allowed(kwargs, match):
    args = {"entropy": ENTROPY, "loss_mask": MASK, **kwargs}
    entropy, loss_mask = args.pop("entropy"), args.pop("loss_mask")
    with pytest.raises(ValueError, match=match):
        select_tokens(entropy, loss_mask, **args)


def test_helper_errors():
    with pytest.raises(ValueError, match=r"n_valid must be a non-negative int; got -1"):
        num_selected(-1, 0.2)
    with pytest.raises(ValueError, match=r"rho must be a number in \[0, 1\]"):
        num_selected(3, 2.0)
    with pytest.raises(
        ValueError, match=r"k must be an int in \[1, 3\] \(the number of valid values\); got 4"
    ):
        radix_kth_largest(torch.tensor([1.0, 2.0, 3.0, 4.0]), 4, valid=torch.tensor([T, T, T, F]))
    with pytest.raises(
        ValueError, match=r"bits_per_pass must be None \(automatic\) or one of \(1, 2, 4, 8, 16\); got 3"
    ):
        radix_kth_largest(torch.ones(3), 1, bits_per_pass=3)


# --- properties against the reference ---------------------------------------------------------------

TIE_HEAVY = [0.0, -0.0, 0.25, 0.5, 1.0, 2.0, 3.5]
rho_values = st.one_of(st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.5, 1.0]), st.floats(0.0, 1.0))


@st.composite
def batches(draw):
    b, l = draw(st.integers(0, 4)), draw(st.integers(0, 7))
    element = (
        st.sampled_from(TIE_HEAVY)
        if draw(st.booleans())
        else st.floats(-100.0, 100.0, width=32, allow_nan=False, allow_infinity=False)
    )
    values = draw(st.lists(element, min_size=b * l, max_size=b * l))
    valid = draw(st.lists(st.booleans(), min_size=b * l, max_size=b * l))
    entropy = torch.tensor(values, dtype=torch.float32).reshape(b, l)
    mask = torch.tensor(valid, dtype=torch.bool).reshape(b, l)
    if b and draw(st.booleans()):
        mask[draw(st.integers(0, b - 1))] = False  # a fully masked row
    return entropy, mask


def _assert_matches_reference(entropy, mask, rho, rule, count, per_sequence, seed=0):
    sel, tau = select_tokens_with_threshold(
        entropy,
        mask,
        rho=rho,
        rule=rule,
        count=count,
        per_sequence=per_sequence,
        generator=torch.Generator().manual_seed(seed),
    )
    keys = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed)).tolist()
    ref_sel, ref_tau = ref_select(entropy.tolist(), mask.tolist(), rho, rule, count, per_sequence, keys)
    assert not (sel & ~mask).any()
    ref_tau = torch.tensor(ref_tau, dtype=torch.float64)
    if count == "quantile" and rule != "random":
        # tau is a float32 lerp; allow a token within rounding of the exact quantile to fall either way
        assert torch.allclose(tau.double(), ref_tau, rtol=1e-6, atol=1e-30, equal_nan=True)
        ref_sel_t = torch.tensor(ref_sel, dtype=torch.bool).reshape(mask.shape)
        tau_b = ref_tau[:, None] if per_sequence else ref_tau
        near = (entropy.double() - tau_b).abs() <= 1e-6 * tau_b.abs().clamp(min=1.0)
        assert torch.equal(sel & ~near, ref_sel_t & ~near)
    else:
        assert sel.tolist() == ref_sel
        assert torch.equal(tau.double().nan_to_num(123.0), ref_tau.nan_to_num(123.0))
    return sel


@given(
    batches(),
    rho_values,
    st.sampled_from(["top", "bottom", "random", "all"]),
    st.sampled_from(COUNTS),
    st.booleans(),
)
def test_fast_path_equals_reference(batch, rho, rule, count, per_sequence):
    entropy, mask = batch
    sel = _assert_matches_reference(entropy, mask, rho, rule, count, per_sequence)
    if count == "exact" or rule == "random":  # exactly k per scope
        rows = mask.sum(1).tolist() if per_sequence else [int(mask.sum())]
        kept = sel.sum(1).tolist() if per_sequence else [int(sel.sum())]
        # rule=random keeps k by the count rule that has one (the fork's for count=fork), else exact
        k_of = K_RULES[count] if (rule == "random" and count in K_RULES) else None
        want = [
            n if rule == "all" else k_of(n, _rho_fraction(rho)) if k_of else num_selected(n, rho)
            for n in rows
        ]
        assert kept == want


@given(
    st.lists(
        st.one_of(
            st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, math.inf, -math.inf]),
            st.floats(width=32, allow_nan=False),
        ),
        min_size=1,
        max_size=200,
    ),
    st.data(),
    st.sampled_from([4, 8, 16]),
)
def test_radix_select_equals_sort(values, data, bits):
    x = torch.tensor(values, dtype=torch.float32)
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values))))
    valid[data.draw(st.integers(0, len(values) - 1))] = True
    kept = x[valid].tolist()
    k = data.draw(st.integers(1, len(kept)))
    got = radix_kth_largest(x, k, valid=valid, bits_per_pass=bits)
    assert got.item() == ref_kth_largest(kept, k)
    assert got.item() == x[valid].sort(descending=True).values[k - 1].item()


def test_radix_select_on_random_data_with_negatives_zeros_and_duplicates():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(100_003, generator=g) * 10
    x[::5] = 0.0
    x[1::7] = -0.0
    x[2::11] = x[3::11][: x[2::11].numel()]  # duplicates
    x[::13] = torch.round(x[::13])
    valid = torch.rand(x.shape, generator=g) > 0.1
    kept = x[valid]
    for k in (1, 17, kept.numel() // 3, kept.numel()):
        want = torch.kthvalue(kept, kept.numel() - k + 1).values
        for bits in (8, 16):
            assert radix_kth_largest(x, k, valid=valid, bits_per_pass=bits) == want, (k, bits)


# --- scale: no 2^24 limit anywhere -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fifty_million():
    # H[b, j] = (j mod 1000) / 8, exact in float32; the last row is padding, so N = 49e6 valid tokens
    # and every value appears 49,000 times among them.
    b, l = 50, 1_000_000
    entropy = (torch.arange(l, dtype=torch.int32) % 1000).float().div_(8).expand(b, l).contiguous()  # (B, L)
    mask = torch.ones(b, l, dtype=torch.bool)
    mask[-1] = False
    return entropy, mask


def test_fifty_million_entropies_exact(fifty_million):
    # rho = 0.2001: k = ceil(0.2001 * 49e6) = 9,804,900. Descending, the values 999/8 .. 800/8 fill
    # 200 * 49,000 = 9.8e6 slots, so tau = 799/8 and 4,900 of the 49,000 tied 799/8 are taken: the
    # first in row-major order, j = 799, 1799, ... in rows 0-4.
    entropy, mask = fifty_million
    n, k = 49_000_000, 9_804_900
    assert num_selected(n, 0.2001) == k
    sel, tau = select_tokens_with_threshold(entropy, mask, rho=0.2001)  # the radix select, 16-bit digits
    assert int(sel.count_nonzero()) == k and tau.item() == 799 / 8
    assert tau == torch.kthvalue(entropy[:-1].reshape(-1), n - k + 1).values  # cross-check with torch
    ties = sel.view(-1)[799::1000]  # every position holding 799/8
    assert int(ties[:4_900].count_nonzero()) == 4_900 and not ties[4_900:].any()
    assert not sel[-1].any()


def test_fifty_million_entropies_quantile(fifty_million):
    # torch.quantile refuses > 2^24 elements. p = 0.8, pos = 0.8 * (49e6 - 1) = 39,199,999.2:
    # x_lo = 799/8, x_hi = 800/8, tau = lerp(99.875, 100, 0.2) = 99.9; kept: the 200 * 49,000 values >= 100.
    entropy, mask = fifty_million
    assert Fraction(4, 5) * (49_000_000 - 1) == Fraction(391_999_992, 10)
    sel, tau = select_tokens_with_threshold(entropy, mask, rho=0.2, count="quantile")
    assert tau.item() == pytest.approx(99.9, rel=1e-7)
    assert int(sel.count_nonzero()) == 9_800_000


def test_the_random_rule_keeps_the_count_rules_k():
    # with count=fork the fork's k (at least 1 token, even at rho = 0), with exact/quantile ceil(rho N)
    g = torch.Generator().manual_seed(0)
    one, mask = torch.tensor([[0.5]]), torch.tensor([[True]])
    assert select_tokens(one, mask, rho=0.0, rule="random", count="fork", generator=g).sum() == 1
    assert select_tokens(one, mask, rho=0.0, rule="random", count="exact", generator=g).sum() == 0
    ten, mask10 = torch.rand(1, 10, generator=g), torch.ones(1, 10, dtype=torch.bool)
    assert select_tokens(ten, mask10, rho=0.2, rule="random", count="fork", generator=g).sum() == 2
