"""Batched generation across prompts and seeds; every image has its own seeded generator, so batching never
changes which image a (prompt, seed) pair gets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from bwl.sd.pipeline import PAPER_CFG, PAPER_STEPS


def generate(pipe: StableDiffusionPipeline, prompts: Sequence[str], seeds: Sequence[int], steps: int = PAPER_STEPS,
             guidance_scale: float = PAPER_CFG, batch_size: int = 32, size: int | None = None,
             extra: Mapping | None = None) -> list[Image.Image]:
    """One image per (prompt, seed), prompt-major, generated ``batch_size`` at a time; ``extra``: more keyword
    arguments of every pipeline call (a combination mode's step callback, :mod:`bwl.adapters.modes`)."""
    jobs = [(p, s) for p in prompts for s in seeds]
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    images: list[Image.Image] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed) for _, seed in chunk]
        with torch.inference_mode():
            images += pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                           height=size, width=size, generator=generators, **(extra or {})).images
    return images
