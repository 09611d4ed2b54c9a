"""Regularization images: the base model's own pictures of the class, for prior preservation (~500 in the paper)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from bwl.core.atomic import atomic_path, write_text
from bwl.sd.pipeline import PAPER_CFG, PAPER_STEPS


def generate_regularization(pipe: StableDiffusionPipeline, folder: str | Path, prompt: str, count: int = 500,
                            resolution: int | None = None, seed: int = 0, batch_size: int = 4,
                            steps: int = PAPER_STEPS, guidance_scale: float = PAPER_CFG) -> int:
    """Generate ``count`` images of ``prompt`` (image i from seed ``seed + i``) with class captions beside them.

    Resumable: images already in ``folder`` are skipped. Returns how many new images were generated.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(count) if not (folder / f"reg_{i:05d}.png").exists()]
    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    for start in tqdm(range(0, len(todo), batch_size), desc="regularization images", disable=not todo):
        batch = todo[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + i) for i in batch]
        images = pipe([prompt] * len(batch), num_inference_steps=steps, guidance_scale=guidance_scale,
                      height=size, width=size, generator=generators).images
        for i, image in zip(batch, images):
            write_text(folder / f"reg_{i:05d}.txt", prompt + "\n")
            with atomic_path(folder / f"reg_{i:05d}.png") as tmp:
                image.save(tmp, format="PNG")
    return len(todo)
