"""Run configs as dataclasses: read from YAML/JSON, overridden from the command line, unknown keys refused, every
value coerced to its field's declared type and checked against its allowed range when the config is made.

YAML 1.1 reads ``1e-3`` (no dot) as a string and a flag's value may be any text, so each config class calls
:func:`coerce_fields` in ``__post_init__``: ``"1e-3"`` becomes ``0.001`` for a float field, ``"abc"`` for an int
field is a ``ConfigError`` naming the field, the value and the type. :func:`require` states a range.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value bwl does not accept."""


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the type ``hint`` describes (int, float, bool, str, Literal, X | None, list[X], dict[K, V]), or a
    ``ConfigError`` naming ``where``, the value and the type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def refuse() -> ConfigError:
        return ConfigError(f"{where}={value!r} is not a valid {_type_name(hint)}")

    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return coerce(value, option, where)
            except ConfigError as error:
                errors.append(error)
        if len(errors) == 1 and type(None) in args:  # X | None: say what X allows, and that None does too
            raise ConfigError(f"{errors[0]} (or None)") from None
        raise refuse()
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}={value!r} is not one of {', '.join(map(str, args))}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise refuse()
    if hint in (int, float):
        if isinstance(value, bool):
            raise refuse()
        if isinstance(value, str):
            try:
                numeric = hint is float or "." in value or "e" in value.lower()
                value_number = float(value.strip()) if numeric else int(value)
            except ValueError:
                raise refuse() from None
        elif isinstance(value, (int, float)):
            value_number = value
        else:
            raise refuse()
        if hint is int:
            if float(value_number) != int(value_number):
                raise refuse()
            return int(value_number)
        return float(value_number)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise refuse()
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise refuse()
        return [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise refuse()
        if not args:
            return dict(value)
        return {coerce(k, args[0], f"{where} key"): coerce(v, args[1], f"{where}[{k!r}]") for k, v in value.items()}
    return value


def coerce_fields(config: Any) -> None:
    """Coerce every field of the dataclass instance ``config`` to its declared type, in place."""
    cls = type(config)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        setattr(config, f.name, coerce(getattr(config, f.name), hints[f.name], f"{cls.__name__}.{f.name}"))


def require(config: Any, checks: Iterable[tuple[str, bool, str]]) -> None:
    """A ``ConfigError`` for the first ``(field, ok, allowed)`` that is not ok, naming the field, value and range."""
    for name, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{type(config).__name__}.{name}={getattr(config, name)!r}: must be {allowed}")


def read_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping from ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys to values")
    return data


def build(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """``cls(**values)``, raising a ``ConfigError`` that names any unknown key and lists the valid ones."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(names)}")
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--name`` flag per dataclass field (values parsed as YAML scalars, lists or mappings)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, type=parse_value, default=argparse.SUPPRESS,
            help=f"{hints.get(f.name, '')} (default: {json.dumps(default, default=str)})",
        )


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build ``cls`` from ``--config FILE`` plus the flags given on the command line (flags win)."""
    values = dict(vars(args))
    config_file = values.pop("config", None)
    values.pop("command", None)
    values.pop("debug", None)
    merged = read_file(config_file) if config_file else {}
    merged.update(values)
    return build(cls, merged, source=str(config_file or "command line"))
