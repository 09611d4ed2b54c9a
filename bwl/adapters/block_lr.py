"""Learning rates per block: kohya's block learning-rate weights, and LoRA+'s faster B matrices.

kohya's sd-scripts weight the learning rate by fine block with ``down_lr_weight`` (12 values, IN00..IN11; 9 on
SDXL), ``mid_lr_weight`` (M00; SDXL's three middle slots, which bwl's M00 holds together, so they must agree) and
``up_lr_weight`` (12 values, OUT00..OUT11; 9 on SDXL), each list either numbers or a preset:
``cosine``, ``sine``, ``linear``, ``reverse_linear`` or ``zeros``, optionally ``+<base>`` (added to every value).
A weight at or below ``block_lr_zero_threshold`` (default 0) becomes 0, and a block at 0 is not created at all
(its rank is set to 0), so it keeps its base weights exactly. bwl does the same.

LoRA+ (Hayou et al. 2024; kohya's ``loraplus_lr_ratio``) trains LoRA's B (up) matrices at ``ratio`` times the
learning rate. It is defined for the LoRA family (``lora``, ``locon``, DoRA's B); other methods refuse it by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from bwl.adapters.architectures import ArchitectureLike, get_architecture
from bwl.adapters.blocks import BlockSpecError, fine_block, parse_blocks

KOHYA_LR_PRESETS: tuple[str, ...] = ("cosine", "sine", "linear", "reverse_linear", "zeros")
PER_DIRECTION = 12  # kohya's NUM_OF_BLOCKS on SD 1.x: values in down_lr_weight and up_lr_weight (SDXL: 9)
BlockLR = str | Mapping | Sequence | None
LORAPLUS_TENSORS = (".lora_B.",)  # LoRA's B: the matrices LoRA+ speeds up


def kohya_preset(name: str, length: int = PER_DIRECTION) -> list[float]:
    """A kohya preset's ``length`` weights, shallow to deep for ``down_lr_weight`` (as sd-scripts computes them)."""
    preset, _, base_text = name.strip().partition("+")
    try:
        base = float(base_text) if base_text else 0.0
    except ValueError:
        raise BlockSpecError(f"block_lr preset {name!r}: {base_text!r} after '+' is not a number") from None
    steps = [i / (length - 1) for i in range(length)]
    curves = {
        "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
        "sine": [math.sin(math.pi * s / 2) for s in steps],
        "linear": steps,
        "reverse_linear": list(reversed(steps)),
        "zeros": [0.0] * length,
    }
    if preset not in curves:
        raise BlockSpecError(f"unknown block_lr preset {preset!r}; valid: {', '.join(KOHYA_LR_PRESETS)} "
                             "(optionally +<base>)")
    return [v + base for v in curves[preset]]


def _direction(value: str | Sequence[float], where: str, length: int) -> list[float]:
    values = kohya_preset(value, length) if isinstance(value, str) else [float(v) for v in value]
    if len(values) > length:
        raise BlockSpecError(f"block_lr {where}: {len(values)} values; kohya's {where}_lr_weight takes at most "
                             f"{length} here")
    return values + [1.0] * (length - len(values))  # kohya fills a short list with 1


def _mid(value) -> float:
    values = [float(v) for v in value] if isinstance(value, Sequence) and not isinstance(value, str) else [float(value)]
    if len(set(values)) != 1:
        raise BlockSpecError(f"block_lr mid: {values}; bwl's M00 holds SDXL's three middle slots together, so they "
                             "take one multiplier")
    return values[0]


def block_lr_weights(value: BlockLR, zero_threshold: float = 0.0,
                     arch: ArchitectureLike | None = None) -> dict[str, float]:
    """The learning-rate multiplier of each fine block of ``arch`` (25 on SD 1.x, 19 on SDXL).

    ``value`` is None (all 1); a kohya preset name (applied to the down and the up blocks, as ``down_lr_weight`` and
    ``up_lr_weight`` given the same preset; M00 stays 1); one number per fine block (IN00..IN11, M00, OUT00..OUT11
    on SD 1.x); a dict with kohya's ``down``/``mid``/``up`` keys; or a dict of paper blocks, groups or fine blocks to
    multipliers (others 1, fine names win). Multipliers at or below ``zero_threshold`` become 0.
    """
    arch = get_architecture(arch)
    fine_blocks, per_direction = arch.fine_blocks, 3 * arch.levels
    weights = dict.fromkeys(fine_blocks, 1.0)
    if value is None:
        return weights
    if isinstance(value, str):
        value = {"down": value, "up": value}
    if isinstance(value, Mapping) and set(value) & {"down", "mid", "up"}:
        unknown = set(value) - {"down", "mid", "up"}
        if unknown:
            raise BlockSpecError(f"block_lr: {sorted(unknown)} mixed with kohya's down/mid/up keys")
        for where, offset in (("down", 0), ("up", per_direction + 1)):
            if where in value:
                for i, w in enumerate(_direction(value[where], where, per_direction)):
                    weights[fine_blocks[offset + i]] = w
        weights["M00"] = _mid(value.get("mid", 1.0))
    elif isinstance(value, Mapping):
        fine = {}
        for key, multiplier in value.items():
            name = str(key).strip().upper()
            if name in fine_blocks:
                fine[name] = float(multiplier)
            else:
                for paper in parse_blocks(str(key), arch):
                    weights.update(dict.fromkeys(arch.fine_blocks_of(paper), float(multiplier)))
        weights.update(fine)
    elif isinstance(value, Sequence) and len(value) == len(fine_blocks):
        weights = {f: float(v) for f, v in zip(fine_blocks, value)}
    else:
        raise BlockSpecError(f"block_lr={value!r}: expected a kohya preset ({', '.join(KOHYA_LR_PRESETS)}), "
                             f"{len(fine_blocks)} numbers ({arch.label}), a dict of down/mid/up, or a dict of blocks "
                             "to multipliers")
    return {f: (w if w > zero_threshold else 0.0) for f, w in weights.items()}


def zero_lr_blocks(value: BlockLR, zero_threshold: float = 0.0, arch: ArchitectureLike | None = None) -> list[str]:
    """Fine blocks whose multiplier is 0: not trained, and (as kohya does) not created."""
    if value is None:
        return []
    return [f for f, w in block_lr_weights(value, zero_threshold, arch).items() if w == 0]


def parameter_multiplier(parameter_name: str, weights: Mapping[str, float], loraplus_ratio: float | None) -> float:
    """The learning-rate multiplier of one U-Net adapter parameter: its fine block's weight, times the LoRA+ ratio
    for LoRA's B matrices. Parameters outside the fine blocks take 1."""
    multiplier = weights.get(fine_block(parameter_name) or "", 1.0)
    if loraplus_ratio and any(t in parameter_name for t in LORAPLUS_TENSORS):
        multiplier *= loraplus_ratio
    return multiplier
