"""Where configurations come from: the YAML files shipped with forkrl and reading a YAML file safely."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from forkrl.errors import ConfigError

__all__ = ["SHIPPED_CONFIGS", "read_yaml", "resolve_config_path", "shipped_configs"]


SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # forkrl/configs/


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


def read_yaml(path: Path) -> Any:
    """A YAML file's plain values (safe_load: a config must not run code), with errors naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh) or {}
    except yaml.constructor.ConstructorError as e:
        line = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
        raise ConfigError(
            f"{path}: {line}the tag {e.problem.split('tag ')[-1]} is not a plain value; a forkrl config holds "
            "only numbers, strings, booleans, null, lists and mappings (YAML tags such as !!python/... are "
            "never loaded)"
        ) from None
    except yaml.YAMLError as e:
        mark, context, cmark = (getattr(e, k, None) for k in ("problem_mark", "context", "context_mark"))
        problem = (getattr(e, "problem", None) or str(e)) + (f", line {mark.line + 1}" if mark else "")
        if context and cmark:
            problem += f"; {context} that starts on line {cmark.line + 1}"
        raise ConfigError(f"{path}: not valid YAML ({problem}); fix the file") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None
