"""Clip-Cov and KL-Cov (forkrl.core.cov_losses) against verl's code (tests/reference/verl_ref.py), and
the batch-global scope on 2 gloo ranks against one process on the concatenated batch.

verl runs on the official fork's folded mask (`response_mask = sel_mask`, token-mean), which is
forkrl's `normalizer="selected_tokens"`; no log-ratio clamp and no dual clip (verl has neither here).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from forkrl.core.cov_losses import token_covariance
from forkrl.core.losses import LossMode, TokenCounts, policy_loss
from forkrl.core.selection import select_tokens
from tests.reference import verl_ref

PLAIN = dict(normalizer="selected_tokens", dual_clip=None, log_ratio_clamp=None)


def _batch(B=8, L=10, seed=0):
    """(logp0, old, adv (B, L), entropy, mask): per-sequence advantages, ragged rows."""
    g = torch.Generator().manual_seed(seed)
    logp0 = -3 * torch.rand(B, L, generator=g)
    old = logp0 + 0.3 * torch.randn(B, L, generator=g)
    adv = (2 * torch.randn(B, 1, generator=g)).expand(B, L).clone()
    entropy = torch.rand(B, L, generator=g)
    mask = torch.arange(L)[None] < torch.randint(3, L + 1, (B, 1), generator=g)
    return logp0, old, adv, entropy, mask


def _grad(fn, logp0):
    logp = logp0.clone().requires_grad_()
    out = fn(logp)
    loss = out[0] if isinstance(out, tuple) else out
    (g,) = torch.autograd.grad(loss, logp)
    return loss.detach(), g, out[1] if isinstance(out, tuple) else None


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _ours(logp0, old, adv, mask, sel, mode, **kw):
    return _grad(lambda lp: policy_loss(lp, old, adv, mask, sel, mode=mode, **{**PLAIN, **kw}), logp0)


# ----------------------------------------------------------------------------- one process vs verl


@pytest.mark.parametrize("rho", [1.0, 0.5])
def test_clip_cov_rank_scope_matches_verl_with_its_random_pick(rho):
    logp0, old, adv, entropy, mask = _batch()
    sel = select_tokens(entropy, mask, rho=rho) if rho < 1 else mask
    opts = dict(cov_ratio=0.05, clip_cov_lb=0.2, clip_cov_ub=5.0)
    torch.manual_seed(123)
    theirs = _grad(
        lambda lp: verl_ref.clip_cov(
            old, lp, adv, sel.float(), clip_cov_ratio=0.05, clip_cov_lb=0.2, clip_cov_ub=5.0
        ),
        logp0,
    )
    torch.manual_seed(123)
    ours = _ours(logp0, old, adv, mask, sel, LossMode("clip_cov", cov_across_ranks=False, **opts))
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    m = ours[2]
    _close(m["cov_touched_frac"], theirs[2]["pg_clipfrac"])
    # the random pick is a real draw: fewer tokens detached than the band holds
    n_sel = int(sel.sum())
    assert 0 < m["cov_touched_frac"] * n_sel == max(int(0.05 * n_sel), 1) < m["cov_band_frac"] * n_sel
    assert m["cov_band_lb"] == 0.2 and m["cov_band_ub"] == 5.0


def test_clip_cov_batch_scope_touches_min_k_band_tokens_and_equals_verl_when_all_are_touched():
    logp0, old, adv, entropy, mask = _batch(seed=1)
    sel = select_tokens(entropy, mask, rho=0.5)
    # clip_num >= |band|: every band token is detached, no randomness left
    mode = LossMode("clip_cov", cov_ratio=1.0, clip_cov_lb=0.1, clip_cov_ub=5.0)
    theirs = _grad(
        lambda lp: verl_ref.clip_cov(
            old, lp, adv, sel.float(), clip_cov_ratio=1.0, clip_cov_lb=0.1, clip_cov_ub=5.0
        ),
        logp0,
    )
    ours = _ours(logp0, old, adv, mask, sel, mode)
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    assert ours[2]["cov_touched_frac"] == ours[2]["cov_band_frac"] > 0
    # a small share: exactly max(1, floor(ratio N)) band tokens, each with no gradient
    g = torch.Generator().manual_seed(0)
    small = LossMode("clip_cov", cov_ratio=0.05, clip_cov_lb=0.1, clip_cov_ub=5.0, generator=g)
    loss, grad, m = _ours(logp0, old, adv, mask, sel, small)
    n_sel = int(sel.sum())
    assert round(float(m["cov_touched_frac"]) * n_sel) == max(int(0.05 * n_sel), 1)
    full = _ours(logp0, old, adv, mask, sel, "clip")[1]
    assert int(((grad == 0) & (full != 0)).sum()) == max(int(0.05 * n_sel), 1)


@pytest.mark.parametrize("scope", ["batch", "rank"])
@pytest.mark.parametrize("rho", [1.0, 0.5])
def test_kl_cov_matches_verl(scope, rho):
    logp0, old, adv, entropy, mask = _batch(seed=2)
    sel = select_tokens(entropy, mask, rho=rho) if rho < 1 else mask
    theirs = _grad(
        lambda lp: verl_ref.kl_cov(old, lp, adv, sel.float(), kl_cov_ratio=0.1, ppo_kl_coef=2.0), logp0
    )
    mode = LossMode("kl_cov", cov_ratio=0.1, kl_cov_coef=2.0, cov_across_ranks=scope == "batch")
    ours = _ours(logp0, old, adv, mask, sel, mode)
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    m = ours[2]
    n_sel = int(sel.sum())
    assert round(float(m["cov_touched_frac"]) * n_sel) == int(theirs[2]["touched"].sum()) == int(0.1 * n_sel)
    _close(m["abs_log_ratio"], theirs[2]["ppo_kl"])
    cov, _ = token_covariance(torch.where(sel, adv, 0.0), logp0, sel, None)
    assert m["cov_kth"] == cov[theirs[2]["touched"]].min()


def test_covariance_is_over_the_selected_tokens():
    adv = torch.tensor([[1.0, -1.0, 3.0]])
    logp = torch.tensor([[-1.0, -3.0, -100.0]])
    sel = torch.tensor([[True, True, False]])
    cov, n = token_covariance(torch.where(sel, adv, 0.0), logp, sel, None)
    # means over the two selected tokens: A = 0, logp = -2: (1)(1), (-1)(-1)
    assert n == 2 and cov.tolist() == [[1.0, 1.0, 0.0]]


# ----------------------------------------------------------------------------- 2 gloo ranks


def _global_case():
    logp0, old, adv, entropy, mask = _batch(B=10, L=9, seed=3)
    keys = torch.rand(mask.shape, generator=torch.Generator().manual_seed(9))
    sel = select_tokens(entropy, mask, rho=0.6)
    return logp0, old, adv, mask, sel, keys


def _verl_on(name, old, logp, a, s):
    """verl's clip_cov / kl_cov on one rank's rows, with the options of `_check_rank`."""
    if name == "clip_cov":
        return verl_ref.clip_cov(
            old, logp, a, s.float(), clip_cov_ratio=0.1, clip_cov_lb=0.1, clip_cov_ub=5.0
        )
    return verl_ref.kl_cov(old, logp, a, s.float(), kl_cov_ratio=0.1)


def _check_rank(rank: int, world: int) -> None:
    logp0, old, adv, mask, sel, keys = _global_case()
    rows = slice(rank * 5, rank * 5 + 5)  # rank r holds rows [5r, 5r + 5)
    counts = TokenCounts.from_masks(mask, sel)  # every rank's tokens: the losses add up over ranks
    modes = {
        "clip_cov": dict(cov_ratio=0.1, clip_cov_lb=0.1, clip_cov_ub=5.0),
        "kl_cov": dict(cov_ratio=0.1, kl_cov_coef=1.0),
    }
    for name, opts in modes.items():
        whole = _ours(
            logp0, old, adv, mask, sel, LossMode(name, keys=keys, **opts), token_counts=counts
        )  # one process, the concatenated batch
        mode = LossMode(name, keys=keys[rows], group=dist.group.WORLD, **opts)
        part = _ours(logp0[rows], old[rows], adv[rows], mask[rows], sel[rows], mode, token_counts=counts)
        total = part[0].clone()
        dist.all_reduce(total)
        _close(total, whole[0])
        _close(part[1], whole[1][rows])
        touched = part[2]["cov_touched_frac"] * sel[rows].sum()
        dist.all_reduce(touched)
        _close(touched, whole[2]["cov_touched_frac"] * sel.sum())
        if name == "kl_cov":
            _close(part[2]["cov_kth"], whole[2]["cov_kth"])
        else:  # a real random pick: fewer than the band
            assert 0 < whole[2]["cov_touched_frac"] < whole[2]["cov_band_frac"]
        # the per-rank option is verl's computation on this rank's rows alone
        lp, o, a, s = logp0[rows], old[rows], adv[rows], sel[rows]
        verl_fn = partial(_verl_on, name, o, a=a, s=s)
        torch.manual_seed(7 + rank)
        theirs = _grad(verl_fn, lp)
        torch.manual_seed(7 + rank)
        rank_mode = LossMode(name, cov_across_ranks=False, group=dist.group.WORLD, **opts)
        ours = _ours(lp, o, a, mask[rows], s, rank_mode)
        _close(ours[0], theirs[0])
        _close(ours[1], theirs[1])
        assert not torch.equal(ours[1], part[1])  # per rank is not the batch-global result


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        _check_rank(rank, world)
        Path(out, f"ok{rank}").write_text("ok")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 2 spawned gloo ranks
def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    """batch scope: means, N, top-k and random pick over both ranks; rank scope: verl on each rank."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
