"""One mini/micro-batch optimisation loop, shared by the actor and the critic.

An RL step's rows are split into ``optim.mini_batches`` mini-batches (one optimizer step each) of
micro-batches (one forward/backward each, gradients accumulated). The loop owns what both models need
alike: the layout (aligned across ranks, so every rank runs the same number of micro-batches and
their collectives line up), how a micro-batch's loss is weighted (``Aggregate``), accumulation under
FSDP2, averaging over ranks, clipping, and skipping a step whose gradient is not finite.

Weighting (``loss.aggregate``):

* ``batch``: the normalizer's counts are the mini-batch's totals over every rank, so a micro-batch's
  loss is its share of the mini-batch loss; gradients are averaged over W ranks, so each share is
  multiplied by W. The gradient is that of the mini-batch loss, whatever the split (the paper's
  1/Σ|oᵢ|; TRL's ``dapo``, whose ``num_items_in_batch`` counts every process's tokens).
* ``micro_batch``: each micro-batch is normalised by its own counts and weighted by its share of its
  rank's mini-batch rows, and gradients are averaged over ranks: verl's (and the official fork's)
  ``agg_loss`` per micro-batch with ``loss / gradient_accumulation`` (fixed micro-batches) or
  ``loss * rows / ppo_mini_batch_size`` (``use_dynamic_bsz``), then FSDP's mean over ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from forkrl.core.losses import TokenCounts
from forkrl.core.packing import balanced, balanced_count, in_order
from forkrl.training.dist import (
    DistEnv,
    Parallel,
    all_max_tensor,
    all_sum,
    average_replicated_grads,
    clip_grad_norm,
)
from forkrl.training.stopping import Abort

__all__ = ["AGGREGATES", "Aggregate", "MiniBatch", "Rows", "chunks", "layout", "n_rows", "optimizer_steps"]

AGGREGATES = ("batch", "micro_batch")


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


Rows = slice | Tensor  # a micro-batch's rows: a slice, or row indices (balanced packing)


def n_rows(rows: Rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else int(rows.numel())


@dataclass
class MiniBatch:
    """One optimizer step: its rows and its micro-batches' rows (an empty one pads a rank's list)."""

    rows: slice
    micros: list[Rows]

    @property
    def n_rows(self) -> int:
        return self.rows.stop - self.rows.start


def _in_order_groups(lengths: list[int], budget: int, group_size: int) -> list[list[int]]:
    """`in_order` over units of `group_size` consecutive rows (a group larger than the budget, or a
    trailing part of one, counts row by row); returns row indices per micro-batch.

    >>> _in_order_groups([2, 2, 3, 1, 9, 1], 8, 2)
    [[0, 1, 2, 3], [4], [5]]
    """
    G = group_size
    units: list[list[int]] = []
    for g0 in range(0, len(lengths), G):
        rows = list(range(g0, min(g0 + G, len(lengths))))
        whole = len(rows) == G and sum(lengths[i] for i in rows) <= budget
        units += [rows] if whole else [[i] for i in rows]
    parts = in_order([sum(lengths[i] for i in u) for u in units], budget)
    return [[i for k in p for i in units[k]] for p in parts]


def layout(
    n_rows: int,
    mini_batches: int,
    micro_batch_size: int,
    env: DistEnv,
    row_tokens: Tensor | None = None,
    micro_batch_tokens: int = 0,
    packing: str = "in_order",
    group_size: int = 1,
) -> list[MiniBatch]:
    """The mini-batches of ``n_rows`` rows and their micro-batches.

    In one process: ``ceil(n_rows / mini_batches)``-row mini-batches. Across ranks every rank runs
    exactly ``mini_batches`` (its m-th slice of local rows, possibly empty) and, in each, as many
    micro-batches as the rank with the most (the others end with empty ones). Micro-batches are
    ``micro_batch_size`` rows, or with ``micro_batch_tokens > 0`` packed by their token counts
    (``row_tokens``, prompt + response) by ``packing`` (``forkrl.core.packing``: ``in_order`` or the
    fork's ``balanced``, whose count is all-reduced first, as verl's ``rearrange_micro_batches``).
    ``in_order`` with ``group_size`` G > 1 packs whole groups of G rows where a group fits the budget, so
    that the training forward can run each group's prompt once (``model.share_prompt``).
    """
    minis = chunks(n_rows, math.ceil(n_rows / mini_batches)) if n_rows else []
    if env.enabled:
        minis += [slice(n_rows, n_rows)] * (mini_batches - len(minis))
    budgeted = micro_batch_tokens > 0 and row_tokens is not None
    lengths = [row_tokens[mb].tolist() for mb in minis] if budgeted else []
    at_least = [0] * len(minis)
    if budgeted and packing == "balanced" and env.enabled:
        counts = [balanced_count(n, micro_batch_tokens) for n in lengths]
        at_least = all_max_tensor(torch.tensor(counts), env).tolist()
    out = []
    for m, mb in enumerate(minis):
        if not budgeted:
            micros = [
                slice(mb.start + c.start, mb.start + c.stop)
                for c in chunks(mb.stop - mb.start, micro_batch_size)
            ]
        elif packing == "balanced":
            micros = [
                torch.tensor(p) + mb.start for p in balanced(lengths[m], micro_batch_tokens, at_least[m])
            ]
        else:
            micros = [
                slice(mb.start + p[0], mb.start + p[-1] + 1)
                for p in _in_order_groups(
                    lengths[m], micro_batch_tokens, group_size if mb.start % group_size == 0 else 1
                )
            ]
        out.append(MiniBatch(mb, micros))
    if env.enabled and out:
        most = all_max_tensor(torch.tensor([len(m.micros) for m in out]), env).tolist()
        for m, n in zip(out, most):
            m.micros += [slice(m.rows.stop, m.rows.stop)] * (n - len(m.micros))
    return out


class Aggregate:
    """How a micro-batch's loss is normalised and weighted (``loss.aggregate``, module docstring)."""

    def __init__(self, mode: str, env: DistEnv):
        if mode not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}; got {mode!r}")
        self.mode, self.env = mode, env
        self._totals: TokenCounts | None = None

    def begin(self, loss_mask: Tensor, sel_mask: Tensor | None) -> None:
        """A mini-batch starts: with ``batch``, its counts over every rank (``sel_mask=None``: the
        selection is not known yet, so the selected count is nan and must not be used)."""
        if self.mode != "batch":
            return
        nan = torch.full((), math.nan, device=loss_mask.device)
        t = torch.stack(
            [
                loss_mask.sum().float(),
                sel_mask.sum().float() if sel_mask is not None else nan,
                loss_mask.any(-1).sum().float(),
                torch.tensor(float(loss_mask.shape[0]), device=loss_mask.device),
            ]
        )
        t = all_sum(t, self.env)
        self._totals = TokenCounts(t[0], t[1], t[2], rows=t[3])

    def counts(self, loss_mask: Tensor, sel_mask: Tensor) -> TokenCounts:
        return self._totals if self.mode == "batch" else TokenCounts.from_masks(loss_mask, sel_mask)

    def weight(self, rows: Rows, mini: MiniBatch) -> float:
        """The factor on a micro-batch's loss before its backward."""
        if self.mode == "batch":
            return float(self.env.world) if self.env.enabled else 1.0
        return n_rows(rows) / mini.n_rows


