"""The U-Net layouts bwl knows, each with its block map: SD 1.x, SD 2.x and SDXL (torch-free).

A layout is read from the U-Net's config (:func:`architecture_of`), never from a model's name. Everything else is
derived from which resolution levels hold cross-attention:

- paper blocks ``IN{i}``/``OUT{i}`` are ``down_blocks.i``/``up_blocks.i``, ``MID`` is ``mid_block``;
- the paper's groups pair the two blocks of one resolution level: ``upper`` the highest (``IN0`` with the last up
  block), ``middle`` the next, ``bottom`` the next;
- kohya's fine blocks follow sd-scripts' ``get_block_index``: ``down_blocks.i.{resnets|attentions}.j`` is
  ``IN{1+3i+j}``, the level's downsampler ``IN{3+3i}``, ``up_blocks.i.*.j`` is ``OUT{3i+j}`` (upsampler
  ``OUT{3i+2}``), ``mid_block`` ``M00``; ``IN00`` is ``conv_in``. On SDXL these are the original (SGM) model's
  ``input_blocks.N``/``output_blocks.N`` indices, which kohya's SDXL files name;
- lora-block-weight's vectors: BASE plus every fine block (26 values on SD 1.x, 20 on SDXL), or BASE plus the fine
  blocks that hold attention, which is what a plain LoRA can adapt (17 values on SD 1.x, 12 on SDXL).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property


class BlockSpecError(ValueError):
    """A block name, group, spec, weight vector, rank or U-Net layout that bwl does not know."""


@dataclass(frozen=True)
class Architecture:
    """One U-Net layout and everything bwl names in it.

    ``attention``: per resolution level, highest first, whether ``down_blocks.i`` (and its mirror up block) holds
    attention. ``text_encoders``: the pipeline's text-encoder attributes, in the order of kohya's
    ``kohya_te_prefixes``. ``kohya_sgm_names``: whether kohya names the U-Net's modules by the original (SGM) model, as
    it does SDXL's. ``kohya_version``: sd-scripts' ``ss_base_model_version``. ``presets``: lora-block-weight's own
    presets over the short vector, where it has them (SD 1.x's 17 values).
    """

    name: str
    label: str
    attention: tuple[bool, ...]
    text_encoders: tuple[str, ...]
    kohya_te_prefixes: tuple[str, ...]
    kohya_sgm_names: bool
    kohya_version: str
    paper_model: str
    presets: tuple[tuple[str, tuple[float, ...]], ...] = ()

    @property
    def levels(self) -> int:
        return len(self.attention)

    @cached_property
    def paper_blocks(self) -> tuple[str, ...]:
        n = self.levels
        return tuple(f"IN{i}" for i in range(n)) + ("MID",) + tuple(f"OUT{i}" for i in range(n))

    @cached_property
    def prefixes(self) -> dict[str, str]:
        """Each paper block's diffusers prefix."""
        return {b: ("mid_block" if b == "MID" else f"{'down' if b.startswith('IN') else 'up'}_blocks.{b[-1]}")
                for b in self.paper_blocks}

    @cached_property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """``all``, ``none`` and the paper's groups by resolution level (``upper`` the highest)."""
        n = self.levels
        names = ("upper", "middle", "bottom")
        pairs = {name: (f"IN{level}", f"OUT{n - 1 - level}") for level, name in enumerate(names)}
        return {"all": self.paper_blocks, "none": (), **pairs}

    def level_of(self, block: str) -> int | None:
        """A paper block's resolution level (0 the highest); None for MID."""
        if block == "MID":
            return None
        index = int(block[-1])
        return index if block.startswith("IN") else self.levels - 1 - index

    def holds_attention(self, block: str) -> bool:
        level = self.level_of(block)
        return True if level is None else self.attention[level]

    @cached_property
    def fine_blocks(self) -> tuple[str, ...]:
        """kohya's fine blocks, as lora-block-weight names them (IN00 is ``conv_in`` and never adapted)."""
        per_side = 3 * self.levels
        return tuple(f"IN{i:02d}" for i in range(per_side)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(per_side))

    def paper_block_of_fine(self, fine: str) -> str:
        """The paper block a fine block belongs to (IN01-IN03 -> IN0, ..., OUT09-OUT11 -> OUT3 on SD 1.x)."""
        if fine not in self.fine_blocks:
            raise BlockSpecError(f"unknown {self.label} fine block {fine!r}; valid: {', '.join(self.fine_blocks)}")
        if fine == "M00":
            return "MID"
        n = int(fine[-2:])
        return f"IN{(n - 1) // 3}" if fine.startswith("IN") else f"OUT{n // 3}"

    def fine_blocks_of(self, paper: str) -> tuple[str, ...]:
        return tuple(f for f in self.fine_blocks if f != "IN00" and self.paper_block_of_fine(f) == paper)

    @cached_property
    def attention_fine_blocks(self) -> tuple[str, ...]:
        """The fine blocks that hold a transformer (not a downsampler, IN03, IN06, …): what a plain LoRA adapts."""
        return tuple(f for f in self.fine_blocks[1:] if not (f.startswith("IN") and int(f[-2:]) % 3 == 0)
                     and self.holds_attention(self.paper_block_of_fine(f)))

    @cached_property
    def lbw_full(self) -> tuple[str, ...]:
        return ("BASE",) + self.fine_blocks

    @cached_property
    def lbw_short(self) -> tuple[str, ...]:
        return ("BASE",) + self.attention_fine_blocks

    @cached_property
    def lbw_presets(self) -> dict[str, tuple[float, ...]]:
        """Presets over the short vector: lora-block-weight's own where it has them, else the ones that mean the
        same on any layout (NONE, ALL, INALL and OUTALL with BASE on, ALL0.5)."""
        ids = self.lbw_short
        only = {half: tuple(1.0 if f == "BASE" or f.startswith(half) else 0.0 for f in ids) for half in ("IN", "OUT")}
        return dict(self.presets) or {"NONE": (0.0,) * len(ids), "ALL": (1.0,) * len(ids), "INALL": only["IN"],
                                      "OUTALL": only["OUT"], "ALL0.5": (0.5,) * len(ids)}


LBW_SD1_PRESETS: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("NONE", (0,) * 17),
    ("ALL", (1,) * 17),
    ("INS", (1, 1, 1, 1) + (0,) * 13),
    ("IND", (1, 0, 0, 0, 1, 1, 1) + (0,) * 10),
    ("INALL", (1,) * 7 + (0,) * 10),
    ("MIDD", (1, 0, 0, 0) + (1,) * 8 + (0,) * 5),
    ("OUTD", (1,) + (0,) * 7 + (1,) * 4 + (0,) * 5),
    ("OUTS", (1,) + (0,) * 11 + (1,) * 5),
    ("OUTALL", (1,) + (0,) * 7 + (1,) * 9),
    ("ALL0.5", (0.5,) * 17),
)
SD1 = Architecture("sd1", "SD 1.x", (True, True, True, False), ("text_encoder",), ("lora_te_",), False, "sd_v1",
                   "CompVis/stable-diffusion-v1-4", LBW_SD1_PRESETS)
