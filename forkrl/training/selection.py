"""Selection as a step of its own: which tokens of one RL step carry the policy gradient.

DESIGN.md's data flow puts selection between the scoring pass and the update. *When* it can run
depends on the convention (``selection.scope`` x ``selection.entropy_source``), so each pair has a
plan in ``PLANS`` (``@register_plan(scope, source)``):

===================  ====================================================================
(scope, source)      selects
===================  ====================================================================
(batch, old)         once, on the scoring pass's entropies of every rank's tokens (the paper)
(sequence, old)      once, row by row
(micro_batch, old)   once, per micro-batch of the update's layout
(batch, current)     before each optimizer step, on a no-grad pass under the current weights
(micro_batch, cur.)  in each training forward, on its own entropies (the verl fork, TRL)
(sequence, current)  in each training forward, row by row
===================  ====================================================================

``across_ranks`` (``selection.across_ranks``): under torchrun, the batch (or the same micro-batch
index of every rank) is selected over as one token set (a radix select, never a gather; TRL gathers
every process's entropies before ``torch.quantile``); off, each rank selects among its own tokens
(the fork's ``get_global_entropy_top_mask`` runs per rank). Sequence scope is always per row.

Whatever the plan, the tokens that trained are recorded in one :class:`Selection`, which the
critic, the metrics and the rollout dumps read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from forkrl.core.selection import select_tokens_with_threshold

__all__ = ["PLANS", "Selection", "SelectionPlan", "make_plan", "register_plan", "select"]


@dataclass
class Selection:
    """The tokens one RL step trained on, and the thresholds that chose them."""

    sel_mask: Tensor  # (B, L) bool, a subset of loss_mask
    taus: list[float]  # one per selection made (mean over rows for sequence scope); nan = no threshold
    time_s: float = 0.0  # time spent selecting, collectives included

    @property
    def tau(self) -> float:
        finite = [t for t in self.taus if not math.isnan(t)]
        return sum(finite) / len(finite) if finite else float("nan")


def select(entropy: Tensor, loss_mask: Tensor, s, generator, *, per_sequence=False, group=None):
    """(sel_mask, tau as a float: the threshold, averaged over rows for per-sequence selection)."""
    sel, tau = select_tokens_with_threshold(
        entropy,
        loss_mask,
        rho=s.selection.rho,
        rule=s.selection.rule,
        count=s.selection.count,
        per_sequence=per_sequence,
        generator=generator,
        group=group,
    )
    return sel, float(tau.float().nanmean()) if tau.numel() else float("nan")


class SelectionPlan:
    """One (scope, entropy_source) convention. The update calls ``mini_batch`` before each optimizer
    step and ``micro_batch`` in each training forward; ``needs_forward_entropy`` says whether the latter
    needs the forward's own entropies. Every rank calls every hook the same number of times (an empty
    micro-batch included), so the plans' collectives line up.

    Until the first optimizer step the weights are those that scored the rollout, so with
    ``selection.reuse_entropy`` the "current" plans take the first mini-batch's entropies from
    `entropy` instead of recomputing them (docs/DESIGN.md); not from a stochastic (dropout) forward."""

    in_forward = False  # needs entropies of the training forward
    per_sequence = False
    _minis_begun = 0
    _scored_now = False  # this mini-batch's forward entropies are the scored ones

    def __init__(
        self,
        entropy,
        loss_mask,
        s,
        generator,
        group,
        rescore: Callable | None,
        stochastic_forward: bool = False,
    ):
        self.entropy, self.loss_mask, self.s, self.gen = entropy, loss_mask, s, generator
        self.group = None if self.per_sequence else group
        self.rescore = rescore  # () -> (B, L) entropies under the current weights (no grad)
        self.stochastic_forward = stochastic_forward  # dropout active in the training forward
        self.record = Selection(torch.zeros_like(loss_mask), [])

    @property
    def needs_forward_entropy(self) -> bool:
        return self.in_forward and not self._scored_now

    def _first_mini(self) -> bool:
        """Count a mini-batch begun; True for the first (no optimizer step yet) when reuse is on."""
        self._minis_begun += 1
        return self._minis_begun == 1 and self.s.selection.reuse_entropy

    def _select(self, entropy, mask, rows: slice | None = None) -> Tensor:
        t = time.perf_counter()
        sel, tau = select(entropy, mask, self.s, self.gen, per_sequence=self.per_sequence, group=self.group)
        self.record.taus.append(tau)
        if rows is not None:
            self.record.sel_mask[rows] = sel
        self.record.time_s += time.perf_counter() - t
        return sel

    def select_upfront(self, layout) -> None:
        """The selection made before the update, on the scoring pass's entropies (the "old" plans: all
        of it); the "current" plans select in the update instead (`mini_batch`, `micro_batch`)."""

    def mini_batch(self, rows: slice) -> Tensor | None:
        """Before an optimizer step: the selection of the mini-batch's rows when already known."""
        return self.record.sel_mask[rows]

    def micro_batch(self, rows: slice, entropy_now: Tensor | None) -> Tensor:
        """The selection of one micro-batch (``entropy_now``: its training forward's, when in_forward)."""
        return self.record.sel_mask[rows]


PLANS: dict[tuple[str, str], type[SelectionPlan]] = {}


def register_plan(scope: str, source: str):
    def decorator(cls: type[SelectionPlan]) -> type[SelectionPlan]:
        PLANS[(scope, source)] = cls
        return cls

    return decorator


@register_plan("batch", "old")
class _BatchOld(SelectionPlan):
    def select_upfront(self, layout) -> None:  # the paper's: the top rho of every rank's tokens, once
        self._select(self.entropy, self.loss_mask, slice(None))


@register_plan("sequence", "old")
class _SequenceOld(_BatchOld):
    per_sequence = True


@register_plan("micro_batch", "old")
class _MicroOld(SelectionPlan):
    def select_upfront(self, layout) -> None:
        for mini in layout:
            for rows in mini.micros:
                self._select(self.entropy[rows], self.loss_mask[rows], rows)


@register_plan("batch", "current")
class _BatchCurrent(SelectionPlan):
    def mini_batch(self, rows: slice) -> Tensor:
        # the first rescoring (eval mode, as the scoring pass) would recompute `self.entropy`
        entropy = self.entropy if self._first_mini() else self.rescore()
        sel = self._select(entropy, self.loss_mask)  # every row, under this step's weights
        self.record.sel_mask[rows] = sel[rows]
        return sel[rows]


@register_plan("micro_batch", "current")
class _MicroCurrent(SelectionPlan):
    in_forward = True

    def mini_batch(self, rows: slice) -> None:
        self._scored_now = self._first_mini() and not self.stochastic_forward
        return None  # known only micro-batch by micro-batch

    def micro_batch(self, rows: slice, entropy_now: Tensor | None) -> Tensor:
        entropy = self.entropy[rows] if self._scored_now else entropy_now
        return self._select(entropy, self.loss_mask[rows], rows)


@register_plan("sequence", "current")
class _SequenceCurrent(_MicroCurrent):
    per_sequence = True


def make_plan(scope: str, source: str, **kwargs) -> SelectionPlan:
    if (scope, source) not in PLANS:
        raise ValueError(
            f"no selection plan for scope={scope!r}, entropy_source={source!r}; known: {sorted(PLANS)}"
        )
    return PLANS[(scope, source)](**kwargs)
