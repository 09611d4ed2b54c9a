"""Adapter files: one ``.safetensors`` per adapter, loadable by ``StableDiffusionPipeline.load_lora_weights``.

Layout (diffusers' own): tensors ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (or the method's own peft
tensors: ``lora_magnitude_vector``, ``hada_w1_a``…, ``lokr_w1``…, ``oft_R.weight``), and
``text_encoder.<module>...`` (and SDXL's ``text_encoder_2.<module>...``) when the text encoders are adapted too;
metadata ``lora_adapter_metadata`` (the peft configs keyed ``unet.*``, ``text_encoder.*`` and ``text_encoder_2.*``, so
ranks and alphas reload exactly; SDXL pipelines' ``load_lora_weights`` reads the same layout) plus ``bwl_*`` keys that
record method, blocks, per-block ranks, alpha, base model, trigger word, steps, layout and bwl version
(:mod:`bwl.adapters.metadata`).
Each adapter is saved on its own, which avoids the mixed-format pitfall of
``convert_state_dict_to_diffusers`` (see NOTES.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bwl import __version__
from bwl.adapters.metadata import AdapterFileError, bwl_fields
from bwl.adapters.methods import carries
from bwl.adapters.spec import AdapterSpec
from bwl.core.atomic import atomic_path

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


@dataclass
class AdapterInfo:
    """What a bwl adapter file says about itself."""

    spec: AdapterSpec
    base_model: str
    trigger: str
    steps: int
    version: str
    block_ranks: dict[str, int]


def check_safetensors(path: str | Path, allow_pickle: bool = False) -> Path:
    """Refuse missing files and pickle formats (which can run code) unless ``allow_pickle`` is set."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise AdapterFileError(
            f"{path}: refusing a pickle file ({path.suffix}); it can execute code when loaded. "
            "Convert it to .safetensors, or pass allow_pickle=True if you trust its source."
        )
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such adapter file")
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of ``path`` (an empty dict if there is none)."""
    path = check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({err})") from err


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors adapter file, on the CPU."""
    path = check_safetensors(path)
    try:
        return load_file(str(path))
    except Exception as err:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({err})") from err


def has_adapter(model: torch.nn.Module | None, name: str) -> bool:
    """Whether ``model`` carries peft adapter ``name``."""
    return model is not None and any(carries(m, name) for m in model.modules())


TextEncoders = Mapping[str, torch.nn.Module] | torch.nn.Module | None


def encoders_by_name(text_encoder: TextEncoders) -> dict[str, torch.nn.Module]:
    """Text encoders keyed by pipeline attribute (a bare module is ``text_encoder``)."""
    if text_encoder is None:
        return {}
    if isinstance(text_encoder, torch.nn.Module):
        return {"text_encoder": text_encoder}
    return {k: v for k, v in text_encoder.items() if v is not None}


def adapter_state_dict(unet: torch.nn.Module, name: str, text_encoder: TextEncoders = None) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors with diffusers' ``unet.``/``text_encoder.``/``text_encoder_2.`` prefixes,
    contiguous, on the CPU. ``text_encoder``: one module, or the text encoders by pipeline attribute."""
    state = {}
    for prefix, model in (("unet", unet), *encoders_by_name(text_encoder).items()):
        if prefix == "unet" or has_adapter(model, name):
            for key, value in get_peft_model_state_dict(model, adapter_name=name).items():
                state[f"{prefix}.{key}"] = value.detach().to("cpu").contiguous()
    return state


def save_adapter(
    unet: torch.nn.Module,
    path: str | Path,
    spec: AdapterSpec,
    name: str = "default",
    base_model: str = "",
    trigger: str = "",
    steps: int = 0,
    dtype: torch.dtype | None = None,
    text_encoder: TextEncoders = None,
    training: dict[str, str] | None = None,
) -> Path:
    """Write adapter ``name`` of ``unet`` (and of the text encoders, where they have one) to ``path`` atomically.
    ``text_encoder``: one module, or SDXL's two by pipeline attribute. ``training`` adds ``bwl_*`` fields on how it
    was trained (per-block learning rates, LoRA+)."""
    spec = spec.bind(unet)
    encoders = encoders_by_name(text_encoder)
    tensors = adapter_state_dict(unet, name, encoders)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    for attribute, model in (encoders.items() if encoders else {"text_encoder": None}.items()):
        if spec.text_encoder != has_adapter(model, name):
            raise AdapterFileError(f"{path}: the spec says text_encoder={spec.text_encoder}, but {attribute} "
                                   f"{'lacks' if spec.text_encoder else 'has'} adapter {name!r}")
    bwl_metadata = {
        "bwl_method": spec.method,
        "bwl_blocks": spec.blocks,
        "bwl_block_ranks": json.dumps(spec.fine_ranks()),
        "bwl_alpha": json.dumps(spec.alpha),
        "bwl_spec": json.dumps(spec.to_dict(), sort_keys=True),
        "bwl_base_model": str(base_model),
        "bwl_trigger": str(trigger),
        "bwl_steps": str(int(steps)),
        "bwl_architecture": spec.arch.name,
        **(training or {}),
    }
    configs = {"unet": unet.peft_config[name].to_dict()}
    if spec.text_encoder:
        configs.update({attribute: model.peft_config[name].to_dict() for attribute, model in encoders.items()})
    return write_adapter_file(path, tensors, configs, bwl_metadata)


def write_adapter_file(
    path: str | Path, tensors: dict[str, torch.Tensor], peft_configs: dict[str, dict], metadata: dict[str, str]
) -> Path:
    """Write diffusers-format LoRA tensors, their peft configs (``{"unet": ..., "text_encoder": ...}``) and extra
    metadata to ``path`` atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterFileError(f"{path}: adapter files must end in .safetensors")
    flat = {
        f"{component}.{k}": (sorted(v) if isinstance(v, set) else v)
        for component, config in peft_configs.items()
        for k, v in config.items()
    }
    header = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(flat, indent=2, sort_keys=True),
        "bwl_version": __version__,
        **metadata,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def read_info(path: str | Path) -> AdapterInfo:
    """The bwl metadata of an adapter file written by :func:`save_adapter`, each field checked for its type."""
    meta = read_metadata(path)
    if "bwl_spec" not in meta:
        raise AdapterFileError(f"{path}: not a bwl adapter file (no bwl_spec metadata); use bwl inspect")
    fields = bwl_fields(path, meta)
    return AdapterInfo(
        spec=AdapterSpec(**fields["bwl_spec"]),
        base_model=meta.get("bwl_base_model", ""),
        trigger=meta.get("bwl_trigger", ""),
        steps=fields.get("bwl_steps", 0),
        version=meta.get("bwl_version", ""),
        block_ranks=fields.get("bwl_block_ranks", {}),
    )
