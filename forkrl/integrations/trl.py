"""forkrl's exact forking-token selection inside TRL's `GRPOTrainer` (TRL 1.16).

TRL's `GRPOTrainer._compute_loss` keeps in the policy loss only the tokens of
``self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)`` (when
``top_entropy_quantile < 1.0``). This module replaces that method with forkrl's batch-scope
selection (`forkrl/core/selection.py`, docs/DESIGN.md "Selection at scale").

Mapping of the knobs: TRL's ``GRPOConfig.top_entropy_quantile`` is the paper's ρ, the fraction of
tokens *kept*; the ``threshold`` TRL passes to ``get_high_entropy_mask`` is the quantile *level*
``1 - top_entropy_quantile``. So ρ = 1 - threshold (`rho_from_threshold`; the trainer's own
``top_entropy_quantile`` is used when it matches, so no float noise from ``1 - (1 - ρ)`` reaches k).

What differs from TRL's own method (``torch.quantile`` over the entropies gathered from every process,
then ``entropies >= quantile``):

- the count: forkrl keeps exactly k = ⌈ρN⌉ of the N valid tokens of all processes (`num_selected`),
  tokens tied at the boundary taken in a deterministic order (process rank, then row-major position).
  TRL keeps every token at or above the linearly interpolated (1 - ρ) quantile: floor(ρ(N - 1)) + 1
  tokens when the entropies are distinct (one fewer than ⌈ρN⌉ when the fractional part of ρN is below
  ρ, e.g. 1 instead of 2 for N = 4, ρ = 0.3; the highest token at ρ = 0, where forkrl keeps none), and
  *every* token tied at the threshold, so ties (common in bf16 entropies) can keep many more than k;
- the scale: ``torch.quantile`` refuses more than 2^24 elements ("quantile() input tensor is too
  large"), and TRL pads and gathers every process's entropies onto every process first. forkrl finds
  the k-th largest by a radix select over the float bits, all-reducing only small histograms
  (`forkrl/core/radix.py`), at any size;
- NaN: a NaN entropy at a valid token raises ``ValueError`` (on every process) instead of silently
  keeping no token.

Three ways in (micro-batch scope unless said otherwise):

1. ``ForkGRPOTrainer(model=..., args=GRPOConfig(top_entropy_quantile=0.2, ...), ...)``: a drop-in
   subclass of ``trl.GRPOTrainer`` (built on first access, so importing this module does not import
   TRL). Extra keyword arguments: ``fork_count`` (`exact`, `fork` or `quantile`: forkrl's
   `COUNTS`), ``fork_across_processes`` and ``fork_scope``:

   - ``"micro_batch"`` (default): TRL's scope. Each ``_compute_loss`` selects among the tokens of its
     micro-batch on the entropies of its own training forward (over all processes).
   - ``"generation_batch"``: the paper's whole-batch scope across TRL's gradient-accumulation steps.
     Right after TRL generates and scores a generation batch (``per_device_train_batch_size x
     steps_per_generation`` rows per process; ``steps_per_generation`` defaults to
     ``gradient_accumulation_steps``), one extra no-grad forward computes the entropies of all its
     tokens under the weights that sampled them, and ``exact_high_entropy_mask`` selects over all of
     them and all processes at once (forkrl's ``scope=batch, entropy_source=old``). The mask travels
     with the batch as the ``fork_sel_mask`` column through TRL's shuffle and split, and every
     micro-batch's loss uses its slice of it (also for ``num_iterations > 1``). Text models only are
     tested (multimodal inputs are passed through as ``_compute_loss`` passes them).

2. One line, for code that builds ``trl.GRPOTrainer`` itself::

       import forkrl.integrations.trl as fork_trl; fork_trl.patch_trl()

   replaces ``trl.GRPOTrainer.get_high_entropy_mask`` (micro-batch scope) for every trainer;
   ``patch_trl(...).undo()`` (or ``with patch_trl(): ...``) puts TRL's back.

3. ``exact_high_entropy_mask(entropies, mask, rho)`` for any other trainer.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import Tensor

from forkrl.core.selection import COUNTS, select_tokens

__all__ = [
    "SCOPES",
    "ForkGRPOTrainer",  # noqa: F822 (built from trl.GRPOTrainer by __getattr__ on first access)
    "ForkSelectionMixin",
    "TrlPatch",
    "exact_high_entropy_mask",
    "patch_trl",
    "rho_from_threshold",
]

SCOPES = ("micro_batch", "generation_batch")
"""Where `ForkGRPOTrainer` selects: TRL's micro-batch, or the whole generation batch (see module doc)."""

# `_compute_loss`'s optional forward inputs (TRL 1.16), passed the same way to the generation-batch forward.
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
SEL_MASK_KEY = "fork_sel_mask"  # the generation batch's selection, a column of TRL's buffered inputs


