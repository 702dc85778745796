"""A run's set-up as a list of phases, in order, and the state a checkpoint holds besides the weights.

    build_run(cfg):  open the folder -> check the inputs -> load the models -> parallelise
                     -> optimizer (and critic) -> restore -> services -> record the config

Everything that can be refused without the model (the folder, data rows, the reward, settings) is
checked before the model loads, which takes minutes for a large one. Every service that must be
closed (the reward pool, the vLLM engine, the process group) is registered on the caller's
`ExitStack` as it starts, so that clean-up is one `stack.close()` in reverse order. `TrainState` is
the one place that checkpoints save from and resume restores to (docs/DESIGN.md, "Checkpoints").
"""

from __future__ import annotations

import dataclasses
import math
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

from forkrl.config import Config, ConfigError, set_value, warnings_for
from forkrl.models.loading import enable_gradient_checkpointing, resolve_model_path
from forkrl.rewards.inprocess import InProcessReward
from forkrl.training.checkpoint import load_state, rng_state, set_rng_state
from forkrl.training.components import (
    completion_budget,
    data_and_reward,
    load_policy,
    model_warnings,
    reward_pool,
    settings_from,
    weighted_reward,
    with_chat_template,
)
from forkrl.training.dist import (
    LOCAL,
    DistEnv,
    Parallel,
    apply_fsdp,
    barrier,
    full_optimizer_state,
    load_full_optimizer_state,
)
from forkrl.training.rollouts import PromptSampler
from forkrl.training.run_folder import RunLock, on_main, open_run, prepare_new, record_config
from forkrl.training.stopping import Abort, StopFlag
from forkrl.training.update import UpdateSettings


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
    critic: object | None = None  # forkrl.training.critic.Critic when algorithm.advantage=gae (PPO)
    rollout_backend: object | None = None  # VLLMRollout or CastSampler; None = the HF backend on the policy
    par: Parallel = dataclasses.field(default_factory=lambda: LOCAL)  # ranks and FSDP2 modules
    stop: StopFlag = dataclasses.field(default_factory=lambda: StopFlag(can_abort=False))
    synced_at: int = -1  # the optimizer step count the rollout backend last received weights at


@dataclasses.dataclass
class Given:
    """What a caller of `forkrl.Trainer` passed as objects instead of config values (None: from the config)."""

    model: object = None  # a transformers model object
    tokenizer: object = None
    train_data: object = None  # a datasets.Dataset or a list of dicts
    eval_data: object = None
    reward_fn: object = None  # one callable (several are combined into one by the Trainer)


class TrainState:
    """The loop's position, and everything a checkpoint holds besides the weights: `state_dict()` is
    what a checkpoint saves, `load_state_dict()` what a resume restores, key for key."""

    def __init__(self, opt, sched, sampler: PromptSampler, gen: torch.Generator, critic=None):
        self.opt, self.sched, self.sampler, self.gen, self.critic = opt, sched, sampler, gen, critic
        self.step = 0  # the last finished step
        self.history: dict = {}  # eval_accuracy_start/_last, wall_time_s; summary.json at the end
        self.skipped_in_row = 0  # optimizer steps skipped in a row (non-finite gradient)
        self.empty_in_row = 0  # steps in a row that kept no group
        self.saved: int | None = None  # the step of the newest checkpoint

    def state_dict(self, metrics_offset: int) -> dict:
        state = {
            "step": self.step,
            "optimizer": full_optimizer_state(self.opt),  # full state: any number of ranks
            "scheduler": self.sched.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(self.gen),
            "history": dict(self.history),
            "skipped_in_row": self.skipped_in_row,
            "metrics_offset": metrics_offset,  # forkrl.training.run_folder truncates the log to it
        }
        if self.critic is not None:
            state["critic"] = self.critic.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        load_full_optimizer_state(self.opt, state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"], self.gen)
        self.step = self.saved = state["step"]
        self.history, self.skipped_in_row = state["history"], state["skipped_in_row"]
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])

    def mark(self) -> tuple:
        """What a step changes before its first optimizer step: the selection RNG and the data position."""
        return rng_state(self.gen), self.sampler.state_dict()

    def rewind(self, mark: tuple) -> None:
        set_rng_state(mark[0], self.gen)
        self.sampler.load_state_dict(mark[1])


@dataclasses.dataclass
class _Inputs:
    train: list
    held: list
    reward_fn: object
    task: object
    max_new: int


