"""Transformer blocks that keep a channels_last U-Net channels_last.

SD 1.x's Transformer2DModel projects in and out with 1x1 convolutions. On the way out diffusers turns the
(batch, tokens, channels) activations back into an image with ``permute(0, 3, 1, 2).contiguous()``: in a
channels_last network that permuted view is already channels_last, and ``.contiguous()`` copies it into NCHW,
which the next convolution then converts back (and backward copies the gradient the same way). On an H100 at
batch 8 copies, mostly these, were 21 % of the eager step's GPU time.

:func:`install` swaps the classes of a U-Net's Transformer2DModels once (:mod:`bwl.train.fast.module_swaps`); inside the
``keep_layout`` switch they return the permuted view instead of the NCHW copy (same values, channels_last
memory), outside it they behave as before. Only the conv-projection
path (``use_linear_projection: false``, SD 1.x) is changed. Written against diffusers 0.42, whose private
``_get_output_for_continuous_inputs`` this overrides; pyproject pins diffusers to 0.42.x.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from bwl.train.fast.module_swaps import Switch, swap_classes

keep_layout = Switch()  # within ``with keep_layout():`` installed transformer blocks skip the NCHW copy


class ChannelsLastTransformer2DModel(Transformer2DModel):
    def _get_output_for_continuous_inputs(self, hidden_states: torch.Tensor, residual: torch.Tensor, batch_size: int,
                                          height: int, width: int, inner_dim: int) -> torch.Tensor:
        if not keep_layout.on or self.use_linear_projection:
            return super()._get_output_for_continuous_inputs(hidden_states, residual, batch_size, height, width,
                                                             inner_dim)
        image = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)  # a channels_last view
        return self.proj_out(image) + residual


def install(unet: torch.nn.Module) -> int:
    """Give every Transformer2DModel of ``unet`` the switchable output; returns how many were changed."""
    return swap_classes(unet, {Transformer2DModel: ChannelsLastTransformer2DModel})