def exact_high_entropy_mask(
    entropies: Tensor,
    mask: Tensor,
    rho: float,
    *,
    count: str = "exact",
    across_processes: bool = True,
) -> Tensor:
    """The top-ρ entropy tokens: a bool mask (B, L), a subset of `mask`, of exactly k tokens over all processes.

    forkrl's `select_tokens(rule="top")` (forkrl/core/selection.py) with the process group of
    `torch.distributed` when `across_processes` and more than one process run (accelerate's group):
    the result equals selecting, in one process, on every process's flattened (B, L) tokens
    concatenated in rank order, found by the radix select across processes (DESIGN.md, "Selection
    at scale"), never by gathering entropies, and with no 2^24-element limit (TRL's `torch.quantile`
    has one). Every process must call it the same number of times with the same `rho` and `count`.

    Args:
        entropies: (B, L) float entropies (any float dtype, compared in float32; detached here).
        mask: (B, L) valid tokens (bool or 0/1 ints, as TRL's `completion_mask`).
        rho: fraction of valid tokens kept, in [0, 1]: TRL's `top_entropy_quantile`, *not* the
            quantile level TRL passes to `get_high_entropy_mask` (that is 1 - ρ; see `rho_from_threshold`).
        count: `exact` (k = ⌈ρN⌉, ties by earlier (rank, position)), `fork` (the official verl fork's
            k = max(1, int(ρN + 0.9999)), same tie order) or `quantile` (TRL's own rule, keep H >= the
            interpolated (1 - ρ) quantile, computed by the radix select, so without TRL's size limit).
        across_processes: select over the union of all processes' tokens (TRL's default behaviour);
            False selects among this process's tokens only.

    Raises ValueError on a NaN entropy at a valid token (on every process), a bad `rho` or `count`.
    """
    if count not in COUNTS:
        raise ValueError(f"count must be one of {list(COUNTS)}; got {count!r}")
    group = _process_group() if across_processes else None
    return select_tokens(entropies.detach(), mask.bool(), rho=rho, rule="top", count=count, group=group)


def rho_from_threshold(threshold: float, top_entropy_quantile: float | None = None) -> float:
    """ρ (fraction kept) from the quantile level TRL passes to `get_high_entropy_mask`: ρ = 1 - threshold.

    TRL calls ``get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)``; when
    `top_entropy_quantile` is given and matches, it is returned as is (1 - (1 - 0.2) is
    0.19999999999999996 in floats; forkrl's k rule tolerates that, but the trainer's own value is exact).
    """
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
        raise ValueError(
            f"threshold (TRL's quantile level, 1 - top_entropy_quantile) must be in [0, 1]; got {threshold!r}"
        )
    rho = 1.0 - threshold
    if top_entropy_quantile is not None and abs(rho - float(top_entropy_quantile)) <= 1e-9:
        return float(top_entropy_quantile)
    return rho


def _process_group():
    """accelerate's (the default) torch.distributed group when more than one process runs, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


# ---------------------------------------------------------------------------------------------------
# The trainer: a mixin (no TRL import) and `ForkGRPOTrainer`, built from trl.GRPOTrainer on first access
# ---------------------------------------------------------------------------------------------------


class ForkSelectionMixin:
    """Put before ``trl.GRPOTrainer`` in the bases: ``class T(ForkSelectionMixin, GRPOTrainer)``.

    Overrides `get_high_entropy_mask` (same signature as TRL's) with `exact_high_entropy_mask`, and,
    for ``fork_scope="generation_batch"``, `_generate_and_score_completions` and `_compute_loss` to
    select once per generation batch (module docstring). Keyword arguments, taken before TRL's:
    ``fork_count`` (default `exact`), ``fork_scope`` (default `micro_batch`),
    ``fork_across_processes`` (default True).
    """

    def __init__(
        self,
        *args,
        fork_count: str = "exact",
        fork_scope: str = "micro_batch",
        fork_across_processes: bool = True,
        **kwargs,
    ):
        if fork_count not in COUNTS:
            raise ValueError(f"fork_count must be one of {list(COUNTS)}; got {fork_count!r}")
        if fork_scope not in SCOPES:
            raise ValueError(f"fork_scope must be one of {list(SCOPES)}; got {fork_scope!r}")
        if not isinstance(fork_across_processes, bool):
            raise ValueError(f"fork_across_processes must be a bool; got {fork_across_processes!r}")
        self.fork_count, self.fork_scope = fork_count, fork_scope
        self.fork_across_processes = fork_across_processes
        self._fork_pending: Tensor | None = None  # the current micro-batch's slice (generation_batch scope)
        super().__init__(*args, **kwargs)

    def get_high_entropy_mask(self, entropies: Tensor, mask: Tensor, threshold: float) -> Tensor:
        """forkrl's exact top-ρ mask, ρ = 1 - `threshold` (TRL's argument is the quantile level).

        Same signature and contract as ``trl.GRPOTrainer.get_high_entropy_mask``: (B, L) bool, a
        subset of `mask`. With ``fork_scope="generation_batch"`` inside `_compute_loss`, the slice of
        the generation batch's selection; otherwise `exact_high_entropy_mask` on these entropies.
        """
        if self._fork_pending is not None:
            sel = self._fork_pending
            if sel.shape != entropies.shape:
                raise ValueError(
                    f"the generation batch's selection slice is {tuple(sel.shape)} but the micro-batch's "
                    f"entropies are {tuple(entropies.shape)}"
                )
            return sel.to(entropies.device) & mask.bool()
        rho = rho_from_threshold(threshold, getattr(self, "top_entropy_quantile", None))
        return exact_high_entropy_mask(
            entropies, mask, rho, count=self.fork_count, across_processes=self.fork_across_processes
        )

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.fork_scope == "generation_batch" and self.top_entropy_quantile < 1.0:
            output[SEL_MASK_KEY] = self._fork_select_generation_batch(output)
        return output

    def _compute_loss(self, model, inputs):
        self._fork_pending = inputs.get(SEL_MASK_KEY) if self.fork_scope == "generation_batch" else None
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._fork_pending = None

    def _fork_select_generation_batch(self, output: dict) -> Tensor:
        """Entropies of the whole generation batch under the current (sampling) weights, no grad; its mask."""
        prompt_ids, completion_ids = output["prompt_ids"], output["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        mask = output["completion_mask"]
        if output.get("tool_mask") is not None:
            mask = mask * output["tool_mask"]
        training = self.model.training
        batch_size = (
            self.args.per_device_train_batch_size if training else self.args.per_device_eval_batch_size
        )
        with torch.no_grad(), _no_checkpointing(self):
            _, entropies, _ = self._get_per_token_logps_and_entropies(
                self.model,
                input_ids,
                attention_mask,
                completion_ids.size(1),
                batch_size=batch_size,
                compute_entropy=True,
                **{key: output.get(key) for key in _FORWARD_KEYS},
            )
        sel = exact_high_entropy_mask(
            entropies,
            mask,
            self.top_entropy_quantile,
            count=self.fork_count,
            across_processes=self.fork_across_processes,
        )
        self.fork_last_generation_selection = (entropies, mask, sel)  # for inspection and tests
        return sel


def _no_checkpointing(trainer):
    """TRL's `disable_gradient_checkpointing` around a no-grad forward, as TRL does (a no-op if absent)."""
    try:
        from trl.models.utils import disable_gradient_checkpointing
    except ImportError:  # pragma: no cover - other TRL versions
        return nullcontext()
    return disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs)


