"""What a run is built from: data and reward, context checks, evaluation, update settings.

The RL loop (`forkrl.training.trainer`) assembles a run from these and the model that
`forkrl.models.loading` loads, and drives it.
"""

from __future__ import annotations

import math
import sys
import warnings

from forkrl.config import Config, ConfigError
from forkrl.evaluate import evaluate_task
from forkrl.rewards import REWARDS, call_reward, get_reward, is_correct, task_reward
from forkrl.training.update import UpdateSettings


def check_context(tokenizer, model, examples, max_new_tokens: int, what: str, fit: bool = False) -> int:
    """The completion budget, checked before training against the model's context: a prompt that leaves
    no room for `max_new_tokens` is refused, or with `fit` (the budget is a default, not the user's)
    the budget is cut to what the longest prompt leaves, with a note."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit or not examples:
        return max_new_tokens
    lengths = [
        len(ids) for ids in tokenizer([e.prompt for e in examples], add_special_tokens=False).input_ids
    ]
    i = max(range(len(lengths)), key=lengths.__getitem__)
    if fit and lengths[i] + max_new_tokens > limit and limit - lengths[i] >= 1:
        print(
            f"forkrl: note: {what}: the default completion budget of {max_new_tokens} tokens plus the longest "
            f"prompt ({lengths[i]} tokens) exceeds the model's context of {limit}; sampling up to "
            f"{limit - lengths[i]} new tokens (set rollout.max_new_tokens to choose)",
            file=sys.stderr,
        )
        return limit - lengths[i]
    if lengths[i] + max_new_tokens > limit:
        raise ConfigError(
            f"{what}: prompt #{i + 1} ({lengths[i]} tokens, {examples[i].prompt[:60]!r}...) plus "
            f"rollout.max_new_tokens={max_new_tokens} exceeds the model's context of {limit} tokens; "
            "shorten the prompts or lower rollout.max_new_tokens"
        )
    return max_new_tokens


def completion_budget(cfg: Config, tokenizer, model, train, held, max_new: int) -> int:
    """`max_new` checked against the model's context for the training and held-out prompts; the default
    budget (rollout.max_new_tokens=0) is cut to fit, a budget the user set is refused if it does not."""
    fit = cfg.rollout.max_new_tokens == 0
    task = f"task {cfg.task.name}"
    max_new = check_context(tokenizer, model, train, max_new, cfg.data.path or task, fit)
    return check_context(tokenizer, model, held, max_new, cfg.data.eval_path or f"{task} (held out)", fit)


def import_reward(spec: str, weights: str | None = None):
    """`reward.fn` -> the callable: a name of `forkrl.rewards.REWARDS` (`math`, `dapo`, `pick`), as
    `forkrl eval --reward` takes it, `package.module:function` or `model:PATH`; several, comma-separated,
    weighted by `reward.weights` (forkrl.rewards.combined)."""
    from forkrl.rewards.combined import part_name

    specs = [x.strip() for x in spec.split(",") if x.strip()]
    try:
        w = [float(x) for x in weights.split(",")] if (weights or "").strip() else [1.0] * len(specs)
    except ValueError:
        raise ConfigError(f"reward.weights={weights!r}: comma-separated numbers, one per reward") from None
    if len(w) != len(specs) or not all(math.isfinite(x) for x in w):
        raise ConfigError(
            f"reward.weights={weights!r}: {len(w)} finite weights for {len(specs)} rewards in reward.fn={spec!r}"
        )
    fns = []
    for one in specs:
        try:
            fns.append(get_reward(one))
        except ValueError as e:
            raise ConfigError(str(e).replace(f"reward {one!r}", f"reward.fn={one!r}", 1)) from None
    return weighted_reward([(part_name(x, f), wx, f) for x, wx, f in zip(specs, w, fns)])


def weighted_reward(parts: list):
    """`(name, weight, fn)` parts as one reward: the function itself when it is alone at weight 1, else
    their weighted sum (`WeightedRewards`, which logs each part); `reward.fn` and `Trainer(reward_funcs=)`."""
    from forkrl.rewards.combined import WeightedRewards

    return parts[0][2] if len(parts) == 1 and parts[0][1] == 1.0 else WeightedRewards(parts)


def data_and_reward(cfg: Config, reward_fn, train_data=None, eval_data=None):
    """Training pool, held-out set, reward function, task (or None) and completion budget.

    `train_data`/`eval_data`: rows in memory (a `datasets.Dataset`, a list of dicts; `forkrl.Trainer`)
    read in place of `data.path`/`data.eval_path`, checked alike. Needs no model, so that a bad row or
    reward is refused before the model loads; `with_chat_template` wraps the prompts once the tokenizer
    is loaded."""
    from forkrl.tasks.registry import task_from_config

    if cfg.data.path or train_data is not None:
        from forkrl.tasks.files import load_examples

        def load(path, split):
            return load_examples(
                path,
                prompt_field=cfg.data.prompt_field,
                answer_field=cfg.data.answer_field,
                on_error=cfg.data.on_error,
                split=split,  # a DatasetDict folder or a cached dataset's split
            )

        train = load(cfg.data.path if train_data is None else train_data, cfg.data.split)
        held_from = cfg.data.eval_path if eval_data is None else eval_data
        held = load(held_from, cfg.data.eval_split) if eval_data is not None or cfg.data.eval_path else []
        fn = reward_fn or import_reward(cfg.reward.fn or "math", cfg.reward.weights)
        return train, held[: cfg.train.eval_n], fn, None, cfg.rollout.max_new_tokens or 512
    task = task_from_config(cfg.task)
    train = task.examples("train", 20_000, seed=cfg.train.seed)
    held = task.examples("test", cfg.train.eval_n, seed=1234)  # fixed: comparable across seeds
    spec = cfg.reward.fn or (task.name if task.name in REWARDS else None)  # a built-in task's own reward
    fn = reward_fn or (import_reward(spec, cfg.reward.weights) if spec else task_reward(task))
    return train, held, fn, task, cfg.rollout.max_new_tokens or task.default_max_new_tokens


def with_chat_template(cfg: Config, tokenizer, rows: list) -> list:
    """Rows with their prompts formatted as `forkrl eval` formats them (`forkrl.tasks.prompts`): for a
    data file, DAPO's template (`data.dapo_template`); then, for a data file or a built-in task, the
    tokenizer's chat template (`model.chat_template`)."""
    chat, dapo = cfg.model.chat_template, cfg.data.dapo_template and bool(cfg.data.path)
    if not (chat or dapo):
        return rows
    from forkrl.tasks.prompts import format_example

    try:
        return [format_example(e, tokenizer, chat_template=chat, dapo_template=dapo) for e in rows]
    except ValueError as e:  # a tokenizer without a chat template
        raise ConfigError(f"model.chat_template=true: {e}") from None


