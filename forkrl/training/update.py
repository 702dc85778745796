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
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from forkrl.config.loss import AlgorithmConfig, LossConfig
from forkrl.config.sections import ModelConfig, OptimConfig, RolloutConfig, SelectionConfig
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


@dataclass(frozen=True)
class UpdateSettings:
    """The update's view of the run config: the sections it reads, under the config's own names
    (`s.loss.eps_low`, `s.selection.rho`, `s.optim.mini_batches`), and the few values that several
    settings decide together, named here and computed once by `settings_from`. The math below never
    sees the whole config."""

    model: ModelConfig
    rollout: RolloutConfig
    selection: SelectionConfig
    loss: LossConfig
    algorithm: AlgorithmConfig
    optim: OptimConfig
    max_len: int  # the completion budget (rollout.max_new_tokens, or the task's), for the normalizers
    share_prompt: bool  # model.share_prompt: micro-batches of whole groups, each prompt run once
    reuse_sampler_logprobs: bool  # rollout.reuse_logprobs, with the HF backend only
    # a rollout.dtype copy samples and one optimizer step per RL step: the old log-probs are the
    # update's own, detached (the ratio is exactly 1, as in TRL at num_iterations=1), not the copy's
    old_from_update: bool
    kl_coef: float  # loss.kl_coef; under loss.mode=archer the larger of its per-class coefficients


#: LossMode's options: each is the `loss.*` setting of the same name (forkrl.core.loss_modes)
MODE_OPTIONS = tuple(f.name for f in fields(LossMode) if f.name not in ("name", "group", "generator", "keys"))


def loss_mode(s: UpdateSettings, env: DistEnv) -> LossMode:
    """The settings' policy-loss mode; the covariance modes' statistics span every rank's micro-batch
    when ``loss.cov_across_ranks`` (then every rank calls ``policy_loss`` for each micro-batch)."""
    group = env.group if s.loss.cov_across_ranks and env.enabled else None
    return LossMode(s.loss.mode, group=group, **{k: getattr(s.loss, k) for k in MODE_OPTIONS})


def shape_advantages(adv: Tensor, scored: Scored, s: UpdateSettings, env: DistEnv) -> tuple[Tensor, dict]:
    """The advantages the actor trains on: ``adv`` itself, or with ``entropy_adv_alpha > 0`` Cheng et
    al.'s ``A + min(α·H, |A|/κ)`` on the scoring pass's entropies, ``(B, L)``; and its metrics (over
    every rank's valid tokens). The critic's targets and the dumps keep the unshaped ``adv``."""
    if s.algorithm.entropy_adv_alpha <= 0:
        return adv, {}
    shaped, psi, capped = entropy_shaped_advantages(
        adv,
        scored.entropy,
        scored.loss_mask,
        alpha=s.algorithm.entropy_adv_alpha,
        kappa=s.algorithm.entropy_adv_kappa,
    )
    sums = all_sum(
        torch.stack([psi.double().sum(), capped.sum().double(), scored.loss_mask.sum().double()]), env
    )
    n = max(float(sums[2]), 1.0)
    return shaped, {"entropy_adv_mean": float(sums[0]) / n, "entropy_adv_capped_frac": float(sums[1]) / n}


def group_advantages(rewards: Tensor, group_size: int, s: UpdateSettings) -> Tensor:
    """Per-response outcome advantages ``(B,)`` float32 from the registered group estimator."""
    fn = ADVANTAGES.get(s.algorithm.advantage)
    kw = {"eps": s.algorithm.std_eps} if fn is not None and "eps" in inspect.signature(fn).parameters else {}
    return compute_advantages(s.algorithm.advantage, rewards, group_size, **kw).float()


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
            temperature=s.rollout.temperature,
            selective_head=s.model.selective_head,
            group_size=_group(ro, rows, s.share_prompt),
        )
        logp[rows, :width], entropy[rows, :width] = lp, h
    return logp, entropy


