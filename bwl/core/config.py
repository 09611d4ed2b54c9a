"""Run configs as dataclasses: read from YAML/JSON, overridden from the command line, unknown keys refused."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value bwl does not accept."""


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
    return cls(**values)


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
    merged = read_file(config_file) if config_file else {}
    merged.update(values)
    return build(cls, merged, source=str(config_file or "command line"))
