"""``inspect``: what any SD 1.x/2.x or SDXL LoRA/LyCORIS file adapts, block by block, without a model to load it
into."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bwl.adapters.blocks import fine_block, format_blocks, paper_block
from bwl.adapters.metadata import UNREADABLE, kohya_fields
from bwl.adapters.methods import method_label
from bwl.adapters.modules import read_modules

TEXT_ENCODER_ROW = "BASE"
"""The text encoder's row: lora-block-weight's name for its slot."""


@dataclass
class AdapterReport:
    """What ``inspect`` tells about an adapter file."""

    path: str
    format: str
    architecture: str
    method: str
    blocks: str
    ranks: dict[str, list[int]]
    alphas: dict[str, list[float]]
    parameters: dict[str, int]
    fine_ranks: dict[str, int]
    text_encoder_modules: int
    text_encoders: dict[str, int] = field(default_factory=dict)
    not_placed: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        """A plain-text report, one row per paper block, then the text encoder (BASE) and modules not placed."""
        lines = [
            f"file:    {self.path}",
            f"format:  {self.format}",
            f"model:   {self.architecture}",
            f"method:  {self.method}",
            f"blocks:  {self.blocks}",
        ]
        for key in ("bwl_trigger", "bwl_base_model", "bwl_steps", "ss_sd_model_name", "ss_max_train_steps"):
            if self.metadata.get(key):
                lines.append(f"{key}: {self.metadata[key]}")
        lines.append(f"{'block':<6} {'ranks':<10} {'alphas':<14} {'params':>10}")
        rows = tuple(self.parameters)
        for block in rows:
            ranks = ",".join(map(str, self.ranks.get(block, []))) or "0"
            alphas = ",".join(f"{a:g}" for a in self.alphas.get(block, [])) or "-"
            lines.append(f"{block:<6} {ranks:<10} {alphas:<14} {self.parameters.get(block, 0):>10,}")
        total = sum(self.parameters.values()) + sum(self.not_placed.values())
        lines.append(f"{'total':<6} {'':<10} {'':<14} {total:>10,}")
        if self.text_encoder_modules:
            counts = ", ".join(f"{name} {n}" for name, n in self.text_encoders.items())
            lines.append(f"text encoder: {self.text_encoder_modules} modules (BASE: {counts})")
        if self.not_placed:
            shown = ", ".join(f"{name} ({n:,} params)" for name, n in self.not_placed.items())
            lines.append(f"not placed (outside the paper blocks): {shown}")
        unreadable = [k for k, v in self.metadata.items() if k.startswith("ss_") and v == UNREADABLE]
        if unreadable:
            lines.append(f"unreadable kohya metadata: {', '.join(unreadable)}")
        return "\n".join(lines)


def inspect_adapter(path: str | Path) -> AdapterReport:
    """Layout, method, blocks, ranks, alphas and parameters per block of any SD 1.x/2.x or SDXL adapter file (bwl,
    kohya or LyCORIS). The layout is the file's (:func:`bwl.adapters.modules.file_architecture`); a file that fits
    either is shown in SD 1.x's blocks and said to be so.

    bwl's own metadata is validated (a malformed field is an error naming it); kohya fields that do not parse are
    shown as unreadable. U-Net modules outside the paper blocks are listed as not placed.
    """
    contents = read_modules(path)
    meta, arch = contents.metadata, contents.arch
    ranks: dict[str, set[int]] = {}
    alphas: dict[str, set[float]] = {}
    params = dict.fromkeys(arch.paper_blocks, 0)
    fine: dict[str, int] = {}
    for module in contents.unet:
        block = paper_block(module.name, arch)
        ranks.setdefault(block, set()).add(module.rank)
        alphas.setdefault(block, set()).add(module.alpha)
        params[block] += module.parameters
        fb = fine_block(module.name)
        if fb is not None and not module.is_conv3x3:
            fine[fb] = max(fine.get(fb, 0), module.rank)
    blocks = format_blocks(ranks, arch)
    if contents.text_encoder:
        ranks[TEXT_ENCODER_ROW] = {m.rank for m in contents.text_encoder}
        alphas[TEXT_ENCODER_ROW] = {m.alpha for m in contents.text_encoder}
        params[TEXT_ENCODER_ROW] = sum(m.parameters for m in contents.text_encoder)
    return AdapterReport(
        path=str(path),
        format=contents.format,
        architecture=arch.label if contents.architecture else f"{arch.label} or SDXL (its names fit both)",
        method=method_label(contents.method, contents.dora),
        blocks=blocks,
        ranks={b: sorted(r) for b, r in ranks.items()},
        alphas={b: sorted(a) for b, a in alphas.items()},
        parameters=params,
        fine_ranks={f: fine[f] for f in arch.fine_blocks if f in fine},
        text_encoder_modules=len(contents.text_encoder),
        text_encoders={name: len(modules) for name, modules in contents.text_encoders.items()},
        not_placed={m.name: m.parameters for m in contents.unplaced},
        metadata={**{k: v for k, v in meta.items() if k.startswith("bwl_")}, **kohya_fields(meta)},
    )
