"""The U-Net block vocabulary: the paper's blocks, kohya's fine blocks and lora-block-weight vectors, per architecture.

Every function takes the layout it names blocks in (``arch``, an :class:`~bwl.adapters.architectures.Architecture`
or its name; SD 1.x by default). On SD 1.x the paper's blocks map to diffusers prefixes as follows (our reading; the
paper names no prefixes):

    IN0..IN3 -> down_blocks.0..3     MID -> mid_block     OUT0..OUT3 -> up_blocks.0..3

and on SDXL ``IN0..IN2``, ``MID``, ``OUT0..OUT2`` likewise. Module names may be diffusers', peft's, kohya's
(``lora_unet_down_blocks_…``) or the original model's (``input_blocks_4_1_…``, as kohya names SDXL's).
The module-level constants are SD 1.x's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from bwl.adapters.architectures import SD1, ArchitectureLike, BlockSpecError, get_architecture, sgm_block

PAPER_BLOCKS: tuple[str, ...] = SD1.paper_blocks
PAPER_PREFIXES: dict[str, str] = SD1.prefixes
GROUPS: dict[str, tuple[str, ...]] = SD1.groups
FINE_BLOCKS: tuple[str, ...] = SD1.fine_blocks
"""kohya's 25 SD 1.x block slots, in the order of ``block_dims``."""
LBW_IDS_26: tuple[str, ...] = SD1.lbw_full
LBW_IDS_17: tuple[str, ...] = SD1.lbw_short
LBW_PRESETS: dict[str, tuple[float, ...]] = SD1.lbw_presets

_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
_PAPER = re.compile(r"^(?:unet[._]|lora_unet_)?(?:(down|up)_blocks[._](\d+)|(mid_block))(?:[._]|$)")
_UNET_PREFIX = re.compile(r"^(?:unet[._]|lora_unet_)")

__all__ = ["BlockSpecError"]


def _unknown(kind: str, name: object, valid: Iterable[str], layout: str = "") -> BlockSpecError:
    return BlockSpecError(f"unknown {kind} {name!r}; valid{f' on {layout}' if layout else ''}: {', '.join(valid)}")


def parse_blocks(spec: str | Iterable[str], arch: ArchitectureLike | None = None) -> tuple[str, ...]:
    """Parse ``"IN0+OUT3"``, ``"upper"``, ``"upper+MID"`` or a list of names into ``arch``'s paper blocks, in U-Net
    order. Names and groups are case-insensitive; ``+`` and ``,`` both separate terms.
    """
    arch = get_architecture(arch)
    groups, blocks = arch.groups, arch.paper_blocks
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
        if term.lower() in groups:
            selected.update(groups[term.lower()])
        elif term.upper() in blocks:
            selected.add(term.upper())
        else:
            raise _unknown("block", term, list(blocks) + list(groups), arch.label)
    return tuple(b for b in blocks if b in selected)


def format_blocks(blocks: Iterable[str], arch: ArchitectureLike | None = None) -> str:
    """The canonical spec string for a set of paper blocks (a group name where one matches)."""
    arch = get_architecture(arch)
    ordered = tuple(b for b in arch.paper_blocks if b in set(blocks))
    for name, members in arch.groups.items():
        if ordered == members:
            return name
    return "+".join(ordered)


def valid_blocks(arch: ArchitectureLike | None = None) -> str:
    """``arch``'s paper blocks with their diffusers prefixes, for error messages."""
    return ", ".join(f"{block} ({prefix})" for block, prefix in get_architecture(arch).prefixes.items())


def _checked(module_name: str, block: str, where: str, arch) -> str:
    if block not in arch.paper_blocks:
        raise BlockSpecError(f"{module_name!r} is in {where}, a block {arch.label} does not have; "
                             f"valid blocks: {valid_blocks(arch)}")
    return block


def paper_block(module_name: str, arch: ArchitectureLike | None = None) -> str | None:
    """The paper block holding a module (diffusers, peft, kohya or SGM name), or None outside ``arch``'s blocks.

    A name in a block the layout does not have (``down_blocks_9``) is a :class:`BlockSpecError` naming it.
    """
    arch = get_architecture(arch)
    m = _PAPER.match(module_name)
    if m:
        if m.group(3):
            return "MID"
        block = f"{'IN' if m.group(1) == 'down' else 'OUT'}{m.group(2)}"
        return _checked(module_name, block, f"{m.group(1)}_blocks {m.group(2)}", arch)
    sgm = sgm_block(_UNET_PREFIX.sub("", module_name))
    if sgm is None:
        return None
    kind, n = sgm
    if kind == "middle_block":
        return "MID"
    if kind == "input_blocks":
        return None if n == 0 else _checked(module_name, f"IN{(n - 1) // 3}", f"input_blocks {n}", arch)
    return _checked(module_name, f"OUT{n // 3}", f"output_blocks {n}", arch)


