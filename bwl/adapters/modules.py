"""What an adapter file holds, module by module, in either format (:mod:`.fitting` checks it against a model).

Two formats are read:

- bwl/diffusers: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (and ``text_encoder.<module>...``, SDXL's
  ``text_encoder_2.<module>...``), with the peft configs in ``lora_adapter_metadata``;
- kohya/A1111 and LyCORIS: ``lora_unet_<module_with_underscores>`` (diffusers' names on SD 1.x/2.x, the original
  model's ``input_blocks``/``middle_block``/``output_blocks`` on SDXL) and ``lora_te_<...>`` (SDXL: ``lora_te1_``,
  ``lora_te2_``) with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` (scale = alpha / rank), plus
  ``.dora_scale`` (DoRA), or LoHa's ``hada_w1_a``… and LoKr's ``lokr_w1``… tensors, which keep their names in peft.

The file's layout is read from what it says (``bwl_architecture``), its names (SGM names, a second text encoder) or
the blocks it adapts (attention in ``down_blocks.0`` is SD 1.x's, in ``up_blocks.0`` SDXL's); None where they leave
it open. U-Net modules inside the paper blocks are *placed*; others (``conv_in``, ``time_embedding``, which LyCORIS'
``full`` preset trains) are listed as not placed. A module in a block the layout does not have is an error naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.tuners.lokr.layer import factorization
from peft.utils.other import get_pattern_key

from bwl.adapters.architectures import SD1, SDXL, Architecture, get_architecture
from bwl.adapters.blocks import BlockSpecError, paper_block
from bwl.adapters.files import read_metadata, read_tensors
from bwl.adapters.metadata import AdapterFileError, bwl_fields, peft_configs
from bwl.adapters.methods import ALL_TENSOR_NAMES, METHODS, TENSOR_NAMES

_PEFT_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.("
                       + "|".join(re.escape(n) for n in ALL_TENSOR_NAMES) + r")$")
KOHYA_TE_COMPONENTS = {"te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_KOHYA_KEY = re.compile(r"^lora_(unet|te\d?)_([^.]+)\.(.+)$")
# kohya/LyCORIS tensor names -> peft's (LoHa and LoKr tensors are named alike in both).
KOHYA_TENSORS: dict[str, str] = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight",
                                 "dora_scale": "lora_magnitude_vector",
                                 **{n: n for n in TENSOR_NAMES["LOHA"] + TENSOR_NAMES["LOKR"]}}
UNSUPPORTED_KOHYA = {"lora_mid.weight": "LoCon's Tucker core (use_tucker/use_cp)", "hada_t1": "LoHa's Tucker core",
                     "hada_t2": "LoHa's Tucker core", "lokr_t2": "LoKr's Tucker core",
                     "oft_blocks": "LyCORIS' Diag-OFT", "oft_diag": "LyCORIS' Diag-OFT", "w_norm": "a norm layer",
                     "diff": "a full weight difference", "diff_b": "a bias difference"}
_CONV3X3 = re.compile(r"(resnets[._]\d+[._]conv[12]|samplers[._]0[._]conv)$")


@dataclass
class ModuleAdapter:
    """One adapted module as stored in a file (``name`` as the file spells it), its tensors under peft's names."""

    name: str
    tensors: dict[str, torch.Tensor]
    alpha: float
    rank: int
    peft_type: str = "LORA"
    options: dict = field(default_factory=dict)  # peft config fields the tensors imply (LoKr's decompose_both)

    @property
    def down(self) -> torch.Tensor:
        return self.tensors["lora_A.weight"]

    @property
    def up(self) -> torch.Tensor:
        return self.tensors["lora_B.weight"]

    @property
    def dora(self) -> bool:
        return "lora_magnitude_vector" in self.tensors

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def is_conv3x3(self) -> bool:
        if self.peft_type == "LORA":
            return self.down.ndim == 4 and tuple(self.down.shape[-2:]) != (1, 1)
        return bool(_CONV3X3.search(self.name))

    @property
    def is_resnet_side(self) -> bool:
        return any(c in self.name for c in ("resnets", "downsamplers", "upsamplers"))


@dataclass
class AdapterContents:
    """An adapter file read module by module."""

    path: Path
    format: str  # "diffusers" (bwl's own) or "kohya"
    unet: list[ModuleAdapter] = field(default_factory=list)
    text_encoders: dict[str, list[ModuleAdapter]] = field(default_factory=dict)
    """Text-encoder modules by pipeline attribute (``text_encoder``, SDXL's ``text_encoder_2``)."""
    unplaced: list[ModuleAdapter] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    architecture: Architecture | None = None
    """The layout the file is for, where it tells (:func:`file_architecture`)."""

    @property
    def text_encoder(self) -> list[ModuleAdapter]:
        """Every text-encoder module, of either encoder."""
        return [m for modules in self.text_encoders.values() for m in modules]

    @property
    def arch(self) -> Architecture:
        """The layout to name blocks in: the file's, else SD 1.x (whose block names SDXL's all share)."""
        return self.architecture or SD1

    @property
    def method(self) -> str:
        """The method's name: ``lora``/``locon`` by what they adapt, ``loha``, ``lokr`` or ``oft`` by their tensors."""
        kinds = {m.peft_type for m in self.unet + self.unplaced} or {"LORA"}
        if kinds != {"LORA"}:
            return next(m.name for m in METHODS.values() if m.peft_type in kinds and m.name != "lora")
        return "locon" if any(m.is_resnet_side for m in self.unet) else "lora"

    @property
    def dora(self) -> bool:
        return any(m.dora for m in self.unet + self.text_encoder)


