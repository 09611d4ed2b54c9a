"""Latents and text embeddings, computed once and reused for every step.

20 images x 25 repeats x 11,000 steps must not run the VAE 11,000 times: each (image, flip) is encoded once and
its latent distribution (mean, std) kept, so every step still draws a fresh latent sample as diffusers'
DreamBooth script does. Captions are encoded once each by :class:`bwl.train.conditioning.TextCache`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images as a float tensor in [-1, 1], shape [N, 3, H, W]."""
    array = np.stack([np.asarray(img, dtype=np.float32) for img in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


@torch.no_grad()
def encode_distribution(
    vae: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent mean and std for each image (one encoder call per ``batch_size`` images)."""
    means, stds = [], []
    for chunk in pixels.split(batch_size):
        dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, generator: torch.Generator
) -> torch.Tensor:
    """Draw latents from cached distributions, scaled as the U-Net expects."""
    noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32).to(
        mean.device, mean.dtype
    )
    return (mean + std * noise) * scaling_factor


class LatentCache:
    """Latent distributions for every image, and its mirror image when flips are used."""

    def __init__(self, vae: torch.nn.Module, images: Sequence[Image.Image], with_flips: bool):
        pixels = to_pixels(images)
        if with_flips:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        self.mean, self.std = encode_distribution(vae, pixels)
        self.count = len(images)
        self.scaling_factor = vae.config.scaling_factor

    def sample(self, index: torch.Tensor, flip: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        rows = (index + flip.long() * self.count).to(self.mean.device)
        return sample_latents(self.mean[rows], self.std[rows], self.scaling_factor, generator)
