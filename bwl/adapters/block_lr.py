"""Learning rates per block: kohya's block learning-rate weights, and LoRA+'s faster B matrices.

kohya's sd-scripts weight the learning rate by fine block with ``down_lr_weight`` (12 values, IN00..IN11),
``mid_lr_weight`` (M00) and ``up_lr_weight`` (12 values, OUT00..OUT11), each list either numbers or a preset:
``cosine``, ``sine``, ``linear``, ``reverse_linear`` or ``zeros``, optionally ``+<base>`` (added to every value).
A weight at or below ``block_lr_zero_threshold`` (default 0) becomes 0, and a block at 0 is not created at all
(its rank is set to 0), so it keeps its base weights exactly. bwl does the same.

LoRA+ (Hayou et al. 2024; kohya's ``loraplus_lr_ratio``) trains LoRA's B (up) matrices at ``ratio`` times the
learning rate. It is defined for the LoRA family (``lora``, ``locon``, DoRA's B); other methods refuse it by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from bwl.adapters.blocks import FINE_BLOCKS, BlockSpecError, fine_block, fine_blocks_of, parse_blocks

KOHYA_LR_PRESETS: tuple[str, ...] = ("cosine", "sine", "linear", "reverse_linear", "zeros")
PER_DIRECTION = 12  # kohya's NUM_OF_BLOCKS: values in down_lr_weight and up_lr_weight
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


def _direction(value: str | Sequence[float], where: str) -> list[float]:
    values = kohya_preset(value) if isinstance(value, str) else [float(v) for v in value]
    if len(values) > PER_DIRECTION:
        raise BlockSpecError(f"block_lr {where}: {len(values)} values; kohya's {where}_lr_weight takes at most 12")
    return values + [1.0] * (PER_DIRECTION - len(values))  # kohya fills a short list with 1


def block_lr_weights(value: BlockLR, zero_threshold: float = 0.0) -> dict[str, float]:
    """The learning-rate multiplier of each of the 25 fine blocks.

    ``value`` is None (all 1); a kohya preset name (applied to the down and the up blocks, as ``down_lr_weight`` and
    ``up_lr_weight`` given the same preset; M00 stays 1); 25 numbers (IN00..IN11, M00, OUT00..OUT11); a dict with
    kohya's ``down``/``mid``/``up`` keys; or a dict of paper blocks, groups or fine blocks to multipliers (others 1,
    fine names win). Multipliers at or below ``zero_threshold`` become 0.
    """
    weights = dict.fromkeys(FINE_BLOCKS, 1.0)
    if value is None:
        return weights
    if isinstance(value, str):
        value = {"down": value, "up": value}
    if isinstance(value, Mapping) and set(value) & {"down", "mid", "up"}:
        unknown = set(value) - {"down", "mid", "up"}
        if unknown:
            raise BlockSpecError(f"block_lr: {sorted(unknown)} mixed with kohya's down/mid/up keys")
        for where, offset in (("down", 0), ("up", PER_DIRECTION + 1)):
            if where in value:
                for i, w in enumerate(_direction(value[where], where)):
                    weights[FINE_BLOCKS[offset + i]] = w
        weights["M00"] = float(value.get("mid", 1.0))
    elif isinstance(value, Mapping):
        fine = {}
        for key, multiplier in value.items():
            name = str(key).strip().upper()
            if name in FINE_BLOCKS:
                fine[name] = float(multiplier)
            else:
                for paper in parse_blocks(str(key)):
                    weights.update(dict.fromkeys(fine_blocks_of(paper), float(multiplier)))
        weights.update(fine)
    elif isinstance(value, Sequence) and len(value) == len(FINE_BLOCKS):
        weights = {f: float(v) for f, v in zip(FINE_BLOCKS, value)}
    else:
        raise BlockSpecError(f"block_lr={value!r}: expected a kohya preset ({', '.join(KOHYA_LR_PRESETS)}), 25 "
                             "numbers, a dict of down/mid/up, or a dict of blocks to multipliers")
    return {f: (w if w > zero_threshold else 0.0) for f, w in weights.items()}


def zero_lr_blocks(value: BlockLR, zero_threshold: float = 0.0) -> list[str]:
    """Fine blocks whose multiplier is 0: not trained, and (as kohya does) not created."""
    if value is None:
        return []
    return [f for f, w in block_lr_weights(value, zero_threshold).items() if w == 0]


def parameter_multiplier(parameter_name: str, weights: Mapping[str, float], loraplus_ratio: float | None) -> float:
    """The learning-rate multiplier of one U-Net adapter parameter: its fine block's weight, times the LoRA+ ratio
    for LoRA's B matrices. Parameters outside the 25 fine blocks take 1."""
    multiplier = weights.get(fine_block(parameter_name) or "", 1.0)
    if loraplus_ratio and any(t in parameter_name for t in LORAPLUS_TENSORS):
        multiplier *= loraplus_ratio
    return multiplier
