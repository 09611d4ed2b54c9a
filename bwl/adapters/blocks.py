"""The U-Net block vocabulary: the paper's nine blocks, kohya's 25 fine blocks, lora-block-weight vectors.

Paper blocks (Li et al. 2024) map to diffusers prefixes as follows (our reading; the paper names no prefixes):

    IN0..IN3 -> down_blocks.0..3     MID -> mid_block     OUT0..OUT3 -> up_blocks.0..3

kohya's fine blocks follow sd-scripts' ``get_block_index``: ``down_blocks.i.{resnets|attentions}.j`` is
IN{1+3i+j}, ``down_blocks.i.downsamplers`` is IN{3+3i}, ``mid_block`` is M00 and ``up_blocks.i.*.j`` is
OUT{3i+j} (upsamplers OUT{3i+2}). IN00 is ``conv_in`` and never carries LoRA.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

PAPER_BLOCKS: tuple[str, ...] = ("IN0", "IN1", "IN2", "IN3", "MID", "OUT0", "OUT1", "OUT2", "OUT3")
PAPER_PREFIXES: dict[str, str] = {
    **{f"IN{i}": f"down_blocks.{i}" for i in range(4)},
    "MID": "mid_block",
    **{f"OUT{i}": f"up_blocks.{i}" for i in range(4)},
}
GROUPS: dict[str, tuple[str, ...]] = {
    "all": PAPER_BLOCKS,
    "none": (),
    "upper": ("IN0", "OUT3"),
    "middle": ("IN1", "OUT2"),
    "bottom": ("IN2", "OUT1"),
}

FINE_BLOCKS: tuple[str, ...] = (
    tuple(f"IN{i:02d}" for i in range(12)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(12))
)
"""kohya's 25 block slots, in the order of ``block_dims``."""

LBW_IDS_26: tuple[str, ...] = ("BASE",) + FINE_BLOCKS
LBW_IDS_17: tuple[str, ...] = (
    "BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
    "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
)
LBW_PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0,) * 17,
    "ALL": (1,) * 17,
    "INS": (1, 1, 1, 1) + (0,) * 13,
    "IND": (1, 0, 0, 0, 1, 1, 1) + (0,) * 10,
    "INALL": (1,) * 7 + (0,) * 10,
    "MIDD": (1, 0, 0, 0) + (1,) * 8 + (0,) * 5,
    "OUTD": (1,) + (0,) * 7 + (1,) * 4 + (0,) * 5,
    "OUTS": (1,) + (0,) * 11 + (1,) * 5,
    "OUTALL": (1,) + (0,) * 7 + (1,) * 9,
    "ALL0.5": (0.5,) * 17,
}

_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
_PAPER = re.compile(r"^(?:unet[._]|lora_unet_)?(?:(down|up)_blocks[._](\d+)|(mid_block))(?:[._]|$)")


class BlockSpecError(ValueError):
    """A block name, group, spec, weight vector or rank that bwl does not know."""


