"""The training step's speed choices, each a small module with its measured reason, made once per run.

:func:`prepare` applies them to a U-Net and returns the :class:`FastPath` that :class:`bwl.train.run.TrainingRun`
steps through: norms in the compute dtype under autocast (:mod:`.autocast_norms`), channels_last with transformer
outputs kept channels_last on CUDA (:mod:`.channels_last`), CPU convolution kernels chosen by size
(:mod:`.cpu_convolutions`) and TorchInductor with an eager fallback (:mod:`.compile`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from bwl.train.fast import autocast_norms, channels_last, cpu_convolutions
from bwl.train.fast.compile import CompiledUNet


@dataclass
class FastPath:
    """What one run chose: each field is recorded in its ``config.json``."""

    norms_in_compute_dtype: bool
    channels_last: bool
    keep_transformer_layout: bool  # channels_last transformer outputs (an attribute, for ablations)
    cpu_convolutions: str | None = None  # on CPU: "onednn" or "native", chosen for the training shape

    @contextmanager
    def kernels(self) -> Iterator[None]:
        """The step's kernel choices, applied around its forward and backward (checkpointing recomputes there)."""
        with ExitStack() as stack:
            stack.enter_context(autocast_norms.norms_in_compute_dtype(self.norms_in_compute_dtype))
            stack.enter_context(channels_last.keep_layout(self.keep_transformer_layout))
            if self.cpu_convolutions is not None:
                stack.enter_context(cpu_convolutions.kernels(self.cpu_convolutions))
            yield


def prepare(unet: torch.nn.Module, device: torch.device, norms_in_compute_dtype: bool,
            use_channels_last: bool | None) -> FastPath:
    """Swap in the switchable norms and transformer outputs and set the memory format (None: channels_last on CUDA)."""
    if norms_in_compute_dtype:
        autocast_norms.install(unet)
    layout = device.type == "cuda" if use_channels_last is None else use_channels_last
    if layout:
        unet.to(memory_format=torch.channels_last)
        channels_last.install(unet)
    return FastPath(norms_in_compute_dtype, layout, layout)


__all__ = ["CompiledUNet", "FastPath", "cpu_convolutions", "prepare"]
