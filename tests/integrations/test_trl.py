"""forkrl.integrations.trl: forkrl's exact selection inside TRL's GRPOTrainer (TRL 1.16).

The masks must equal forkrl's reference selection (`forkrl.core.selection.select_tokens`) on the same
entropies, in one process, across 2 gloo processes and inside a real `ForkGRPOTrainer` run on a tiny
model; against TRL's own `get_high_entropy_mask` (called through TRL on a stand-in trainer,
tests/reference/trl_harness.py) they differ only where ties or quantile interpolation make TRL keep
a different number of tokens than k = ceil(rho N).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from forkrl.core.selection import num_selected, select_tokens
from forkrl.integrations.trl import (
    ForkSelectionMixin,
    exact_high_entropy_mask,
    patch_trl,
    rho_from_threshold,
)

pytest.importorskip("trl")

from tests.reference.trl_harness import trl_trainer  # noqa: E402

RHO = 0.2
TIMEOUT_S = 120


def _trl_mask(entropy, mask, rho=RHO):
    """TRL's own `GRPOTrainer.get_high_entropy_mask`, called as `_compute_loss` calls it."""
    fake = trl_trainer(top_entropy_quantile=rho)
    return fake.get_high_entropy_mask(entropy, mask.long(), 1 - rho).bool()


def _fork_method(rho=RHO, count="exact"):
    """`ForkSelectionMixin.get_high_entropy_mask` bound to the same stand-in trainer."""
    fake = trl_trainer(top_entropy_quantile=rho)
    fake.fork_count, fake.fork_across_processes, fake._fork_pending = count, True, None
    return ForkSelectionMixin.get_high_entropy_mask.__get__(fake)


