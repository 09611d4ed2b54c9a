"""Block-wise adapters on an SD 1.x/2.x or SDXL U-Net, through peft: LoRA, LoCon, LoHa, LoKr, DoRA and OFT
(:mod:`.methods`). The U-Net's layout is read from its config (:func:`bwl.adapters.architectures.architecture_of`).

Targets follow kohya's ``networks/lora.py``:

- ``lora``: every Linear and 1x1 Conv2d inside ``Transformer2DModel`` (proj_in, attn1/attn2 q/k/v/out, ff, proj_out);
- ``locon`` (and ``loha``, ``lokr``): also every Linear and Conv2d inside ``ResnetBlock2D``,
  ``Downsample2D`` and ``Upsample2D`` (conv1/conv2 3x3 at ``conv_rank``, time_emb_proj and the 1x1 conv_shortcut at
  the block's rank); ``oft`` the same but no 3x3 conv.

Only modules inside the selected blocks get an adapter; a block at rank 0 is simply not targeted. A selection in which
the method finds nothing to adapt (plain LoRA on SDXL's ``upper`` blocks, which hold no attention) is an error naming
the blocks and what they hold.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from peft import PeftConfig

from bwl.adapters.architectures import ARCHITECTURES, SD1, Architecture, architecture_of, get_architecture
from bwl.adapters.blocks import (
    BlockSpecError,
    block_ranks,
    fine_block,
    format_selection,
    paper_block,
    parse_selection,
)
from bwl.adapters.methods import (
    base_layer,
    carries,
    expected_shapes,
    get_method,
    method_config,
    method_label,
    plain_lora,
)

# Matched with isinstance, so a subclass swapped in by the fast path (bwl.train.fast) is still a container.
ATTENTION_CONTAINERS: tuple[type, ...] = (Transformer2DModel,)
CONV_CONTAINERS: tuple[type, ...] = (ResnetBlock2D, Downsample2D, Upsample2D)
ADAPTER_PARTS = ("lora_", "hada_", "lokr_", "oft_")  # peft's own sub-modules inside a wrapped layer


@dataclass(frozen=True)
class Target:
    """One module that can carry an adapter."""

    name: str
    paper_block: str
    fine_block: str
    is_conv3x3: bool


@dataclass
class AdapterSpec:
    """What to adapt: method, blocks and ranks. Serialisable, so it travels in file metadata and run configs.

    ``method`` is one of :data:`bwl.adapters.methods.METHODS`; ``dora`` decomposes a ``lora``/``locon`` update (DoRA).
    ``blocks`` is a paper spec (``"upper"``), kohya fine blocks (``"OUT00+OUT01"``) or a lora-block-weight vector
    (:func:`bwl.adapters.blocks.parse_selection`).

    ``alpha`` defaults to the rank (scale 1, as diffusers' DreamBooth LoRA script); ``conv_rank``/``conv_alpha``
    apply to 3x3 convs (kohya ``conv_dim``/``conv_alpha``) and default to the block's linear values.
    ``block_ranks`` overrides ranks per paper block, group or kohya fine block (kohya ``block_dims``); 0 skips.
    ``text_encoder`` also adapts the text encoder(s) (lora-block-weight's BASE) at ``rank``/``alpha``, as kohya does.
    ``architecture`` names the layout the blocks are read in (``sd1``, ``sd2``, ``sdxl``); left None, the spec takes
    the layout of the U-Net it is applied to (:meth:`bind`), and its blocks are checked against SD 1.x's until then.
    """

    method: Literal["lora", "locon", "loha", "lokr", "oft"] = "lora"
    blocks: str = "all"
    rank: int = 4
    alpha: float | None = None
    conv_rank: int | None = None
    conv_alpha: float | None = None
    block_ranks: dict[str, int] = field(default_factory=dict)
    text_encoder: bool = False
    dora: bool = False
    architecture: str | None = None

    def __post_init__(self) -> None:
        if self.architecture is not None:
            self.architecture = get_architecture(self.architecture).name
        method = get_method(self.method, self.dora)
        if self.text_encoder and not plain_lora(self.method, self.dora):
            raise BlockSpecError(f"text_encoder=True with method {method_label(self.method, self.dora)!r}: the text "
                                 "encoder takes plain LoRA only (as diffusers and kohya load it)")
        if not method.conv3x3 and (self.conv_rank is not None or self.conv_alpha is not None):
            raise BlockSpecError(f"method {self.method!r} adapts no 3x3 conv; leave conv_rank and conv_alpha unset")
        if method.rank_is_block_size and (self.alpha is not None or self.conv_alpha is not None):
            raise BlockSpecError(f"method {self.method!r} has no alpha (its rank is the orthogonal block size); "
                                 "leave alpha and conv_alpha unset")
        self.blocks = _canonical_blocks(self.blocks, self.architecture)
        if self.conv_rank is not None and (not isinstance(self.conv_rank, int) or self.conv_rank <= 0):
            raise BlockSpecError(f"conv_rank must be a positive integer, got {self.conv_rank!r}")
        layouts = [self.arch] if self.architecture else [a for a in ARCHITECTURES.values() if _parses(self.blocks, a)]
        block_ranks(self.blocks, self.rank, self.block_ranks, layouts[0])  # ranks and overrides checked

    @property
    def arch(self) -> Architecture:
        return get_architecture(self.architecture)

    def bind(self, unet: torch.nn.Module) -> AdapterSpec:
        """This spec in ``unet``'s layout (its blocks read there); a spec for a layout with other blocks is an error."""
        model = unet_architecture(unet)
        if self.architecture is not None and self.arch.attention != model.attention:
            raise BlockSpecError(f"the adapter spec is for {self.arch.label} blocks, but the U-Net is {model.label}")
        values = {**self.to_dict(), "architecture": model.name}
        return AdapterSpec(**values) if self.architecture != model.name else self

    def fine_ranks(self) -> dict[str, int]:
        """Linear ranks per kohya fine block, blocks at rank 0 left out."""
        return block_ranks(self.blocks, self.rank, self.block_ranks, self.arch)

    def module_ranks(self, unet: torch.nn.Module) -> dict[str, tuple[int, float]]:
        """(rank, alpha) for every module this spec adapts in ``unet``."""
        spec = self.bind(unet)
        ranks = spec.fine_ranks()
        chosen = {}
        for target in find_targets(unet, self.method):
            rank = ranks.get(target.fine_block)
            if not rank:
                continue
            if target.is_conv3x3:
                conv_rank = self.conv_rank or rank
                chosen[target.name] = (conv_rank, float(self.conv_alpha if self.conv_alpha is not None else conv_rank))
            else:
                chosen[target.name] = (rank, float(self.alpha if self.alpha is not None else rank))
        return chosen

    def parameter_count(self, unet: torch.nn.Module) -> int:
        """Trainable parameters this spec adds to ``unet``, before adding them (the shapes peft builds per module)."""
        modules = dict(unet.named_modules())
        total = 0
        for name, (rank, alpha) in self.module_ranks(unet).items():
            shapes = expected_shapes(self.method, modules[name], rank, alpha, self.dora)
            total += sum(torch.Size(shape).numel() for shape in shapes.values())
        return total

    def to_dict(self) -> dict:
        """The spec's fields; ``architecture`` only where it is set (so SD 1.x specs keep their keys)."""
        values = asdict(self)
        if values["architecture"] is None:
            del values["architecture"]
        return values


def _canonical_blocks(blocks: str, architecture: str | None) -> str:
    """``blocks`` as :func:`format_selection` writes it in the spec's layout. Without one, a selection only another
    layout reads (SDXL's 20-value vector) is kept as given until :meth:`AdapterSpec.bind` reads it in the model's."""
    arch = get_architecture(architecture)
    try:
        return format_selection(parse_selection(blocks, arch), arch)
    except BlockSpecError:
        if architecture is not None or not any(_parses(blocks, a) for a in ARCHITECTURES.values()):
            raise
        return blocks


def _parses(blocks: str, arch: Architecture) -> bool:
    try:
        parse_selection(blocks, arch)
    except BlockSpecError:
        return False
    return True


def unet_architecture(unet: torch.nn.Module) -> Architecture:
    """The layout of ``unet`` from its config (SD 1.x for a module without one)."""
    config = getattr(unet, "config", None)
    return architecture_of(config) if config is not None else SD1


def find_targets(unet: torch.nn.Module, method: str = "locon") -> list[Target]:
    """Every module of ``unet`` that ``method`` can adapt, found from the model's own module tree."""
    arch = unet_architecture(unet)
    chosen = get_method(method)
    containers = ATTENTION_CONTAINERS + (CONV_CONTAINERS if chosen.conv else ())
    targets: dict[str, Target] = {}
    for container_name, container in unet.named_modules():
        if not isinstance(container, containers):
            continue
        for child_name, child in container.named_modules():
            if any(part == "base_layer" or part.startswith(ADAPTER_PARTS) for part in child_name.split(".")):
                continue
            base = base_layer(child)
            if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            name = f"{container_name}.{child_name}"
            block, fine = paper_block(name, arch), fine_block(name)
            if block is None or fine is None:
                continue
            is_conv3x3 = isinstance(base, torch.nn.Conv2d) and tuple(base.kernel_size) != (1, 1)
            if is_conv3x3 and not chosen.conv3x3:
                continue
            targets[name] = Target(name, block, fine, is_conv3x3)
    return list(targets.values())


def adapter_config(unet: torch.nn.Module, spec: AdapterSpec) -> PeftConfig:
    """The peft config (of ``spec``'s method) whose regex ``target_modules`` and ``rank_pattern`` realise ``spec``."""
    chosen = spec.module_ranks(unet)
    _check_selection(unet, spec, chosen)
    modules = dict(unet.named_modules())
    for name, (rank, alpha) in chosen.items():  # a combination peft cannot build raises here, naming it
        try:
            expected_shapes(spec.method, modules[name], rank, alpha, spec.dora)
        except BlockSpecError as err:
            raise BlockSpecError(f"module {name}: {err}") from None
    return method_config(spec.method, {re.escape(n): v for n, v in chosen.items()}, spec.dora)


def _check_selection(unet: torch.nn.Module, spec: AdapterSpec, chosen: dict) -> None:
    """Refuse a selection that adapts nothing, or (unless it is ``all``) a selected block the method finds nothing
    to adapt in, naming the blocks and what they hold."""
    spec = spec.bind(unet)
    arch = spec.arch
    ranked = {arch.paper_block_of_fine(f) for f in spec.fine_ranks()}
    adapted = {paper_block(name, arch) for name in chosen}
    empty = [b for b in arch.paper_blocks if b in ranked and b not in adapted]
    if chosen and (not empty or spec.blocks == "all"):
        return
    if not ranked:
        raise BlockSpecError(f"adapter spec selects no module (blocks={spec.blocks!r}, block_ranks={spec.block_ranks})")
    modules = dict(unet.named_modules())
    held = ", ".join(f"{b} ({arch.prefixes[b]}: {type(modules[arch.prefixes[b]]).__name__}, "
                     f"{'with' if arch.holds_attention(b) else 'no'} attention)" for b in empty)
    method = method_label(spec.method, spec.dora)
    raise BlockSpecError(f"{method} on {arch.label} finds nothing to adapt in {held}; {method} adapts "
                         f"{'attention layers only' if not get_method(spec.method).conv else 'no layer there'}: "
                         "choose other blocks, or a method that adapts resnets (locon, loha, lokr)")


def config_for_modules(chosen: dict[str, tuple[int, float]], method: str = "lora", dora: bool = False) -> PeftConfig:
    """A peft config adapting exactly these modules (full names), each at its (rank, alpha), with ``method``."""
    return method_config(method, {re.escape(n): v for n, v in chosen.items()}, dora)


def adapter_parameters(module: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of adapter ``name`` in one peft layer, by their name inside it."""
    return {key: p for key, p in module.named_parameters()
            if not key.startswith("base_layer.") and name in key.split(".")}


def add_adapter(unet: torch.nn.Module, spec: AdapterSpec, name: str = "default") -> PeftConfig:
    """Add a block-wise adapter named ``name`` to ``unet``. Base weights stay frozen; only the adapter is trainable."""
    config = adapter_config(unet, spec)
    unet.requires_grad_(False)
    unet.add_adapter(config, adapter_name=name)
    for module in adapted_modules(unet, name).values():
        for param in adapter_parameters(module, name).values():
            param.requires_grad_(True)
    return config


def adapted_modules(unet: torch.nn.Module, name: str = "default") -> dict[str, torch.nn.Module]:
    """Modules of ``unet`` that carry adapter ``name`` (peft layers of any method)."""
    return {module_name: module for module_name, module in unet.named_modules() if carries(module, name)}


def parameters_per_block(unet: torch.nn.Module, name: str = "default") -> dict[str, int]:
    """Adapter parameters per paper block (every paper block of the U-Net's layout listed, 0 where skipped)."""
    arch = unet_architecture(unet)
    counts = dict.fromkeys(arch.paper_blocks, 0)
    for module_name, module in adapted_modules(unet, name).items():
        counts[paper_block(module_name, arch)] += sum(p.numel() for p in adapter_parameters(module, name).values())
    return counts
