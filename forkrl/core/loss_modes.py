"""Policy-loss modes (``POLICY_LOSSES``): the per-token terms that ``policy_loss`` normalises, by name.

Each mode turns the selected tokens (``sel_mask``) into per-token loss terms ``(B, L)``, zero
elsewhere; ``policy_loss`` then applies the normalizer, the KL penalty and the common metrics, so
every mode composes with every selection rule and normalizer. ``r = exp(logp - old_logp)``:

============  ===========================================================  ===========================
name          per-token term on a selected token (a loss to minimise)       matches
============  ===========================================================  ===========================
``clip``      ``−min(r·A, clip(r, 1−ε_low, 1+ε_high)·A)``, dual clip opt.   DAPO; TRL ``dapo``; verl
                                                                           ``vanilla``
``gspo``      the same with ``r := s_i = exp(mean_t log r_it)``, one ratio  GSPO (arXiv 2507.18071);
              per sequence                                                 TRL
                                                                           ``importance_sampling_level
                                                                           ="sequence"``; verl ``gspo``
``cispo``     ``−sg(clip(r, 1−ε_low, 1+ε_high))·A·logp``                    CISPO (MiniMax-M1, arXiv
                                                                           2506.13585); TRL / verl
                                                                           ``cispo``
``clip_cov``  ``clip`` terms; a random few tokens whose covariance of A     Clip-Cov (arXiv 2505.22617);
              and logp lies in (lb, ub) get no gradient                    verl ``clip_cov``
``kl_cov``    ``−r·A``, plus ``coef·|log r|`` on the top-ratio tokens by   KL-Cov; verl ``kl_cov``
              that covariance                                              (no ratio clip)
``archer``    ``clip`` terms with a per-token clip range: each row's     Archer (arXiv 2507.15778);
              top ``1 − archer_quantile`` entropies get the loose range,   ArcherCodeR ``use_token_
              the rest the tight one; KL weaker on the former              entropy_separate``
============  ===========================================================  ===========================

GSPO and forkrl's selection (``LossMode.gspo_tokens``): ``"selected"`` (the default) averages the
log-ratio over the row's *selected* tokens and uses GSPO-token (verl's form, ``log s_it = sg(log
s_i) + logp_t − sg(logp_t)``), so the gradient stays on the forking tokens, as for every other mode;
it equals verl's ``gspo`` on the official fork's folded mask (``response_mask = sel_mask``).
``"valid"`` averages over every valid token and keeps ``s_i``'s gradient (TRL's form), so with an
entropy mask the selected tokens weight each row's sequence loss while every valid token receives
gradient through ``s_i``: TRL's ``importance_sampling_level="sequence"`` with
``top_entropy_quantile < 1``. With per-sequence advantages and every token selected both are GSPO.

CISPO's bounds: ``[1 − ε_low, 1 + ε_high]`` as verl (``clip_ratio_low/high``); with
``cispo_clip_low=False`` there is no lower bound (the MiniMax-M1 paper, TRL). TRL's ``epsilon_high``
is the bound itself: TRL ``epsilon_high=5`` is forkrl ``eps_high=4``. ``dual_clip`` applies to the
clipped surrogates (``clip``, ``gspo``, ``clip_cov``) and is ignored by ``cispo`` and ``kl_cov``,
which have none; ``kl_cov`` also ignores ``eps_low``/``eps_high`` (verl's is unclipped).

A new mode is a function ``fn(x: ModeInputs, m: LossMode) -> (terms (B, L), parts, metrics)``
registered with ``@register_policy_loss("name")``; ``parts`` holds the detached token ``adv``,
``ratio`` and ``log_ratio`` the common metrics read (optionally ``clip_ratio``, the ratio the clip
fractions test, and ``dual_active``), ``metrics`` the mode's own 0-dim detached diagnostics.

Optionally ``parts["acted"]``: a bool ``(B, L)`` tensor, a subset of ``sel``, of the tokens the mode
treats specially in this call (beyond the common surrogate: detached, penalised, masked); a mode whose
pick among candidates is random may add ``parts["acted_candidates"]``, the tokens it draws from.
Rollout dumps (``forkrl.training.dump``) evaluate the mode at the rollout's policy (``logp = old_logp``,
ratio 1) and write the candidates, else ``acted``, as the per-token ``acted`` column; no key, no
column (``clip``, ``gspo``, ``cispo``: at ratio 1 no bound binds). ``register_policy_loss(name,
acted="...")`` says in a line what that column holds for the mode (``ACTED``, the dump's meta).

A mode with a per-token clip range gives it as ``parts["clip_lo"]`` / ``parts["clip_hi"]`` (``(B, L)``
ratio bounds; the common clip fractions test them). A mode that weights the KL penalty per token
gives ``parts["kl_coef"]`` (``(B, L)``, replacing ``KLPenalty.coef``), and ``parts["kl_mask/NAME"]``
(bool ``(B, L)``) makes metric ``NAME`` the mean KL over those tokens of the KL scope (with a KL only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ACTED", "POLICY_LOSSES", "LossMode", "ModeInputs", "register_policy_loss"]


@dataclass(frozen=True)
class LossMode:
    """A policy-loss mode by name (`loss.mode`) with its options under the names of the `loss.*` settings
    (`forkrl.config.loss` takes its defaults from here); each option is read only by the modes that
    name it.

    ``gspo_tokens`` (gspo): ``"selected"`` or ``"valid"``, the tokens the sequence ratio averages
    (module docstring). ``gspo_log_ratio_max`` (gspo): upper clamp of ``log s_i`` (verl: 10; None =
    TRL, no clamp). ``cispo_clip_low`` (cispo): False = no lower bound on the weight.
    ``cov_ratio``, ``clip_cov_lb``, ``clip_cov_ub``, ``kl_cov_coef``, ``cov_across_ranks``, ``group``,
    ``generator``, ``keys``: the Cov modes (``forkrl.core.cov_losses``). ``archer_quantile``,
    ``archer_tokens``, ``archer_low_eps_low/_high``, ``archer_high_eps_low/_high`` (the clip range of
    each entropy class),
    ``archer_kl_coef_low``, ``archer_kl_coef_high``: Archer (``forkrl.core.archer``).
    """

    name: str = "clip"
    gspo_tokens: str = "selected"
    gspo_log_ratio_max: float | None = 10.0
    cispo_clip_low: bool = True
    cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_coef: float = 1.0
    cov_across_ranks: bool = True
    group: Any = None
    generator: torch.Generator | None = None
    keys: Tensor | None = None
    archer_quantile: float = 0.8
    archer_tokens: str = "selected"
    archer_low_eps_low: float = 0.2
    archer_low_eps_high: float = 0.2
    archer_high_eps_low: float = 0.5
    archer_high_eps_high: float = 0.5
    archer_kl_coef_low: float = 0.001
    archer_kl_coef_high: float = 0.0


@dataclass(frozen=True)
class ModeInputs:
    """What a mode sees: float32 ``logp`` (grad), detached float32 ``old_logp``, ``adv`` ``(B, L)``
    zero outside ``sel``, the masks and the clip options of ``policy_loss``; ``entropy``: the detached
    float32 token entropies ``policy_loss`` was given (None: none given)."""

    logp: Tensor
    old_logp: Tensor
    adv: Tensor
    loss_mask: Tensor
    sel: Tensor
    eps_low: float
    eps_high: float
    dual_clip: float | None
    log_ratio_clamp: float | None
    entropy: Tensor | None = None

    def log_ratio(self, mask: Tensor | None = None) -> Tensor:
        """``logp − old_logp`` on ``mask`` (default ``sel``), 0 elsewhere, clamped: ``(B, L)``."""
        mask = self.sel if mask is None else mask
        zero = torch.zeros((), dtype=torch.float32, device=self.logp.device)
        # Padding may hold garbage (inf, nan): replace it before any arithmetic, since a masked-out
        # nan still poisons gradients through torch.where.
        lr = torch.where(mask, self.logp - self.old_logp, zero)  # (B, L)
        if self.log_ratio_clamp is not None:
            lr = lr.clamp(-self.log_ratio_clamp, self.log_ratio_clamp)
        return lr


ModeFn = Callable[[ModeInputs, LossMode], tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]]
POLICY_LOSSES: dict[str, ModeFn] = {}
#: mode name -> what a rollout dump's ``acted`` column holds for it (modes that set ``parts["acted"]``)
ACTED: dict[str, str] = {}


def register_policy_loss(name: str, *, acted: str | None = None) -> Callable[[ModeFn], ModeFn]:
    """Register ``fn`` as mode ``name``; ``acted``: one line on its ``parts["acted"]`` tokens (``ACTED``)."""

    def decorator(fn: ModeFn) -> ModeFn:
        POLICY_LOSSES[name] = fn
        if acted is not None:
            ACTED[name] = acted
        return fn

    return decorator


def check_mode(mode: LossMode) -> None:
    """The options' bounds; raises ValueError naming the option."""
    if not isinstance(mode, LossMode):
        raise ValueError(f"mode must be a name or a LossMode, got {type(mode).__name__}")
    if mode.name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy-loss mode {mode.name!r}; known: {sorted(POLICY_LOSSES)}")
    if mode.gspo_tokens not in ("selected", "valid"):
        raise ValueError(f"LossMode.gspo_tokens must be 'selected' or 'valid', got {mode.gspo_tokens!r}")
    if mode.gspo_log_ratio_max is not None and not mode.gspo_log_ratio_max > 0:
        raise ValueError(f"gspo_log_ratio_max must be > 0 (verl: 10) or None, got {mode.gspo_log_ratio_max}")
    if not 0.0 < mode.cov_ratio <= 1.0:
        raise ValueError(f"cov_ratio must be in (0, 1] (verl: 2e-4), got {mode.cov_ratio}")
    if not mode.clip_cov_lb < mode.clip_cov_ub:
        raise ValueError(
            f"need clip_cov_lb < clip_cov_ub (verl: 1 and 5), got {mode.clip_cov_lb} and {mode.clip_cov_ub}"
        )
    if not mode.kl_cov_coef >= 0.0:
        raise ValueError(f"kl_cov_coef must be >= 0 (verl's ppo_kl_coef: 1), got {mode.kl_cov_coef}")
    if not 0.0 <= mode.archer_quantile <= 1.0:
        raise ValueError(f"archer_quantile must be in [0, 1] (Archer: 0.8), got {mode.archer_quantile}")
    if mode.archer_tokens not in ("selected", "valid"):
        raise ValueError(f"LossMode.archer_tokens must be 'selected' or 'valid', got {mode.archer_tokens!r}")
    for name in ("archer_low_eps", "archer_high_eps"):
        lo, hi = getattr(mode, f"{name}_low"), getattr(mode, f"{name}_high")
        if not (0.0 <= lo < 1.0 and hi >= 0.0):
            raise ValueError(f"LossMode.{name}_low/_high need 0 <= {name}_low < 1, {name}_high >= 0")
    if not (mode.archer_kl_coef_low >= 0.0 and mode.archer_kl_coef_high >= 0.0):
        raise ValueError("LossMode.archer_kl_coef_low and archer_kl_coef_high must be >= 0")


