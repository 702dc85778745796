"""The run configuration: one dataclass per section, every field documented next to itself.

A run is configured by a preset (`paper`, `official`, `trl`, see `forkrl.presets`), an optional
YAML file, and dotted overrides such as `selection.rho=0.1`, applied in that order. Every value is
validated against the field's type and allowed values; a bad one names the field and what is allowed.
The resolved configuration is saved as `config.yaml` in the run folder.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def opt(
    default: Any, help: str, choices: tuple | None = None, lo: float | None = None, hi: float | None = None
):
    """A config field with its one-line documentation and, optionally, its allowed values or range."""
    return field(default=default, metadata={"help": help, "choices": choices, "lo": lo, "hi": hi})


@dataclass
class ModelConfig:
    path: str | None = opt(None, "local Hugging Face causal-LM folder; empty = the shipped tiny warm start")
    dtype: str = opt("float32", "parameter dtype for training", ("float32", "bfloat16", "float16"))
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    selective_head: bool = opt(
        True, "apply the LM head only at selected tokens in the update (DESIGN: Selective LM head)"
    )
    pad_token: str | None = opt(None, "padding token to use when the tokenizer has none (e.g. its EOS token)")
    share_prompt: bool = opt(
        True,
        "run each prompt once per group in training forwards and repeat its KV cache "
        "(same values; saves (G-1)/G of the prompt's compute)",
    )
    chat_template: bool = opt(False, "wrap prompts with the tokenizer's chat template")
    gradient_checkpointing: bool = opt(
        False,
        "recompute each decoder layer in the backward instead of keeping its activations (transformers' "
        "gradient checkpointing; turns model.share_prompt off, whose prompt KV cache it cannot keep)",
    )


@dataclass
class TaskConfig:
    name: str = opt("pick", "built-in task used when data.path is empty", ("pick",))
    max_value: int = opt(30, "pick: addends are drawn from 1..max_value", lo=2)
    n_candidates: int = opt(4, "pick: candidates shown per problem (one is right)", lo=2)


@dataclass
class DataConfig:
    path: str | None = opt(None, "local .jsonl or .parquet training file; empty = the built-in task")
    eval_path: str | None = opt(
        None, "local held-out file for periodic evaluation (default: the task's test split)"
    )
    prompt_field: str = opt("prompt", "row field holding the prompt (a string)")
    answer_field: str = opt("answer", "row field holding the ground-truth answer")
    on_error: str = opt("raise", "what to do with a malformed row", ("raise", "skip"))


@dataclass
class RolloutConfig:
    backend: str = opt(
        "hf", "generation backend: hf (transformers), vllm (CUDA; pip install 'forkrl[vllm]')", ("hf", "vllm")
    )
    prompts_per_step: int = opt(16, "prompts whose groups are trained on per RL step", lo=1)
    group_size: int = opt(8, "completions sampled per prompt (G)", lo=1)
    temperature: float = opt(
        1.0, "sampling temperature T; entropies and log-probs use softmax(z / T)", lo=1e-3
    )
    top_p: float = opt(1.0, "nucleus sampling mass (1.0 = off, as in training in the paper)", lo=0.0, hi=1.0)
    max_new_tokens: int = opt(0, "completion length budget; 0 = the task's default", lo=0)
    threads: int = opt(
        0,
        "torch CPU threads while generating with the hf backend on CPU; 0 = auto: 1 for models under "
        "2M parameters (their decode steps are bound by per-op overhead, which more threads add to; "
        "bench/decode.py), else train.threads",
        lo=0,
    )
    lean_decode: bool = opt(
        True,
        "hf backend: decode steps of Llama/Qwen2/Qwen3/Mistral models through forkrl's lean step (the same "
        "logits as the model's forward, less overhead per token); false = the model's forward every step",
    )
    reuse_logprobs: bool = opt(
        True,
        "take old log-probs and entropies from the sampler (same model, same T) "
        "instead of a separate scoring pass (hf only: vllm gives no entropies)",
    )
    vllm_gpu_memory_utilization: float = opt(
        0.3, "vllm: share of GPU memory the colocated engine may take (weights + KV cache)", lo=0.01, hi=1
    )
    vllm_sleep: bool = opt(
        True, "vllm: free the engine's GPU memory during the update (sleep level 1: weights to CPU)"
    )


@dataclass
class SelectionConfig:
    rho: float = opt(0.2, "fraction of tokens that carry the gradient (paper: 0.2)", lo=0.0, hi=1.0)
    rule: str = opt(
        "top",
        "which tokens: highest entropy, lowest, uniform random, or all",
        ("top", "bottom", "random", "all"),
    )
    count: str = opt(
        "exact",
        "exact: k = ceil(rho*N) with deterministic ties; quantile: H >= (1-rho) quantile (TRL)",
        ("exact", "quantile"),
    )
    scope: str = opt("batch", "the token set rho is taken over", ("batch", "micro_batch", "sequence"))
    entropy_source: str = opt(
        "old",
        "old: entropies of the scoring pass; current: recomputed in each training forward",
        ("old", "current"),
    )


@dataclass
class LossConfig:
    eps_low: float = opt(0.2, "lower clip range of the importance ratio (DAPO)", lo=0.0)
    eps_high: float = opt(0.28, "upper clip range (DAPO clip-higher)", lo=0.0)
    dual_clip: float | None = opt(10.0, "dual-clip constant c for negative advantages; null = off", lo=1.0)
    normalizer: str = opt(
        "all_tokens", "loss denominator", ("all_tokens", "selected_tokens", "seq_mean", "constant")
    )
    kl_coef: float = opt(
        0.0, "KL penalty coefficient against the initial model (0 = off, as in DAPO)", lo=0.0
    )
    kl_estimator: str = opt(
        "k3",
        "KL estimator (Schulman's k1/k2/k3; verl's clamped low_var_kl)",
        ("k1", "k2", "k3", "low_var_kl"),
    )


@dataclass
class AlgorithmConfig:
    advantage: str = opt(
        "grpo",
        "advantage estimator; gae = PPO with a value model (critic) trained alongside the policy",
        ("grpo", "dr_grpo", "rloo", "gae"),
    )
    gamma: float = opt(
        1.0, "gae: discount over response tokens (1.0: the reward is the outcome)", lo=0.0, hi=1.0
    )
    lam: float = opt(
        1.0,
        "gae: lambda; 1.0 = Monte-Carlo return minus the critic's baseline (verl's RLVR default), "
        "< 1 leans on the critic's own bootstrapped values",
        lo=0.0,
        hi=1.0,
    )
    whiten_advantages: bool = opt(
        True, "gae: normalise advantages to mean 0, std 1 over the batch's valid tokens"
    )
    kl_in_reward: float = opt(
        0.0,
        "gae: beta of the per-token KL penalty in the reward, -beta*(logp_old - logp_ref) (0 = off)",
        lo=0.0,
    )
    value_clip: float | None = opt(
        0.2, "gae: clip of the value prediction around the scoring pass's value; null = off", lo=0.0
    )
    critic_lr: float = opt(1e-3, "gae: the critic's AdamW learning rate", lo=0.0)
    critic_warmup: int = opt(0, "gae: first RL steps that train only the critic (the policy waits)", lo=0)
    critic_path: str | None = opt(
        None,
        "gae: local folder to initialise the critic from (a causal LM or a saved critic); empty = the policy's",
    )
    critic_selection: bool = opt(
        False,
        "gae: train the critic only on the actor's selected tokens (ablation; default: every valid token)",
    )


@dataclass
class SamplingConfig:
    dynamic: bool = opt(True, "DAPO dynamic sampling: drop groups whose rewards are all equal and refill")
    max_rounds: int = opt(10, "most generation rounds per step when refilling", lo=1)
    overlong_filter: bool = opt(False, "mask truncated responses out of the loss")


@dataclass
class RewardConfig:
    fn: str | None = opt(
        None, "user reward 'package.module:function' called as fn(prompts, completions, **row_fields)"
    )
    isolate: bool = opt(
        True,
        "score in worker processes with a timeout enforced from outside (a hung or crashing "
        "verifier cannot stall training)",
    )
    timeout: float = opt(10.0, "seconds one completion's reward may take before it counts as 0", lo=0.001)
    workers: int = opt(0, "reward worker processes (0 = half the CPUs, at least 1)", lo=0)
    on_error: str = opt(
        "default",
        "a reward that raises: count it and give 0 (default), or stop the run (raise)",
        ("default", "raise"),
    )
    overlong_buffer: int = opt(
        0, "DAPO soft overlong punishment: length of the buffer before the budget (0 = off)", lo=0
    )
    overlong_factor: float = opt(1.0, "DAPO soft overlong punishment: penalty at the budget", lo=0.0)


@dataclass
class OptimConfig:
    lr: float = opt(2e-4, "AdamW learning rate", lo=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", lo=0.0)
    beta1: float = opt(0.9, "AdamW beta1", lo=0.0, hi=1.0)
    beta2: float = opt(0.99, "AdamW beta2", lo=0.0, hi=1.0)
    warmup_steps: int = opt(5, "linear learning-rate warmup, in optimizer steps", lo=0)
    grad_clip: float = opt(1.0, "global gradient-norm clip (0 = off)", lo=0.0)
    mini_batches: int = opt(
        1, "optimizer steps per RL step (the batch is split into this many mini-batches)", lo=1
    )
    micro_batch_size: int = opt(
        64, "sequences per forward/backward (gradient accumulation inside a mini-batch)", lo=1
    )


@dataclass
class TrainConfig:
    steps: int = opt(40, "RL steps", lo=0)
    seed: int = opt(0, "seed for data order, sampling and selection ties", lo=0)
    eval_every: int = opt(10, "evaluate every N steps (0 = only at start and end)", lo=0)
    eval_n: int = opt(500, "held-out problems per evaluation", lo=1)
    out_dir: str = opt("runs/forkrl", "run folder (metrics.jsonl, config.yaml, checkpoints/, final model)")
    dump_every: int = opt(
        0,
        "save the step's rollouts with per-token entropy, log-prob, selection and advantage "
        "to rollouts/ every N steps, for `forkrl analyze` (0 = off)",
        lo=0,
    )
    save_every: int = opt(
        0, "write a checkpoint every N steps (0 = only at the end and on SIGINT/SIGTERM)", lo=0
    )
    keep_checkpoints: int = opt(2, "newest checkpoints kept", lo=1)
    max_skipped_steps: int = opt(
        5, "stop after this many optimizer steps in a row skipped for NaN/inf gradients", lo=1
    )
    progress: bool = opt(True, "live progress display")
    threads: int = opt(
        1,
        "torch CPU threads (0 = torch's default); the tiny model's small matmuls gain little from more, and "
        "multithreaded small ops slow down badly on a busy machine",
        lo=0,
    )
    tensorboard: bool = opt(True, "also write TensorBoard events when tensorboard is installed")
    parallel: str = opt(
        "ddp",
        "with several processes (torchrun): `ddp` replicates the model and averages gradients; `fsdp` "
        "shards each decoder layer with FSDP2 (fully_shard)",
        ("ddp", "fsdp"),
    )


@dataclass
class Config:
    preset: str = opt("paper", "named option set applied first", ("paper", "official", "trl", "ppo"))
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message says what is allowed."""


