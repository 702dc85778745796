"""The scoring pass, the selection plan and the actor's clipped updates of one RL step.

DESIGN.md's boxes, each a function returning a value the next one takes:

    score_rollout(model, ref, rollout, s)   -> Scored      old log-probs, entropies (no grad)
    plan_selection(scored, s, ...)          -> SelectionPlan   which tokens carry the gradient
    actor_update(model, ..., scored, adv, plan, s) -> metrics   mini/micro-batch clipped updates

`plan.record` is the `Selection` that trained; the critic, the metrics and the dumps read it.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from forkrl.core.advantages import ADVANTAGES, compute_advantages, entropy_shaped_advantages
from forkrl.core.losses import KLPenalty, LossMode, policy_loss
from forkrl.core.packing import in_order
from forkrl.core.sampling import overlong_filter_mask
from forkrl.models.lora import AdaptersOff
from forkrl.rollout.base import Rollout
from forkrl.training.dist import LOCAL, DistEnv, Parallel, all_gather_objects, all_sum
from forkrl.training.forward import body_autocast, scoring_pass, train_logprobs
from forkrl.training.optimize import Aggregate, MiniBatch, chunks, layout, n_rows, optimizer_steps
from forkrl.training.selection import Selection, SelectionPlan, make_plan


@dataclass
class Scored:
    """A rollout after the scoring pass (rows = sequences): everything the update treats as constant."""

    rollout: Rollout
    loss_mask: Tensor  # (B, L) bool
    old_logp: Tensor  # (B, L) float32
    entropy: Tensor  # (B, L) float32, scoring pass
    ref_logp: Tensor | None  # (B, L) float32, for the KL penalty (or the critic's KL-in-reward)


@dataclass
class UpdateSettings:
    """The knobs of the update, copied out of the run config (the math below never sees the config)."""

    temperature: float
    selective_head: bool
    share_prompt: bool
    update_dtype: str  # the body's autocast dtype in the training forward (model.update_dtype)
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
    across_ranks: bool = True
    log_ratio_clamp: float | None = 20.0
    aggregate: str = "batch"
    kl_normalizer: str | None = None  # None: with the policy terms
    micro_batch_tokens: int = 0
    micro_batch_packing: str = "in_order"
    advantage: str = "grpo"
    std_eps: float = 1e-6
    loss_mode: str = "clip"  # the policy-loss mode and its options (forkrl.core.loss_modes)
    gspo_tokens: str = "selected"
    gspo_log_ratio_max: float | None = 10.0
    cispo_clip_low: bool = True
    cov_ratio: float = 2e-4
    reuse_entropy: bool = True  # entropy_source=current: the first mini-batch selects on the scored entropies
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_coef: float = 1.0
    cov_across_ranks: bool = True
    archer_quantile: float = 0.8
    archer_tokens: str = "selected"
    archer_low_eps: tuple[float, float] = (0.2, 0.2)  # (eps_low, eps_high) of low-entropy tokens
    archer_high_eps: tuple[float, float] = (0.5, 0.5)
    archer_kl_coef_low: float = 0.001
    archer_kl_coef_high: float = 0.0
    entropy_adv_alpha: float = 0.0  # Cheng et al.'s entropy-shaped advantage; 0 = off
    entropy_adv_kappa: float = 2.0


def loss_mode(s: UpdateSettings, env: DistEnv) -> LossMode:
    """The settings' policy-loss mode; the covariance modes' statistics span every rank's micro-batch
    when ``cov_across_ranks`` (then every rank calls ``policy_loss`` for each micro-batch)."""
    return LossMode(
        s.loss_mode,
        seq_tokens=s.gspo_tokens,
        seq_log_ratio_max=s.gspo_log_ratio_max,
        cispo_clip_low=s.cispo_clip_low,
        cov_ratio=s.cov_ratio,
        cov_lb=s.clip_cov_lb,
        cov_ub=s.clip_cov_ub,
        kl_cov_coef=s.kl_cov_coef,
        cov_scope="batch" if s.cov_across_ranks else "rank",
        group=env.group if s.cov_across_ranks and env.enabled else None,
        ent_quantile=s.archer_quantile,
        ent_tokens=s.archer_tokens,
        low_ent_clip=s.archer_low_eps,
        high_ent_clip=s.archer_high_eps,
        low_ent_kl_coef=s.archer_kl_coef_low,
        high_ent_kl_coef=s.archer_kl_coef_high,
    )


def shape_advantages(adv: Tensor, scored: Scored, s: UpdateSettings, env: DistEnv) -> tuple[Tensor, dict]:
    """The advantages the actor trains on: ``adv`` itself, or with ``entropy_adv_alpha > 0`` Cheng et
    al.'s ``A + min(α·H, |A|/κ)`` on the scoring pass's entropies, ``(B, L)``; and its metrics (over
    every rank's valid tokens). The critic's targets and the dumps keep the unshaped ``adv``."""
    if s.entropy_adv_alpha <= 0:
        return adv, {}
    shaped, psi, capped = entropy_shaped_advantages(
        adv, scored.entropy, scored.loss_mask, alpha=s.entropy_adv_alpha, kappa=s.entropy_adv_kappa
    )
    sums = all_sum(
        torch.stack([psi.double().sum(), capped.sum().double(), scored.loss_mask.sum().double()]), env
    )
    n = max(float(sums[2]), 1.0)
    return shaped, {"entropy_adv_mean": float(sums[0]) / n, "entropy_adv_capped_frac": float(sums[1]) / n}


def group_advantages(rewards: Tensor, group_size: int, s: UpdateSettings) -> Tensor:
    """Per-response outcome advantages ``(B,)`` float32 from the registered group estimator."""
    fn = ADVANTAGES.get(s.advantage)
    kw = {"eps": s.std_eps} if fn is not None and "eps" in inspect.signature(fn).parameters else {}
    return compute_advantages(s.advantage, rewards, group_size, **kw).float()


def _inputs(ro: Rollout, rows: slice):
    return ro.input_ids[rows], ro.attention_mask[rows], ro.prompt_len, ro.response_ids[rows]


def _group(ro: Rollout, rows, share_prompt: bool) -> int:
    """G when `rows` (a slice) holds whole groups (their prompt can run once per group), else 1."""
    G = ro.group_size
    whole = isinstance(rows, slice) and rows.start % G == 0 and (rows.stop - rows.start) % G == 0
    return G if share_prompt and whole else 1


@torch.no_grad()
def score(model, ro: Rollout, s: UpdateSettings):
    """Scoring pass over the whole rollout in micro-batches: (logp, entropy), each (B, L) float32.

    `model` may be `forkrl.models.lora.AdaptersOff` (the reference of a LoRA policy): the policy with
    its adapters disabled for the pass."""
    if isinstance(model, AdaptersOff):
        with model.active() as base:
            return score(base, ro, s)
    B, L = ro.response_ids.shape
    logp = torch.zeros(B, L, device=ro.response_ids.device)
    entropy = torch.zeros_like(logp)
    for rows in _scoring_chunks(ro, s):
        width = int(ro.response_mask[rows].sum(-1).max()) if rows.stop > rows.start else 0
        if width == 0:
            continue
        ids, attn, P, resp = _inputs(ro, rows)  # cut to this chunk's longest response
        lp, h = scoring_pass(
            model,
            ids[:, : P + width],
            attn[:, : P + width],
            P,
            resp[:, :width],
            temperature=s.temperature,
            selective_head=s.selective_head,
            group_size=_group(ro, rows, s.share_prompt),
        )
        logp[rows, :width], entropy[rows, :width] = lp, h
    return logp, entropy


def _scoring_chunks(ro: Rollout, s: UpdateSettings) -> list[slice]:
    """The scoring pass's micro-batches: `micro_batch_size` rows, or with `micro_batch_tokens` > 0
    consecutive rows up to that many tokens (prompt + response, as the update packs them), so that its
    peak memory follows the budget, not the longest response (each chunk is cut to its own longest)."""
    B = ro.response_ids.shape[0]
    if not s.micro_batch_tokens:
        return chunks(B, s.micro_batch_size)
    lengths = (ro.prompt_len + ro.response_mask.sum(-1)).tolist()
    return [slice(p[0], p[-1] + 1) for p in in_order(lengths, s.micro_batch_tokens)]


def dropout_active(model) -> bool:
    """Whether `model`'s training forward is stochastic: a dropout module, or an attention dropout
    (transformers' attention modules keep it as a float), with p > 0. Its current entropies then differ
    from the scoring pass's (which runs in eval mode) even at the same weights."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        for name in ("attention_dropout", "attn_dropout", "dropout"):
            p = getattr(m, name, None)
            if isinstance(p, float) and p > 0:
                return True
    return False


def score_rollout(model, ref_model, ro: Rollout, s: UpdateSettings, *, overlong_filter: bool) -> Scored:
    """The no-grad scoring pass: old log-probs and entropies (and the reference's log-probs for KL)."""
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
    return Scored(ro, loss_mask, old_logp, entropy, ref_logp)


def update_layout(scored: Scored, s: UpdateSettings, env: DistEnv) -> list[MiniBatch]:
    """The update's mini- and micro-batches (the same for the actor and the critic)."""
    ro = scored.rollout
    row_tokens = ro.attention_mask.sum(-1) if s.micro_batch_tokens else None  # (B,) prompt + response
    B = ro.response_ids.shape[0]
    G = ro.group_size if s.share_prompt else 1  # whole groups per micro-batch: their prompts run once
    return layout(
        B, s.mini_batches, s.micro_batch_size, env, row_tokens, s.micro_batch_tokens, s.micro_batch_packing, G
    )


def plan_selection(
    model, scored: Scored, minis: list[MiniBatch], s: UpdateSettings, *, generator, par: Parallel = LOCAL
) -> SelectionPlan:
    """The selection step: the plan registered for (scope, entropy_source) (forkrl.training.selection)."""

    def rescore() -> Tensor:  # entropies under the current weights, for (batch, current)
        with par.gathered():
            return score(model, scored.rollout, s)[1]

    return make_plan(
        s.scope,
        s.entropy_source,
        entropy=scored.entropy,
        loss_mask=scored.loss_mask,
        layout=minis,
        s=s,
        generator=generator,
        group=par.env.group if s.across_ranks else None,
        rescore=rescore,
        stochastic_forward=dropout_active(model),
    )


ADDITIVE = ("loss", "pg_loss", "kl_loss", "valid_tokens", "selected_tokens")


def actor_update(
    model,
    optimizer,
    scheduler,
    scored: Scored,
    adv: Tensor,
    plan: SelectionPlan,
    minis: list[MiniBatch],
    s: UpdateSettings,
    *,
    par: Parallel = LOCAL,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """One optimizer step per mini-batch, gradients accumulated over its micro-batches, on the tokens
    `plan` selects; `should_stop` gives the update up before its first step (`optimizer_steps`). `scored` and `adv` (``(B,)`` or ``(B, L)``) hold this rank's rows (possibly none).

    Data-parallel: with ``loss.aggregate=batch`` the normalizer's counts are over every rank's rows,
    each micro-batch's loss is its share of the global loss, times W because gradients are averaged
    over ranks; with ``micro_batch`` each rank's micro-batch is normalised on its own
    (forkrl.training.optimize).
    """
    env = par.env
    ro = scored.rollout
    model.train()
    adv, shaping = shape_advantages(adv, scored, s, env)
    agg = Aggregate(s.aggregate, env)
    mode = loss_mode(s, env)
    # gspo over every valid token: its sequence ratio needs their log-probs, as the KL term does
    gspo_valid = s.loss_mode == "gspo" and s.gspo_tokens == "valid"
    sums: dict[str, float] = {}
    n_metric = 0

    def begin(mini: MiniBatch) -> None:
        agg.begin(scored.loss_mask[mini.rows], plan.mini_batch(mini.rows))

    def micro_loss(mini: MiniBatch, rows: slice) -> Tensor | None:
        nonlocal n_metric
        lm = scored.loss_mask[rows]
        if n_rows(rows) == 0:  # nothing on this rank: only the plan's collectives
            if plan.in_forward:
                plan.micro_batch(rows, scored.entropy[rows])
            if mode.group is not None:  # the loss's own collectives (the covariance modes), on no rows
                empty = scored.old_logp[rows]
                policy_loss(
                    empty,
                    empty,
                    adv[rows],
                    lm,
                    lm,
                    mode=mode,
                    normalizer=s.normalizer,
                    max_len=s.max_len,
                    entropy=scored.entropy[rows],
                )
            return None
        with body_autocast(model, s.update_dtype):
            ent_now, finish = train_logprobs(
                model,
                *_inputs(ro, rows),
                temperature=s.temperature,
                selective_head=s.selective_head,
                need_entropy=plan.needs_forward_entropy,
                group_size=_group(ro, rows, s.share_prompt),
            )
        sel = plan.micro_batch(rows, ent_now)
        kl = None  # archer: the mode's own per-token coefficients replace s.kl_coef's value
        if s.kl_coef > 0 and scored.ref_logp is not None:
            kl = KLPenalty(scored.ref_logp[rows], s.kl_coef, s.kl_estimator, normalizer=s.kl_normalizer)
        # The KL term acts on every valid token: the selective head must then score them all.
        loss, m = policy_loss(
            finish(lm if kl is not None or gspo_valid else sel),
            scored.old_logp[rows],
            adv[rows],
            lm,
            sel,
            eps_low=s.eps_low,
            eps_high=s.eps_high,
            dual_clip=s.dual_clip,
            normalizer=s.normalizer,
            max_len=s.max_len,
            kl=kl,
            entropy=ent_now if ent_now is not None else scored.entropy[rows],
            token_counts=agg.counts(lm, sel),
            log_ratio_clamp=s.log_ratio_clamp,
            mode=mode,
        )
        weight = agg.weight(rows, mini)
        m["loss"] = loss.detach()
        share = weight / env.world if env.enabled else weight  # of the mini-batch loss (a mean over ranks)
        for k in ("loss", "pg_loss", "kl_loss"):
            if k in m:
                m[k] = m[k] * share
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n_metric += 1
        return loss * weight

    t0 = time.perf_counter()
    grad_norms, skipped = optimizer_steps(
        model,
        optimizer,
        scheduler,
        minis,
        micro_loss,
        grad_clip=s.grad_clip,
        par=par,
        begin=begin,
        should_stop=should_stop,
    )
    out = _metrics(sums, n_metric, len(minis), plan.record, s, env)
    out.update(shaping)
    out.update(
        grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
        skipped_steps=skipped,
        time_update=time.perf_counter() - t0,
        time_selection=plan.record.time_s,
        lr=scheduler.get_last_lr()[0],
    )
    return out


def _metrics(sums: dict, n_metric: int, n_steps: int, sel: Selection, s: UpdateSettings, env) -> dict:
    """Loss parts and token counts add up over a mini-batch's micro-batches (and ranks): per optimizer
    step they are sums, averaged over the steps; the other diagnostics are means over micro-batches."""
    taus = sel.taus
    if env.enabled:  # over every rank's micro-batches
        parts = all_gather_objects((sums, n_metric, taus), env)
        sums, n_metric = {}, sum(p[1] for p in parts)
        for part in parts:
            for k, v in part[0].items():
                sums[k] = sums.get(k, 0.0) + v
        if s.scope != "batch" or not s.across_ranks:
            taus = [t for p in parts for t in p[2]]
    n_steps = max(1, n_steps)
    out = {k: v / (n_steps if k in ADDITIVE else max(1, n_metric)) for k, v in sums.items()}
    if sums.get("valid_tokens"):  # the step's share of tokens kept: a ratio of sums, not a mean of ratios
        out["kept_frac"] = sums["selected_tokens"] / sums["valid_tokens"]
    out["tau"] = Selection(sel.sel_mask, taus).tau
    return out


def update(
    model, optimizer, scheduler, scored: Scored, adv: Tensor, s: UpdateSettings, *, generator, par=None
):
    """Selection and the actor's update in one call (for scripts and tests): (metrics, Selection)."""
    par = par or LOCAL
    minis = update_layout(scored, s, par.env)
    plan = plan_selection(model, scored, minis, s, generator=generator, par=par)
    m = actor_update(model, optimizer, scheduler, scored, adv, plan, minis, s, par=par)
    return m, plan.record
