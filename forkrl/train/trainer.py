"""The RL loop: the only place that knows the order of DESIGN.md's data flow.

    prompts -> rollout -> rewards -> group filter -> advantages -> scoring pass -> selection -> update

`train(config)` runs it end to end and returns the run folder and the final metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from forkrl.config import Config, warnings_for
from forkrl.errors import TrainingError
from forkrl.models.loading import enable_gradient_checkpointing, resolve_device, resolve_model_path
from forkrl.models.lora import is_peft, merged_state
from forkrl.rewards.inprocess import InProcessReward
from forkrl.rewards.pool import FAILURES as REWARD_FAILURES
from forkrl.rewards.pool import RewardError
from forkrl.rollout.hf import decode_threads, lean_decoding, torch_threads
from forkrl.train.checkpoint import latest_checkpoint, load_state, rng_state, save_checkpoint, set_rng_state
from forkrl.train.components import (
    completion_budget,
    data_and_reward,
    evaluate_held_out,
    load_policy,
    model_warnings,
    reward_pool,
    save_final,
    settings_from,
    with_chat_template,
)
from forkrl.train.critic import critic_targets, critic_update
from forkrl.train.dist import (
    LOCAL,
    Parallel,
    all_max,
    all_sum,
    apply_fsdp,
    barrier,
    broadcast_object,
    full_model_state,
    full_optimizer_state,
    init_distributed,
    load_full_optimizer_state,
    rank_device,
)
from forkrl.train.dump import dump_step, mode_columns
from forkrl.train.health import collapse, count_streaks, failure
from forkrl.train.memory import set_mmap_threshold, update_heap
from forkrl.train.metrics import MetricsLog, NullLog
from forkrl.train.progress import TrainProgress
from forkrl.train.rollouts import PromptSampler, collect, empty_rollout
from forkrl.train.run_folder import RunLock, on_main, open_run, prepare_new, record_config
from forkrl.train.stopping import Abort, StopFlag, TrainingInterrupted
from forkrl.train.update import (
    Scored,
    UpdateSettings,
    actor_update,
    group_advantages,
    plan_selection,
    score_rollout,
    update_layout,
)


@dataclasses.dataclass
class Run:
    """The state one run's steps share (passed in, so a test can drive a single step)."""

    cfg: Config
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    ref_model: torch.nn.Module | None
    task: object
    held: list
    reward_fn: object
    max_new: int
    sampler: PromptSampler
    opt: torch.optim.Optimizer
    sched: object
    settings: UpdateSettings
    gen: torch.Generator
    pool_stats: dict | None = None
    critic: object | None = None  # forkrl.train.critic.Critic when algorithm.advantage=gae (PPO)
    rollout_backend: object | None = None  # forkrl.rollout.vllm.VLLMRollout; None = the HF backend
    par: Parallel = dataclasses.field(default_factory=lambda: LOCAL)  # ranks and FSDP2 modules
    stop: StopFlag = dataclasses.field(default_factory=lambda: StopFlag(can_abort=False))
    synced_at: int = -1  # the optimizer step count the vLLM engine last received weights at


def _rl_step(run: Run, dump_path: Path | None = None) -> dict:
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
    minis = update_layout(scored, s, par.env)
    plan = plan_selection(run.model, scored, minis, s, generator=run.gen, par=par)  # selection
    trained = run.critic is None or run.critic.actor_trains()
    if trained:
        actor = (run.model, run.opt, run.sched, scored, adv, plan, minis, s)  # a signal: asked until a step
        with update_heap(cfg.train.mmap_threshold_mib, cfg.train.update_mmap_threshold_mib):  # train.memory
            m.update(actor_update(*actor, par=par, should_stop=partial(run.stop.requested, par.env)))
    selection = plan.record if trained else None  # what the actor trained on
    if run.critic is not None:
        m.update(
            critic_update(run.critic, scored, targets, selection, minis, s, generator=run.gen, env=par.env)
        )
    m["tokens"] = int(all_sum(scored.loss_mask.sum(), par.env))
    if dump_path is not None:  # on every rank: the dump's covariance may span them
        _dump(run, dump_path, exp, scored, adv, selection)
    return _timed(m, t0)


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
        path, run.tokenizer, scored, adv, sel_mask,
        step=int(path.stem.split(".")[0].split("_")[-1]),
        rewards=exp.rewards,
        prompts=[e.prompt for e in exp.examples for _ in range(cfg.rollout.group_size)],
        cov=cov, acted=acted, meta={**dataclasses.asdict(cfg.selection), **mode_meta},
        show=cfg.train.log_completions if env.main else 0, log_path=run.run_dir / "train.log",
    )  # fmt: skip


