"""One RL step, in DESIGN.md's data flow order; the only place that knows that order.

    prompts -> rollout -> rewards -> group filter -> advantages -> scoring pass -> selection -> update

`rl_step(run)` runs it on a `Run` (`forkrl.training.setup`) and returns the step's metrics; the loop
around it (evaluation, log, checkpoints, signals) is `forkrl.training.trainer.Trainer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from functools import partial
from pathlib import Path

import torch

from forkrl.config import Config
from forkrl.models.lora import is_peft, merged_state
from forkrl.rollout.hf import decode_threads, lean_decoding, torch_threads
from forkrl.training.critic import critic_targets, critic_update
from forkrl.training.dist import LOCAL, Parallel, all_sum, full_model_state
from forkrl.training.dump import dump_step, mode_columns
from forkrl.training.memory import update_heap
from forkrl.training.rollouts import collect, empty_rollout
from forkrl.training.selection import Selection
from forkrl.training.setup import Run
from forkrl.training.update import (
    Scored,
    UpdateSettings,
    actor_update,
    group_advantages,
    plan_selection,
    score_rollout,
    update_layout,
)


def rl_step(run: Run, dump_path: Path | None = None) -> dict:
    """One RL step of DESIGN.md's data flow; returns its metrics."""
    cfg, s, par, t0 = run.cfg, run.settings, run.par, time.perf_counter()
    exp = _collect(run)  # rollout, rewards, group filter
    m = dict(exp.stats)
    rollout = exp.rollout
    if rollout is None and not par.env.enabled:
        return _timed(m, t0)
    if rollout is None:  # this rank kept no group; it still joins the update's collectives
        rollout = empty_rollout(cfg.rollout.group_size, next(run.model.parameters()).device)
    t_score = time.perf_counter()
    scored = _score(run, rollout)  # old log-probs, entropies
    m["time_scoring"] = time.perf_counter() - t_score
    m["entropy_mean"] = _mean_entropy(scored, par.env)
    adv, targets = _advantages(run, scored, exp.rewards, m)  # per group, or GAE from the critic
    actor, selection, minis = select_and_train(  # selection, then the clipped update on it
        run.model,
        run.opt,
        run.sched,
        scored,
        adv,
        s,
        generator=run.gen,
        par=par,
        train=run.critic is None or run.critic.actor_trains(),  # PPO: not during the critic's warmup
        should_stop=partial(run.stop.requested, par.env),  # a signal: asked until the first optimizer step
        heap=(cfg.train.mmap_threshold_mib, cfg.train.update_mmap_threshold_mib),  # forkrl.training.memory
    )
    m.update(actor)
    if run.critic is not None:
        m.update(
            critic_update(run.critic, scored, targets, selection, minis, s, generator=run.gen, env=par.env)
        )
    m["tokens"] = int(all_sum(scored.loss_mask.sum(), par.env))
    if dump_path is not None:  # on every rank: the dump's covariance may span them
        _dump(run, dump_path, exp, scored, adv, selection)
    return _timed(m, t0)


def select_and_train(
    model,
    opt,
    sched,
    scored: Scored,
    adv,
    s: UpdateSettings,
    *,
    generator,
    par: Parallel = LOCAL,
    train: bool = True,
    should_stop=None,
    heap: tuple[int, int] = (0, 0),
) -> tuple[dict, Selection | None, list]:
    """The step's selection and the actor's update on it: (the update's metrics, the `Selection` that
    trained or None when `train` is off, the mini-batches). The selection is planned either way, so
    that its random draws are the same with and without the update (PPO's critic warmup)."""
    minis = update_layout(scored, s, par.env)  # mini/micro-batches
    plan = plan_selection(model, scored, minis, s, generator=generator, par=par)  # which tokens train
    if not train:
        return {}, None, minis
    with update_heap(*heap):
        metrics = actor_update(
            model, opt, sched, scored, adv, plan, minis, s, par=par, should_stop=should_stop
        )
    return metrics, plan.record, minis


def _timed(m: dict, t0: float) -> dict:
    m["time_step"] = time.perf_counter() - t0
    m["tokens_per_s"] = m.get("tokens", 0) / m["time_step"]
    return m


