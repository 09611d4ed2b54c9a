"""What an adapter file holds, module by module, in either format, and whether it fits a model.

Two formats are read:

- bwl/diffusers: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (and ``text_encoder.<module>...``), with the peft
  configs in ``lora_adapter_metadata``;
- kohya/A1111 and LyCORIS: ``lora_unet_<module_with_underscores>`` and ``lora_te_<...>`` with ``.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (scale = alpha / rank), plus ``.dora_scale`` (DoRA), or LoHa's ``hada_w1_a``…
  and LoKr's ``lokr_w1``… tensors, which keep their names in peft.

U-Net modules inside the nine paper blocks are *placed*; others (``conv_in``, ``time_embedding``, which LyCORIS'
``full`` preset trains) are listed as not placed. A module in a block SD1.x does not have is an error naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.tuners.lokr.layer import factorization
from peft.utils.other import get_pattern_key

from bwl.adapters.blocks import BlockSpecError, paper_block
from bwl.adapters.files import read_metadata, read_tensors
from bwl.adapters.metadata import AdapterFileError, bwl_fields, peft_configs
from bwl.adapters.methods import ALL_TENSOR_NAMES, METHODS, TENSOR_NAMES, base_layer, expected_shapes
from bwl.adapters.text_encoder import KOHYA_PREFIX as KOHYA_TE_PREFIX
from bwl.adapters.text_encoder import modules_by_kohya_name

_PEFT_KEY = re.compile(r"^(unet|text_encoder)\.(.+)\.(" + "|".join(re.escape(n) for n in ALL_TENSOR_NAMES) + r")$")
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
    text_encoder: list[ModuleAdapter] = field(default_factory=list)
    unplaced: list[ModuleAdapter] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

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
        placed = paper_block(module.name) is not None
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
    for key, tensor in tensors.items():
        m = _KOHYA_KEY.match(key)
        suffix = m.group(3) if m else ""
        if suffix in UNSUPPORTED_KOHYA:
            raise AdapterFileError(f"{path}: key {key!r} holds {UNSUPPORTED_KOHYA[suffix]}, which bwl does not read")
        if not m or (suffix not in KOHYA_TENSORS and suffix != "alpha"):
            raise AdapterFileError(f"{path}: unexpected key {key!r} in a kohya-format file")
        component = "unet" if m.group(1) == "unet" else "text_encoder"
        found.setdefault((component, m.group(2)), {})[KOHYA_TENSORS.get(suffix, suffix)] = tensor
    for (component, name), parts in found.items():
        module = _from_kohya(path, name, parts)
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
                f"{path}: unexpected key {key!r}; expected unet.<module>.<peft tensor> (lora_A/B.weight, hada_*, "
                "lokr_*, oft_R.weight), text_encoder.<module>.lora_A/B.weight, or kohya's lora_unet_*/lora_te_*"
            )
        found.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = tensor
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
) -> dict[str, dict[str, ModuleAdapter]]:
    """Each U-Net and text-encoder module under the model's own module name: ``{"unet": {...}, "text_encoder": ...}``.

    kohya names are matched against the model's names with dots as underscores. A module the model does not have is
    an error naming it (and, for the text encoder, one without a text encoder to hold it).
    """
    resolved: dict[str, dict[str, ModuleAdapter]] = {"unet": {}, "text_encoder": {}}
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


def _method(module: ModuleAdapter) -> str:
    return next(m.name for m in METHODS.values() if m.peft_type == module.peft_type)


def check_shapes(path: str | Path, modules: dict[str, ModuleAdapter], model: torch.nn.Module, what: str) -> None:
    """Raise unless each module's tensors have the shapes peft builds for ``model``'s layer, naming the first misfit,
    its tensors' shapes and the layer's weight shape."""
    named = dict(model.named_modules())
    for name, adapter in modules.items():
        base = base_layer(named[name])  # under every peft wrapper (a model may hold several methods' layers)
        weight = getattr(base, "weight", None)
        if weight is None or not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            raise AdapterFileError(f"{path}: {what} module {name!r} has no Linear or Conv2d weight to adapt")
        shapes = {k: tuple(t.shape) for k, t in adapter.tensors.items()}
        options = {k: v for k, v in adapter.options.items() if k != "factors"}
        try:
            expected = expected_shapes(_method(adapter), base, adapter.rank, adapter.alpha, adapter.dora, **options)
            if "factors" in adapter.options:  # a LyCORIS LoKr file: the factors its shapes fit in this layer
                method, rank, alpha = _method(adapter), adapter.rank, adapter.alpha
                fits = [f for f in adapter.options["factors"]
                        if expected_shapes(method, base, rank, alpha, **{**options, "decompose_factor": f}) == shapes]
                expected = shapes if fits else expected
                adapter.options["factors"] = fits
        except ValueError as err:
            raise AdapterFileError(f"{path}: {what} module {name}: {err}") from None
        if shapes != expected:
            shown = (f"LoRA down {shapes.get('lora_A.weight')} and up {shapes.get('lora_B.weight')}"
                     if adapter.peft_type == "LORA" and not adapter.dora else
                     f"{adapter.peft_type} tensors {shapes}")
            raise AdapterFileError(
                f"{path}: {what} module {name}: {shown} do not fit its weight {tuple(weight.shape)} "
                "(an adapter for a different base architecture?)"
            )


def lokr_options(path: str | Path, modules: list[ModuleAdapter]) -> dict:
    """The LoKr config fields a file's modules imply together: ``decompose_both`` where any factors ``w1``, and the
    one ``decompose_factor`` (peft has one per adapter; modules that disagree are an error naming the file)."""
    fitting = [set(m.options.get("factors", [m.options.get("decompose_factor", -1)])) for m in modules]
    common = set.intersection(*fitting) if fitting else {-1}
    if not common:
        raise AdapterFileError(f"{path}: LoKr modules whose shapes need different factors; peft takes one per file")
    return {"decompose_both": any(m.options.get("decompose_both") for m in modules),
            "decompose_factor": -1 if -1 in common else min(common)}


def check_fits(
    contents: AdapterContents, unet: torch.nn.Module, text_encoder: torch.nn.Module | None
) -> dict[str, dict[str, ModuleAdapter]]:
    """Check that every module ``contents`` adapts exists in the model, with fitting shapes; returns them resolved."""
    resolved = resolve_names(contents, unet, text_encoder)
    check_shapes(contents.path, resolved["unet"], unet, "U-Net")
    if text_encoder is not None:
        check_shapes(contents.path, resolved["text_encoder"], text_encoder, "text-encoder")
    return resolved


def fitted_modules(
    path: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None
) -> tuple[AdapterContents, dict[str, dict[str, ModuleAdapter]]]:
    """Read ``path`` and :func:`check_fits` it against the model."""
    contents = read_modules(path)
    return contents, check_fits(contents, unet, text_encoder)