@contextlib.contextmanager
def _decoding(model, cfg: Config):
    """Generation settings: torch threads on CPU (`rollout.threads`), the lean decode step or not."""
    threads = decode_threads(model, cfg.rollout.threads, cfg.train.threads)
    with torch_threads(threads, next(model.parameters()).device), lean_decoding(cfg.rollout.lean_decode):
        yield


def _collect(run: Run):
    cfg = run.cfg
    _sync_sampler(run)  # the policy as the last step left it
    # generation: a different number of forwards on each rank; nothing a checkpoint holds changes here
    with run.stop.abortable(), run.par.gathered(), _decoding(run.model, cfg):
        return _collect_rows(run)


def _sync_sampler(run: Run) -> None:
    """The vLLM engine samples from the current policy from its next call on: on every rank at the
    same point, since under FSDP2 the sharded parameters are gathered (a collective). Weights change
    only at optimizer steps, so an evaluation and the next step's rollouts share one sync."""
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
        prompts_per_step=cfg.rollout.prompts_per_step,
        group_size=cfg.rollout.group_size,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        max_new_tokens=run.max_new,
        dynamic=cfg.sampling.dynamic,
        max_rounds=cfg.sampling.max_rounds,
        overlong_buffer=cfg.reward.overlong_buffer,
        overlong_factor=cfg.reward.overlong_factor,
        generate_fn=run.rollout_backend,
        env=run.par.env,
        on_error=cfg.reward.on_error,  # a NaN/inf reward: counted as 0, or a RewardError
        should_stop=partial(run.stop.requested, run.par.env),  # asked under torchrun
    )


def train(
    cfg: Config, reward_fn=None, *, resume: bool = False, overwrite: bool = False, checkpoint_hook=None
) -> tuple[Path, dict]:
    """Run RLVR as configured. Returns (run folder, final metrics).

    A run folder holds one run (`forkrl.train.run_folder`): a new run refuses a `cfg.train.out_dir`
    that holds another run's outputs unless `overwrite`, and the folder is locked while it runs. With
    `resume`, continue from the newest readable checkpoint there (model, optimizer, scheduler, RNG
    states, data position, metrics log), bit-identically on CPU; only the settings of
    `SAFE_ON_RESUME` may differ from those the run ran under. `checkpoint_hook` is a fault-injection
    hook for tests (see `save_checkpoint`).
    """
    seed = cfg.train.seed
    set_mmap_threshold(cfg.train.mmap_threshold_mib)  # before the first large tensor (forkrl.train.memory)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    run_dir = Path(cfg.train.out_dir)
    env = init_distributed(resolve_device(cfg.model.device))  # torchrun: one rank per process
    lock = RunLock(run_dir) if env.main else None
    with StopFlag(can_abort=not env.enabled) as stop:
        try:
            return _start(cfg, reward_fn, env, lock, stop, resume, overwrite, checkpoint_hook)
        except Abort:  # a signal during start-up or the first evaluation
            raise TrainingInterrupted(stop.signum, None, run_dir, resumable=resume) from None
        finally:
            if lock is not None:
                lock.release()