def _pattern_value(config: dict, pattern: str, module: str, default):
    patterns = config.get(pattern) or {}
    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def _place(path: Path, key: str, module: ModuleAdapter, contents: AdapterContents) -> None:
    try:
        placed = paper_block(module.name, contents.arch) is not None
    except BlockSpecError as err:
        raise AdapterFileError(f"{path}: key {key!r}: {err}") from None
    (contents.unet if placed else contents.unplaced).append(module)


def _kind(path: Path, name: str, parts: dict[str, torch.Tensor]) -> str:
    """The peft type a module's tensors belong to, every tensor it needs present."""
    kinds = {kind for kind, names in TENSOR_NAMES.items() if any(n in parts for n in names)}
    if len(kinds) != 1:
        held = " and ".join(sorted(kinds)) if kinds else "no adapter tensors"
        raise AdapterFileError(f"{path}: module {name!r} holds {held}; one method's tensors expected")
    kind = kinds.pop()
    if kind == "LOKR":
        missing = [f"{n} (or {n}_a and {n}_b)" for n in ("lokr_w1", "lokr_w2")
                   if n not in parts and not (f"{n}_a" in parts and f"{n}_b" in parts)]
    else:
        needed = {"LORA": ("lora_A.weight", "lora_B.weight"), "LOHA": TENSOR_NAMES["LOHA"], "OFT": ("oft_R.weight",)}
        missing = [n for n in needed[kind] if n not in parts]
    if missing:
        raise AdapterFileError(f"{path}: module {name!r} lacks its {', '.join(missing)} tensor")
    return kind


def _lokr_factors(parts: dict[str, torch.Tensor]) -> list[int]:
    """LyCORIS' possible ``factor`` values for a LoKr module, likeliest first: -1 when ``w1`` is the balanced
    factorization of the dimensions the factors give, and ``w1``'s larger side (what LyCORIS' loader takes then).
    :func:`check_shapes` keeps the first that fits the model's layer."""
    w1 = parts["lokr_w1"].shape if "lokr_w1" in parts else (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1])
    w2 = parts["lokr_w2"].shape[:2] if "lokr_w2" in parts else (parts["lokr_w2_a"].shape[0],
                                                                parts["lokr_w2_b"].shape[1])
    balanced = (factorization(w1[0] * w2[0], -1)[0], factorization(w1[1] * w2[1], -1)[0]) == tuple(w1)
    return [-1, max(w1)] if balanced else [max(w1), -1]


def _lokr_rank(parts: dict[str, torch.Tensor], alpha: float | None) -> tuple[int, float, dict]:
    """LyCORIS' LoKr rank and scale, as peft's ``r``/``alpha``: both factors full means scale 1 (LyCORIS sets alpha to
    the rank), which peft builds with ``r`` at least half the largest factor dimension."""
    factors = _lokr_factors(parts)
    options = {"decompose_both": "lokr_w1_a" in parts, "decompose_factor": factors[0], "factors": factors}
    for factor in ("lokr_w2_a", "lokr_w1_a"):
        if factor in parts:
            rank = int(parts[factor].shape[1])
            return rank, float(alpha if alpha is not None else rank), options
    rank = max(max(parts["lokr_w1"].shape), max(parts["lokr_w2"].shape[:2]))
    return rank, float(rank), options


def _from_kohya(path: Path, name: str, parts: dict[str, torch.Tensor]) -> ModuleAdapter:
    alpha_tensor = parts.pop("alpha", None)
    alpha = float(alpha_tensor) if alpha_tensor is not None else None
    kind = _kind(path, name, parts)
    if kind == "LOKR":
        rank, alpha, options = _lokr_rank(parts, alpha)
        return ModuleAdapter(name, parts, alpha, rank, kind, options)
    rank = int(parts["lora_A.weight" if kind == "LORA" else "hada_w1_b"].shape[0])
    if "lora_magnitude_vector" in parts:
        scale = parts["lora_magnitude_vector"]
        out = parts["lora_B.weight"].shape[0]
        if scale.shape[0] != out:
            raise AdapterFileError(f"{path}: module {name!r}: dora_scale {tuple(scale.shape)} is on the input axis "
                                   "(LyCORIS wd_on_output=False); peft's DoRA, which bwl uses, keeps one per output")
        conv = parts["lora_A.weight"].ndim == 4
        parts["lora_magnitude_vector"] = scale.reshape(1, out, 1, 1) if conv else scale.reshape(out)
    return ModuleAdapter(name, parts, float(alpha if alpha is not None else rank), rank, kind)