def clipped_surrogate(
    ratio: Tensor,
    adv: Tensor,
    sel: Tensor,
    eps_low: float | Tensor,
    eps_high: float | Tensor,
    dual_clip: float | None,
) -> tuple[Tensor, Tensor | None]:
    """``max(−A r, −A clip(r))`` with verl's dual clip, 0 outside ``sel``; and where the cap is active.
    ``eps_low``/``eps_high``: floats, or ``(B, L)`` tensors (both) for a per-token range."""
    zero = torch.zeros((), dtype=torch.float32, device=ratio.device)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high))  # (B, L)
    dual_active = None
    if dual_clip is not None:
        cap = -adv * dual_clip  # (B, L)
        dual_active = sel & (adv < 0) & (pg.detach() > cap)  # (B, L)
        pg = torch.where(adv < 0, torch.minimum(pg, cap), pg)  # (B, L)
    return torch.where(sel, pg, zero), dual_active


@register_policy_loss("clip")
def _mode_clip(x: ModeInputs, m: LossMode) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    log_ratio = x.log_ratio()  # (B, L)
    ratio = torch.exp(log_ratio)  # (B, L)
    pg, dual_active = clipped_surrogate(ratio, x.adv, x.sel, x.eps_low, x.eps_high, x.dual_clip)
    parts = {"adv": x.adv, "ratio": ratio.detach(), "log_ratio": log_ratio.detach()}
    if dual_active is not None:
        parts["dual_active"] = dual_active
    return pg, parts, {}