def reward_pool(cfg: Config, fn):
    """The reward wrapped in a `RewardPool` (timeouts from outside, crash-proof), or None to call it directly."""
    if not cfg.reward.isolate:
        return None
    from forkrl.rewards.combined import RewardModel, WeightedRewards
    from forkrl.rewards.pool import RewardPool

    if isinstance(fn, RewardModel):  # batched in this process, not a model per worker
        return None
    if isinstance(fn, WeightedRewards):  # each function in its own pool
        parts = [(n, w, reward_pool(cfg, f) or f) for n, (_, w, f) in zip(fn.names, fn.parts)]
        pooled = any(isinstance(f, RewardPool) for _, _, f in parts)
        return WeightedRewards(parts) if pooled else None
    try:
        r = cfg.reward
        return RewardPool(
            fn,
            workers=r.workers or None,
            timeout=r.timeout,
            on_error=r.on_error,
            max_failed_calls=r.max_failed_calls,
            worker_max_rows=r.worker_max_rows,
            worker_max_rss_mb=r.worker_max_rss_mb,
            batch_rows=r.batch_size,
        )
    except TypeError as e:  # a lambda or closure from a notebook cannot reach a worker process
        warnings.warn(
            f"reward.isolate: {e}; calling the reward in this process, without a timeout", stacklevel=3
        )
        return None


EVAL_BATCH = 64  # held-out prompts per generate call in periodic evaluation


def evaluate_held_out(
    model, tokenizer, task, held, reward_fn, max_new_tokens: int, generate_fn=None
) -> float | None:
    """Greedy accuracy on the held-out rows, sampled by the run's rollout backend (`generate_fn`,
    e.g. vLLM; None = the HF backend on `model`); None without held-out rows (a data file without
    data.eval_path): nothing was measured, which JSON writes as null (NaN is not JSON)."""
    if not held:
        return None
    if task is not None:
        kw = dict(greedy=True, max_new_tokens=max_new_tokens, generate_fn=generate_fn)
        return evaluate_task(model, tokenizer, task, held, **kw)["accuracy"]
    from functools import partial

    from forkrl.rollout.hf import generate

    gen = generate_fn or partial(generate, model, tokenizer)
    correct = 0
    for start in range(0, len(held), EVAL_BATCH):  # batches bound the KV cache on real models
        chunk = held[start : start + EVAL_BATCH]
        ro = gen([e.prompt for e in chunk], greedy=True, max_new_tokens=max_new_tokens)
        correct += sum(bool(is_correct(r)) for r in call_reward(reward_fn, chunk, ro.texts, 1))
    return correct / len(held)


def kl_coef_of(cfg: Config) -> float:
    """The KL penalty's coefficient, > 0 when a reference is needed: loss.kl_coef, or under loss.mode=archer
    the larger of its per-class coefficients (the mode weights each token by its own)."""
    loss = cfg.loss
    return max(loss.archer_kl_coef_low, loss.archer_kl_coef_high) if loss.mode == "archer" else loss.kl_coef


