"""Block-wise LoRA and LoCon adapters on an SD1.x U-Net, through peft.

Targets follow kohya's ``networks/lora.py``:

- ``lora``: every Linear and 1x1 Conv2d inside ``Transformer2DModel`` (proj_in, attn1/attn2 q/k/v/out, ff, proj_out);
- ``locon``: also every Linear and Conv2d inside ``ResnetBlock2D``, ``Downsample2D`` and ``Upsample2D``
  (conv1/conv2 3x3 at ``conv_rank``, time_emb_proj and the 1x1 conv_shortcut at the block's rank).

Only modules inside the selected blocks get an adapter; a block at rank 0 is simply not targeted.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from bwl.adapters.blocks import (
    PAPER_BLOCKS,
    BlockSpecError,
    block_ranks,
    fine_block,
    format_blocks,
    paper_block,
    parse_blocks,
)

METHODS = ("lora", "locon")
# Matched with isinstance, so a subclass swapped in by the fast path (bwl.train.fast) is still a container.
ATTENTION_CONTAINERS: tuple[type, ...] = (Transformer2DModel,)
CONV_CONTAINERS: tuple[type, ...] = (ResnetBlock2D, Downsample2D, Upsample2D)


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

    ``alpha`` defaults to the rank (scale 1, as diffusers' DreamBooth LoRA script); ``conv_rank``/``conv_alpha``
    apply to 3x3 convs (kohya ``conv_dim``/``conv_alpha``) and default to the block's linear values.
    ``block_ranks`` overrides ranks per paper block, group or kohya fine block (kohya ``block_dims``); 0 skips.
    ``text_encoder`` also adapts the text encoder (lora-block-weight's BASE) at ``rank``/``alpha``, as kohya does.
    """

    method: Literal["lora", "locon"] = "lora"
    blocks: str = "all"
    rank: int = 4
    alpha: float | None = None
    conv_rank: int | None = None
    conv_alpha: float | None = None
    block_ranks: dict[str, int] = field(default_factory=dict)
    text_encoder: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BlockSpecError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        self.blocks = format_blocks(parse_blocks(self.blocks))
        if self.conv_rank is not None and (not isinstance(self.conv_rank, int) or self.conv_rank <= 0):
            raise BlockSpecError(f"conv_rank must be a positive integer, got {self.conv_rank!r}")
        self.fine_ranks()

    def fine_ranks(self) -> dict[str, int]:
        """Linear ranks per kohya fine block, blocks at rank 0 left out."""
        return block_ranks(self.blocks, self.rank, self.block_ranks)

    def module_ranks(self, unet: torch.nn.Module) -> dict[str, tuple[int, float]]:
        """(rank, alpha) for every module this spec adapts in ``unet``."""
        ranks = self.fine_ranks()
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
        """Trainable parameters this spec adds to ``unet`` (LoRA's down and up matrices), before adding them."""
        modules = dict(unet.named_modules())
        total = 0
        for name, (rank, _) in self.module_ranks(unet).items():
            base = modules[name]
            base = base.get_base_layer() if isinstance(base, LoraLayer) else base
            if isinstance(base, torch.nn.Conv2d):
                total += rank * base.in_channels * base.kernel_size[0] * base.kernel_size[1] + base.out_channels * rank
            else:
                total += rank * (base.in_features + base.out_features)
        return total

    def to_dict(self) -> dict:
        return asdict(self)


def find_targets(unet: torch.nn.Module, method: str = "locon") -> list[Target]:
    """Every module of ``unet`` that ``method`` can adapt, found from the model's own module tree."""
    if method not in METHODS:
        raise BlockSpecError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    containers = ATTENTION_CONTAINERS + (CONV_CONTAINERS if method == "locon" else ())
    targets: dict[str, Target] = {}
    for container_name, container in unet.named_modules():
        if not isinstance(container, containers):
            continue
        for child_name, child in container.named_modules():
            if any(part == "base_layer" or part.startswith("lora_") for part in child_name.split(".")):
                continue
            base = child.get_base_layer() if isinstance(child, LoraLayer) else child
            if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            name = f"{container_name}.{child_name}"
            block, fine = paper_block(name), fine_block(name)
            if block is None or fine is None:
                continue
            is_conv3x3 = isinstance(base, torch.nn.Conv2d) and tuple(base.kernel_size) != (1, 1)
            targets[name] = Target(name, block, fine, is_conv3x3)
    return list(targets.values())


def lora_config(unet: torch.nn.Module, spec: AdapterSpec) -> LoraConfig:
    """A peft ``LoraConfig`` whose regex ``target_modules`` and ``rank_pattern`` realise ``spec`` on ``unet``."""
    chosen = spec.module_ranks(unet)
    if not chosen:
        raise BlockSpecError(f"adapter spec selects no module (blocks={spec.blocks!r}, block_ranks={spec.block_ranks})")
    return config_for_modules(chosen)


def config_for_modules(chosen: dict[str, tuple[int, float]]) -> LoraConfig:
    """A ``LoraConfig`` adapting exactly these modules, each at its (rank, alpha).

    The most common (rank, alpha) becomes ``r``/``lora_alpha``; the rest go in ``rank_pattern``/``alpha_pattern``,
    keyed by escaped full module names (peft matches them against the end of each name).
    """
    rank, alpha = Counter(chosen.values()).most_common(1)[0][0]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules="|".join(re.escape(name) for name in chosen),
        rank_pattern={re.escape(n): r for n, (r, _) in chosen.items() if r != rank},
        alpha_pattern={re.escape(n): a for n, (_, a) in chosen.items() if a != alpha},
        init_lora_weights=True,
    )


def add_adapter(unet: torch.nn.Module, spec: AdapterSpec, name: str = "default") -> LoraConfig:
    """Add a block-wise adapter named ``name`` to ``unet``. Base weights stay frozen; only its LoRA is trainable."""
    config = lora_config(unet, spec)
    unet.requires_grad_(False)
    unet.add_adapter(config, adapter_name=name)
    for param_name, param in unet.named_parameters():
        param.requires_grad_(f".{name}." in param_name and ".lora_" in param_name)
    return config


def adapted_modules(unet: torch.nn.Module, name: str = "default") -> dict[str, LoraLayer]:
    """Modules of ``unet`` that carry adapter ``name``."""
    return {
        module_name: module
        for module_name, module in unet.named_modules()
        if isinstance(module, LoraLayer) and name in module.lora_A
    }


def parameters_per_block(unet: torch.nn.Module, name: str = "default") -> dict[str, int]:
    """Adapter parameters per paper block (every paper block listed, 0 where skipped)."""
    counts = dict.fromkeys(PAPER_BLOCKS, 0)
    for module_name, module in adapted_modules(unet, name).items():
        n = sum(p.numel() for p in module.lora_A[name].parameters()) + sum(
            p.numel() for p in module.lora_B[name].parameters()
        )
        counts[paper_block(module_name)] += n
    return counts
