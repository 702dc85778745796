"""Selection across ranks (gloo, CPU): each rank's result equals one process on the concatenated tokens.

One spawned group of 3 ranks runs every case, over the whole world and over a 2-rank subgroup (global
ranks 1 and 2, so group rank != global rank), so process start-up is paid once. Ranks write their
results to a temporary folder; the parent compares them with the single-process selection on every
rank's flattened (B, L) tokens concatenated in rank order, and with the slow reference.
"""

import itertools
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from forkrl.core.selection import COUNTS, num_selected, radix_kth_largest, select_tokens_with_threshold
from tests.reference.selection_ref import ref_select

pytestmark = pytest.mark.slow  # a spawned group of 3 gloo ranks
RHOS = (0.0, 0.2, 1.0, 0.5, 0.37)
RADIX_KS = (1, 2, 5, 11)
TIMEOUT_S = 240
WORLD = 3
SUBGROUP = [1, 2]  # group ranks 0, 1


def _datasets(world: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per-rank (entropy, loss_mask) with unequal shapes and counts; rebuilt identically by the parent."""
    g = torch.Generator().manual_seed(world)
    shapes = [(3, 5), (2, 7), (4, 3)][:world]
    pool = torch.tensor([0.0, 0.5, 1.0, 2.0])

    def tied(shape):  # ties within and across ranks
        return pool[torch.randint(0, len(pool), shape, generator=g)]

    def valid(shape, p=0.7):
        return torch.rand(shape, generator=g) < p

    sets = {
        "ties": [(tied(s), valid(s)) for s in shapes],
        "continuous": [(torch.randn(s, generator=g) * 2, valid(s)) for s in shapes],
        # rank 1 holds no valid token; rank 0 holds ties only
        "rank_without_tokens": [
            (tied(s), torch.zeros(s, dtype=torch.bool) if r == 1 else valid(s)) for r, s in enumerate(shapes)
        ],
        # the last rank's batch is empty (B = 0)
        "empty_batch": [(tied(s), valid(s)) for s in shapes[:-1]]
        + [(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool))],
        "nothing_valid": [(tied(s), torch.zeros(s, dtype=torch.bool)) for s in shapes],
        # N >= 65,536: the 16-bit radix digits; values on a grid of 64, so ties everywhere
        "large": [
            (torch.randint(0, 64, s, generator=g).float() / 8, valid(s, 0.9))
            for s in [(40, 1100), (36, 1000), (20, 1000)][:world]
        ],
    }
    return sets


def _run_cases(rank: int, world: int, group) -> dict:
    results = {}
    for name, per_rank in _datasets(world).items():
        entropy, mask = per_rank[rank]
        for rule in ("top", "bottom"):
            for count in COUNTS:
                for rho in RHOS:
                    results[name, rule, count, rho] = select_tokens_with_threshold(
                        entropy, mask, rho=rho, rule=rule, count=count, group=group
                    )
        for rho in RHOS:
            gen = torch.Generator().manual_seed(100 + rank)  # each rank draws its own keys
            results[name, "random", "exact", rho] = select_tokens_with_threshold(
                entropy, mask, rho=rho, rule="random", generator=gen, group=group
            )
        # rows are local: per_sequence ignores the group (and makes no collective call)
        results[name, "per_sequence"] = select_tokens_with_threshold(
            entropy, mask, rho=0.5, per_sequence=True, group=group
        )
        n_valid = int(sum(m.sum() for _, m in per_rank))
        for k in RADIX_KS:
            for bits in (8, 16):
                if k <= n_valid:
                    results[name, "radix", k, bits] = radix_kth_largest(
                        entropy, k, valid=mask, group=group, bits_per_pass=bits
                    )
    # A NaN on the last rank must raise on every rank (all ranks stop at the same collective).
    entropy, mask = _datasets(world)["ties"][rank]
    if rank == world - 1:
        entropy = entropy.clone()
        entropy[mask] = float("nan")
    try:
        select_tokens_with_threshold(entropy, mask, rho=0.2, group=group)
        results["nan"] = "no error"
    except ValueError as err:
        results["nan"] = str(err)
    # Collectives still line up after the error.
    results["after_nan"] = select_tokens_with_threshold(*_datasets(world)["ties"][rank], rho=0.2, group=group)
    return results


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        results = {world: _run_cases(rank, world, dist.group.WORLD)}
        sub = dist.new_group(SUBGROUP)  # every rank takes part in creating it
        if rank in SUBGROUP:
            results[len(SUBGROUP)] = _run_cases(dist.get_rank(sub), len(SUBGROUP), sub)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, out_dir: Path) -> None:
    ctx = mp.start_processes(
        _worker, args=(world, _free_port(), str(out_dir)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):  # raises with the child's traceback if a rank fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"gloo ranks did not finish in {TIMEOUT_S} s (a collective mismatch hangs)")


def _concat(per_rank):
    """Every rank's flattened (B, L) in rank order, as one (1, total) batch."""
    entropy = torch.cat([e.reshape(-1) for e, _ in per_rank])[None]
    mask = torch.cat([m.reshape(-1) for _, m in per_rank])[None]
    return entropy, mask


def _split(flat, per_rank):
    sizes = [m.numel() for _, m in per_rank]
    return [
        part.reshape(m.shape) for part, (_, m) in zip(flat.reshape(-1).split(sizes), per_rank, strict=True)
    ]


@pytest.fixture(autouse=True)
def _one_thread():
    # The parent's many small single-process selections stall in a 2-thread pool on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """{group size: [results of group rank 0, 1, ...]} from one spawned group of WORLD ranks."""
    out_dir = tmp_path_factory.mktemp("ranks")
    _spawn(WORLD, out_dir)
    saved = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {WORLD: [s[WORLD] for s in saved], len(SUBGROUP): [saved[r][len(SUBGROUP)] for r in SUBGROUP]}


def _expected(per_rank, rule, count, rho):
    """(sel_mask, tau) of one process on the concatenation of every rank's tokens."""
    entropy, mask = _concat(per_rank)
    if rule == "random":  # the k largest of every rank's own keys, concatenated; no threshold
        keys = _concat(
            [
                (torch.rand(m.shape, generator=torch.Generator().manual_seed(100 + r)), m)
                for r, (_, m) in enumerate(per_rank)
            ]
        )[0]
        return select_tokens_with_threshold(keys, mask, rho=rho)[0], torch.tensor(float("nan"))
    want_sel, want_tau = select_tokens_with_threshold(entropy, mask, rho=rho, rule=rule, count=count)
    if mask.sum() < 1000:  # and the slow reference agrees
        assert want_sel.tolist() == ref_select(entropy.tolist(), mask.tolist(), rho, rule, count)[0]
    return want_sel, want_tau


def _same_tau(a, b):
    return torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0))