@register_policy_loss("gspo")
def _mode_gspo(x: ModeInputs, m: LossMode) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    zero = torch.zeros((), dtype=torch.float32, device=x.logp.device)
    scope = x.sel if m.gspo_tokens == "selected" else x.loss_mask
    tok_lr = x.log_ratio(scope)  # (B, L)
    seq_lr = tok_lr.sum(-1) / scope.sum(-1).clamp(min=1)  # (B,) log s_i, verl's negative_approx_kl_seq
    if m.gspo_tokens == "selected":
        # GSPO-token (verl): value s_i on each token, gradient s_i ∇logp_t through that token only.
        logp = torch.where(x.sel, x.logp, zero)  # (B, L)
        log_s = seq_lr.detach()[:, None] + (logp - logp.detach())  # (B, L)
    else:
        # TRL's sequence form: s_i itself, so every valid token gets gradient through the mean.
        log_s = seq_lr[:, None].expand_as(x.logp)  # (B, L)
    if m.gspo_log_ratio_max is not None:
        log_s = log_s.clamp(max=m.gspo_log_ratio_max)  # verl: clamp(max=10.0) for numerical stability
    s = torch.exp(log_s)  # (B, L)
    pg, dual_active = clipped_surrogate(s, x.adv, x.sel, x.eps_low, x.eps_high, x.dual_clip)
    ratio = torch.exp(x.log_ratio()).detach()  # (B, L) token ratios, for approx_kl
    s = s.detach()
    parts = {"adv": x.adv, "ratio": ratio, "log_ratio": x.log_ratio().detach(), "clip_ratio": s}
    if dual_active is not None:
        parts["dual_active"] = dual_active
    with torch.no_grad():
        clipped = x.sel & (((x.adv < 0) & (s < 1.0 - x.eps_low)) | ((x.adv > 0) & (s > 1.0 + x.eps_high)))
        rows = x.sel.any(-1)  # (B,)
        n_rows = rows.sum().float()
        metrics = {
            "seq_clip_frac": _safe_ratio(clipped.any(-1).sum().float(), n_rows),
            "seq_ratio_mean": _safe_ratio(torch.where(rows, s[:, 0], zero).sum(), n_rows),
        }
    return pg, parts, metrics


