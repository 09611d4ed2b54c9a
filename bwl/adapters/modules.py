"""What an adapter file holds, module by module, in either format, and whether it fits a model.

Two formats are read:

- bwl/diffusers: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (and ``text_encoder.<module>...``), with the peft
  configs in ``lora_adapter_metadata``;
- kohya/A1111: ``lora_unet_<module_with_underscores>`` and ``lora_te_<...>`` with ``.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (scale = alpha / rank).

U-Net modules inside the nine paper blocks are *placed*; others (``conv_in``, ``time_embedding``, which LyCORIS'
``full`` preset trains) are listed as not placed. A module in a block SD1.x does not have is an error naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key

from bwl.adapters.blocks import BlockSpecError, paper_block
from bwl.adapters.files import read_metadata, read_tensors
from bwl.adapters.metadata import AdapterFileError, bwl_fields, peft_configs
from bwl.adapters.text_encoder import KOHYA_PREFIX as KOHYA_TE_PREFIX
from bwl.adapters.text_encoder import modules_by_kohya_name

_PEFT_KEY = re.compile(r"^(unet|text_encoder)\.(.+)\.lora_([AB])\.weight$")
_KOHYA_KEY = re.compile(r"^lora_(unet|te\d?)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


@dataclass
class ModuleLoRA:
    """One adapted module as stored in a file (``name`` as the file spells it)."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def parameters(self) -> int:
        return self.down.numel() + self.up.numel()

    @property
    def is_conv3x3(self) -> bool:
        return self.down.ndim == 4 and tuple(self.down.shape[-2:]) != (1, 1)

    @property
    def is_resnet_side(self) -> bool:
        return any(c in self.name for c in ("resnets", "downsamplers", "upsamplers"))


@dataclass
class AdapterContents:
    """An adapter file read module by module."""

    path: Path
    format: str  # "diffusers" (bwl's own) or "kohya"
    unet: list[ModuleLoRA] = field(default_factory=list)
    text_encoder: list[ModuleLoRA] = field(default_factory=list)
    unplaced: list[ModuleLoRA] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return "locon" if any(m.is_resnet_side for m in self.unet) else "lora"


def _peft_alpha(config: dict, module: str, rank: int) -> float:
    patterns = config.get("alpha_pattern") or {}
    key = get_pattern_key(list(patterns), module)
    return float(patterns.get(key, config.get("lora_alpha", rank)))


def _place(path: Path, key: str, module: ModuleLoRA, contents: AdapterContents) -> None:
    try:
        placed = paper_block(module.name) is not None
    except BlockSpecError as err:
        raise AdapterFileError(f"{path}: key {key!r}: {err}") from None
    (contents.unet if placed else contents.unplaced).append(module)


def _pairs(path: Path, found: dict[tuple[str, str], dict[str, torch.Tensor]], down: str, up: str):
    for (component, name), parts in found.items():
        if down not in parts or up not in parts:
            raise AdapterFileError(f"{path}: module {name!r} ({component}) lacks its {down} or {up} tensor")
        yield component, name, parts