def settings_from(cfg: Config, max_len: int) -> UpdateSettings:
    """The update's view of `cfg` (its sections, by reference) and the values several settings decide."""
    return UpdateSettings(
        model=cfg.model,
        rollout=cfg.rollout,
        selection=cfg.selection,
        loss=cfg.loss,
        algorithm=cfg.algorithm,
        optim=cfg.optim,
        max_len=max_len,
        share_prompt=cfg.model.share_prompt,
        # vllm returns no entropies, and its kernels are not the policy's: the scoring pass gives both.
        # A rollout.dtype copy's log-probs are too far from the update's to be its old log-probs
        # (docs/DESIGN.md, Precision): with one optimizer step per RL step the update takes its own,
        # detached, and the copy's entropies still select; with more, the scoring pass gives both.
        reuse_sampler_logprobs=cfg.rollout.reuse_logprobs
        and cfg.rollout.backend == "hf"
        and (cfg.rollout.dtype == "float32" or cfg.optim.mini_batches == 1),
        old_from_update=cfg.rollout.reuse_logprobs
        and cfg.rollout.dtype != "float32"
        and cfg.optim.mini_batches == 1,
        kl_coef=kl_coef_of(cfg),
    )


def load_policy(cfg: Config, ckpt, device, model=None, tokenizer=None):
    """The policy, its tokenizer and the reference policy for KL (None without KL).

    Full fine-tuning: the policy from the checkpoint (or `model.path`), the reference a second copy of
    `model.path`. LoRA (`model.lora_rank` > 0, forkrl.models.lora): the base from `model.path` with new
    adapters, or a checkpoint's; the reference is that model with its adapters disabled (no copy).
    `model`/`tokenizer`: an object the caller built (`forkrl.Trainer(model=...)`), trained in place on
    `device` in its own dtype; its reference is a copy of it as given, and a resume loads the
    checkpoint's weights (or adapters) into it.
    """
    import copy

    from forkrl.models.loading import check_tokenizer, load_model_and_tokenizer
    from forkrl.models.lora import AdaptersOff, add_adapters, load_adapters

    m, lora = cfg.model, cfg.model.lora_rank > 0
    needs_ref = (
        kl_coef_of(cfg) > 0 or cfg.algorithm.kl_in_reward > 0
    )  # the initial policy, also when resuming
    kw = dict(dtype=m.dtype, device=str(device), trust_remote_code=m.trust_remote_code)
    ref = None
    if model is None:
        model, tokenizer = load_model_and_tokenizer(
            m.path if lora else (ckpt or m.path), pad_token=m.pad_token, **kw
        )
    else:
        if tokenizer is None:
            raise ConfigError("forkrl.Trainer(model=<a model object>) needs its tokenizer too: tokenizer=...")
        check_tokenizer(tokenizer, "the tokenizer given to forkrl.Trainer", m.pad_token)
        model = model.to(device).train()
        if needs_ref and not lora:
            ref = copy.deepcopy(model).eval()  # the policy as given
        if ckpt is not None and not lora:  # the weights the run had reached
            saved = type(model).from_pretrained(
                ckpt, dtype=next(model.parameters()).dtype, local_files_only=True
            )
            model.load_state_dict(saved.state_dict())
            del saved
    if lora:
        model = (
            load_adapters(model, ckpt)
            if ckpt is not None
            else add_adapters(model, m.lora_rank, m.lora_alpha, m.lora_dropout, m.lora_targets)
        )
    if needs_ref and (lora or ref is None):
        ref = AdaptersOff(model) if lora else load_model_and_tokenizer(m.path, **kw)[0].eval()
    return model, tokenizer, ref


def save_final(model, final, weights=None) -> None:
    """`final/`: the trained model as a plain Hugging Face checkpoint; for LoRA the merged weights,
    with the adapters alone in `final-adapter/` beside it."""
    from forkrl.models.lora import is_peft, merged_state, unwrap

    if is_peft(model):
        model.save_pretrained(final.parent / "final-adapter")
        unwrap(model).save_pretrained(final, state_dict=merged_state(model))
    else:
        model.save_pretrained(final, state_dict=weights)


TINY_PARAMS = 2_000_000  # the shipped model has 0.8M; anything past this is a real model to these checks


def model_warnings(cfg: Config, model, tokenizer) -> list[str]:
    """Settings tuned for the shipped 0.8M-parameter model that a real pretrained model should not get
    silently (issue 26): its learning rate, and prompts without the tokenizer's chat template."""
    out = []
    params = sum(p.numel() for p in model.parameters())
    if params > TINY_PARAMS and cfg.optim.lr >= 1e-4:
        out.append(
            f"optim.lr={cfg.optim.lr:g} is the step size tuned for the shipped 0.8M-parameter model; this model "
            f"has {params / 1e6:.0f}M parameters and a step that large collapses a pretrained model within a "
            "few steps (SmolLM2-135M: held-out accuracy 0.33 -> 0.13 in 6 steps at 2e-4). Start from the "
            "shipped recipe (forkrl train --config smollm2) or optim.lr=1e-6..1e-5"
        )
    if getattr(tokenizer, "chat_template", None) and not cfg.model.chat_template:
        out.append(
            "the tokenizer has a chat template but model.chat_template=false: an instruct model sees raw "
            "prompts it was not tuned on (SmolLM2-135M-Instruct: held-out accuracy 0.000 without it, 0.325 "
            "with it); set model.chat_template=true unless the model is a base model"
        )
    return out