@register_policy_loss("cispo")
def _mode_cispo(x: ModeInputs, m: LossMode) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    zero = torch.zeros((), dtype=torch.float32, device=x.logp.device)
    log_ratio = x.log_ratio()  # (B, L)
    ratio = torch.exp(log_ratio).detach()  # (B, L)
    low = 1.0 - x.eps_low if m.cispo_clip_low else None
    weight = ratio.clamp(min=low, max=1.0 + x.eps_high)  # (B, L) sg(clip(r)): no gradient
    logp = torch.where(x.sel, x.logp, zero)  # (B, L)
    pg = torch.where(x.sel, -weight * x.adv * logp, zero)  # (B, L)
    parts = {"adv": x.adv, "ratio": ratio, "log_ratio": log_ratio.detach()}
    with torch.no_grad():
        # verl's pg_clipfrac: ratio != clipped_ratio
        touched = x.sel & (weight != ratio)
        metrics = {"cispo_clip_frac": _safe_ratio(touched.sum().float(), x.sel.sum().float())}
    return pg, parts, metrics


def _safe_ratio(num: Tensor, denom: Tensor) -> Tensor:
    """``num / denom`` for detached metrics, 0 when ``denom`` is 0."""
    return torch.where(denom > 0, num / denom.clamp(min=1.0), torch.zeros_like(num))