@pytest.mark.parametrize("world", [WORLD, len(SUBGROUP)])
def test_selection_across_ranks_equals_one_process(world, rank_results):
    ranks = rank_results[world]  # ranks[r] = results of group rank r
    for name, per_rank in _datasets(world).items():
        n_valid = sum(int(m.sum()) for _, m in per_rank)
        cases = [(rule, count) for rule in ("top", "bottom") for count in COUNTS] + [("random", "exact")]
        for (rule, count), rho in itertools.product(cases, RHOS):
            case = (name, rule, count, rho)
            want_sel, want_tau = _expected(per_rank, rule, count, rho)
            for r, want in enumerate(_split(want_sel, per_rank)):
                sel, tau = ranks[r][case]
                assert torch.equal(sel, want), (case, r)
                assert _same_tau(tau, want_tau), (case, r, tau, want_tau)
            if count == "exact":
                assert sum(int(ranks[r][case][0].sum()) for r in range(world)) == num_selected(n_valid, rho)
        for r, (e, m) in enumerate(per_rank):  # rows are local
            sel, tau = ranks[r][name, "per_sequence"]
            want_sel, want_tau = select_tokens_with_threshold(e, m, rho=0.5, per_sequence=True)
            assert torch.equal(sel, want_sel) and _same_tau(tau, want_tau), (name, r)
        entropy, mask = _concat(per_rank)
        descending = entropy[mask].sort(descending=True).values
        for k, bits in itertools.product(RADIX_KS, (8, 16)):
            if k <= n_valid:
                got = [ranks[r][name, "radix", k, bits] for r in range(world)]
                assert all(g == descending[k - 1] for g in got), (name, k, bits)


@pytest.mark.parametrize("world", [WORLD, len(SUBGROUP)])
def test_nan_on_one_rank_raises_on_every_rank(world, rank_results):
    ranks = rank_results[world]
    for r in range(world):
        assert "NaN values at loss_mask=True positions (summed over the process group)" in ranks[r]["nan"]
    # and the ranks' collectives still line up afterwards
    per_rank = _datasets(world)["ties"]
    want_sel, _ = select_tokens_with_threshold(*_concat(per_rank), rho=0.2)
    for r, want in enumerate(_split(want_sel, per_rank)):
        assert torch.equal(ranks[r]["after_nan"][0], want)
