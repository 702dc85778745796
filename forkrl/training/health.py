"""When a run must stop or warn: non-finite weights, skipped optimizer steps, steps that keep no group."""

from __future__ import annotations

import warnings

import torch

from forkrl.training.dist import all_max

EMPTY_STEPS_WARN = 3  # steps in a row that kept no group before the run warns that it learns nothing


def weights_finite(model, env) -> bool:
    """Whether every weight is finite (on every rank: each checks its own FSDP shards)."""
    local = [getattr(p, "to_local", lambda p=p: p)().detach() for p in model.parameters()]
    bad = int(not bool(torch.stack([torch.isfinite(p).all() for p in local]).all()))
    return all_max(bad, env) == 0


def count_streaks(m: dict, step: int, skipped_in_row: int, empty_in_row: int) -> tuple[int, int]:
    """(optimizer steps skipped in a row, steps in a row that kept no group) after step `step`'s metrics.

    A step that kept no group took no optimizer step: it neither ends nor extends a run of skipped
    ones (else a diverged model, whose groups are all dropped, would never reach the limit)."""
    kept = m.get("kept_groups", 1) > 0
    skipped_in_row = skipped_in_row + 1 if m.get("skipped_steps") else 0 if kept else skipped_in_row
    empty_in_row = 0 if kept else empty_in_row + 1
    if empty_in_row == EMPTY_STEPS_WARN:
        warnings.warn(
            f"steps {step - empty_in_row + 1}-{step} kept no group: every group's rewards were equal "
            f"(reward mean {m.get('reward_mean', float('nan')):.3f}), so dynamic sampling dropped them all "
            "and nothing trained; check the reward (is every reward 0?) and optim.lr",
            stacklevel=3,
        )
    return skipped_in_row, empty_in_row


def failure(model, env, cfg, step: int, skipped_in_row: int, saved: int | None, run_dir) -> str | None:
    """Why the run must stop after `step` (None: it goes on); then no checkpoint or final/ is written."""
    if not weights_finite(model, env):
        kept = (
            f"the newest checkpoint, {run_dir}/checkpoints/step-{saved:06d}, is finite"
            if saved is not None
            else "no checkpoint was written before it"
        )
        return (
            f"step {step} left non-finite (NaN/inf) weights, so the run stops without saving them ({kept}). "
            f"Lower optim.lr (now {cfg.optim.lr:g}) or use model.dtype=float32 (now {cfg.model.dtype})"
        )
    if skipped_in_row >= cfg.train.max_skipped_steps:
        return (
            f"{skipped_in_row} optimizer steps in a row had a NaN/inf gradient and were skipped "
            f"(train.max_skipped_steps={cfg.train.max_skipped_steps}); lower optim.lr or check the reward"
        )
    return None


def collapse(start: float | None, end: float | None, lr: float, n: int) -> str | None:
    """Why a finished run counts as failed although every step ran: held-out accuracy that was above 0
    and ends at 0 on `n` held-out rows (a diverged policy that still writes tokens, e.g. optim.lr far too
    large); else None. A zero that chance explains is no collapse: a model still as accurate as at the
    start answers all `n` rows wrong with probability (1 - start) ** n, and below 1% that counts as a
    collapse (2 of 4 right, then 0 of 4, is chance at 6%; 0.57 on 32 rows, then 0, is not)."""
    if start is None or end is None or not start > 0 or end > 0 or (1 - start) ** n >= 0.01:
        return None
    return (
        f"held-out accuracy fell from {start:.3f} to {end:.3f} on {n} rows: the model collapsed (its "
        f"outputs are kept for inspection, final/ included); lower optim.lr (now {lr:g}) and start again"
    )