def idle_backward(model) -> None:
    """A zero-loss forward and backward through the backbone: the one backward with FSDP2 gradient
    sync on, identical on every rank whatever its micro-batches were, so it reduces what they left."""
    body = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(body, "model", body)
    device = next(model.parameters()).device
    out = inner(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    (out.last_hidden_state.sum() * 0.0).backward()


def optimizer_steps(
    model,
    optimizer,
    scheduler,
    minis: list[MiniBatch],
    micro_loss: Callable[[MiniBatch, slice], Tensor | None],
    *,
    grad_clip: float,
    par: Parallel,
    begin: Callable[[MiniBatch], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[float], int]:
    """Run one optimizer step per mini-batch; returns (gradient norms of the steps taken, skipped).

    ``should_stop()`` (a signal asked to stop; under torchrun an agreement of every rank, so it is
    called at the same micro-batches on each) is asked before each micro-batch until the first
    optimizer step: if it says so, the gradients are dropped and `Abort` is raised with the weights,
    optimizer and scheduler untouched (forkrl.training.stopping). After a step it is not asked.

    ``begin(mini)`` runs before a step's micro-batches; ``micro_loss(mini, rows)`` returns the loss to
    backward for one micro-batch, already weighted (``Aggregate.weight``), or None for nothing to
    backward (an empty micro-batch, which still ran its collectives). A step whose global gradient
    norm is NaN/inf is skipped on every rank (the norm is global) and counted.
    """
    env = par.env
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norms: list[float] = []
    skipped = 0
    stepped = False
    for mini in minis:
        if begin is not None:
            begin(mini)
        optimizer.zero_grad(set_to_none=True)
        # FSDP2: on leaving, every rank's one synced backward reduce-scatters the gradients
        with par.accumulating(lambda: idle_backward(model)):
            for rows in mini.micros:
                if should_stop is not None and not stepped and should_stop():
                    optimizer.zero_grad(set_to_none=True)
                    raise Abort
                loss = micro_loss(mini, rows)
                if loss is not None:
                    loss.backward()
        average_replicated_grads(params, env)
        gn = clip_grad_norm(params, grad_clip, env)
        if not torch.isfinite(gn):
            skipped += 1  # a NaN/inf gradient must not reach the weights
            optimizer.zero_grad(set_to_none=True)
            continue
        grad_norms.append(float(gn))
        stepped = True
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    # The gradients are not needed until the next update: their memory is free for the rollouts
    # in between (the next zero_grad would drop them only when that update begins).
    optimizer.zero_grad(set_to_none=True)
    return grad_norms, skipped
