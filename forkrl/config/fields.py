"""How `forkrl.config` declares and checks one field: `opt`, the registry-backed choices, `coerce`.

A field's allowed values are a tuple or a function returning one, called when a value is checked or
the reference is printed: a name added later with `register_rule` (or any `register_*` of
`forkrl.core`) is then selectable from YAML and the command line. Numeric fields carry the bounds
the core enforces, inclusive (`lo`, `hi`) or exclusive (`gt`, `lt`), so a bad value fails when the
config is read, not at the first update.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import field
from typing import Any

from forkrl.errors import ConfigError

Choices = tuple | Callable[[], tuple] | None


def opt(
    default: Any,
    help: str,
    choices: Choices = None,
    lo: float | None = None,
    hi: float | None = None,
    *,
    gt: float | None = None,
    lt: float | None = None,
):
    """A config field with its one-line documentation and, optionally, its allowed values or range.

    `lo <= value <= hi` and `gt < value < lt`; at most one lower and one upper bound.
    """
    if (lo is not None and gt is not None) or (hi is not None and lt is not None):
        raise ValueError("give lo or gt, hi or lt, not both")
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi, "gt": gt, "lt": lt}
    return field(default=default, metadata=meta)


def choices_of(f: dataclasses.Field) -> tuple | None:
    """The field's allowed values now (a registry's names as they stand), or None when any will do."""
    ch = f.metadata.get("choices")
    return tuple(ch()) if callable(ch) else ch


def range_of(f: dataclasses.Field) -> str | None:
    """The allowed range in interval notation, `[0.0, 1.0)`, or None when the field has no bound."""
    m = f.metadata
    lo, hi, gt, lt = m.get("lo"), m.get("hi"), m.get("gt"), m.get("lt")
    if lo is None and hi is None and gt is None and lt is None:
        return None
    left = f"[{lo}" if lo is not None else (f"({gt}" if gt is not None else "(-inf")
    right = f"{hi}]" if hi is not None else (f"{lt})" if lt is not None else "inf)")
    return f"{left}, {right}"


def _in_range(f: dataclasses.Field, value: float) -> bool:
    m = f.metadata
    return (
        (m.get("lo") is None or value >= m["lo"])
        and (m.get("gt") is None or value > m["gt"])
        and (m.get("hi") is None or value <= m["hi"])
        and (m.get("lt") is None or value < m["lt"])
    )


# Choices read from the registries of forkrl.core, imported on first use (the core imports torch).


def rules() -> tuple[str, ...]:
    from forkrl.core.selection import RULES

    return tuple(RULES)


def counts() -> tuple[str, ...]:
    from forkrl.core.selection import COUNTS

    return tuple(COUNTS)


def normalizers() -> tuple[str, ...]:
    from forkrl.core.losses import NORMALIZERS

    return tuple(NORMALIZERS)


def kl_normalizers() -> tuple[str, ...]:
    return tuple(dict.fromkeys(("policy", *normalizers())))


def loss_modes() -> tuple[str, ...]:
    from forkrl.core.losses import POLICY_LOSSES

    return tuple(POLICY_LOSSES)


def kl_estimators() -> tuple[str, ...]:
    from forkrl.core.losses import KL_ESTIMATORS

    return tuple(KL_ESTIMATORS)


def advantages() -> tuple[str, ...]:
    from forkrl.core.advantages import ADVANTAGES, TOKEN_ADVANTAGES

    return tuple(dict.fromkeys((*ADVANTAGES, *TOKEN_ADVANTAGES)))


def presets() -> tuple[str, ...]:
    from forkrl.config.presets import PRESETS

    return tuple(PRESETS)


def _to_base(base, value: Any) -> Any:
    """`value` as `base` (bool, int, float, str); ValueError or TypeError when it is not one."""
    if base is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return value.lower() in ("true", "1", "yes", "on")
        if not isinstance(value, bool):
            raise ValueError
        return value
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    if base is float:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if base is str:
        return str(value)
    return value


def coerce(key: str, f: dataclasses.Field, value: Any, hint) -> Any:
    """`value` converted to the field's type and checked against its choices and range."""
    meta = f.metadata
    args = typing.get_args(hint)
    optional = type(None) in args or hint is type(None)
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required (got {value!r}); {meta['help']}")
    try:
        value = _to_base(base, value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}={value!r}: expected {base.__name__}; {meta['help']}") from None
    choices = choices_of(f)
    if choices and value not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
    if isinstance(value, float) and not math.isfinite(value):
        # NaN compares False with every bound, so it must be refused on its own.
        allowed = f"a finite number in {range_of(f)}" if range_of(f) else "a finite number"
        raise ConfigError(f"{key}={value!r} is not allowed; give {allowed}; {meta['help']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not _in_range(f, value):
        raise ConfigError(f"{key}={value!r} is out of range {range_of(f)}; {meta['help']}")
    return value
