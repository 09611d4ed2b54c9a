"""Adapter-file metadata, parsed against the types it must have rather than trusted.

bwl's own fields (``bwl_*`` and diffusers' ``lora_adapter_metadata``) are bwl's contract: a malformed one is an
:class:`AdapterFileError` naming the field. kohya's ``ss_*`` fields are someone else's: one that cannot be parsed is
shown as unreadable, and the file stays readable from its tensors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bwl.adapters.architectures import ARCHITECTURES
from bwl.adapters.blocks import FINE_BLOCKS, BlockSpecError, parse_selection
from bwl.adapters.methods import METHODS
from bwl.adapters.spec import AdapterSpec


class AdapterFileError(ValueError):
    """An adapter file that is missing, unsafe, malformed, or does not fit the model."""


PEFT_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
PEFT_TYPES = tuple(dict.fromkeys(m.peft_type for m in METHODS.values()))
UNREADABLE = "unreadable"


def _json(path: str | Path, field: str, text: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{path}: metadata field {field!r} is not JSON ({err.msg} at {err.pos})") from None
    if not isinstance(value, kind):
        raise AdapterFileError(
            f"{path}: metadata field {field!r} must be a JSON {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check(path: str | Path, field: str, ok: bool, expected: str, value: Any) -> None:
    if not ok:
        raise AdapterFileError(f"{path}: metadata field {field!r} must be {expected}, got {value!r}")


def peft_configs(path: str | Path, metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``lora_adapter_metadata`` split into each component's peft config: ``{"unet": {...}, "text_encoder": ...}``.

    Every key must be ``unet.<field>`` or ``text_encoder.<field>``, and the fields that decide ranks and alphas must
    have their types, so a flat or misshapen config is refused instead of read as "alpha = rank".
    """
    field = "lora_adapter_metadata"
    if field not in metadata:
        return {}
    flat = _json(path, field, metadata[field], dict)
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, dot, name = key.partition(".")
        if component not in PEFT_COMPONENTS or not dot:
            raise AdapterFileError(
                f"{path}: metadata field {field!r} has key {key!r}; keys are unet.<field>, text_encoder.<field> or "
                "text_encoder_2.<field>"
            )
        configs.setdefault(component, {})[name] = value
    for component, config in configs.items():
        where = f"{field}: {component}"
        peft_type = config.get("peft_type", "LORA")
        _check(path, f"{where}.peft_type", peft_type in PEFT_TYPES, f"one of {', '.join(PEFT_TYPES)}", peft_type)
        if peft_type == "OFT":
            size = config.get("oft_block_size")
            _check(path, f"{where}.oft_block_size", _positive_int(size), "an integer >= 1", size)
            continue
        _check(path, f"{where}.r", _positive_int(config.get("r")), "an integer >= 1", config.get("r"))
        alpha_field = "lora_alpha" if peft_type == "LORA" else "alpha"
        alpha = config.get(alpha_field)
        _check(path, f"{where}.{alpha_field}", _number(alpha), "a number", alpha)
        for pattern, valid, expected in (("rank_pattern", _positive_int, "integers >= 1"),
                                         ("alpha_pattern", _number, "numbers")):
            values = config.get(pattern) or {}
            ok = isinstance(values, dict) and all(valid(v) for v in values.values())
            _check(path, f"{where}.{pattern}", ok, f"an object of {expected}", values)
    return configs


def _parse_spec(path: str | Path, text: str) -> dict:
    value = _json(path, "bwl_spec", text, dict)
    try:
        AdapterSpec(**value)
    except (TypeError, BlockSpecError) as err:
        raise AdapterFileError(f"{path}: metadata field 'bwl_spec' is not an adapter spec ({err})") from None
    return value


def _parse_block_ranks(path: str | Path, text: str) -> dict[str, int]:
    value = _json(path, "bwl_block_ranks", text, dict)
    for block, rank in value.items():
        _check(path, f"bwl_block_ranks.{block}", block in FINE_BLOCKS, f"a kohya fine block ({FINE_BLOCKS[1]}..)",
               block)
        _check(path, f"bwl_block_ranks.{block}", _positive_int(rank), "an integer >= 1", rank)
    return value


def _parse_alpha(path: str | Path, text: str) -> float | None:
    value = _json(path, "bwl_alpha", text, object)
    _check(path, "bwl_alpha", value is None or _number(value), "a number or null", value)
    return value


def _parse_steps(path: str | Path, text: str) -> int:
    try:
        steps = int(text)
    except ValueError:
        steps = -1
    _check(path, "bwl_steps", steps >= 0, "an integer >= 0", text)
    return steps


def _parse_method(path: str | Path, text: str) -> str:
    _check(path, "bwl_method", text in METHODS, f"one of {', '.join(METHODS)}", text)
    return text


def _parse_blocks(path: str | Path, text: str) -> str:
    errors = []
    for arch in ARCHITECTURES.values():  # the field is read in the file's layout, which bwl_architecture names
        try:
            parse_selection(text, arch)
            return text
        except BlockSpecError as err:
            errors.append(err)
    raise AdapterFileError(f"{path}: metadata field 'bwl_blocks' is not a block spec ({errors[0]})") from None


def _parse_architecture(path: str | Path, text: str) -> str:
    _check(path, "bwl_architecture", text in ARCHITECTURES, f"one of {', '.join(ARCHITECTURES)}", text)
    return text


BWL_FIELDS: dict[str, Callable[[str | Path, str], Any]] = {
    "bwl_spec": _parse_spec,
    "bwl_block_ranks": _parse_block_ranks,
    "bwl_alpha": _parse_alpha,
    "bwl_steps": _parse_steps,
    "bwl_method": _parse_method,
    "bwl_blocks": _parse_blocks,
    "bwl_architecture": _parse_architecture,
}
"""bwl's typed metadata fields and their parsers; the other ``bwl_*`` fields are free text."""


def bwl_fields(path: str | Path, metadata: dict[str, str]) -> dict[str, Any]:
    """Every typed ``bwl_*`` field present in ``metadata``, parsed; a malformed one raises naming it."""
    peft_configs(path, metadata)
    return {field: parse(path, metadata[field]) for field, parse in BWL_FIELDS.items() if field in metadata}


KOHYA_FIELDS: dict[str, Callable[[str], Any]] = {
    "ss_network_dim": int,
    "ss_network_alpha": float,
    "ss_network_args": json.loads,
    "ss_max_train_steps": int,
    "ss_learning_rate": float,
    "ss_unet_lr": float,
    "ss_text_encoder_lr": float,
    "ss_tag_frequency": json.loads,
}
"""The kohya fields bwl reads, with their types (as sd-scripts writes them)."""


def kohya_fields(metadata: dict[str, str]) -> dict[str, str]:
    """kohya's ``ss_*`` fields as text, with each typed one that does not parse replaced by ``"unreadable"``."""
    shown = {}
    for key, text in metadata.items():
        if not key.startswith("ss_"):
            continue
        parse = KOHYA_FIELDS.get(key)
        try:
            if parse is not None and text not in ("", "None"):
                parse(text)
            shown[key] = text
        except (ValueError, TypeError):
            shown[key] = UNREADABLE
    return shown