def _score(run: Run, rollout) -> Scored:
    with run.par.gathered():
        return score_rollout(
            run.model, run.ref_model, rollout, run.settings, overlong_filter=run.cfg.sampling.overlong_filter
        )


def _mean_entropy(scored: Scored, env) -> float:
    ent = all_sum(
        torch.stack([scored.entropy[scored.loss_mask].double().sum(), scored.loss_mask.sum().double()]), env
    )
    return float(ent[0] / ent[1]) if ent[1] > 0 else float("nan")


def _advantages(run: Run, scored: Scored, rewards, m: dict):
    """(adv, critic targets): per-group outcome advantages (B,), or the critic's GAE (B, L) for PPO."""
    if run.critic is None:
        adv = group_advantages(rewards, scored.rollout.group_size, run.settings)
        return adv.to(scored.loss_mask.device), None
    adv, targets, cm = critic_targets(run.critic, scored, rewards, run.settings, run.ref_model, run.par.env)
    m.update(cm)
    return adv, targets


def _dump(run: Run, path: Path, exp, scored: Scored, adv, selection) -> None:
    """The step's rollouts with the selection that trained (None during critic warmup: nothing did)."""
    env, cfg = run.par.env, run.cfg
    if env.enabled:  # one file per rank
        path = path.with_name(f"{path.stem}.rank{env.rank}{path.suffix}")
    sel_mask = selection.sel_mask if selection is not None else torch.zeros_like(scored.loss_mask)
    cov, acted, mode_meta = mode_columns(scored, adv, sel_mask, run.settings, env)  # collectives
    if exp.rollout is None:  # this rank kept no group: nothing to write
        return
    dump_step(
        path,
        run.tokenizer,
        scored,
        adv,
        sel_mask,
        step=int(path.stem.split(".")[0].split("_")[-1]),
        rewards=exp.rewards,
        prompts=[e.prompt for e in exp.examples for _ in range(cfg.rollout.group_size)],
        cov=cov,
        acted=acted,
        meta={**dataclasses.asdict(cfg.selection), **mode_meta},
        show=cfg.train.log_completions if env.main else 0,
        log_path=run.run_dir / "train.log",
    )


@contextlib.contextmanager
def decoding(model, cfg: Config):
    """Generation settings: torch threads on CPU (`rollout.threads`), the lean decode step or not."""
    threads = decode_threads(model, cfg.rollout.threads, cfg.train.threads)
    with torch_threads(threads, next(model.parameters()).device), lean_decoding(cfg.rollout.lean_decode):
        yield


def _collect(run: Run):
    cfg = run.cfg
    sync_sampler(run)  # the policy as the last step left it
    # generation: a different number of forwards on each rank; nothing a checkpoint holds changes here
    with run.stop.abortable(), run.par.gathered(), decoding(run.model, cfg):
        return _collect_rows(run)


def sync_sampler(run: Run) -> None:
    """The rollout backend (a vLLM engine, or the rollout.dtype copy) samples from the current policy
    from its next call on: on every rank at the same point, since under FSDP2 the sharded parameters
    are gathered (a collective). Weights change only at optimizer steps, so an evaluation and the
    next step's rollouts share one sync."""
    if run.rollout_backend is not None and run.synced_at != run.sched.last_epoch:
        run.synced_at, model = run.sched.last_epoch, run.model
        run.rollout_backend.sync_weights(
            full_model_state(model) if run.par.fsdp else merged_state(model) if is_peft(model) else model
        )


def _collect_rows(run: Run):
    cfg = run.cfg
    return collect(
        run.model,
        run.tokenizer,
        run.sampler,
        run.reward_fn,
        cfg.rollout,
        cfg.sampling,
        cfg.reward,  # reward.on_error: a NaN/inf reward counted as 0, or a RewardError
        max_new_tokens=run.max_new,
        generate_fn=run.rollout_backend,
        env=run.par.env,
        should_stop=partial(run.stop.requested, run.par.env),  # asked under torchrun
    )
