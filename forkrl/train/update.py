"""From experience to a parameter update: advantages, scoring pass, selection, clipped updates.

Follows the data flow of DESIGN.md. Selection conventions (all selectable):
- scope `batch`: rho is taken over every valid response token of the RL batch (the paper's tau_rho^B);
  `micro_batch`: inside each micro-batch (the verl fork and TRL); `sequence`: row by row.
- entropy_source `old`: the scoring pass's entropies; `current`: recomputed under the parameters being
  updated (in the training forward for `micro_batch`/`sequence`; by a no-grad pass over the whole batch
  before each optimizer step for `batch`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from forkrl.core.advantages import compute_advantages
from forkrl.core.losses import KLPenalty, TokenCounts, policy_loss
from forkrl.core.sampling import overlong_filter_mask
from forkrl.core.selection import select_tokens_with_threshold
from forkrl.rollout.hf import Rollout
from forkrl.train.forward import scoring_pass, train_logprobs


@dataclass
class Batch:
    """One RL step's training data (rows = sequences)."""

    rollout: Rollout
    loss_mask: Tensor  # (B, L) bool
    adv: Tensor  # (B,) float32
    old_logp: Tensor  # (B, L) float32
    entropy: Tensor  # (B, L) float32, scoring pass
    ref_logp: Tensor | None  # (B, L) float32, for the KL penalty


@dataclass
class UpdateSettings:
    """The knobs of the update, copied out of the run config (the math below never sees the config)."""

    temperature: float
    selective_head: bool
    share_prompt: bool
    reuse_sampler_logprobs: bool
    rho: float
    rule: str
    count: str
    scope: str
    entropy_source: str
    eps_low: float
    eps_high: float
    dual_clip: float | None
    normalizer: str
    kl_coef: float
    kl_estimator: str
    mini_batches: int
    micro_batch_size: int
    grad_clip: float
    max_len: int


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _inputs(ro: Rollout, rows: slice):
    return ro.input_ids[rows], ro.attention_mask[rows], ro.prompt_len, ro.response_ids[rows]


def _group(ro: Rollout, rows: slice, share_prompt: bool) -> int:
    """G when `rows` holds whole groups (their prompt can run once per group), else 1."""
    G = ro.group_size
    whole = rows.start % G == 0 and (rows.stop - rows.start) % G == 0
    return G if share_prompt and whole else 1


