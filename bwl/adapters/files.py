"""Adapter files: one ``.safetensors`` per adapter, loadable by ``StableDiffusionPipeline.load_lora_weights``.

Layout (diffusers' own): tensors ``unet.<module>.lora_A.weight`` / ``lora_B.weight``; metadata
``lora_adapter_metadata`` (the peft config, so ranks and alphas reload exactly) plus ``bwl_*`` keys that record
method, blocks, per-block ranks, alpha, base model, trigger word, steps and bwl version.
Each adapter is saved on its own, which avoids the mixed-format pitfall of
``convert_state_dict_to_diffusers`` (see NOTES.md).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bwl import __version__
from bwl.adapters.spec import AdapterSpec
from bwl.core.atomic import atomic_path

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class AdapterFileError(ValueError):
    """An adapter file that is missing, unsafe, or does not fit the model."""


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


def adapter_state_dict(unet: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors with diffusers' ``unet.`` prefix, contiguous and on the CPU."""
    state = get_peft_model_state_dict(unet, adapter_name=name)
    return {f"unet.{k}": v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_adapter(
    unet: torch.nn.Module,
    path: str | Path,
    spec: AdapterSpec,
    name: str = "default",
    base_model: str = "",
    trigger: str = "",
    steps: int = 0,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write adapter ``name`` of ``unet`` to ``path`` atomically."""
    tensors = adapter_state_dict(unet, name)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    bwl_metadata = {
        "bwl_method": spec.method,
        "bwl_blocks": spec.blocks,
        "bwl_block_ranks": json.dumps(spec.fine_ranks()),
        "bwl_alpha": json.dumps(spec.alpha),
        "bwl_spec": json.dumps(spec.to_dict(), sort_keys=True),
        "bwl_base_model": str(base_model),
        "bwl_trigger": str(trigger),
        "bwl_steps": str(int(steps)),
    }
    return write_adapter_file(path, tensors, unet.peft_config[name].to_dict(), bwl_metadata)


def write_adapter_file(
    path: str | Path, tensors: dict[str, torch.Tensor], peft_config: dict, metadata: dict[str, str]
) -> Path:
    """Write diffusers-format LoRA tensors, their peft config and extra metadata to ``path`` atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterFileError(f"{path}: adapter files must end in .safetensors")
    peft_config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_config.items()}
    header = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in peft_config.items()}, indent=2, sort_keys=True),
        "bwl_version": __version__,
        **metadata,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def read_info(path: str | Path) -> AdapterInfo:
    """The bwl metadata of an adapter file written by :func:`save_adapter`."""
    meta = read_metadata(path)
    if "bwl_spec" not in meta:
        raise AdapterFileError(f"{path}: not a bwl adapter file (no bwl_spec metadata); use bwl.kohya.inspect_adapter")
    try:
        spec = AdapterSpec(**json.loads(meta["bwl_spec"]))
        return AdapterInfo(
            spec=spec,
            base_model=meta.get("bwl_base_model", ""),
            trigger=meta.get("bwl_trigger", ""),
            steps=int(meta.get("bwl_steps", "0")),
            version=meta.get("bwl_version", ""),
            block_ranks=json.loads(meta.get("bwl_block_ranks", "{}")),
        )
    except (ValueError, TypeError) as err:
        raise AdapterFileError(f"{path}: malformed bwl metadata ({err})") from err


def check_fits(unet: torch.nn.Module, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise if an adapter's tensors do not fit ``unet``, naming the first mismatched module and the shapes."""
    modules = dict(unet.named_modules())
    for key, tensor in tensors.items():
        if not key.startswith("unet.") or ".lora_" not in key:
            continue
        module_name, kind = key[len("unet."):].split(".lora_", 1)
        module = modules.get(module_name)
        if module is None:
            raise AdapterFileError(
                f"{path}: module {module_name!r} does not exist in this U-Net (different base architecture?)"
            )
        module = getattr(module, "base_layer", module)
        weight = getattr(module, "weight", None)
        if weight is None:
            raise AdapterFileError(f"{path}: module {module_name!r} has no weight to adapt")
        fan_in, fan_out = weight.shape[1], weight.shape[0]
        if (kind.startswith("A") and tensor.shape[1] != fan_in) or (
            kind.startswith("B") and tensor.shape[0] != fan_out
        ):
            raise AdapterFileError(
                f"{path}: {key} has shape {tuple(tensor.shape)} but {module_name} has weight {tuple(weight.shape)} "
                "(different base architecture?)"
            )


def _unet_only_notice(record: logging.LogRecord) -> bool:
    """False for diffusers' notice that a file has no text-encoder LoRA (bwl's files are U-Net only by design)."""
    return not record.getMessage().startswith("No LoRA keys associated to CLIPTextModel")


def load_adapter(pipe: StableDiffusionPipeline, path: str | Path, name: str) -> None:
    """Load a bwl or kohya/A1111 adapter file into ``pipe`` as adapter ``name``, after checking it fits."""
    path = check_safetensors(path)
    tensors = read_tensors(path)
    if any(k.startswith("unet.") for k in tensors):
        check_fits(pipe.unet, tensors, path)
    notices = logging.getLogger("diffusers.loaders.lora_base")
    notices.addFilter(_unet_only_notice)
    try:
        with warnings.catch_warnings():  # peft's note that the U-Net now holds several adapters: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
            pipe.load_lora_weights(str(path), adapter_name=name)
    finally:
        notices.removeFilter(_unet_only_notice)
