"""PPO's critic in the RL step: values of the rollout, GAE advantages and returns, the value update.

With ``algorithm.advantage=gae`` the trainer calls this module around the actor's update:

    scored = score_rollout(...)                               # old log-probs and entropies (actor)
    adv, targets, m = critic_targets(critic, scored, rewards)  # V_old, token rewards, GAE: adv (B, L)
    actor_update(actor, scored, adv, plan, ...)               # the selection applies to the actor only
    critic_update(critic, scored, targets, selection, ...)    # clipped value loss, its own AdamW

Which tokens train the critic: every valid response token (``loss_mask``), whatever the actor's
selection. GAE needs a value at every token (each δₜ uses Vₜ and the next token's V), so a critic fit
only on the ~20% forking tokens would leave the other 80% of the values it bootstraps from
untrained. ``algorithm.critic_selection=true`` restricts the value loss to the tokens the actor's
update selected (an ablation); the normalizer is the policy loss's (``loss.normalizer``) either way.

The critic's mini-batches are the actor's (the same layout), one pass per RL step like the actor's
update, through the same loop (``forkrl.training.optimize``: aggregation, accumulation, averaging over
ranks, clipping at ``optim.grad_clip``, skipping non-finite steps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from forkrl.core.advantages import TOKEN_ADVANTAGES, token_rewards, whiten
from forkrl.core.losses import value_loss
from forkrl.models.value import ValueModel
from forkrl.training.dist import (
    LOCAL,
    SINGLE,
    DistEnv,
    Parallel,
    all_max_tensor,
    all_sum,
    apply_fsdp,
    full_model_state,
    full_optimizer_state,
    load_full_optimizer_state,
)
from forkrl.training.forward import response_hidden
from forkrl.training.optimize import Aggregate, MiniBatch, chunks, n_rows, optimizer_steps
from forkrl.training.selection import Selection, select
from forkrl.training.update import Scored, UpdateSettings, _group, score

__all__ = ["Critic", "CriticSettings", "Targets", "build_critic", "critic_targets", "critic_update"]


@dataclass
class CriticSettings:
    """The critic's knobs, copied out of ``cfg.algorithm`` (the math never sees the config)."""

    estimator: str = "gae"
    gamma: float = 1.0
    lam: float = 1.0
    whiten: bool = True
    kl_in_reward: float = 0.0
    value_clip: float | None = 0.2
    warmup: int = 0
    selection: bool = False