def _cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(entropy, mask) hand-made, with ties at the boundary, padding and interpolation."""
    ties = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.5], [1.0, 1.0, 0.5, 0.5, 0.5]])  # k = 2, six >= q = 1.0
    ties_mask = torch.ones_like(ties, dtype=torch.bool)
    padded = torch.tensor([[0.3, 0.9, 0.9, 7.0, 7.0], [0.9, 0.1, 0.2, 0.9, 7.0], [0.4, 0.9, 0.5, 0.6, 0.7]])
    pad_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    distinct = torch.arange(10, dtype=torch.float32).flip(0).reshape(2, 5) / 7  # N = 10: TRL keeps 2 = k
    few = torch.tensor([[0.1, 0.4, 0.2, 0.3]])  # N = 4, rho 0.3: TRL keeps floor(0.9) + 1 = 1, k = 2
    return {
        "ties": (ties, ties_mask),
        "padded_ties": (padded, pad_mask),
        "distinct": (distinct, torch.ones(2, 5, dtype=torch.bool)),
        "interpolation": (few, torch.ones(1, 4, dtype=torch.bool)),
        "all_masked": (torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.bool)),
    }


RHOS = {"interpolation": 0.3}


@pytest.mark.parametrize("name", sorted(_cases()))
def test_exactly_k_tokens_equal_forkrls_selection(name):
    entropy, mask = _cases()[name]
    rho = RHOS.get(name, RHO)
    got = exact_high_entropy_mask(entropy, mask.long(), rho)
    n = int(mask.sum())
    assert got.dtype == torch.bool and not (got & ~mask).any()
    assert int(got.sum()) == math.ceil(rho * n) == num_selected(n, rho)
    assert torch.equal(got, select_tokens(entropy, mask, rho=rho))  # forkrl's reference selection
    assert torch.equal(_fork_method(rho)(entropy, mask.long(), 1 - rho), got)  # the trainer's method
    # Kept tokens are the highest entropies; ties at the boundary go to the earlier row-major position.
    if got.any() and (mask & ~got).any():
        kept, dropped = entropy[got], entropy[mask & ~got]
        assert kept.min() >= dropped.max()
        tau = kept.min()
        tied = (mask & (entropy == tau)).view(-1).nonzero().squeeze(1)
        n_tied_kept = int((got & (entropy == tau)).sum())
        assert torch.equal(got.view(-1)[tied], torch.arange(len(tied)) < n_tied_kept)


@pytest.mark.parametrize("name", sorted(_cases()))
def test_differs_from_trls_mask_only_by_the_count(name):
    entropy, mask = _cases()[name]
    rho = RHOS.get(name, RHO)
    ours, theirs = exact_high_entropy_mask(entropy, mask, rho), _trl_mask(entropy, mask, rho)
    # Both keep top entropies: one mask contains the other, and they are equal iff the counts are.
    assert not (ours & ~theirs).any() or not (theirs & ~ours).any()
    assert torch.equal(ours, theirs) == (int(ours.sum()) == int(theirs.sum()))
    # forkrl's `quantile` count is TRL's rule exactly.
    assert torch.equal(exact_high_entropy_mask(entropy, mask, rho, count="quantile"), theirs)
    n, k = int(mask.sum()), num_selected(int(mask.sum()), rho)
    if name == "ties":  # q = 1.0: TRL keeps all six tokens >= 1.0; forkrl the 2.0 and the first 1.0
        assert (int(theirs.sum()), int(ours.sum())) == (6, 2)
        tau = entropy[ours].min()
        n_above = int((mask & (entropy > tau)).sum())
        assert int(theirs.sum()) - k == int((mask & (entropy == tau)).sum()) - (k - n_above)  # the ties
        assert ours.view(-1).nonzero().squeeze(1).tolist() == [0, 1]
    if name == "padded_ties":  # 12 valid, k = 3: the 0.9s tie (five), TRL keeps all of them
        assert (int(theirs.sum()), int(ours.sum())) == (5, 3)
    if name == "distinct":
        assert torch.equal(ours, theirs)
    if name == "interpolation":  # no ties: TRL's interpolated quantile keeps floor(rho (N - 1)) + 1
        assert int(theirs.sum()) == math.floor(rho * (n - 1)) + 1 == 1 and int(ours.sum()) == k == 2


def test_rho_is_one_minus_trls_threshold():
    # TRL: `self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)`.
    assert rho_from_threshold(1 - 0.2, 0.2) == 0.2
    assert rho_from_threshold(0.8) == pytest.approx(0.2)
    assert num_selected(10, rho_from_threshold(1 - 0.2)) == 2  # 0.19999999999999996 keeps 2, not 3
    assert rho_from_threshold(0.5, 0.2) == 0.5  # a threshold that does not match the trainer's wins
    with pytest.raises(ValueError, match="threshold"):
        rho_from_threshold(1.5)
    with pytest.raises(ValueError, match="count"):
        exact_high_entropy_mask(torch.rand(2, 3), torch.ones(2, 3), 0.2, count="topk")


def test_nan_raises_where_trl_keeps_nothing():
    entropy, mask = torch.tensor([[0.5, float("nan"), 1.0]]), torch.ones(1, 3, dtype=torch.bool)
    assert not _trl_mask(entropy, mask).any()
    with pytest.raises(ValueError, match="NaN"):
        exact_high_entropy_mask(entropy, mask, RHO)


def test_patch_trl_replaces_and_restores_trls_method():
    from trl import GRPOTrainer

    original = GRPOTrainer.get_high_entropy_mask
    entropy, mask = _cases()["ties"]
    with patch_trl() as handle:
        assert GRPOTrainer.get_high_entropy_mask is not original
        assert torch.equal(_trl_mask(entropy, mask), select_tokens(entropy, mask, rho=RHO))
    assert not handle.active and GRPOTrainer.get_high_entropy_mask is original
    assert int(_trl_mask(entropy, mask).sum()) == 6  # TRL's own again
    handle = patch_trl(count="fork")
    try:
        assert int(_trl_mask(entropy, mask, rho=0.01).sum()) == 1  # the fork's max(1, ...) count
    finally:
        handle.undo()
    assert GRPOTrainer.get_high_entropy_mask is original


def test_importing_the_module_does_not_import_trl():
    code = (
        "import sys, forkrl.integrations.trl as m; assert 'trl' not in sys.modules, 'trl imported'; "
        "m.ForkGRPOTrainer; assert 'trl' in sys.modules; import trl; "
        "assert issubclass(m.ForkGRPOTrainer, trl.GRPOTrainer); print('ok')"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _beyond_two_to_the_24():
    n = (1 << 24) + 1  # one past torch.quantile's limit: 64 MB of float32 entropies
    entropy = torch.rand(1, n, generator=torch.Generator().manual_seed(0))
    return entropy, torch.ones(1, n, dtype=torch.bool)


@pytest.mark.slow  # 2^24 + 1 tokens: ~300 MB peak, a few seconds
def test_beyond_two_to_the_24_forkrl_selects_exactly_k():
    entropy, mask = _beyond_two_to_the_24()
    got = exact_high_entropy_mask(entropy, mask, RHO)
    n = mask.numel()
    assert int(got.sum()) == num_selected(n, RHO) == math.ceil(RHO * n)
    assert entropy[got].min() >= entropy[~got].max()


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FORKRL_TEST_TRL_BEYOND_2_24") != "1",
    reason="TRL's own path needs ~800 MB more on 2^24 tokens (its boolean indexing and padding copies) "
    "before torch.quantile refuses; set FORKRL_TEST_TRL_BEYOND_2_24=1 to run it",
)
def test_beyond_two_to_the_24_trls_quantile_raises():
    entropy, mask = _beyond_two_to_the_24()
    with pytest.raises(RuntimeError, match="quantile\\(\\) input tensor is too large"):
        _trl_mask(entropy, mask)


# ---------------------------------------------------------------------------------------------------
# 2 processes (gloo): the mask over both equals the one-process mask on the concatenated entropies
# ---------------------------------------------------------------------------------------------------


def _rank_data(rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per rank, shapes differ between ranks (as TRL's micro-batches padded to their own length)."""
    g = torch.Generator().manual_seed(100 + rank)
    pool = torch.tensor([0.25, 0.5, 0.5, 1.0, 1.0, 2.0])
    shape = (3, 7) if rank == 0 else (2, 5)
    ties = pool[torch.randint(0, len(pool), shape, generator=g)]
    return {
        "ties": (ties, torch.rand(shape, generator=g) < 0.8),
        "boundary_ties": (torch.full(shape, 1.0), torch.ones(shape, dtype=torch.bool)),  # every token tied
        "one_rank_empty": (torch.rand(shape, generator=g), torch.full(shape, rank == 1)),
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        results = {}
        for name, (entropy, mask) in _rank_data(rank).items():
            results[name] = {
                "across": exact_high_entropy_mask(entropy, mask, RHO),
                "method": _fork_method()(entropy, mask.long(), 1 - RHO),
                "local": exact_high_entropy_mask(entropy, mask, RHO, across_processes=False),
                "quantile": exact_high_entropy_mask(entropy, mask, RHO, count="quantile"),
                "trl": _trl_mask(entropy, mask),  # TRL gathers every process's entropies
            }
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 2 spawned gloo processes
def test_two_processes_equal_one_process_on_the_concatenation(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(
        _worker, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):  # raises with the child's traceback if a process fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"gloo processes did not finish in {TIMEOUT_S} s")
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in _rank_data(0):
        data = [_rank_data(r)[name] for r in range(2)]
        entropy = torch.cat([e.reshape(-1) for e, _ in data])[None]  # (1, N0 + N1) in rank order
        mask = torch.cat([m.reshape(-1) for _, m in data])[None]
        flat = {
            key: torch.cat([per_rank[r][name][key].reshape(-1) for r in range(2)])[None]
            for key in per_rank[0][name]
        }
        want = exact_high_entropy_mask(entropy, mask, RHO)  # one process
        assert torch.equal(want, select_tokens(entropy, mask, rho=RHO))
        assert torch.equal(flat["across"], want), name
        assert torch.equal(flat["method"], want), name
        assert int(flat["across"].sum()) == num_selected(int(mask.sum()), RHO)
        assert torch.equal(flat["quantile"], flat["trl"]), name  # TRL's rule, no gather
        for r in range(2):
            e, m = data[r]
            assert torch.equal(per_rank[r][name]["local"], select_tokens(e, m, rho=RHO))
        if name == "boundary_ties":  # all tied: the first k in (rank, position) order, all on rank 0
            k = num_selected(int(mask.sum()), RHO)
            assert flat["across"].view(-1).nonzero().squeeze(1).tolist() == list(range(k))
            assert bool(flat["trl"].all())


# ---------------------------------------------------------------------------------------------------
# End to end: a real ForkGRPOTrainer on a tiny model
# ---------------------------------------------------------------------------------------------------


def _run_trainer(tiny_model_dir, tmp_path, **fork_kwargs):
    """Two optimizer steps of 2 accumulated micro-batches of 4 completions (under a second on CPU)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig

    from forkrl.integrations.trl import ForkGRPOTrainer

    class Recording(ForkGRPOTrainer):
        def get_high_entropy_mask(self, entropies, mask, threshold):
            out = super().get_high_entropy_mask(entropies, mask, threshold)
            self.recorded.append((entropies.detach().clone(), mask.clone(), threshold, out.clone()))
            return out

        def _fork_select_generation_batch(self, output):
            sel = super()._fork_select_generation_batch(output)
            self.generations.append(self.fork_last_generation_selection)
            return sel

    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_generations=2,
        max_completion_length=8,
        top_entropy_quantile=RHO,
        temperature=1.0,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    dataset = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(4) for b in range(2)]})
    trainer = Recording(
        model=str(tiny_model_dir),
        reward_funcs=lambda completions, **kwargs: [float(len(c) % 3) for c in completions],
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        **fork_kwargs,
    )
    trainer.recorded, trainer.generations = [], []
    trainer.train()
    return trainer


def test_fork_grpo_trainer_micro_batch_masks_equal_forkrls_selection(tiny_model_dir, tmp_path):
    trainer = _run_trainer(tiny_model_dir, tmp_path)
    assert trainer.state.global_step == 2
    assert len(trainer.recorded) == 2 * 2  # every micro-batch of both optimizer steps
    for entropies, mask, threshold, got in trainer.recorded:
        assert threshold == pytest.approx(1 - RHO)
        assert torch.equal(got, select_tokens(entropies, mask.bool(), rho=RHO))
        assert int(got.sum()) == math.ceil(RHO * int(mask.sum()))
    assert not trainer.generations


def test_fork_grpo_trainer_generation_batch_scope_selects_across_accumulation(tiny_model_dir, tmp_path):
    trainer = _run_trainer(tiny_model_dir, tmp_path, fork_scope="generation_batch")
    assert trainer.state.global_step == 2
    assert len(trainer.generations) == 2 and len(trainer.recorded) == 4  # one selection per optimizer step
    for step, (entropies, mask, sel) in enumerate(trainer.generations):
        assert entropies.shape[0] == 4 * 2  # per_device_train_batch_size x steps_per_generation rows
        assert torch.equal(sel, select_tokens(entropies, mask.bool(), rho=RHO))
        k = math.ceil(RHO * int(mask.sum()))
        assert int(sel.sum()) == k
        micro = trainer.recorded[2 * step : 2 * step + 2]  # that generation batch's two micro-batches
        assert sum(int(got.sum()) for *_, got in micro) == k  # exactly k over the accumulation steps
        rows = sorted(int(r) for *_, got in micro for r in got.sum(1))
        assert rows == sorted(int(r) for r in sel.sum(1))  # the same rows' selections, shuffled by TRL
        for _, m, _, got in micro:
            assert not (got & ~m.bool()).any()


def test_fork_grpo_trainer_refuses_unknown_options():
    from forkrl.integrations.trl import ForkGRPOTrainer

    with pytest.raises(ValueError, match="fork_scope"):
        ForkGRPOTrainer(model=None, fork_scope="batch")
    with pytest.raises(ValueError, match="fork_count"):
        ForkGRPOTrainer(model=None, fork_count="topk")