@torch.no_grad()
def score(model, ro: Rollout, s: UpdateSettings):
    """Scoring pass over the whole rollout in micro-batches: (logp, entropy), each (B, L) float32."""
    parts = [
        scoring_pass(
            model,
            *_inputs(ro, rows),
            temperature=s.temperature,
            selective_head=s.selective_head,
            group_size=_group(ro, rows, s.share_prompt),
        )
        for rows in _chunks(ro.response_ids.shape[0], s.micro_batch_size)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def prepare(
    model,
    ref_model,
    ro: Rollout,
    rewards: Tensor,
    *,
    advantage: str,
    overlong_filter: bool,
    s: UpdateSettings,
) -> Batch:
    """Advantages per group and the no-grad scoring pass (old log-probs and entropies)."""
    adv = compute_advantages(advantage, rewards, ro.group_size).float()  # (B,)
    loss_mask = ro.response_mask.clone()
    if overlong_filter:
        loss_mask = overlong_filter_mask(loss_mask, ro.truncated)
    if s.reuse_sampler_logprobs and ro.sampler_logp is not None:
        # The sampler ran this very model at temperature T: its log-probs and entropies are the
        # scoring pass's (tests/train/test_forward.py checks they agree), so the pass is skipped.
        old_logp, entropy = ro.sampler_logp, ro.sampler_entropy
    else:
        was_training = model.training
        model.eval()  # no dropout in the scoring pass, so old_logp matches the sampler
        old_logp, entropy = score(model, ro, s)
        model.train(was_training)
    ref_logp = None
    if s.kl_coef > 0 and ref_model is not None:
        ref_logp, _ = score(ref_model, ro, s)
    return Batch(ro, loss_mask, adv, old_logp, entropy, ref_logp)


def _select(entropy, loss_mask, s: UpdateSettings, generator, per_sequence=False):
    """(sel_mask, tau as a float: the threshold, averaged over rows for per-sequence selection)."""
    sel, tau = select_tokens_with_threshold(
        entropy,
        loss_mask,
        rho=s.rho,
        rule=s.rule,
        count=s.count,
        per_sequence=per_sequence,
        generator=generator,
    )
    return sel, float(tau.float().nanmean()) if tau.numel() else float("nan")


def update(
    model, optimizer, scheduler, batch: Batch, s: UpdateSettings, *, generator: torch.Generator
) -> dict:
    """Mini-batch updates (one optimizer step each) with gradient accumulation over micro-batches."""
    ro, B = batch.rollout, batch.rollout.response_ids.shape[0]
    model.train()
    per_seq = s.scope == "sequence"
    sel_all, tau = None, float("nan")
    if s.entropy_source == "old" and s.scope != "micro_batch":
        sel_all, tau = _select(batch.entropy, batch.loss_mask, s, generator, per_sequence=per_seq)
    sums: dict[str, float] = {}
    n_metric = 0
    taus: list[float] = []
    grad_norms: list[float] = []
    skipped = 0
    t0 = time.perf_counter()
    mb_size = math.ceil(B / s.mini_batches)
    for mb in _chunks(B, mb_size):
        if s.entropy_source == "current" and s.scope == "batch":
            _, ent_now = score(model, ro, s)
            sel_all, tau = _select(ent_now, batch.loss_mask, s, generator)
        if not math.isnan(tau):
            taus.append(tau)
        micro = _chunks(mb.stop - mb.start, s.micro_batch_size)
        lm = batch.loss_mask[mb]
        sel_mb = sel_all[mb] if sel_all is not None else None
        # Normalizer denominators of the whole mini-batch, so the accumulated micro-batch losses sum
        # to the mini-batch loss. With micro_batch scope the selected count is only known per
        # micro-batch: each is normalised by its own count and weighted 1/n_micro (verl's behaviour).
        counts = TokenCounts(
            valid=lm.sum().float(),
            selected=sel_mb.sum().float() if sel_mb is not None else float("nan"),
            sequences=lm.any(-1).sum().float(),
        )
        optimizer.zero_grad(set_to_none=True)
        for mu in micro:
            rows = slice(mb.start + mu.start, mb.start + mu.stop)
            lm_mu = batch.loss_mask[rows]
            need_ent = s.entropy_source == "current" and s.scope != "batch"
            ent_now, finish = train_logprobs(
                model,
                *_inputs(ro, rows),
                temperature=s.temperature,
                selective_head=s.selective_head,
                need_entropy=need_ent,
                group_size=_group(ro, rows, s.share_prompt),
            )
            ent_mu = ent_now if need_ent else batch.entropy[rows]
            mu_counts = counts
            if sel_all is not None:
                sel_mu = sel_all[rows]
            else:  # micro_batch scope, or sequence scope with current entropies
                sel_mu, tau_mu = _select(ent_mu, lm_mu, s, generator, per_sequence=per_seq)
                if not math.isnan(tau_mu):
                    taus.append(tau_mu)
                local = sel_mu.sum().float() * len(micro)
                mu_counts = TokenCounts(counts.valid, local, counts.sequences)
            logp = finish(sel_mu)
            kl = None
            if s.kl_coef > 0 and batch.ref_logp is not None:
                kl = KLPenalty(batch.ref_logp[rows], s.kl_coef, estimator=s.kl_estimator)
            loss, m = policy_loss(
                logp,
                batch.old_logp[rows],
                batch.adv[rows],
                lm_mu,
                sel_mu,
                eps_low=s.eps_low,
                eps_high=s.eps_high,
                dual_clip=s.dual_clip,
                normalizer=s.normalizer,
                max_len=s.max_len,
                kl=kl,
                entropy=ent_mu,
                token_counts=mu_counts,
            )
            loss.backward()
            m["loss"] = loss.detach()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_metric += 1
        params = [p for p in model.parameters() if p.grad is not None]
        gn = torch.nn.utils.clip_grad_norm_(params, s.grad_clip if s.grad_clip > 0 else float("inf"))
        if not torch.isfinite(gn):
            skipped += 1  # a NaN/inf gradient must not reach the weights
            optimizer.zero_grad(set_to_none=True)
            continue
        grad_norms.append(float(gn))
        optimizer.step()
        scheduler.step()
    out = {k: v / max(1, n_metric) for k, v in sums.items()}
    if sums.get("valid_tokens"):  # the step's share of tokens kept: a ratio of sums, not a mean of ratios
        out["kept_frac"] = sums["selected_tokens"] / sums["valid_tokens"]
    out.update(
        tau=sum(taus) / len(taus) if taus else float("nan"),
        grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
        skipped_steps=skipped,
        time_update=time.perf_counter() - t0,
        lr=scheduler.get_last_lr()[0],
    )
    return out