@functools.cache
def _fork_grpo_trainer() -> type:
    from trl import GRPOTrainer

    class ForkGRPOTrainer(ForkSelectionMixin, GRPOTrainer):
        __doc__ = (
            "``trl.GRPOTrainer`` whose high-entropy mask is forkrl's exact selection "
            "(forkrl.integrations.trl; DESIGN.md, 'Selection at scale').\n\n"
            + (ForkSelectionMixin.__doc__ or "")
        )

    ForkGRPOTrainer.__module__ = __name__
    return ForkGRPOTrainer


def __getattr__(name: str):
    # `ForkGRPOTrainer` imports TRL on first access only.
    if name == "ForkGRPOTrainer":
        return _fork_grpo_trainer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------
# The one-line patch
# ---------------------------------------------------------------------------------------------------


class TrlPatch:
    """The handle `patch_trl` returns: `undo()` (or leaving a ``with`` block) restores TRL's method."""

    def __init__(self, cls: type, original):
        self.cls, self.original, self.active = cls, original, True

    def undo(self) -> None:
        if self.active:
            self.cls.get_high_entropy_mask = self.original
            self.active = False

    def __enter__(self) -> TrlPatch:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def patch_trl(*, count: str = "exact", across_processes: bool = True) -> TrlPatch:
    """Replace ``trl.GRPOTrainer.get_high_entropy_mask`` with forkrl's exact selection, for every trainer.

    One line before the trainer is built::

        import forkrl.integrations.trl as fork_trl; fork_trl.patch_trl()

    Micro-batch scope (TRL's): each call selects k = ⌈ρN⌉ (`count`) of its micro-batch's valid tokens
    over all processes, ρ = 1 - threshold = ``top_entropy_quantile`` (`rho_from_threshold`); see
    `exact_high_entropy_mask` and the module docstring for what differs from TRL's ``torch.quantile``
    (DESIGN.md, "Selection at scale"). Subclasses that override the method keep their own. Returns a
    `TrlPatch`: ``.undo()`` or ``with patch_trl(): ...`` puts back the method that was there.
    """
    if count not in COUNTS:
        raise ValueError(f"count must be one of {list(COUNTS)}; got {count!r}")
    from trl import GRPOTrainer

    original = GRPOTrainer.__dict__["get_high_entropy_mask"]

    def get_high_entropy_mask(self, entropies: Tensor, mask: Tensor, threshold: float) -> Tensor:
        rho = rho_from_threshold(threshold, getattr(self, "top_entropy_quantile", None))
        return exact_high_entropy_mask(entropies, mask, rho, count=count, across_processes=across_processes)

    get_high_entropy_mask.__doc__ = ForkSelectionMixin.get_high_entropy_mask.__doc__
    get_high_entropy_mask.forkrl_patch = True
    GRPOTrainer.get_high_entropy_mask = get_high_entropy_mask
    return TrlPatch(GRPOTrainer, original)
