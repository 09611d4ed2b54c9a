"""TorchInductor for the U-Net, with eager as the fallback when compiling fails.

Inductor's C++ code generation can fail on some CPUs (seen: an ``AssertionError`` in ``codegen/cpp.py`` ``store``
on an AVX2-only machine, torch 2.13, tiny model). Compiling is lazy, so the failure surfaces in the first step.
:class:`CompiledUNet` then warns once, naming the cause, runs that step and every later one eagerly, and keeps the
cause in :attr:`CompiledUNet.fallback` for the run's ``config.json``. Errors that are not compile failures pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from torch._dynamo.exc import BackendCompilerFailed  # InductorError is a subclass

T = TypeVar("T")


def compile_failure(error: BaseException) -> str | None:
    """One line naming the cause if ``error`` is a failed compilation, else ``None``."""
    if not isinstance(error, BackendCompilerFailed):
        return None
    cause = getattr(error, "inner_exception", None) or error.__cause__
    detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(error)
    return f"{type(error).__name__} ({detail.splitlines()[0] if detail.strip() else 'no message'})"


class CompiledUNet:
    """The U-Net compiled with ``torch.compile``, or the eager U-Net once compiling has failed."""

    def __init__(self, unet: torch.nn.Module, backend: str, mode: str):
        self.eager = unet
        self.compiled = torch.compile(unet, backend=backend, mode=mode)
        self.fallback: str | None = None

    def __call__(self, *args, **kwargs):
        return (self.eager if self.fallback else self.compiled)(*args, **kwargs)

    def run(self, work: Callable[[], T], undo: Callable[[], None]) -> T:
        """``work()`` (a step's forward and backward through this U-Net); if compiling fails in it, ``undo()`` what
        it left (gradients) and run it again eagerly."""
        try:
            return work()
        except Exception as error:
            cause = compile_failure(error)
            if cause is None or self.fallback:
                raise
            self.fallback = cause
            warnings.warn(f"compile_unet: TorchInductor failed to compile the U-Net, training eagerly instead: {cause}",
                          RuntimeWarning, stacklevel=2)
            undo()
            return work()