def _unknown(kind: str, name: object, valid: Iterable[str]) -> BlockSpecError:
    return BlockSpecError(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")


def parse_blocks(spec: str | Iterable[str]) -> tuple[str, ...]:
    """Parse ``"IN0+OUT3"``, ``"upper"``, ``"upper+MID"`` or a list of names into paper blocks, in U-Net order.

    Names and groups are case-insensitive; ``+`` and ``,`` both separate terms.
    """
    terms = re.split(r"[+,]", spec) if isinstance(spec, str) else list(spec)
    selected: set[str] = set()
    for raw in terms:
        if not isinstance(raw, str):
            raise BlockSpecError(f"block names must be strings, got {raw!r}")
        term = raw.strip()
        if not term:
            if isinstance(spec, str) and spec.strip() == "":
                raise BlockSpecError("empty block spec; use 'none' to select no block")
            raise BlockSpecError(f"empty term in block spec {spec!r}")
        if term.lower() in GROUPS:
            selected.update(GROUPS[term.lower()])
        elif term.upper() in PAPER_BLOCKS:
            selected.add(term.upper())
        else:
            raise _unknown("block", term, list(PAPER_BLOCKS) + list(GROUPS))
    return tuple(b for b in PAPER_BLOCKS if b in selected)


def format_blocks(blocks: Iterable[str]) -> str:
    """The canonical spec string for a set of paper blocks (a group name where one matches)."""
    ordered = tuple(b for b in PAPER_BLOCKS if b in set(blocks))
    for name, members in GROUPS.items():
        if ordered == members:
            return name
    return "+".join(ordered)


VALID_BLOCKS = ", ".join(f"{block} ({prefix})" for block, prefix in PAPER_PREFIXES.items())


def paper_block(module_name: str) -> str | None:
    """The paper block holding a module (diffusers, peft or kohya name), or None outside the nine blocks.

    A name in a block SD1.x does not have (``down_blocks_9``) is a :class:`BlockSpecError` naming it.
    """
    m = _PAPER.match(module_name)
    if not m:
        return None
    if m.group(3):
        return "MID"
    block = f"{'IN' if m.group(1) == 'down' else 'OUT'}{m.group(2)}"
    if block not in PAPER_PREFIXES:
        raise BlockSpecError(
            f"{module_name!r} is in {m.group(1)}_blocks {m.group(2)}, a block SD1.x does not have; "
            f"valid blocks: {VALID_BLOCKS}"
        )
    return block


def fine_block(module_name: str) -> str | None:
    """kohya's fine block (IN01..OUT11, M00) for a module name, exactly as sd-scripts' ``get_block_index``."""
    underscored = module_name.replace(".", "_") + "_"
    m = _UPDOWN.search(underscored)
    if m:
        direction, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return f"IN{1 + idx:02d}" if direction == "down" else f"OUT{idx:02d}"
    if "mid_block_" in underscored:
        return "M00"
    return None


def paper_block_of_fine(fine: str) -> str:
    """The paper block a fine block belongs to (IN01-IN03 -> IN0, ..., OUT09-OUT11 -> OUT3)."""
    if fine not in FINE_BLOCKS:
        raise _unknown("fine block", fine, FINE_BLOCKS)
    if fine == "M00":
        return "MID"
    n = int(fine[-2:])
    return f"IN{(n - 1) // 3}" if fine.startswith("IN") else f"OUT{n // 3}"


def fine_blocks_of(paper: str) -> tuple[str, ...]:
    """The fine blocks inside one paper block."""
    return tuple(f for f in FINE_BLOCKS if f != "IN00" and paper_block_of_fine(f) == paper)


def lbw_weights(vector: str | Sequence[float]) -> dict[str, float]:
    """A lora-block-weight preset name or 17/26-value vector as weights for BASE + the 25 fine blocks.

    As in lora-block-weight, a 17-value vector leaves the slots it does not name at 0.
    """
    if isinstance(vector, str):
        key = vector.strip()
        if key.upper() in LBW_PRESETS:
            values: Sequence[float] = LBW_PRESETS[key.upper()]
        else:
            try:
                values = [float(v) for v in key.split(",")]
            except ValueError:
                raise _unknown("lora-block-weight preset", vector, LBW_PRESETS) from None
    else:
        values = [float(v) for v in vector]
    if len(values) == 17:
        ids = LBW_IDS_17
    elif len(values) == 26:
        ids = LBW_IDS_26
    else:
        raise BlockSpecError(f"a lora-block-weight vector has 17 or 26 values, got {len(values)}")
    weights = dict.fromkeys(LBW_IDS_26, 0.0)
    weights.update(zip(ids, (float(v) for v in values)))
    return weights


def block_weights(spec: float | str | Mapping[str, float] | Sequence[float]) -> dict[str, float]:
    """Per-block inference weights for BASE (text encoder) and the 25 fine blocks.

    - a number: that weight everywhere;
    - a paper spec (``"upper"``, ``"IN0+OUT3"``): 1 on those blocks, 0 elsewhere (BASE 1);
    - an LBW preset name or comma-separated 17/26 values;
    - a list of 17 or 26 numbers (an LBW vector);
    - a dict of paper blocks, groups, fine blocks or ``BASE`` to weights: those override a default of 1.0;
      fine names override paper names.
    """
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return dict.fromkeys(LBW_IDS_26, float(spec))
    if isinstance(spec, str):
        if spec.strip().upper() in LBW_PRESETS or ("," in spec and _is_number_list(spec)):
            return lbw_weights(spec)
        selected = parse_blocks(spec)
        weights = {f: (1.0 if paper_block_of_fine(f) in selected else 0.0) for f in FINE_BLOCKS}
        return {"BASE": 1.0, **weights}
    if isinstance(spec, Mapping):
        weights = dict.fromkeys(LBW_IDS_26, 1.0)
        fine_overrides = {}
        for key, value in spec.items():
            name = str(key).strip().upper()
            if name in LBW_IDS_26:
                fine_overrides[name] = float(value)
            else:
                for paper in parse_blocks(str(key)):
                    for f in fine_blocks_of(paper):
                        weights[f] = float(value)
        weights.update(fine_overrides)
        return weights
    if isinstance(spec, Sequence):
        return lbw_weights(spec)
    raise BlockSpecError(f"cannot read block weights from {spec!r}")


def _is_number_list(text: str) -> bool:
    try:
        [float(v) for v in text.split(",")]
    except ValueError:
        return False
    return True


def block_ranks(blocks: str | Iterable[str], rank: int, overrides: Mapping[str, int] | None = None) -> dict[str, int]:
    """Training ranks per fine block (kohya ``block_dims`` semantics): the selected blocks get ``rank``.

    ``overrides`` maps paper blocks, groups or fine blocks to ranks; fine names win over paper names and a rank
    of 0 skips the block. Blocks with no positive rank are left out of the result.
    """
    selected = parse_blocks(blocks)
    if selected and (not isinstance(rank, int) or rank <= 0):
        raise BlockSpecError(
            f"rank must be a positive integer for the selected blocks {format_blocks(selected)}, got {rank!r}"
        )
    ranks = {f: rank for p in selected for f in fine_blocks_of(p)}
    paper_overrides: dict[str, int] = {}
    fine_overrides: dict[str, int] = {}
    for key, value in (overrides or {}).items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BlockSpecError(f"block rank for {key!r} must be an integer >= 0 (0 skips the block), got {value!r}")
        name = str(key).strip().upper()
        if name in FINE_BLOCKS:
            fine_overrides[name] = value
        else:
            for paper in parse_blocks(str(key)):
                paper_overrides.update(dict.fromkeys(fine_blocks_of(paper), value))
    ranks.update(paper_overrides)
    ranks.update(fine_overrides)
    return {f: r for f, r in ranks.items() if r > 0}