def _read_kohya(path: Path, tensors: dict[str, torch.Tensor], contents: AdapterContents) -> None:
    found: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KOHYA_KEY.match(key)
        if not m:
            raise AdapterFileError(f"{path}: unexpected key {key!r} in a kohya-format file")
        component = "unet" if m.group(1) == "unet" else "text_encoder"
        found.setdefault((component, m.group(2)), {})[m.group(3)] = tensor
    for component, name, parts in _pairs(path, found, "lora_down.weight", "lora_up.weight"):
        down = parts["lora_down.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        module = ModuleLoRA(name, down, parts["lora_up.weight"], alpha)
        if component == "unet":
            _place(path, f"lora_unet_{name}", module, contents)
        else:
            contents.text_encoder.append(module)


def _read_peft(path: Path, tensors: dict[str, torch.Tensor], contents: AdapterContents) -> None:
    configs = peft_configs(path, contents.metadata)
    found: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _PEFT_KEY.match(key)
        if not m:
            raise AdapterFileError(
                f"{path}: unexpected key {key!r}; expected unet.<module>.lora_A/B.weight, "
                "text_encoder.<module>.lora_A/B.weight, or kohya's lora_unet_*/lora_te_*"
            )
        found.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = tensor
    for component, name, parts in _pairs(path, found, "A", "B"):
        rank = parts["A"].shape[0]
        config = configs.get(component)
        module = ModuleLoRA(name, parts["A"], parts["B"], _peft_alpha(config, name, rank) if config else float(rank))
        if component == "unet":
            _place(path, f"unet.{name}", module, contents)
        else:
            contents.text_encoder.append(module)


def read_modules(path: str | Path) -> AdapterContents:
    """Read an adapter file (bwl/diffusers or kohya format) module by module; bwl's metadata fields are validated."""
    path = Path(path)
    tensors = read_tensors(path)
    contents = AdapterContents(path, "diffusers", metadata=read_metadata(path))
    bwl_fields(path, contents.metadata)
    if any(_KOHYA_KEY.match(k) for k in tensors):
        contents.format = "kohya"
        _read_kohya(path, tensors, contents)
    else:
        _read_peft(path, tensors, contents)
    return contents


def resolve_names(
    contents: AdapterContents, unet: torch.nn.Module, text_encoder: torch.nn.Module | None
) -> dict[str, dict[str, ModuleLoRA]]:
    """Each U-Net and text-encoder module under the model's own module name: ``{"unet": {...}, "text_encoder": ...}``.

    kohya names are matched against the model's names with dots as underscores. A module the model does not have is
    an error naming it (and, for the text encoder, one without a text encoder to hold it).
    """
    resolved: dict[str, dict[str, ModuleLoRA]] = {"unet": {}, "text_encoder": {}}
    kohya = contents.format == "kohya"
    unet_names = [n for n, _ in unet.named_modules()]
    unet_index = {n.replace(".", "_"): n for n in unet_names} if kohya else {n: n for n in unet_names}
    for module in contents.unet + contents.unplaced:
        name = unet_index.get(module.name)
        shown = f"lora_unet_{module.name}" if kohya else module.name
        if name is None:
            raise AdapterFileError(f"{contents.path}: module {shown} does not exist in this U-Net "
                                   "(different base architecture?)")
        resolved["unet"][name] = module
    if contents.text_encoder and text_encoder is None:
        raise AdapterFileError(f"{contents.path}: has text-encoder LoRA but the model has no text encoder")
    te_index = modules_by_kohya_name(text_encoder) if contents.text_encoder and kohya else {}
    te_names = {n for n, _ in text_encoder.named_modules()} if contents.text_encoder else set()
    for module in contents.text_encoder:
        name = te_index.get(module.name) if kohya else module.name
        if name is None or name not in te_names:
            shown = f"{KOHYA_TE_PREFIX}{module.name}" if kohya else module.name
            raise AdapterFileError(f"{contents.path}: module {shown} does not exist in this text encoder "
                                   "(different base architecture?)")
        resolved["text_encoder"][name] = module
    return resolved


def check_shapes(path: str | Path, modules: dict[str, ModuleLoRA], model: torch.nn.Module, what: str) -> None:
    """Raise unless each module's down/up matrices fit ``model``'s weights, naming the first misfit and the shapes."""
    named = dict(model.named_modules())
    for name, lora in modules.items():
        base = named[name]
        base = getattr(base, "base_layer", base)
        weight = getattr(base, "weight", None)
        if weight is None:
            raise AdapterFileError(f"{path}: {what} module {name!r} has no weight to adapt")
        kernel = tuple(weight.shape[2:])
        fits = (
            lora.down.ndim == weight.ndim
            and lora.up.ndim == weight.ndim
            and lora.down.shape[1] == weight.shape[1]
            and lora.up.shape[0] == weight.shape[0]
            and lora.up.shape[1] == lora.rank
            and tuple(lora.down.shape[2:]) == kernel
        )
        if not fits:
            raise AdapterFileError(
                f"{path}: {what} module {name}: LoRA down {tuple(lora.down.shape)} and up {tuple(lora.up.shape)} "
                f"do not fit its weight {tuple(weight.shape)} (an adapter for a different base architecture?)"
            )


def check_fits(
    contents: AdapterContents, unet: torch.nn.Module, text_encoder: torch.nn.Module | None
) -> dict[str, dict[str, ModuleLoRA]]:
    """Check that every module ``contents`` adapts exists in the model, with fitting shapes; returns them resolved."""
    resolved = resolve_names(contents, unet, text_encoder)
    check_shapes(contents.path, resolved["unet"], unet, "U-Net")
    if text_encoder is not None:
        check_shapes(contents.path, resolved["text_encoder"], text_encoder, "text-encoder")
    return resolved


def fitted_modules(
    path: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None
) -> tuple[AdapterContents, dict[str, dict[str, ModuleLoRA]]]:
    """Read ``path`` and :func:`check_fits` it against the model."""
    contents = read_modules(path)
    return contents, check_fits(contents, unet, text_encoder)
