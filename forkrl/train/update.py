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

from forkrl.core.advantages import TOKEN_ADVANTAGES, compute_advantages
from forkrl.core.losses import KLPenalty, TokenCounts, policy_loss
from forkrl.core.sampling import overlong_filter_mask
from forkrl.core.selection import select_tokens_with_threshold
from forkrl.rollout.base import Rollout
from forkrl.train.dist import (
    LOCAL,
    DistEnv,
    Parallel,
    all_gather_objects,
    all_sum,
    average_replicated_grads,
    clip_grad_norm,
)
from forkrl.train.forward import scoring_pass, train_logprobs


@dataclass
class Batch:
    """One RL step's training data (rows = sequences)."""

    rollout: Rollout
    loss_mask: Tensor  # (B, L) bool
    adv: Tensor | None  # (B,) float32; (B, L) from the critic for token-level estimators (gae)
    old_logp: Tensor  # (B, L) float32
    entropy: Tensor  # (B, L) float32, scoring pass
    ref_logp: Tensor | None  # (B, L) float32, for the KL penalty
    sel_mask: Tensor | None = None  # (B, L) bool, the tokens the last `update` trained on


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
    adv = None  # token-level estimators (gae) need the critic's values: forkrl.train.critic sets it
    if advantage not in TOKEN_ADVANTAGES:
        adv = compute_advantages(advantage, rewards, ro.group_size).float()  # (B,)
    loss_mask = ro.response_mask.clone()
    if overlong_filter:
        loss_mask = overlong_filter_mask(loss_mask, ro.truncated)
    if s.reuse_sampler_logprobs and ro.sampler_logp is not None and ro.sampler_entropy is not None:
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


def _select(entropy, loss_mask, s: UpdateSettings, generator, per_sequence=False, group=None):
    """(sel_mask, tau as a float: the threshold, averaged over rows for per-sequence selection)."""
    sel, tau = select_tokens_with_threshold(
        entropy,
        loss_mask,
        rho=s.rho,
        rule=s.rule,
        count=s.count,
        per_sequence=per_sequence,
        generator=generator,
        group=group,
    )
    return sel, float(tau.float().nanmean()) if tau.numel() else float("nan")


ADDITIVE = ("loss", "pg_loss", "kl_loss", "valid_tokens", "selected_tokens")


def _mini_batches(B: int, n: int, env: DistEnv) -> list[slice]:
    """The rows of each mini-batch. In one process: ceil(B / n)-row chunks. Across ranks every rank
    runs exactly `n` (its m-th slice of local rows, possibly empty), so all step together."""
    chunks = _chunks(B, math.ceil(B / n)) if B else []
    if env.enabled:
        chunks += [slice(B, B)] * (n - len(chunks))
    return chunks


