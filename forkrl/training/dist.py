"""Data parallelism on torch.distributed: process group, group sharding, reductions, FSDP2, full state.

Started by `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment), every rank runs the same
trainer. What differs from one process:

- each RL step's prompts are split into contiguous blocks of whole groups, one block per rank, and
  every rank sees every group's keep decision (DAPO dynamic sampling), so all ranks keep the groups
  one process would keep and step together;
- with `selection.across_ranks` the batch (or the same micro-batch of every rank) is selected over
  the union of all ranks' tokens (exact radix select, `forkrl/core/selection.py`); with
  `loss.aggregate=batch` the normalizer's token counts are global sums and each rank's loss is its
  share of the global loss times the world size, with `micro_batch` each rank's micro-batch is
  normalised alone (forkrl/training/optimize.py);
- gradients are averaged: by FSDP2's reduce-scatter for sharded decoder layers
  (`train.parallel=fsdp`), by one bucketed all-reduce for everything else (`ddp`, DDP's reduction
  done once after gradient accumulation, so ranks may run different numbers of micro-batches);
- metrics are reduced to rank 0, which alone writes logs and checkpoints (full, unsharded state,
  so a run resumes on any number of ranks).

Backend: `nccl` when the ranks run on CUDA, `gloo` otherwise.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives run (CUDA for nccl)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        """The process group for collectives; None in a single process (no collective at all)."""
        return dist.group.WORLD if self.enabled else None


SINGLE = DistEnv()


def launched() -> bool:
    """True when started by torchrun (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> DistEnv:
    """Join the process group torchrun describes; the backend follows the device (nccl on CUDA)."""
    if not launched():
        return SINGLE
    env = DistEnv(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return env


def rank_device(device: torch.device, env: DistEnv) -> torch.device:
    """One GPU per rank (LOCAL_RANK); CPU ranks share the CPU. Also where `env`'s collectives run."""
    if device.type == "cuda" and env.enabled:
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    if env.enabled:
        env.device = device
    return device


def shard(n: int, env: DistEnv) -> range:
    """Rank `env.rank`'s contiguous block of `n` items (block sizes differ by at most one).

    >>> [list(shard(5, DistEnv(r, 2))) for r in range(2)]
    [[0, 1, 2], [3, 4]]
    """
    base, extra = divmod(n, env.world)
    start = env.rank * base + min(env.rank, extra)
    return range(start, start + base + (env.rank < extra))


def _all_reduce(t: Tensor, env: DistEnv, op) -> Tensor:
    if not env.enabled:
        return t.clone()
    out = t.to(env.device, copy=True)
    dist.all_reduce(out, op=op)
    return out.to(t.device)


def all_sum(t: Tensor, env: DistEnv) -> Tensor:
    """Sum of `t` over ranks (a new tensor on `t`'s device; `t` itself unchanged)."""
    return _all_reduce(t, env, dist.ReduceOp.SUM)


def all_max_tensor(t: Tensor, env: DistEnv) -> Tensor:
    """Elementwise maximum of `t` over ranks (a new tensor on `t`'s device)."""
    return _all_reduce(t, env, dist.ReduceOp.MAX)


def all_max(x: int, env: DistEnv) -> int:
    if not env.enabled:
        return x
    t = torch.tensor([x], dtype=torch.long, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_objects(obj, env: DistEnv) -> list:
    if not env.enabled:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, env: DistEnv, src: int = 0):
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def average_replicated_grads(params: list[Tensor], env: DistEnv) -> None:
    """All-reduce and average the gradients of the parameters FSDP does not shard (one bucket per dtype).

    A parameter a rank did not use gets a zero gradient first, so every rank reduces the same tensors.
    """
    if not env.enabled:
        return
    plain = [p for p in params if not _is_dtensor(p)]
    for p in plain:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in plain:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= env.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_grad_norm(params: list[Tensor], max_norm: float, env: DistEnv) -> Tensor:
    """Global L2 norm of the gradients (sharded and replicated alike) and clipping to `max_norm`.

    Sharded (DTensor) gradients contribute their local shards' squares, summed over ranks; replicated
    gradients (identical on every rank after `average_replicated_grads`) count once.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not env.enabled:
        return torch.nn.utils.clip_grad_norm_(
            [p for p in params if p.grad is not None], max_norm if max_norm > 0 else float("inf")
        )
    dev = grads[0].device if grads else torch.device("cpu")
    sharded = torch.zeros((), dtype=torch.float64, device=dev)
    plain = torch.zeros((), dtype=torch.float64, device=dev)
    for g in grads:
        if _is_dtensor(g):
            sharded += g.to_local().double().pow(2).sum()
        else:
            plain += g.double().pow(2).sum()
    dist.all_reduce(sharded, op=dist.ReduceOp.SUM)
    total = (sharded + plain).sqrt().float()
    if max_norm > 0 and torch.isfinite(total):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            (g.to_local() if _is_dtensor(g) else g).mul_(coef)
    return total


def apply_fsdp(model) -> list:
    """FSDP2 (`fully_shard`) on every decoder layer; embeddings, final norm and head stay replicated.

    forkrl's training forward calls the backbone's layers and the LM head weight directly (scoring
    pass, selective head), so the layers are the sharded units; the replicated rest is averaged by
    `average_replicated_grads`. Returns the FSDP modules.
    """
    from torch.distributed.fsdp import fully_shard

    layers = _decoder_layers(model)
    for layer in layers:
        fully_shard(layer)
    return list(layers)


def _decoder_layers(model):
    inner = getattr(model, "model", None) or getattr(model, "transformer", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if layers is None:
        layers = getattr(inner, "h", None) if inner is not None else None
    if layers is None:
        raise ValueError(
            f"train.parallel=fsdp: cannot find the decoder layers of {type(model).__name__} "
            "(expected model.model.layers); use train.parallel=ddp"
        )
    return layers


class Unsharded:
    """Context: FSDP2 layers gathered and kept whole, so ranks can run different numbers of forwards.

    Generation and the no-grad scoring pass run a data-dependent number of forwards per rank; with
    sharded layers each forward would be a collective. Inside this context they are plain forwards.
    """

    def __init__(self, fsdp_modules: list):
        self.mods = fsdp_modules

    def __enter__(self):
        for m in self.mods:
            m.set_reshard_after_forward(False)
            m.unshard()
        return self

    def __exit__(self, *exc):
        for m in self.mods:
            m.reshard()
            m.set_reshard_after_forward(True)


@dataclass
class Parallel:
    """How this process takes part in data parallelism: its rank and the FSDP2-sharded modules."""

    env: DistEnv = field(default_factory=lambda: SINGLE)
    fsdp: list = field(default_factory=list)

    def gathered(self):
        """Context for forwards whose count differs by rank (generation, no-grad scoring)."""
        return Unsharded(self.fsdp) if self.fsdp else nullcontext()

    @contextmanager
    def accumulating(self, idle_backward):
        """Context for one optimizer step's micro-batches.

        Ranks run different numbers of micro-batches, and forkrl's forward may call a layer more than
        once (prompt once per group, then the responses), so FSDP2's per-forward collectives would not
        line up. Inside, layers stay gathered and gradients accumulate unsharded without sync; on exit
        every rank runs exactly one `idle_backward()` (zero loss) with sync on, which reduce-scatters
        the accumulated gradients. Parameters are sharded at rest, gradients and optimizer states
        always (ZeRO-2-like during the micro-batches).
        """
        if not self.fsdp:
            yield
            return
        with self.gathered():
            for m in self.fsdp:
                m.set_requires_gradient_sync(False)
                m.set_reshard_after_backward(False)
            try:
                yield
            finally:
                for m in self.fsdp:
                    m.set_requires_gradient_sync(True)
                    m.set_reshard_after_backward(True)
            idle_backward()


LOCAL = Parallel()  # one process


def full_model_state(model) -> dict[str, Tensor]:
    """The unsharded model state on every rank (sharded tensors gathered): what rank 0 saves."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.full_tensor() if _is_dtensor(v) else v
    return out


def full_optimizer_state(optimizer) -> dict:
    """The optimizer's state dict with sharded tensors gathered (same layout as one process's)."""
    sd = optimizer.state_dict()
    state = {
        i: {k: (v.full_tensor() if _is_dtensor(v) else v) for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state(optimizer, sd: dict) -> None:
    """Load a full (unsharded) optimizer state into an optimizer whose parameters may be sharded."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        if _is_dtensor(p):
            from torch.distributed.tensor import distribute_tensor

            s = {
                k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                if torch.is_tensor(v) and v.shape == p.shape
                else v
                for k, v in s.items()
            }
        state[i] = s
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
