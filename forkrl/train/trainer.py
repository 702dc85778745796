"""The RL loop: the only place that knows the order of DESIGN.md's data flow.

    prompts -> rollout -> rewards -> group filter -> advantages -> scoring pass -> selection -> update

`train(config)` runs it end to end and returns the run folder and the final metrics.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from forkrl.config import Config, ConfigError, save_config
from forkrl.evaluate import evaluate_task
from forkrl.train.metrics import MetricsLog
from forkrl.train.progress import TrainProgress
from forkrl.train.rollouts import PromptSampler, collect, task_reward
from forkrl.train.update import UpdateSettings, prepare, update

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = ASSETS / "warmstart-pick"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model_and_tokenizer(path: str | Path | None, *, dtype: str = "float32", device: str = "cpu"):
    """A local HF causal LM and its tokenizer, with the checks that must pass before training starts."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path else DEFAULT_MODEL
    if not path.is_dir():
        raise ConfigError(
            f"model.path={str(path)!r} is not a folder; give a local Hugging Face checkpoint folder"
        )
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path={str(path)!r}: no usable config.json ({e})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True)
    except ValueError as e:
        raise ConfigError(
            f"model.path={str(path)!r} ({type(hf_config).__name__}) is not a causal LM: {e}"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer in {path} has no EOS token: completions could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # common for Llama-style tokenizers; padding is masked
    return model.to(device), tokenizer


def import_reward(spec: str):
    """`package.module:function` -> the callable."""
    if ":" not in spec:
        raise ConfigError(f"reward.fn={spec!r} must look like 'package.module:function'")
    mod, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward.fn={spec!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ConfigError(f"reward.fn={spec!r} is not callable")
    return fn


def _data_and_reward(cfg: Config, reward_fn, tokenizer):
    """Training pool, held-out set, reward function, task (or None) and completion budget."""
    from forkrl.tasks.pick import get_task

    if cfg.data.path:
        from forkrl.rewards.math import math_reward
        from forkrl.tasks.files import apply_chat_template, load_examples

        def load(path):
            rows = load_examples(
                path,
                prompt_field=cfg.data.prompt_field,
                answer_field=cfg.data.answer_field,
                on_error=cfg.data.on_error,
            )
            if cfg.model.chat_template:
                rows = [
                    dataclasses.replace(
                        e, prompt=apply_chat_template(tokenizer, e.fields.get("messages") or e.prompt)
                    )
                    for e in rows
                ]
            return rows

        train = load(cfg.data.path)
        held = load(cfg.data.eval_path) if cfg.data.eval_path else []
        fn = reward_fn or (import_reward(cfg.reward.fn) if cfg.reward.fn else math_reward)
        return train, held[: cfg.train.eval_n], fn, None, cfg.rollout.max_new_tokens or 512
    task = get_task(cfg.task.name, max_value=cfg.task.max_value, n_candidates=cfg.task.n_candidates)
    train = task.examples("train", 20_000, seed=cfg.train.seed)
    held = task.examples("test", cfg.train.eval_n, seed=1234)  # fixed: comparable across seeds
    fn = reward_fn or (import_reward(cfg.reward.fn) if cfg.reward.fn else task_reward(task))
    return train, held, fn, task, cfg.rollout.max_new_tokens or task.default_max_new_tokens


def _evaluate(model, tokenizer, task, held, reward_fn, max_new_tokens: int) -> float:
    if not held:
        return float("nan")
    if task is not None:
        return evaluate_task(model, tokenizer, task, held, greedy=True, max_new_tokens=max_new_tokens)[
            "accuracy"
        ]
    from forkrl.rollout.hf import generate
    from forkrl.train.rollouts import call_reward

    ro = generate(model, tokenizer, [e.prompt for e in held], greedy=True, max_new_tokens=max_new_tokens)
    return (call_reward(reward_fn, held, ro.texts, 1) > 0.5).float().mean().item()


def settings_from(cfg: Config, max_len: int) -> UpdateSettings:
    return UpdateSettings(
        temperature=cfg.rollout.temperature,
        selective_head=cfg.model.selective_head,
        reuse_sampler_logprobs=cfg.rollout.reuse_logprobs,
        rho=cfg.selection.rho,
        rule=cfg.selection.rule,
        count=cfg.selection.count,
        scope=cfg.selection.scope,
        entropy_source=cfg.selection.entropy_source,
        eps_low=cfg.loss.eps_low,
        eps_high=cfg.loss.eps_high,
        dual_clip=cfg.loss.dual_clip,
        normalizer=cfg.loss.normalizer,
        kl_coef=cfg.loss.kl_coef,
        kl_estimator=cfg.loss.kl_estimator,
        mini_batches=cfg.optim.mini_batches,
        micro_batch_size=cfg.optim.micro_batch_size,
        grad_clip=cfg.optim.grad_clip,
        max_len=max_len,
    )


def train(cfg: Config, reward_fn=None) -> tuple[Path, dict]:
    """Run RLVR as configured. Returns (run folder, final metrics)."""
    seed = cfg.train.seed
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = resolve_device(cfg.model.device)
    model, tokenizer = load_model_and_tokenizer(cfg.model.path, dtype=cfg.model.dtype, device=str(device))
    train_pool, held, reward_fn, task, max_new = _data_and_reward(cfg, reward_fn, tokenizer)
    sampler = PromptSampler(train_pool, seed=seed)
    ref_model = copy.deepcopy(model).eval() if cfg.loss.kl_coef > 0 else None
    run_dir = Path(cfg.train.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
    )
    warm = cfg.optim.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) if warm else 1.0)
    settings = settings_from(cfg, max_new)
    gen = torch.Generator().manual_seed(seed)
    log = MetricsLog(run_dir, tensorboard=cfg.train.tensorboard)
    t_start = time.perf_counter()
    eval0 = _evaluate(model, tokenizer, task, held, reward_fn, max_new)
    log.log(0, {"eval_accuracy": eval0})
    last_eval, history = eval0, {"eval_accuracy_start": eval0}
    with TrainProgress(cfg.train.steps, enabled=cfg.train.progress, eval0=eval0) as bar:
        for step in range(1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            exp = collect(
                model,
                tokenizer,
                sampler,
                reward_fn,
                prompts_per_step=cfg.rollout.prompts_per_step,
                group_size=cfg.rollout.group_size,
                temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p,
                max_new_tokens=max_new,
                dynamic=cfg.sampling.dynamic,
                max_rounds=cfg.sampling.max_rounds,
                overlong_buffer=cfg.reward.overlong_buffer,
                overlong_factor=cfg.reward.overlong_factor,
            )
            m = dict(exp.stats)
            if exp.rollout is not None:
                t1 = time.perf_counter()
                batch = prepare(
                    model,
                    ref_model,
                    exp.rollout,
                    exp.rewards,
                    advantage=cfg.algorithm.advantage,
                    overlong_filter=cfg.sampling.overlong_filter,
                    s=settings,
                )
                m["time_scoring"] = time.perf_counter() - t1
                m["entropy_mean"] = batch.entropy[batch.loss_mask].mean().item()
                m.update(update(model, opt, sched, batch, settings, generator=gen))
                m["tokens"] = int(batch.loss_mask.sum())
            m["time_step"] = time.perf_counter() - t0
            m["tokens_per_s"] = m.get("tokens", 0) / m["time_step"]
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.steps:
                last_eval = _evaluate(model, tokenizer, task, held, reward_fn, max_new)
                m["eval_accuracy"] = last_eval
            log.log(step, m)
            bar.update(step, m, last_eval)
    log.close()
    final = run_dir / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    history.update(
        eval_accuracy_end=last_eval, steps=cfg.train.steps, wall_time_s=time.perf_counter() - t_start
    )
    (run_dir / "summary.json").write_text(json.dumps(history, indent=2))
    return run_dir, history
