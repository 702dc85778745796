"""forkrl's `trl` conventions against TRL's own functions on identical tensors, 1 process and 2 gloo ranks.

TRL 1.16's `GRPOTrainer.get_high_entropy_mask` and `GRPOTrainer._compute_loss` run on a stand-in
trainer (tests/reference/trl_harness.py); forkrl's `select_tokens(count="quantile")` and
`policy_loss` (no dual clip, no log-ratio clamp, `k3_unclamped`) must give the same mask, loss and
gradient. Under 2 ranks TRL gathers every process's entropies; forkrl's `group=` radix select must
find the same threshold without the gather.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from forkrl.core.losses import KLPenalty, TokenCounts, policy_loss
from forkrl.core.selection import select_tokens

pytest.importorskip("trl")

from tests.reference.trl_harness import trl_loss, trl_trainer  # noqa: E402

RHO = 0.2


def _cases(rank: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(entropy, mask) per case; `rank` varies the data per process (same cases on every rank)."""
    g = torch.Generator().manual_seed(10 + rank)
    pool = torch.tensor([0.0, 0.25, 0.25, 1.0, 2.0])
    ties = pool[torch.randint(0, 5, (3, 6), generator=g)]
    padded = torch.rand(3, 6, generator=g)
    pad_mask = torch.ones(3, 6, dtype=torch.bool)
    pad_mask[0, 4:], pad_mask[2, 1:] = False, False
    padded[~pad_mask] = 50.0  # garbage at padding must not count
    seven = torch.rand(1, 7, generator=g)  # 7 tokens at rho 0.2: q = x_4 + 0.8 (x_5 - x_4)
    return {
        "ties": (ties, torch.rand(3, 6, generator=g) < 0.8),
        "padding": (padded, pad_mask),
        "all_masked": (torch.rand(2, 5, generator=g), torch.zeros(2, 5, dtype=torch.bool)),
        "seven": (seven, torch.ones(1, 7, dtype=torch.bool)),
    }


def _losses(entropy, mask, *, beta: float, loss_type: str, n_items: torch.Tensor, max_len: int):
    """(TRL loss, its grad wrt logp, forkrl loss, its grad) on one micro-batch of identical tensors."""
    B, L = mask.shape
    g = torch.Generator().manual_seed(B * 100 + L)
    logp0 = -2 * torch.rand(B, L, generator=g)
    old = logp0 + 0.4 * torch.randn(B, L, generator=g)
    ref = logp0 + 0.6 * torch.randn(B, L, generator=g)
    adv = torch.randn(B, generator=g)
    fake = trl_trainer(
        top_entropy_quantile=RHO, beta=beta, loss_type=loss_type, max_completion_length=max_len
    )
    logp_t = logp0.clone().requires_grad_()
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, L, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": n_items,
    }
    theirs = trl_loss(fake, logp_t, entropy, inputs)
    (g_theirs,) = torch.autograd.grad(theirs, logp_t)
    logp_f = logp0.clone().requires_grad_()
    sel = select_tokens(
        entropy, mask, rho=RHO, count="quantile", group=dist.group.WORLD if dist.is_initialized() else None
    )
    world = dist.get_world_size() if dist.is_initialized() else 1
    local = TokenCounts.from_masks(mask, sel)
    rows = local.rows * world  # dr_grpo: every process's rows (equal micro-batches, as TRL's)
    counts = TokenCounts(n_items, local.selected, local.sequences, rows)  # dapo: every process's tokens
    ours, _ = policy_loss(
        logp_f,
        old,
        adv,
        mask,
        sel,
        eps_low=0.2,
        eps_high=0.28,
        dual_clip=None,
        normalizer="all_tokens" if loss_type == "dapo" else "dr_grpo",
        max_len=max_len,
        kl=KLPenalty(ref, beta, "k3_unclamped") if beta else None,
        token_counts=counts,
        log_ratio_clamp=None,
    )
    ours = ours * world  # a share of the global loss; DDP averages over ranks as TRL's loss is averaged
    (g_ours,) = torch.autograd.grad(ours, logp_f)
    return theirs.detach(), g_theirs, ours.detach(), g_ours


def _check_case(entropy, mask):
    """forkrl's quantile mask equals TRL's; loss and gradient equal for dapo (+KL) and dr_grpo."""
    fake = trl_trainer(top_entropy_quantile=RHO)
    group = dist.group.WORLD if dist.is_initialized() else None
    want = fake.get_high_entropy_mask(entropy, mask.long(), 1 - RHO)
    got = select_tokens(entropy, mask, rho=RHO, count="quantile", group=group)
    assert torch.equal(got, want.bool())
    n_items = fake.accelerator.reduce(mask.sum().float())
    for beta, loss_type in ((0.0, "dapo"), (0.3, "dapo"), (0.0, "dr_grpo")):
        theirs, g_theirs, ours, g_ours = _losses(
            entropy, mask, beta=beta, loss_type=loss_type, n_items=n_items, max_len=mask.shape[1] + 2
        )
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=1e-6)
    return got


@pytest.mark.parametrize("name", sorted(_cases()))
def test_one_process_matches_trl(name):
    entropy, mask = _cases()[name]
    sel = _check_case(entropy, mask)
    if name == "seven":  # q = x_4 + 0.8 (x_5 - x_4) of the sorted 7: keeps the top 2 (> x_5 > q)
        assert int(sel.sum()) == 2
    if name == "all_masked":
        assert not sel.any()
    if name == "ties":  # TRL keeps every token tied at the threshold (H >= q)
        tau = torch.quantile(entropy[mask], 1 - RHO)
        assert int(sel.sum()) == int((entropy[mask] >= tau).sum())


def test_dr_grpo_counts_a_fully_masked_row_as_trl():
    entropy, mask = _cases()["padding"]  # row 2 keeps one token; mask it fully
    mask = mask.clone()
    mask[2] = False
    _check_case(entropy, mask)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        for name, (entropy, mask) in _cases(rank).items():
            if name == "all_masked" and rank == 1:  # one rank with nothing, the other with tokens
                mask = torch.ones_like(mask)
            _check_case(entropy, mask)
        Path(out, f"ok{rank}").write_text("ok")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 2 spawned gloo ranks
def test_two_ranks_match_trls_gathered_quantile(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