def fine_block(module_name: str) -> str | None:
    """kohya's fine block (IN01..OUT11, M00) for a module name, exactly as sd-scripts' ``get_block_index``; an SGM
    name's ``input_blocks.N``/``output_blocks.N`` index is its fine block (``IN0N``/``OUT0N``)."""
    underscored = module_name.replace(".", "_") + "_"
    m = _UPDOWN.search(underscored)
    if m:
        direction, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return f"IN{1 + idx:02d}" if direction == "down" else f"OUT{idx:02d}"
    if "mid_block_" in underscored:
        return "M00"
    sgm = sgm_block(_UNET_PREFIX.sub("", module_name))
    if sgm is None or sgm == ("input_blocks", 0):
        return None
    kind, n = sgm
    return "M00" if kind == "middle_block" else f"{'IN' if kind == 'input_blocks' else 'OUT'}{n:02d}"


def paper_block_of_fine(fine: str, arch: ArchitectureLike | None = None) -> str:
    """The paper block a fine block belongs to (IN01-IN03 -> IN0, ..., OUT09-OUT11 -> OUT3 on SD 1.x)."""
    return get_architecture(arch).paper_block_of_fine(fine)


def fine_blocks_of(paper: str, arch: ArchitectureLike | None = None) -> tuple[str, ...]:
    """The fine blocks inside one paper block."""
    return get_architecture(arch).fine_blocks_of(paper)


def lbw_weights(vector: str | Sequence[float], arch: ArchitectureLike | None = None) -> dict[str, float]:
    """A lora-block-weight preset name or vector as weights for BASE + ``arch``'s fine blocks: 17 or 26 values on
    SD 1.x, 12 or 20 on SDXL. As in lora-block-weight, a short vector leaves the slots it does not name at 0.
    """
    arch = get_architecture(arch)
    presets = arch.lbw_presets
    if isinstance(vector, str):
        key = vector.strip()
        if key.upper() in presets:
            values: Sequence[float] = presets[key.upper()]
        else:
            try:
                values = [float(v) for v in key.split(",")]
            except ValueError:
                raise _unknown("lora-block-weight preset", vector, presets, arch.label) from None
    else:
        values = [float(v) for v in vector]
    by_length = {len(arch.lbw_short): arch.lbw_short, len(arch.lbw_full): arch.lbw_full}
    if len(values) not in by_length:
        raise BlockSpecError(f"an {arch.label} lora-block-weight vector has {len(arch.lbw_short)} or "
                             f"{len(arch.lbw_full)} values, got {len(values)}")
    weights = dict.fromkeys(arch.lbw_full, 0.0)
    weights.update(zip(by_length[len(values)], (float(v) for v in values)))
    return weights


def block_weights(spec: float | str | Mapping[str, float] | Sequence[float],
                  arch: ArchitectureLike | None = None) -> dict[str, float]:
    """Per-block inference weights for BASE (the text encoders) and ``arch``'s fine blocks.

    - a number: that weight everywhere;
    - a selection (``"upper"``, ``"IN0+OUT3"``, fine blocks such as B-LoRA's ``"OUT01"`` on SDXL): 1 on those
      blocks, 0 elsewhere (BASE 1);
    - an LBW preset name or comma-separated values (17/26 on SD 1.x, 12/20 on SDXL);
    - a list of such numbers (an LBW vector);
    - a dict of paper blocks, groups, fine blocks or ``BASE`` to weights: those override a default of 1.0;
      fine names override paper names.
    """
    arch = get_architecture(arch)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return dict.fromkeys(arch.lbw_full, float(spec))
    if isinstance(spec, str):
        if spec.strip().upper() in arch.lbw_presets or ("," in spec and _is_number_list(spec)):
            return lbw_weights(spec, arch)
        selected = set(parse_selection(spec, arch))
        return {"BASE": 1.0, **{f: (1.0 if f in selected else 0.0) for f in arch.fine_blocks}}
    if isinstance(spec, Mapping):
        weights = dict.fromkeys(arch.lbw_full, 1.0)
        fine_overrides = {}
        for key, value in spec.items():
            name = str(key).strip().upper()
            if name in arch.lbw_full:
                fine_overrides[name] = float(value)
            else:
                for paper in parse_blocks(str(key), arch):
                    for f in arch.fine_blocks_of(paper):
                        weights[f] = float(value)
        weights.update(fine_overrides)
        return weights
    if isinstance(spec, Sequence):
        return lbw_weights(spec, arch)
    raise BlockSpecError(f"cannot read block weights from {spec!r}")