def _idle_backward(model) -> None:
    """A zero-loss forward and backward through the backbone: the one backward with FSDP2 gradient
    sync on, identical on every rank whatever its micro-batches were, so it reduces what they left."""
    body = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(body, "model", body)
    device = next(model.parameters()).device
    out = inner(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    (out.last_hidden_state.sum() * 0.0).backward()


def update(
    model,
    optimizer,
    scheduler,
    batch: Batch,
    s: UpdateSettings,
    *,
    generator: torch.Generator,
    par: Parallel | None = None,
) -> dict:
    """Mini-batch updates (one optimizer step each) with gradient accumulation over micro-batches.

    Data-parallel (`par`): `batch` holds this rank's rows (possibly none). The batch-scope selection
    and the normalizer's counts are global; each rank's loss is its share of the global loss, scaled
    by the world size because gradients are averaged over ranks.
    """
    par = par or LOCAL
    env = par.env
    ro, B = batch.rollout, batch.rollout.response_ids.shape[0]
    model.train()
    per_seq = s.scope == "sequence"
    group = env.group if not per_seq else None
    t_select = 0.0  # selection, with its collectives across ranks (bench/scaling.py reports it)

    def select(*args, **kwargs):
        nonlocal t_select
        t = time.perf_counter()
        out = _select(*args, **kwargs)
        t_select += time.perf_counter() - t
        return out

    sel_all, tau = None, float("nan")
    sel_used = torch.zeros_like(batch.loss_mask)  # (B, L): recorded for the critic's selection ablation
    if s.entropy_source == "old" and s.scope != "micro_batch":
        sel_all, tau = select(batch.entropy, batch.loss_mask, s, generator, per_sequence=per_seq, group=group)
    sums: dict[str, float] = {}
    n_metric = 0
    taus: list[float] = []
    grad_norms: list[float] = []
    skipped = 0
    t0 = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    minis = _mini_batches(B, s.mini_batches, env)
    for mb in minis:
        if s.entropy_source == "current" and s.scope == "batch":
            with par.gathered():
                _, ent_now = score(model, ro, s)
            sel_all, tau = select(ent_now, batch.loss_mask, s, generator, group=env.group)
        if not math.isnan(tau):
            taus.append(tau)
        micro = _chunks(mb.stop - mb.start, s.micro_batch_size)
        lm = batch.loss_mask[mb]
        sel_mb = sel_all[mb] if sel_all is not None else None
        # Normalizer denominators of the whole mini-batch (over all ranks), so the accumulated
        # micro-batch losses sum to the mini-batch loss. With micro_batch scope the selected count is
        # only known per micro-batch: each is normalised by its own count and weighted 1/n_micro
        # (verl's behaviour).
        totals = all_sum(
            torch.stack(
                [
                    lm.sum().float(),
                    sel_mb.sum().float() if sel_mb is not None else torch.tensor(float("nan")),
                    lm.any(-1).sum().float(),
                ]
            ),
            env,
        )
        counts = TokenCounts(valid=totals[0], selected=totals[1], sequences=totals[2])
        optimizer.zero_grad(set_to_none=True)
        # FSDP2: on leaving, every rank's one synced backward reduce-scatters the gradients
        with par.accumulating(lambda: _idle_backward(model)):
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
                    sel_mu, tau_mu = select(ent_mu, lm_mu, s, generator, per_sequence=per_seq)
                    if not math.isnan(tau_mu):
                        taus.append(tau_mu)
                    local = sel_mu.sum().float() * len(micro)
                    mu_counts = TokenCounts(counts.valid, local, counts.sequences)
                sel_used[rows] = sel_mu
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
                (loss * env.world if env.enabled else loss).backward()
                m["loss"] = loss.detach()
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n_metric += 1
        average_replicated_grads(params, env)
        gn = clip_grad_norm(params, s.grad_clip, env)
        if not torch.isfinite(gn):
            skipped += 1  # a NaN/inf gradient must not reach the weights (the norm is global: all ranks skip)
            optimizer.zero_grad(set_to_none=True)
            continue
        grad_norms.append(float(gn))
        optimizer.step()
        scheduler.step()
    batch.sel_mask = sel_used
    if env.enabled:  # metrics over every rank's micro-batches
        parts = all_gather_objects((sums, n_metric, taus), env)
        sums, n_metric = {}, sum(p[1] for p in parts)
        for part in parts:
            for k, v in part[0].items():
                sums[k] = sums.get(k, 0.0) + v
        if s.scope != "batch":
            taus = [t for p in parts for t in p[2]]
    # Loss parts and token counts add up over a mini-batch's micro-batches (and ranks): per optimizer
    # step they are sums, averaged over the steps; the other diagnostics are means over micro-batches.
    n_steps = max(1, len(minis))
    out = {k: v / (n_steps if k in ADDITIVE else max(1, n_metric)) for k, v in sums.items()}
    if sums.get("valid_tokens"):  # the step's share of tokens kept: a ratio of sums, not a mean of ratios
        out["kept_frac"] = sums["selected_tokens"] / sums["valid_tokens"]
    out.update(
        tau=sum(taus) / len(taus) if taus else float("nan"),
        grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
        skipped_steps=skipped,
        time_update=time.perf_counter() - t0,
        time_selection=t_select,
        lr=scheduler.get_last_lr()[0],
    )
    return out