def _start(cfg: Config, reward_fn, env, lock, stop: StopFlag, resume, overwrite, checkpoint_hook):
    """Build the run (checks first, the model last) and run its loop."""
    seed, run_dir, created, pool, rollout_backend = cfg.train.seed, Path(cfg.train.out_dir), False, None, None
    device = rank_device(resolve_device(cfg.model.device), env)
    try:
        with stop.abortable():  # nothing a checkpoint holds has changed yet
            values = cfg.to_dict()
            ckpt, changed = on_main(
                lambda: open_run(lock.acquire().path.parent, values, resume=resume, overwrite=overwrite), env
            )
            created = env.main and not resume
            # Data, reward and settings are checked before the model loads (minutes for a large one).
            train_pool, held, reward_fn, task, max_new = data_and_reward(cfg, reward_fn)
            if cfg.rollout.backend == "vllm":  # the package and a device it can use, before the model
                from forkrl.rollout.vllm import require_vllm

                require_vllm(device)
            settings = settings_from(cfg, max_new)
            for w in warnings_for(cfg) if env.main else []:  # settings that by themselves learn nothing
                print(f"forkrl: warning: {w}", file=sys.stderr)
            model, tokenizer, ref_model = load_policy(cfg, ckpt, device)  # LoRA: forkrl.models.lora
            for w in model_warnings(cfg, model, tokenizer) if env.main else []:  # tiny-model defaults
                print(f"forkrl: warning: {w}", file=sys.stderr)
            train_pool, held = (
                with_chat_template(cfg, tokenizer, train_pool),
                with_chat_template(cfg, tokenizer, held),
            )
            max_new = completion_budget(cfg, tokenizer, model, train_pool, held, max_new)
            settings = settings_from(cfg, max_new)
            sampler = PromptSampler(train_pool, seed=seed)
            if cfg.model.gradient_checkpointing:
                enable_gradient_checkpointing(model)
            par = Parallel(env, apply_fsdp(model) if env.enabled and cfg.train.parallel == "fsdp" else [])
            opt = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad],  # LoRA: the adapters
                lr=cfg.optim.lr,
                weight_decay=cfg.optim.weight_decay,
                betas=(cfg.optim.beta1, cfg.optim.beta2),
            )
            warm = cfg.optim.warmup_steps
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda i: min(1.0, (i + 1) / warm) if warm else 1.0
            )
            critic = None
            if cfg.algorithm.advantage == "gae":  # PPO: a value model, from the checkpoint when resuming
                from forkrl.train.critic import build_critic

                critic = build_critic(
                    cfg,
                    policy_path=resolve_model_path(cfg.model.path),
                    device=str(device),
                    checkpoint=ckpt,
                    par=par,
                )
            gen = torch.Generator().manual_seed(seed)
            start_step, history, skipped_in_row = 1, {}, 0
            if ckpt is not None:
                state = load_state(ckpt)
                load_full_optimizer_state(opt, state["optimizer"])  # full state: any number of ranks
                sched.load_state_dict(state["scheduler"])
                sampler.load_state_dict(state["sampler"])
                set_rng_state(state["rng"], gen)
                start_step, history, skipped_in_row = (
                    state["step"] + 1,
                    state["history"],
                    state["skipped_in_row"],
                )
                if critic is not None:
                    critic.load_state_dict(state["critic"])
            if (
                cfg.rollout.backend == "vllm"
            ):  # one colocated engine per run; a ConfigError without vllm or CUDA
                from forkrl.rollout.vllm import VLLMRollout

                path = resolve_model_path(cfg.model.path if cfg.model.lora_rank else ckpt or cfg.model.path)
                rollout_backend = VLLMRollout.from_config(cfg, path, tokenizer, device)
            pool = reward_pool(cfg, reward_fn)
            if pool is None:  # called here: the same stop on unusable values as the pool's
                reward_fn = InProcessReward(reward_fn, cfg.reward.max_failed_calls)
            if env.main:  # the config the steps from here run under
                record_config(run_dir, values, start_step, changed)
            barrier(env)
        run = Run(
            cfg, run_dir, model, tokenizer, ref_model, task, held, pool if pool is not None else reward_fn,
            max_new, sampler, opt, sched, settings, gen, pool.stats if pool is not None else None,
            critic=critic, rollout_backend=rollout_backend, par=par, stop=stop,
        )  # fmt: skip
        return _loop(run, ckpt, start_step, history, skipped_in_row, checkpoint_hook)
    except Abort:
        if created:  # a new run stopped before its first step leaves the folder as it found it
            prepare_new(run_dir, overwrite=True)
        raise
    finally:
        if env.enabled:
            barrier(env)
        if rollout_backend is not None:  # under torchrun vLLM's shutdown also ends the ranks' group
            rollout_backend.close()
        if env.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if pool is not None:
            pool.close()