def _is_number_list(text: str) -> bool:
    try:
        [float(v) for v in text.split(",")]
    except ValueError:
        return False
    return True


def parse_selection(spec: str | Iterable[str], arch: ArchitectureLike | None = None) -> tuple[str, ...]:
    """The fine blocks a training selection names, in U-Net order. A selection is a paper spec (``"upper"``,
    ``"IN0+OUT3"``), kohya fine blocks (``"OUT00+OUT01"``, B-LoRA's content and style blocks on SDXL) or both, or a
    lora-block-weight vector (its nonzero U-Net slots; BASE, the text encoder, is ``text_encoder``'s to say)."""
    arch = get_architecture(arch)
    if isinstance(spec, str) and "," in spec and _is_number_list(spec):
        weights = lbw_weights(spec, arch)
        return tuple(f for f in arch.fine_blocks if f != "IN00" and weights[f] != 0)
    terms = re.split(r"[+,]", spec) if isinstance(spec, str) else list(spec)
    fine = {t.strip().upper() for t in terms if isinstance(t, str) and t.strip().upper() in arch.fine_blocks}
    if "IN00" in fine:
        raise BlockSpecError(f"IN00 is {arch.label}'s conv_in, which no adapter bwl trains holds")
    rest = [t for t in terms if not (isinstance(t, str) and t.strip().upper() in fine)]
    papers = parse_blocks(rest, arch) if rest or not fine else ()
    chosen = fine | {f for p in papers for f in arch.fine_blocks_of(p)}
    return tuple(f for f in arch.fine_blocks if f in chosen)


def format_selection(fine: Iterable[str], arch: ArchitectureLike | None = None) -> str:
    """The canonical spec string for selected fine blocks: whole paper blocks as :func:`format_blocks` writes them,
    then any fine blocks of partly selected ones."""
    arch = get_architecture(arch)
    fine = set(fine)
    whole = [p for p in arch.paper_blocks if set(arch.fine_blocks_of(p)) <= fine]
    partial = [f for f in arch.fine_blocks if f in fine and arch.paper_block_of_fine(f) not in whole]
    if not partial:
        return format_blocks(whole, arch)
    return "+".join(([format_blocks(whole, arch)] if whole else []) + partial)


def block_ranks(blocks: str | Iterable[str], rank: int, overrides: Mapping[str, int] | None = None,
                arch: ArchitectureLike | None = None) -> dict[str, int]:
    """Training ranks per fine block (kohya ``block_dims`` semantics): the selected blocks (:func:`parse_selection`)
    get ``rank``.

    ``overrides`` maps paper blocks, groups or fine blocks to ranks; fine names win over paper names and a rank
    of 0 skips the block. Blocks with no positive rank are left out of the result.
    """
    arch = get_architecture(arch)
    selected = parse_selection(blocks, arch)
    if selected and (not isinstance(rank, int) or rank <= 0):
        raise BlockSpecError(
            f"rank must be a positive integer for the selected blocks {format_selection(selected, arch)}, "
            f"got {rank!r}")
    ranks = dict.fromkeys(selected, rank)
    paper_overrides: dict[str, int] = {}
    fine_overrides: dict[str, int] = {}
    for key, value in (overrides or {}).items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BlockSpecError(f"block rank for {key!r} must be an integer >= 0 (0 skips the block), got {value!r}")
        name = str(key).strip().upper()
        if name in arch.fine_blocks:
            fine_overrides[name] = value
        else:
            for paper in parse_blocks(str(key), arch):
                paper_overrides.update(dict.fromkeys(arch.fine_blocks_of(paper), value))
    ranks.update(paper_overrides)
    ranks.update(fine_overrides)
    return {f: r for f, r in ranks.items() if r > 0}