def _sections(cfg: Config) -> dict[str, Any]:
    return {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if dataclasses.is_dataclass(f.type) or dataclasses.is_dataclass(getattr(cfg, f.name))
    }


def _field(section_obj, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(section_obj):
        if f.name == name:
            return f
    raise KeyError(name)


def _coerce(key: str, f: dataclasses.Field, value: Any, hint) -> Any:
    meta = f.metadata
    args = typing.get_args(hint)
    optional = type(None) in args or hint is type(None)
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required (got {value!r}); {meta['help']}")
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError
                value = value.lower() in ("true", "1", "yes", "on")
            elif not isinstance(value, bool):
                raise ValueError
        elif base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif base is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif base is str:
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: expected {base.__name__}; {meta['help']}") from None
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(
            f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, meta['choices']))}"
        )
    lo, hi = meta.get("lo"), meta.get("hi")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ConfigError(f"{key}={value!r} is out of range {rng}; {meta['help']}")
    return value


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set `section.field` (or `preset`) from a raw value, validating it."""
    if key == "preset":
        f = _field(cfg, "preset")
        cfg.preset = _coerce(key, f, value, str)
        return
    parts = key.split(".")
    sections = _sections(cfg)
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(
            f"unknown config key {key!r}; sections are {', '.join(sections)} (e.g. selection.rho=0.2)"
        )
    sec = sections[parts[0]]
    try:
        f = _field(sec, parts[1])
    except KeyError:
        names = ", ".join(x.name for x in dataclasses.fields(sec))
        raise ConfigError(f"unknown config key {key!r}; fields of {parts[0]!r} are {names}") from None
    hints = typing.get_type_hints(type(sec))
    setattr(sec, parts[1], _coerce(key, f, value, hints[parts[1]]))


def parse_override(text: str) -> tuple[str, Any]:
    """`selection.rho=0.1` -> ("selection.rho", 0.1); the value is parsed as YAML (numbers, bools, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    """Names of the YAML configs shipped in the package (`forkrl train --config NAME`)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file: `path` itself when it exists, else the shipped config of that name (`.yaml` optional)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = SHIPPED_CONFIGS / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if p.parent == Path(".") and shipped.is_file():
        return shipped
    raise ConfigError(
        f"--config {path}: no such file, and not a shipped config (one of: {', '.join(shipped_configs())})"
    )


def load_config(
    yaml_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
) -> Config:
    """Build a Config: preset, then the YAML file, then `values`, then dotted `overrides`."""
    from forkrl.presets import get_preset

    layers: list[tuple[str, Any]] = []
    if yaml_path is not None:
        yaml_path = resolve_config_path(yaml_path)
        with open(yaml_path) as fh:
            data = yaml.safe_load(fh) or {}  # safe_load: a config must not run code
        if not isinstance(data, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of sections, got {type(data).__name__}")
        layers += list(_flatten(data).items())
    layers += list(_flatten(values or {}).items())
    layers += [parse_override(o) for o in overrides]
    cfg = Config()
    # The preset is applied first whatever order it was given in, so explicit values win over it.
    preset = next((v for k, v in reversed(layers) if k == "preset"), cfg.preset)
    set_value(cfg, "preset", preset)
    for key, value in get_preset(cfg.preset).items():
        set_value(cfg, key, value)
    for key, value in layers:
        if key != "preset":
            set_value(cfg, key, value)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe(cfg: Config | None = None) -> str:
    """The configuration reference: every key, its default and its one-line documentation."""
    cfg = cfg or Config()
    lines = [f"preset = {cfg.preset!r}  # {_field(cfg, 'preset').metadata['help']}"]
    for name, sec in _sections(cfg).items():
        lines.append(f"[{name}]")
        for f in dataclasses.fields(sec):
            ch = f.metadata.get("choices")
            extra = f" ({' | '.join(map(str, ch))})" if ch else ""
            lines.append(f"  {name}.{f.name} = {getattr(sec, f.name)!r}  # {f.metadata['help']}{extra}")
    return "\n".join(lines)
