"""Normalization layers that run in autocast's compute dtype.

Autocast runs ``group_norm`` and ``layer_norm`` in float32: each of the U-Net's 61 GroupNorms and 48 LayerNorms
casts its bf16/fp16 input up, writes a float32 output (which the SiLU after it reads and writes in float32 too)
and the next convolution casts it back down. That is a large share of an eager mixed-precision step's memory
traffic and kernel launches. The native bf16/fp16 kernels already accumulate their statistics in float32, so
running the norm in the compute dtype changes results by rounding only.

:func:`install` swaps the classes of a model's norms once (:mod:`bwl.train.fast.module_swaps`); they behave as before
unless a step runs inside the ``norms_in_compute_dtype`` switch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bwl.train.fast.module_swaps import Switch, swap_classes

norms_in_compute_dtype = Switch()  # within ``with norms_in_compute_dtype():`` installed norms run in autocast's dtype


def _compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    if not norms_in_compute_dtype.on or not torch.is_autocast_enabled(x.device.type):
        return None
    return torch.get_autocast_dtype(x.device.type)


class ComputeDtypeGroupNorm(torch.nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        if dtype is None:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            weight, bias = _cast(self.weight, dtype), _cast(self.bias, dtype)
            return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps)


class ComputeDtypeLayerNorm(torch.nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        if dtype is None:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            weight, bias = _cast(self.weight, dtype), _cast(self.bias, dtype)
            return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)


def _cast(param: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if param is None else param.to(dtype)


def install(model: torch.nn.Module) -> int:
    """Give every GroupNorm and LayerNorm of ``model`` the switchable forward; returns how many were changed."""
    return swap_classes(model, {torch.nn.GroupNorm: ComputeDtypeGroupNorm, torch.nn.LayerNorm: ComputeDtypeLayerNorm})