SD2 = Architecture("sd2", "SD 2.x", (True, True, True, False), ("text_encoder",), ("lora_te_",), False, "sd_v2",
                   "stabilityai/stable-diffusion-2-1-base", LBW_SD1_PRESETS)
SDXL = Architecture("sdxl", "SDXL", (False, True, True), ("text_encoder", "text_encoder_2"),
                    ("lora_te1_", "lora_te2_"), True, "sdxl_base_v1-0", "stabilityai/stable-diffusion-xl-base-1.0")
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (SD1, SD2, SDXL)}
ArchitectureLike = Architecture | str


def kohya_slots(arch: Architecture) -> tuple[str, ...]:
    """The slots of kohya's ``block_dims``/``block_alphas``: 25 on SD 1.x (the fine blocks), 23 on SDXL (time
    embedding, IN00..IN08, middle_block 0..2, OUT00..OUT08, out)."""
    if not arch.kohya_sgm_names:
        return arch.fine_blocks
    per_side = 3 * arch.levels
    return (("EMB",) + tuple(f"IN{i:02d}" for i in range(per_side)) + ("M00", "M01", "M02")
            + tuple(f"OUT{i:02d}" for i in range(per_side)) + ("OUT",))


def fine_block_of_slot(slot: str) -> str | None:
    """The fine block a kohya slot belongs to (SDXL's three middle slots are M00); None for EMB and OUT."""
    if slot in ("EMB", "OUT"):
        return None
    return "M00" if slot.startswith("M0") else slot