def build_run(
    cfg: Config,
    env: DistEnv,
    device: torch.device,
    lock: RunLock | None,
    stop: StopFlag,
    stack: ExitStack,
    *,
    resume: bool,
    overwrite: bool,
    given: Given,
) -> tuple[Run, TrainState, Path | None]:
    """The run as configured, in the order of the module docstring, on this rank's `device`: (run, its
    state, the checkpoint it resumed from or None). Services are registered on `stack`; a signal aborts (`Abort`) until the
    config is recorded."""
    run_dir, created = Path(cfg.train.out_dir), False
    try:
        with stop.abortable():  # nothing a checkpoint holds has changed yet
            values = cfg.to_dict()
            ckpt, changed = on_main(
                lambda: open_run(lock.acquire().path.parent, values, resume=resume, overwrite=overwrite), env
            )
            created = env.main and not resume
            inputs = _check_inputs(cfg, given, device, env)
            model, tokenizer, ref_model, inputs = _load_models(cfg, given, inputs, ckpt, device, env)
            settings = settings_from(cfg, inputs.max_new)
            par = _parallelise(cfg, env, model)
            opt, sched = _optimizer(cfg, model)
            critic = _critic(cfg, ckpt, par, device)
            sampler = PromptSampler(inputs.train, seed=cfg.train.seed)
            state = TrainState(opt, sched, sampler, torch.Generator().manual_seed(cfg.train.seed), critic)
            if ckpt is not None:
                state.load_state_dict(load_state(ckpt))
            rollout_backend = _rollout_backend(cfg, ckpt, model, tokenizer, device, stack)
            reward_fn, pool_stats = _reward_service(cfg, inputs.reward_fn, stack)
            if env.main:  # the config the steps from here run under
                record_config(run_dir, values, state.step + 1, changed)
            barrier(env)
    except Abort:
        if created:  # a new run stopped before its first step leaves the folder as it found it
            prepare_new(run_dir, overwrite=True)
        raise
    run = Run(
        cfg,
        run_dir,
        model,
        tokenizer,
        ref_model,
        inputs.task,
        inputs.held,
        reward_fn,
        inputs.max_new,
        sampler,
        opt,
        sched,
        settings,
        state.gen,
        pool_stats,
        critic=critic,
        rollout_backend=rollout_backend,
        par=par,
        stop=stop,
    )
    return run, state, ckpt


def _check_inputs(cfg: Config, given: Given, device, env: DistEnv) -> _Inputs:
    """Data, reward and settings, refused before the model loads."""
    train, held, reward_fn, task, max_new = data_and_reward(
        cfg, given.reward_fn, given.train_data, given.eval_data
    )
    if cfg.rollout.backend == "vllm":  # the package and a device it can use, before the model
        from forkrl.rollout.vllm import require_vllm

        require_vllm(device)
    settings_from(cfg, max_new)  # the update's settings, checked together
    for w in warnings_for(cfg) if env.main else []:  # settings that by themselves learn nothing
        print(f"forkrl: warning: {w}", file=sys.stderr)
    return _Inputs(train, held, reward_fn, task, max_new)


def _load_models(cfg: Config, given: Given, inputs: _Inputs, ckpt, device, env: DistEnv):
    """The policy, its tokenizer and the KL reference (LoRA: forkrl.models.lora); then the prompts in
    the model's chat template and the completion budget checked against its context."""
    model, tokenizer, ref_model = load_policy(cfg, ckpt, device, given.model, given.tokenizer)
    for w in model_warnings(cfg, model, tokenizer) if env.main else []:  # tiny-model defaults
        print(f"forkrl: warning: {w}", file=sys.stderr)
    train = with_chat_template(cfg, tokenizer, inputs.train)
    held = with_chat_template(cfg, tokenizer, inputs.held)
    max_new = completion_budget(cfg, tokenizer, model, train, held, inputs.max_new)
    return model, tokenizer, ref_model, dataclasses.replace(inputs, train=train, held=held, max_new=max_new)


def _parallelise(cfg: Config, env: DistEnv, model) -> Parallel:
    """Gradient checkpointing, then FSDP2 over the ranks under torchrun with train.parallel=fsdp."""
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return Parallel(env, apply_fsdp(model) if env.enabled and cfg.train.parallel == "fsdp" else [])


def _optimizer(cfg: Config, model):
    """AdamW over the trainable parameters (LoRA: the adapters), with a linear warmup."""
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
    )
    warm = cfg.optim.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) if warm else 1.0)
    return opt, sched


def _critic(cfg: Config, ckpt, par: Parallel, device):
    """PPO's value model (algorithm.advantage=gae), from the checkpoint when resuming; else None."""
    if cfg.algorithm.advantage != "gae":
        return None
    from forkrl.training.critic import build_critic

    path = resolve_model_path(cfg.model.path)
    return build_critic(cfg, policy_path=path, device=str(device), checkpoint=ckpt, par=par)