def _scoring_chunks(ro: Rollout, s: UpdateSettings) -> list[slice]:
    """The scoring pass's micro-batches: `micro_batch_size` rows, or with `micro_batch_tokens` > 0
    consecutive rows up to that many tokens (prompt + response, as the update packs them), so that its
    peak memory follows the budget, not the longest response (each chunk is cut to its own longest)."""
    B = ro.response_ids.shape[0]
    if not s.optim.micro_batch_tokens:
        return chunks(B, s.optim.micro_batch_size)
    lengths = (ro.prompt_len + ro.response_mask.sum(-1)).tolist()
    return [slice(p[0], p[-1] + 1) for p in in_order(lengths, s.optim.micro_batch_tokens)]


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
    row_tokens = ro.attention_mask.sum(-1) if s.optim.micro_batch_tokens else None  # (B,) prompt + response
    B = ro.response_ids.shape[0]
    G = ro.group_size if s.share_prompt else 1  # whole groups per micro-batch: their prompts run once
    return layout(
        B,
        s.optim.mini_batches,
        s.optim.micro_batch_size,
        env,
        row_tokens,
        s.optim.micro_batch_tokens,
        s.optim.micro_batch_packing,
        G,
    )


def plan_selection(
    model, scored: Scored, minis: list[MiniBatch], s: UpdateSettings, *, generator, par: Parallel = LOCAL
) -> SelectionPlan:
    """The selection step: the plan registered for (scope, entropy_source) (forkrl.training.selection),
    and the selection it makes before the update: on the scoring pass's entropies ("old", the paper's
    batch-level top rho) all of it, here; on the current weights' ("current") none yet: the update asks
    the plan before each optimizer step (`plan.mini_batch`) and in each forward (`plan.micro_batch`)."""

    def rescore() -> Tensor:  # entropies under the current weights, for (batch, current)
        with par.gathered():
            return score(model, scored.rollout, s)[1]

    plan = make_plan(
        s.selection.scope,
        s.selection.entropy_source,
        entropy=scored.entropy,
        loss_mask=scored.loss_mask,
        s=s,
        generator=generator,
        group=par.env.group if s.selection.across_ranks else None,
        rescore=rescore,
        stochastic_forward=dropout_active(model),
    )
    plan.select_upfront(minis)
    return plan


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
    `plan` selects; `should_stop` gives the update up before its first step (`optimizer_steps`).
    `scored` and `adv` (``(B,)`` or ``(B, L)``) hold this rank's rows (possibly none).

    Each micro-batch: forward (the body; the entropies when the plan selects on them) -> select ->
    policy loss on the selection; `optimizer_steps` runs the backward and the steps, and `MetricSums`
    keeps the metrics apart from the math.

    Data-parallel: with ``loss.aggregate=batch`` the normalizer's counts are over every rank's rows,
    each micro-batch's loss is its share of the global loss, times W because gradients are averaged
    over ranks; with ``micro_batch`` each rank's micro-batch is normalised on its own
    (forkrl.training.optimize).
    """
    env = par.env
    model.train()
    adv, shaping = shape_advantages(adv, scored, s, env)
    agg = Aggregate(s.loss.aggregate, env)
    mode = loss_mode(s, env)
    sums = MetricSums()

    def begin(mini: MiniBatch) -> None:  # before each optimizer step: its selection, when known now
        agg.begin(scored.loss_mask[mini.rows], plan.mini_batch(mini.rows))

    def micro_loss(mini: MiniBatch, rows: slice) -> Tensor | None:
        if n_rows(rows) == 0:  # nothing on this rank: only the collectives of the plan and the loss
            _join_collectives(plan, mode, scored, adv, rows, s)
            return None
        entropy_now, logp_on = _forward(model, scored.rollout, rows, s, plan.needs_forward_entropy)
        sel = plan.micro_batch(rows, entropy_now)  # the tokens that carry the gradient
        loss, m = _policy_loss(logp_on, sel, entropy_now, scored, adv, rows, s, mode, agg)
        weight = agg.weight(rows, mini)
        sums.add(m, loss, share=weight / env.world if env.enabled else weight)  # of the mini-batch's loss
        return loss * weight

    t0 = time.perf_counter()
    grad_norms, skipped = optimizer_steps(
        model,
        optimizer,
        scheduler,
        minis,
        micro_loss,
        grad_clip=s.optim.grad_clip,
        par=par,
        begin=begin,
        should_stop=should_stop,
    )
    out = sums.result(len(minis), plan.record, s, env)
    out.update(shaping)
    out.update(
        grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
        skipped_steps=skipped,
        time_update=time.perf_counter() - t0,
        time_selection=plan.record.time_s,
        lr=scheduler.get_last_lr()[0],
    )
    return out


def _forward(model, ro: Rollout, rows: slice, s: UpdateSettings, need_entropy: bool):
    """The training forward of `rows`: (their entropies when `need_entropy`, else None; a function that
    gives the log-probs at a mask's tokens, so that the selective head scores only those)."""
    with body_autocast(model, s.model.update_dtype):
        return train_logprobs(
            model,
            *_inputs(ro, rows),
            temperature=s.rollout.temperature,
            selective_head=s.model.selective_head,
            need_entropy=need_entropy,
            group_size=_group(ro, rows, s.share_prompt),
        )


def _policy_loss(logp_on, sel, entropy_now, scored: Scored, adv, rows: slice, s: UpdateSettings, mode, agg):
    """The clipped policy loss (and KL) of one micro-batch on `sel`: (loss, its metrics)."""
    lm = scored.loss_mask[rows]
    kl = None  # archer: the mode's own per-token coefficients replace s.kl_coef's value
    if s.kl_coef > 0 and scored.ref_logp is not None:
        kl_norm = None if s.loss.kl_normalizer == "policy" else s.loss.kl_normalizer  # None: the policy's
        kl = KLPenalty(scored.ref_logp[rows], s.kl_coef, s.loss.kl_estimator, normalizer=kl_norm)
    # The KL term acts on every valid token, and gspo over valid tokens needs all their log-probs: the
    # selective head must then score them all.
    every_valid = kl is not None or (s.loss.mode == "gspo" and s.loss.gspo_tokens == "valid")
    logp = logp_on(lm if every_valid else sel)
    return policy_loss(
        logp,
        logp.detach() if s.old_from_update else scored.old_logp[rows],
        adv[rows],
        lm,
        sel,
        eps_low=s.loss.eps_low,
        eps_high=s.loss.eps_high,
        dual_clip=s.loss.dual_clip,
        normalizer=s.loss.normalizer,
        max_len=s.max_len,
        kl=kl,
        entropy=entropy_now if entropy_now is not None else scored.entropy[rows],
        token_counts=agg.counts(lm, sel),
        log_ratio_clamp=s.loss.log_ratio_clamp,
        mode=mode,
    )


def _join_collectives(plan: SelectionPlan, mode: LossMode, scored: Scored, adv, rows: slice, s) -> None:
    """A micro-batch with no rows on this rank still joins the plan's and the loss's collectives."""
    if plan.in_forward:
        plan.micro_batch(rows, scored.entropy[rows])
    if mode.group is not None:  # the covariance modes' statistics span the ranks
        lm, empty = scored.loss_mask[rows], scored.old_logp[rows]
        policy_loss(
            empty,
            empty,
            adv[rows],
            lm,
            lm,
            mode=mode,
            normalizer=s.loss.normalizer,
            max_len=s.max_len,
            entropy=scored.entropy[rows],
        )


class MetricSums:
    """The update's metrics, summed over micro-batches: loss parts and token counts add up over a
    mini-batch's micro-batches (and ranks), so per optimizer step they are sums, averaged over the
    steps; the other diagnostics are means over micro-batches."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0  # micro-batches counted

    def add(self, m: dict, loss: Tensor, share: float) -> None:
        """One micro-batch's metrics; its loss parts scaled by `share`, its part of the mini-batch loss."""
        m["loss"] = loss.detach()
        for k in ("loss", "pg_loss", "kl_loss"):
            if k in m:
                m[k] = m[k] * share
        for k, v in m.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1

    def result(self, n_steps: int, sel: Selection, s: UpdateSettings, env) -> dict:
        sums, n_metric, taus = self.sums, self.n, sel.taus
        if env.enabled:  # over every rank's micro-batches
            parts = all_gather_objects((sums, n_metric, taus), env)
            sums, n_metric = {}, sum(p[1] for p in parts)
            for part in parts:
                for k, v in part[0].items():
                    sums[k] = sums.get(k, 0.0) + v
            if s.selection.scope != "batch" or not s.selection.across_ranks:
                taus = [t for p in parts for t in p[2]]
        n_steps = max(1, n_steps)
        out = {k: v / (n_steps if k in ADDITIVE else max(1, n_metric)) for k, v in sums.items()}
        if sums.get("valid_tokens"):  # the step's share of tokens kept: a ratio of sums, not a mean of ratios
            out["kept_frac"] = sums["selected_tokens"] / sums["valid_tokens"]
        out["tau"] = Selection(sel.sel_mask, taus).tau
        return out