@dataclass
class Critic:
    """The value model, its optimizer, and how many RL steps it has trained (checkpointed)."""

    model: ValueModel
    opt: torch.optim.Optimizer
    settings: CriticSettings
    steps: int = 0
    par: Parallel = field(default_factory=lambda: LOCAL)  # its ranks and FSDP2-sharded layers

    def actor_trains(self) -> bool:
        """False during ``algorithm.critic_warmup``: the first steps fit the critic only (verl's
        ``critic_warmup``), so the actor's first advantages do not come from a random head."""
        return self.steps >= self.settings.warmup

    def state_dict(self) -> dict:
        """Optimizer state (gathered when sharded: a collective) and step count."""
        return {"optimizer": full_optimizer_state(self.opt), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        load_full_optimizer_state(self.opt, state["optimizer"])  # full state: any number of ranks
        self.steps = int(state["steps"])

    def full_weights(self) -> dict[str, Tensor] | None:
        """The unsharded weights when sharded (a collective: call on every rank), else None."""
        return full_model_state(self.model) if self.par.fsdp else None


@dataclass
class Targets:
    """The critic's view of one batch: scoring-pass values and GAE returns, ``(B, L)`` float32."""

    values: Tensor
    returns: Tensor


def build_critic(
    cfg, *, policy_path: str | Path, device: str, checkpoint: Path | None = None, par: Parallel = LOCAL
) -> Critic:
    """The critic of a run: from ``checkpoint/critic`` when resuming, else ``algorithm.critic_path``
    or the policy's checkpoint (its body and a fresh value head). With the policy sharded
    (``par.fsdp``), the critic's decoder layers are sharded the same way."""
    a = cfg.algorithm
    path = Path(checkpoint) / "critic" if checkpoint is not None else Path(a.critic_path or policy_path)
    if not path.is_dir():
        what = "the resumed checkpoint's critic" if checkpoint is not None else "algorithm.critic_path"
        raise ValueError(
            f"{what}: {str(path)!r} is not a folder; give a local causal-LM or saved critic folder"
        )
    model = ValueModel.from_pretrained(
        path,
        dtype=getattr(torch, cfg.model.dtype),
        device=device,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    par = Parallel(par.env, apply_fsdp(model) if par.fsdp else [])  # before the optimizer sees the parameters
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=a.critic_lr,
        weight_decay=cfg.optim.weight_decay,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
    )
    settings = CriticSettings(
        estimator=a.advantage,
        gamma=a.gamma,
        lam=a.lam,
        whiten=a.whiten_advantages,
        kl_in_reward=a.kl_in_reward,
        value_clip=a.value_clip or None,
        warmup=a.critic_warmup,
        selection=a.critic_selection,
    )
    return Critic(model, opt, settings, par=par)


def _values(model: ValueModel, ro, rows: slice, s: UpdateSettings) -> Tensor:
    """``V(s_t)`` at the positions that predict response tokens of ``rows``: ``(b, L)`` float32."""
    hidden = response_hidden(
        model,
        ro.input_ids[rows],
        ro.attention_mask[rows],
        ro.prompt_len,
        group_size=_group(ro, rows, s.share_prompt),
    )  # (b, L, d)
    return model.values_from_hidden(hidden)  # (b, L)


def _global_stats(named: dict[str, Tensor], mask: Tensor, env: DistEnv) -> dict[str, float]:
    """Mean, std (unbiased), max and min of each tensor over every rank's valid tokens, from all-reduced
    counts, sums, squares and maxima."""
    sums, peaks = [], []
    for x in named.values():
        v = x[mask].double()
        sums += [v.numel(), v.sum(), v.square().sum()]
        peaks += [v.max() if v.numel() else -torch.inf, -v.min() if v.numel() else -torch.inf]
    tot = all_sum(torch.tensor([float(t) for t in sums], dtype=torch.float64), env)
    top = all_max_tensor(torch.tensor([float(t) for t in peaks], dtype=torch.float64), env)
    out: dict[str, float] = {}
    for i, name in enumerate(named):
        n, sx, sxx = (float(t) for t in tot[3 * i : 3 * i + 3])
        if n == 0:
            continue
        mean = sx / n
        var = max(0.0, (sxx - n * mean * mean) / (n - 1)) if n > 1 else 0.0  # unbiased, as Tensor.std
        out |= {
            f"{name}_mean": mean,
            f"{name}_std": var**0.5,
            f"{name}_max": float(top[2 * i]),
            f"{name}_min": -float(top[2 * i + 1]),
        }
    return out


def _global_explained_variance(values: Tensor, returns: Tensor, mask: Tensor, env: DistEnv) -> float:
    """`forkrl.core.losses.explained_variance` over every rank's valid tokens (biased variances, as there)."""
    r, d = returns[mask].double(), (returns - values)[mask].double()
    n, sr, srr, sd, sdd = (
        float(t)
        for t in all_sum(
            torch.tensor(
                [r.numel(), r.sum(), r.square().sum(), d.sum(), d.square().sum()], dtype=torch.float64
            ),
            env,
        )
    )
    if n == 0:
        return float("nan")
    var_r, var_d = srr / n - (sr / n) ** 2, sdd / n - (sd / n) ** 2
    return 1.0 - var_d / var_r if var_r > 0 else float("nan")


def critic_targets(
    critic: Critic, scored: Scored, rewards: Tensor, s: UpdateSettings, ref_model=None, env: DistEnv = SINGLE
) -> tuple[Tensor, Targets, dict]:
    """Score the rollout with the critic and compute GAE: ``(adv (B, L), targets, metrics)``.

    ``rewards``: ``(B,)`` outcome rewards (after overlong shaping), placed on each row's last valid
    token. With ``kl_in_reward > 0`` each token's reward also pays ``beta · (old_logp − ref_logp)``
    (the reference is scored here if the batch has none).
    """
    t0 = time.perf_counter()
    c, ro, mask = critic.settings, scored.rollout, scored.loss_mask
    critic.model.eval()
    ref_logp = scored.ref_logp
    with torch.no_grad(), critic.par.gathered():  # a data-dependent number of forwards per rank
        parts = [
            _values(critic.model, ro, rows, s)
            for rows in chunks(ro.response_ids.shape[0], s.optim.micro_batch_size)
        ]
        values = torch.cat(parts) if parts else torch.zeros(mask.shape, device=mask.device)  # (B, L)
        if c.kl_in_reward > 0 and ref_logp is None and ref_model is not None:
            ref_logp, _ = score(ref_model, ro, s)
    r = token_rewards(
        rewards.to(mask.device),
        mask,
        old_logp=scored.old_logp,
        ref_logp=ref_logp,
        kl_coef=c.kl_in_reward,
    )  # (B, L)
    adv, returns = TOKEN_ADVANTAGES[c.estimator](r, values, mask, gamma=c.gamma, lam=c.lam)  # (B, L)
    # Whitening and the logged statistics are over every rank's tokens (collectives: all ranks run them).
    reduce = (lambda t: t.copy_(all_sum(t, env))) if env.enabled else None
    trained_adv = whiten(adv, mask, reduce=reduce) if c.whiten else adv  # (B, L)
    m = {
        "value_explained_var": _global_explained_variance(values, returns, mask, env),
        # advantages before whitening: in reward units
        **_global_stats({"values": values, "returns": returns, "adv": adv}, mask, env),
    }
    m["time_critic_scoring"] = time.perf_counter() - t0
    if c.kl_in_reward > 0 and ref_logp is not None:
        kl = (scored.old_logp - ref_logp)[mask].double()
        total, count = (
            float(t) for t in all_sum(torch.tensor([kl.sum(), kl.numel()], dtype=torch.float64), env)
        )
        m["kl_in_reward"] = total / count if count else 0.0
    return trained_adv, Targets(values, returns), m


def critic_update(
    critic: Critic,
    scored: Scored,
    targets: Targets,
    selection: Selection | None,
    minis: list[MiniBatch],
    s: UpdateSettings,
    *,
    generator: torch.Generator,
    env: DistEnv = SINGLE,
) -> dict:
    """One pass of clipped value-loss updates over the batch (the actor's mini- and micro-batches).

    ``selection``: the tokens the actor trained on this step (None when it did not train, during
    ``critic_warmup``), used only with ``algorithm.critic_selection``."""
    t0 = time.perf_counter()
    ro, model, c = scored.rollout, critic.model, critic.settings
    model.train()
    train_mask = scored.loss_mask
    if c.selection:
        if selection is None:  # the actor did not update (critic warmup): its selection on the old entropies
            sel, _ = select(
                scored.entropy, scored.loss_mask, s, generator, per_sequence=s.selection.scope == "sequence"
            )
        else:
            sel = selection.sel_mask
        train_mask = sel & scored.loss_mask
    agg = Aggregate(s.loss.aggregate, env)
    sums = torch.zeros(3, dtype=torch.float64)  # value loss (per step), clipped tokens, tokens

    def micro_loss(mini: MiniBatch, rows: slice) -> Tensor | None:
        if n_rows(rows) == 0:
            return None
        loss, m = value_loss(
            _values(model, ro, rows, s),  # (b, L), with grad
            targets.values[rows],
            targets.returns[rows],
            scored.loss_mask[rows],
            train_mask[rows],
            clip=c.value_clip,
            normalizer=s.loss.normalizer,
            max_len=s.max_len,
            token_counts=agg.counts(scored.loss_mask[rows], train_mask[rows]),
        )
        weight = agg.weight(rows, mini)
        share = weight / env.world if env.enabled else weight
        sums.add_(
            torch.tensor(
                [
                    float(m["value_loss"]) * share,
                    float(m["value_clip_frac"]) * float(m["value_tokens"]),
                    float(m["value_tokens"]),
                ],
                dtype=torch.float64,
            )
        )
        return loss * weight

    def begin(mini: MiniBatch) -> None:
        agg.begin(scored.loss_mask[mini.rows], train_mask[mini.rows])

    grad_norms, skipped = optimizer_steps(
        model, critic.opt, None, minis, micro_loss, grad_clip=s.optim.grad_clip, par=critic.par, begin=begin
    )
    critic.steps += 1
    loss_sum, clip_sum, tok_sum = (float(x) for x in all_sum(sums, env))
    return {
        "value_loss": loss_sum / max(1, len(minis)),
        "value_clip_frac": clip_sum / tok_sum if tok_sum else 0.0,
        "value_grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
        "value_skipped_steps": skipped,
        "critic_lr": critic.opt.param_groups[0]["lr"],
        "time_critic_update": time.perf_counter() - t0,
    }
