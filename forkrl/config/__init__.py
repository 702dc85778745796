"""The run configuration: one dataclass per section, every field documented next to itself.

A run is configured by a preset (`paper`, `official`, `trl`, see `forkrl.config.presets`), an optional
YAML file, and dotted overrides such as `selection.rho=0.1`, applied in that order. Every value is
validated against the field's type and allowed values; a bad one names the field and what is allowed.
The allowed names of the selection rule, count mode, normalizers, KL estimator and advantage are
read from the core's registries (`register_rule` and the like), and the numeric bounds are the
core's own, so a bad value fails here rather than at the first update.
The resolved configuration is saved as `config.yaml` in the run folder.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from forkrl.config import fields as choices
from forkrl.config.checks import check_together as _check_together
from forkrl.config.checks import warnings_for  # noqa: F401  (part of this module's API)
from forkrl.config.fields import ConfigError, choices_of, coerce, opt, range_of
from forkrl.config.files import SHIPPED_CONFIGS, resolve_config_path, shipped_configs  # noqa: F401
from forkrl.config.files import read_yaml as _read_yaml
from forkrl.config.sections import (  # noqa: F401  (the sections are part of this module's API)
    AlgorithmConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    RolloutConfig,
    SamplingConfig,
    SelectionConfig,
    TaskConfig,
    TrainConfig,
)


@dataclass
class Config:
    preset: str = opt(
        "paper", "named option set applied first (forkrl.config.presets.PRESETS)", choices.presets
    )
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


def all_keys(cfg: Config) -> list[str]:
    """Every `section.field` key."""
    return [f"{n}.{f.name}" for n, sec in _sections(cfg).items() for f in dataclasses.fields(sec)]


def did_you_mean(cfg: Config, key: str, value: Any = None) -> str:
    """'; did you mean `train.steps=5`?' for a misspelt key (or a bare field name such as `steps`),
    or '' when nothing is close.

    >>> did_you_mean(Config(), "trian.steps", 5)
    '; did you mean `train.steps=5`?'
    >>> did_you_mean(Config(), "steps", 5)
    '; did you mean `train.steps=5`?'
    """
    import difflib

    keys = all_keys(cfg)
    by_field = [k for k in keys if k.split(".", 1)[1] == key.replace("-", "_")]
    close = by_field or difflib.get_close_matches(key.replace("-", "_"), keys, n=1, cutoff=0.75)
    if not close:
        return ""
    shown = close[0] if value is None else f"{close[0]}={value}"
    return f"; did you mean `{shown}`?"


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set `section.field` (or `preset`) from a raw value, validating it."""
    if key == "preset":
        cfg.preset = coerce(key, _field(cfg, "preset"), value, str)
        return
    parts = key.split(".")
    sections = _sections(cfg)
    if parts[0] not in sections:
        raise ConfigError(
            f"unknown config key {key!r}{did_you_mean(cfg, key, value)}; sections are "
            f"{', '.join(sections)} (e.g. selection.rho=0.2)"
        )
    sec = sections[parts[0]]
    names = ", ".join(x.name for x in dataclasses.fields(sec))
    if len(parts) == 1:
        if value is None:  # a YAML section with every line commented out
            return
        raise ConfigError(f"{key}: a section, so a mapping of its fields ({names}), not {value!r}")
    try:
        f = _field(sec, parts[1])
    except KeyError:
        raise ConfigError(
            f"unknown config key {key!r}{did_you_mean(cfg, key, value)}; fields of {parts[0]!r} are {names}"
        ) from None
    if len(parts) > 2:
        raise ConfigError(f"{parts[0]}.{parts[1]} takes one value, not a mapping (got key {key!r})")
    hints = typing.get_type_hints(type(sec))
    setattr(sec, parts[1], coerce(key, f, value, hints[parts[1]]))


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


def load_config(
    yaml_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
) -> Config:
    """Build a Config: preset, then the YAML file, then `values`, then dotted `overrides`."""
    from forkrl.config.presets import get_preset

    layers: list[tuple[str, Any, str]] = []  # (key, value, where it came from: prefix of its errors)
    if yaml_path is not None:
        yaml_path = resolve_config_path(yaml_path)
        data = _read_yaml(yaml_path)
        if not isinstance(data, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of sections, got {type(data).__name__}")
        layers += [(k, v, f"{yaml_path}: ") for k, v in _flatten(data).items()]
    layers += [(k, v, "") for k, v in _flatten(values or {}).items()]
    layers += [(*parse_override(o), "") for o in overrides]
    cfg = Config()
    # The preset is applied first whatever order it was given in, so explicit values win over it.
    preset = next(((v, w) for k, v, w in reversed(layers) if k == "preset"), (cfg.preset, ""))
    _apply(cfg, [("preset", *preset)])
    _apply(cfg, [(k, v, f"preset {cfg.preset}: ") for k, v in get_preset(cfg.preset).items()])
    _apply(cfg, [layer for layer in layers if layer[0] != "preset"])
    _check_together(cfg)
    return cfg


def _apply(cfg: Config, layers: list[tuple[str, Any, str]]) -> None:
    for key, value, where in layers:
        try:
            set_value(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None


def describe(cfg: Config | None = None) -> str:
    """The configuration reference: every key, its default, its one-line documentation, what is allowed."""
    cfg = cfg or Config()

    def line(key: str, f: dataclasses.Field, value: Any) -> str:
        ch, rng = choices_of(f), range_of(f)
        extra = f" [{' | '.join(map(str, ch))}]" if ch else (f" [range {rng}]" if rng else "")
        return f"{key} = {value!r}  # {f.metadata['help']}{extra}"

    lines = [line("preset", _field(cfg, "preset"), cfg.preset)]
    for name, sec in _sections(cfg).items():
        lines.append(f"[{name}]")
        lines += [f"  {line(f'{name}.{f.name}', f, getattr(sec, f.name))}" for f in dataclasses.fields(sec)]
    return "\n".join(lines)