def _loop(
    run: Run, ckpt, start_step: int, history: dict, skipped_in_row: int, checkpoint_hook
) -> tuple[Path, dict]:
    cfg, run_dir, model, tokenizer = run.cfg, run.run_dir, run.model, run.tokenizer
    task, held, reward_fn, max_new, pool_stats = (
        run.task,
        run.held,
        run.reward_fn,
        run.max_new,
        run.pool_stats,
    )
    env, stop = run.par.env, run.stop
    log = MetricsLog(run_dir, tensorboard=cfg.train.tensorboard) if env.main else NullLog()
    t_start = time.perf_counter() - history.get("wall_time_s", 0.0)

    def evaluate() -> float:  # on rank 0 (the others wait), with whole layers under FSDP2
        _sync_sampler(run)  # vLLM (rollout.backend=vllm) evaluates the current weights too
        with run.par.gathered(), _decoding(model, cfg):
            gen = run.rollout_backend
            acc = evaluate_held_out(model, tokenizer, task, held, reward_fn, max_new, gen) if env.main else 0
        return broadcast_object(acc, env)

    if ckpt is None:
        try:
            with stop.abortable():  # a signal here stops at once: there is nothing to keep yet
                eval0 = evaluate()
        except Abort:
            log.close()
            raise
        log.log(0, {"eval_accuracy": eval0})
        history = {"eval_accuracy_start": eval0, "eval_accuracy_last": eval0}
    saved = start_step - 1 if ckpt is not None else None  # the step of the newest checkpoint

    def checkpoint(step: int) -> Path:
        nonlocal saved
        history["wall_time_s"] = time.perf_counter() - t_start
        log.flush()
        state = {
            "step": step,
            "optimizer": full_optimizer_state(run.opt),
            "scheduler": run.sched.state_dict(),
            "sampler": run.sampler.state_dict(),
            "rng": rng_state(run.gen),
            "history": dict(history),
            "skipped_in_row": skipped_in_row,
            "metrics_offset": log.offset(),
        }
        if run.critic is not None:
            state["critic"] = run.critic.state_dict()
        weights = full_model_state(model) if run.par.fsdp else None  # gathered on every rank
        critic_weights = run.critic.full_weights() if run.critic is not None else None
        path = run_dir / "checkpoints" / f"step-{step:06d}"
        if env.main:
            path = save_checkpoint(
                run_dir,
                step,
                model=model,
                tokenizer=tokenizer,
                state=state,
                keep=cfg.train.keep_checkpoints,
                before_rename=checkpoint_hook,
                critic=run.critic.model if run.critic is not None else None,
                state_dict=weights,
                critic_state_dict=critic_weights,
            )
        barrier(env)
        saved = step
        return path

    empty_in_row = 0
    shown, main_dir = cfg.train.progress and env.main, run_dir if env.main else None  # train.log: main rank
    eval0 = history["eval_accuracy_last"]
    with TrainProgress(cfg.train.steps, enabled=shown, eval0=eval0, run_dir=main_dir) as bar:
        bar.update(start_step - 1, {}, eval0)
        for step in range(start_step, cfg.train.steps + 1):
            before = dict(pool_stats) if pool_stats is not None else {}
            dump = None
            if cfg.train.dump_every and step % cfg.train.dump_every == 0:
                dump = run_dir / "rollouts" / f"step_{step:06d}.jsonl"
            at_start = rng_state(run.gen), run.sampler.state_dict()
            try:
                m = _rl_step(run, dump)
            except (Abort, RewardError) as e:  # before its first optimizer step: give the step up
                set_rng_state(at_start[0], run.gen)
                run.sampler.load_state_dict(at_start[1])
                path = checkpoint(step - 1) if saved != step - 1 else latest_checkpoint(run_dir)
                log.close()
                if isinstance(e, RewardError):  # the reward failed on every row, call after call
                    raise RewardError(
                        f"{e}; stopped after writing {path}: fix the reward, then resume"
                    ) from None
                raise TrainingInterrupted(stop.signum, path, run_dir) from None
            for key in REWARD_FAILURES:  # per step, from the pool's running counts (plus collect's own)
                if pool_stats is not None:
                    m[f"reward_{key}"] = m.get(f"reward_{key}", 0) + pool_stats[key] - before[key]
            skipped_in_row, empty_in_row = count_streaks(m, step, skipped_in_row, empty_in_row)
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.steps:
                try:  # a signal stops the evaluation (a hung reward) at once: the step stands without it
                    with stop.abortable():
                        history["eval_accuracy_last"] = m["eval_accuracy"] = evaluate()
                except Abort:
                    m["eval_accuracy"] = None
            log.log(step, m)
            bar.update(step, m, history["eval_accuracy_last"])
            why = failure(model, env, cfg, step, skipped_in_row, saved, run_dir)
            if why is not None:
                log.close()
                raise TrainingError(why)
            signum = all_max(stop.signum or 0, env)  # every rank stops at the same step
            if signum:
                path = checkpoint(step)
                log.close()
                raise TrainingInterrupted(signum, path, run_dir)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step != cfg.train.steps:
                checkpoint(step)
        if cfg.train.steps >= start_step or ckpt is None:
            checkpoint(cfg.train.steps)
    log.close()
    final = run_dir / "final"
    weights = full_model_state(model) if run.par.fsdp else None  # collectives: on every rank
    critic_weights = run.critic.full_weights() if run.critic is not None else None
    history.update(
        eval_accuracy_end=history["eval_accuracy_last"],
        steps=cfg.train.steps,
        wall_time_s=time.perf_counter() - t_start,
    )
    history["collapsed"] = collapse(
        history["eval_accuracy_start"], history["eval_accuracy_end"], cfg.optim.lr, len(held)
    )
    if env.main:
        save_final(model, final, weights)  # LoRA: merged, and final-adapter/
        if run.critic is not None:
            run.critic.model.save_pretrained(run_dir / "final-critic", state_dict=critic_weights)
        tokenizer.save_pretrained(final)
        (run_dir / "summary.json").write_text(json.dumps(history, indent=2))
    return run_dir, history
