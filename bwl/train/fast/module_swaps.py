"""Switchable module behaviour: swap a model's modules to subclasses once, turn their new behaviour on per block.

:mod:`bwl.train.fast.autocast_norms` and :mod:`bwl.train.fast.channels_last` use this: the swapped modules behave as
before unless a step runs inside their :class:`Switch`, so a model shared with another loop (the benchmarks'
reference) is unchanged there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Switch:
    """A process-wide flag that a block of work sets (``with switch():``) and swapped modules read (``switch.on``)."""

    def __init__(self) -> None:
        self.on = False

    @contextmanager
    def __call__(self, enabled: bool = True) -> Iterator[None]:
        previous, self.on = self.on, enabled
        try:
            yield
        finally:
            self.on = previous


def swap_classes(model: torch.nn.Module, replacements: dict[type, type]) -> int:
    """Give every module whose class is exactly a key of ``replacements`` that key's subclass; returns how many."""
    changed = 0
    for module in model.modules():
        replacement = replacements.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
            changed += 1
    return changed