def _rollout_backend(cfg: Config, ckpt, model, tokenizer, device, stack: ExitStack):
    """One colocated vLLM engine per rank (rollout.backend=vllm), a lower-precision copy of the policy
    to sample from (rollout.dtype, forkrl.rollout.cast), or None for the HF backend on the policy
    itself. Under torchrun vLLM's shutdown also ends the ranks' process group, so it closes before
    that group."""
    if cfg.rollout.backend != "vllm":
        if cfg.rollout.dtype == "float32":
            return None
        from forkrl.rollout.cast import CastSampler

        sampler = CastSampler(model, tokenizer, getattr(torch, cfg.rollout.dtype))
        stack.callback(sampler.close)
        return sampler
    from forkrl.rollout.vllm import VLLMRollout

    path = resolve_model_path(cfg.model.path if cfg.model.lora_rank else ckpt or cfg.model.path)
    backend = VLLMRollout.from_config(cfg, path, tokenizer, device)
    stack.callback(backend.close)
    return backend


def _reward_service(cfg: Config, fn, stack: ExitStack):
    """(the reward the steps call, the pool's running failure counts or None): the reward in worker
    processes (reward.isolate: timeouts from outside, crash-proof), or wrapped in this process with
    the same stop on unusable values."""
    pool = reward_pool(cfg, fn)
    if pool is None:
        return InProcessReward(fn, cfg.reward.max_failed_calls), None
    stack.callback(pool.close)
    return pool, pool.stats


def given_objects(cfg: Config, model, tokenizer, train_dataset, eval_dataset, reward_funcs, weights) -> Given:
    """The objects a caller passed, and the config values that record them (a path sets its field; an
    object is recorded by a label, so that config.yaml says where the run's model and data came from)."""
    given = Given()
    if isinstance(model, (str, Path)):
        set_value(cfg, "model.path", str(model))
    elif model is not None:
        for key, value, why in (
            ("rollout.backend", "vllm", "loads the weights from a folder"),
            ("algorithm.advantage", "gae", "builds its critic from a folder"),
        ):
            section, name = key.split(".")
            if getattr(getattr(cfg, section), name) == value:
                raise ConfigError(f"{key}={value} {why}: pass model= as a path, not an object")
        given.model, given.tokenizer = model, tokenizer
        cfg.model.path = f"(object) {getattr(model, 'name_or_path', '') or type(model).__name__}"
    if tokenizer is not None and given.model is None:
        raise ConfigError("tokenizer= goes with a model object; a model folder brings its own tokenizer")
    if eval_dataset is not None and train_dataset is None and not cfg.data.path:
        raise ConfigError(
            "eval_dataset= goes with train_dataset= (a built-in task has its own held-out split)"
        )
    for key, data in (("data.path", train_dataset), ("data.eval_path", eval_dataset)):
        if isinstance(data, (str, Path)):
            set_value(cfg, key, str(data))
        elif data is not None:
            setattr(cfg.data, key.split(".")[1], f"(object) {type(data).__name__} of {len(data):,} rows")
    given.train_data = None if isinstance(train_dataset, (str, Path)) else train_dataset
    given.eval_data = None if isinstance(eval_dataset, (str, Path)) else eval_dataset
    given.reward_fn = _combined_reward(reward_funcs, weights)
    return given


def _combined_reward(funcs, weights):
    """One callable from `reward_funcs` (+ `reward_weights`); None: the config's `reward.fn`."""
    if funcs is None:
        if weights is not None:
            raise ConfigError("reward_weights= needs reward_funcs=")
        return None
    from forkrl.rewards import get_reward

    funcs = list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]
    weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(funcs) or not funcs or not all(math.isfinite(w) for w in weights):
        raise ConfigError(
            f"reward_weights= has {len(weights)} weights for {len(funcs)} reward functions (finite numbers, one each)"
        )
    parts = []
    for i, f in enumerate(funcs):
        if isinstance(f, str):
            try:
                name, f = f, get_reward(f)
            except ValueError as e:
                raise ConfigError(f"reward_funcs[{i}]: {e}") from None
        elif callable(f):
            name = getattr(f, "__name__", f"reward_{i}")
        else:
            raise ConfigError(
                f"reward_funcs[{i}] is a {type(f).__name__}: give a callable or a reward's name"
            )
        parts.append((name, weights[i], f))
    return weighted_reward(parts)