def get_architecture(value: ArchitectureLike | None) -> Architecture:
    """An architecture by name (``sd1``, ``sd2``, ``sdxl``); None is SD 1.x, the paper's."""
    if value is None:
        return SD1
    if isinstance(value, Architecture):
        return value
    key = str(value).strip().lower()
    if key not in ARCHITECTURES:
        raise BlockSpecError(f"unknown architecture {value!r}; valid: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[key]


def architecture_of(config: Mapping) -> Architecture:
    """The layout of a U-Net from its config (``unet.config``): SDXL by its text-and-time conditioning, SD 2.x by its
    linear projections, SD 1.x otherwise, each checked against its blocks. Any other layout is an error naming it."""
    down = tuple(config.get("down_block_types") or ())
    up = tuple(config.get("up_block_types") or ())
    attention = tuple("CrossAttn" in t for t in down)
    layers = config.get("layers_per_block", 2)
    layers = set(layers) if isinstance(layers, (list, tuple)) else {layers}
    if config.get("addition_embed_type") == "text_time":
        candidate = SDXL
    else:
        candidate = SD2 if config.get("use_linear_projection") else SD1
    mirrored = tuple("CrossAttn" in t for t in reversed(up)) == attention
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if attention != candidate.attention or not mirrored or layers != {2} or mid != "UNetMidBlock2DCrossAttn":
        raise BlockSpecError(
            f"a U-Net with down blocks {list(down)}, up blocks {list(up)}, {sorted(layers)} layers per block and "
            f"mid block {mid}: not a layout bwl has a block map for "
            f"({', '.join(a.label for a in ARCHITECTURES.values())})")
    return candidate


_SGM = re.compile(r"^(input_blocks|middle_block|output_blocks)[._](\d+)(?:[._]|$)")
_RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_DIFFUSERS = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(\..*)?$")
_OUTSIDE = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_part(rest: str) -> str:
    head, dot, tail = rest.lstrip(".").partition(".")
    return "." + _RESNET_PARTS.get(head, head) + (dot + tail if dot else "") if rest else ""


def sgm_name(module_name: str, arch: Architecture) -> str | None:
    """A diffusers U-Net module name in the original (SGM/LDM) model, as sd-scripts' ``sdxl_model_util`` maps it:
    ``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in``. None for a name it does not map."""
    for diffusers_prefix, sgm_prefix in _OUTSIDE.items():
        if module_name == diffusers_prefix or module_name.startswith(diffusers_prefix + "."):
            return sgm_prefix + module_name[len(diffusers_prefix):]
    if module_name.startswith("mid_block."):
        m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)(\..*)?$", module_name)
        if not m:
            return None
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        return f"middle_block.{2 * j}{_resnet_part(rest)}" if kind == "resnets" else f"middle_block.1{rest}"
    m = _DIFFUSERS.match(module_name)
    if not m:
        return None
    direction, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
    if direction == "down":
        if kind == "downsamplers":
            return f"input_blocks.{3 * (i + 1)}.0.op" + rest.removeprefix(".conv")
        return f"input_blocks.{3 * i + j + 1}.{0 if kind == 'resnets' else 1}" + (
            _resnet_part(rest) if kind == "resnets" else rest)
    if kind == "upsamplers":
        return f"output_blocks.{3 * i + 2}.{2 if arch.holds_attention(f'OUT{i}') else 1}{rest}"
    return f"output_blocks.{3 * i + j}.{0 if kind == 'resnets' else 1}" + (
        _resnet_part(rest) if kind == "resnets" else rest)


def sgm_block(module_name: str) -> tuple[str, int] | None:
    """(``input_blocks``/``middle_block``/``output_blocks``, index) of an SGM module name (dots or underscores)."""
    m = _SGM.match(module_name)
    return (m.group(1), int(m.group(2))) if m else None


def _span(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]}–{names[-1]}" if names else "–"


def block_map_markdown(arch: Architecture) -> str:
    """``arch``'s block map as a markdown table: each paper block's diffusers prefix, resolution level, attention,
    group and kohya fine blocks (with those a plain LoRA adapts), then the lora-block-weight vectors and kohya slots."""
    group_of = {b: g for g, members in arch.groups.items() if g not in ("all", "none") for b in members}
    header = ("| paper block | diffusers prefix | level | attention | group | kohya fine blocks "
              "| of them with attention |")
    rows = [header, "|---|---|---|---|---|---|---|"]
    for block in arch.paper_blocks:
        level = arch.level_of(block)
        fine = list(arch.fine_blocks_of(block))
        attended = [f for f in fine if f in arch.attention_fine_blocks]
        rows.append(f"| {block} | `{arch.prefixes[block]}` | {'lowest' if level is None else level} | "
                    f"{'yes' if arch.holds_attention(block) else 'no'} | {group_of.get(block, '–')} | {_span(fine)} | "
                    f"{', '.join(attended) or 'none'} |")
    presets = ", ".join(arch.lbw_presets)
    rows += ["", f"lora-block-weight vectors: {len(arch.lbw_short)} values (`{','.join(arch.lbw_short)}`) or "
             f"{len(arch.lbw_full)} (BASE and every fine block); presets: {presets}. kohya's `block_dims` has "
             f"{len(kohya_slots(arch))} slots; its files name the U-Net's modules by "
             f"{'the original (SGM) model' if arch.kohya_sgm_names else 'diffusers'} and its text encoders "
             f"{' and '.join(f'`{p}`' for p in arch.kohya_te_prefixes)}."]
    return "\n".join(rows) + "\n"


def block_maps_markdown() -> str:
    """Every layout's block map (:func:`block_map_markdown`), one section each: what the book's toolkit page shows."""
    sections = []
    for arch in ARCHITECTURES.values():
        sections.append(f"### {arch.label} (`{arch.name}`, e.g. `{arch.paper_model}`)\n\n{block_map_markdown(arch)}")
    return "\n".join(sections)
