"""Loading the pipeline the paper samples with (DPM++ 2M Karras, 25 steps, CFG 7)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

PAPER_MODEL = "CompVis/stable-diffusion-v1-4"
PAPER_STEPS = 25
PAPER_CFG = 7.0


def dpmpp_2m_karras(scheduler_config: dict) -> DPMSolverMultistepScheduler:
    """DPM++ 2M Karras built on a model's own noise schedule."""
    return DPMSolverMultistepScheduler.from_config(
        scheduler_config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
    )


def load_pipeline(
    model: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    local_files_only: bool | None = None,
) -> StableDiffusionPipeline:
    """Load an SD1.x pipeline from a hub id or a local directory with ``from_pretrained``.

    The sampler is DPM++ 2M Karras; the safety checker is off (bwl studies the model, not its filter).
    A local directory never touches the network.
    """
    if local_files_only is None:
        local_files_only = Path(model).is_dir()
    pipe = StableDiffusionPipeline.from_pretrained(
        str(model),
        dtype=dtype or torch.float32,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=local_files_only,
    )
    pipe.scheduler = dpmpp_2m_karras(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    pipe.unet.requires_grad_(False)
    if device is not None:
        pipe.to(device)
    return pipe