def _read_kohya(path: Path, tensors: dict[str, torch.Tensor], contents: AdapterContents) -> None:
    found: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    seen = {_KOHYA_KEY.match(k).group(1) + "_" + _KOHYA_KEY.match(k).group(2) for k in tensors if _KOHYA_KEY.match(k)}
    contents.architecture = contents.architecture or file_architecture(seen)
    for key, tensor in tensors.items():
        m = _KOHYA_KEY.match(key)
        suffix = m.group(3) if m else ""
        if suffix in UNSUPPORTED_KOHYA:
            raise AdapterFileError(f"{path}: key {key!r} holds {UNSUPPORTED_KOHYA[suffix]}, which bwl does not read")
        if not m or (suffix not in KOHYA_TENSORS and suffix != "alpha"):
            raise AdapterFileError(f"{path}: unexpected key {key!r} in a kohya-format file")
        component = "unet" if m.group(1) == "unet" else KOHYA_TE_COMPONENTS.get(m.group(1), m.group(1))
        found.setdefault((component, m.group(2)), {})[KOHYA_TENSORS.get(suffix, suffix)] = tensor
    for (component, name), parts in found.items():
        if component not in ("unet", *KOHYA_TE_COMPONENTS.values()):
            raise AdapterFileError(f"{path}: key 'lora_{component}_{name}...': no text encoder is called {component}")
        module = _from_kohya(path, name, parts)
        if component == "unet":
            _place(path, f"lora_unet_{name}", module, contents)
        else:
            contents.text_encoders.setdefault(component, []).append(module)


def _read_peft(path: Path, tensors: dict[str, torch.Tensor], contents: AdapterContents) -> None:
    configs = peft_configs(path, contents.metadata)
    found: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _PEFT_KEY.match(key)
        if not m:
            raise AdapterFileError(
                f"{path}: unexpected key {key!r}; expected unet.<module>.<peft tensor> (lora_A/B.weight, hada_*, "
                "lokr_*, oft_R.weight), text_encoder.<module>.lora_A/B.weight, or kohya's lora_unet_*/lora_te_*"
            )
        found.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = tensor
    contents.architecture = contents.architecture or file_architecture(f"{c}_{n}" for c, n in found)
    for (component, name), parts in found.items():
        kind = _kind(path, name, parts)
        config = configs.get(component) or {}
        if kind != config.get("peft_type", "LORA"):
            raise AdapterFileError(f"{path}: module {name!r} holds {kind} tensors but the {component} config in "
                                   f"'lora_adapter_metadata' is {config.get('peft_type', 'LORA')}")
        if kind == "OFT":
            rank = alpha = config["oft_block_size"]
        else:
            default_rank = parts["lora_A.weight"].shape[0] if kind == "LORA" else config["r"]
            rank = _pattern_value(config, "rank_pattern", name, config.get("r", default_rank))
            alpha = _pattern_value(config, "alpha_pattern", name, config.get("lora_alpha", config.get("alpha", rank)))
        options = ({"decompose_both": bool(config.get("decompose_both")),
                    "decompose_factor": int(config.get("decompose_factor", -1))} if kind == "LOKR" else {})
        module = ModuleAdapter(name, parts, float(alpha), int(rank), kind, options)
        if component == "unet":
            _place(path, f"unet.{name}", module, contents)
        else:
            contents.text_encoders.setdefault(component, []).append(module)


_SD1_ONLY = re.compile(r"^unet_(down_blocks[._]0[._]attentions|down_blocks[._]3|up_blocks[._]3)")
_SDXL_ONLY = re.compile(r"^(unet_(up_blocks[._]0[._]attentions|input_blocks|middle_block|output_blocks)|te2_|"
                        r"text_encoder_2_)")


def file_architecture(names) -> Architecture | None:
    """The layout a file's module names (``<component>_<module>``: ``unet_…``, ``te2_…``) belong to: SDXL for SGM
    names, a second text encoder or attention in ``up_blocks.0``; SD 1.x/2.x for attention in ``down_blocks.0`` or a
    fourth level; None where they fit both."""
    names = list(names)
    if any(_SDXL_ONLY.match(n) for n in names):
        return SDXL
    if any(_SD1_ONLY.match(n) for n in names):
        return SD1
    return None


def read_modules(path: str | Path) -> AdapterContents:
    """Read an adapter file (bwl/diffusers or kohya format) module by module; bwl's metadata fields are validated."""
    path = Path(path)
    tensors = read_tensors(path)
    contents = AdapterContents(path, "diffusers", metadata=read_metadata(path))
    fields = bwl_fields(path, contents.metadata)
    if "bwl_architecture" in fields:
        contents.architecture = get_architecture(fields["bwl_architecture"])
    if any(_KOHYA_KEY.match(k) for k in tensors):
        contents.format = "kohya"
        _read_kohya(path, tensors, contents)
    else:
        _read_peft(path, tensors, contents)
    return contents
