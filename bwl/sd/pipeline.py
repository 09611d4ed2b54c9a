"""Loading the pipeline the paper samples with (DPM++ 2M Karras, 25 steps, CFG 7)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from bwl.core.config import ConfigError

PAPER_MODEL = "CompVis/stable-diffusion-v1-4"
PAPER_STEPS = 25
PAPER_CFG = 7.0


def dpmpp_2m_karras(scheduler_config: dict) -> DPMSolverMultistepScheduler:
    """DPM++ 2M Karras built on a model's own noise schedule."""
    return DPMSolverMultistepScheduler.from_config(
        scheduler_config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
    )


class ModelNotFound(ConfigError):
    """A model that is neither a local pipeline directory nor a cached or downloadable hub id."""


class _NoOfflineChatter(logging.Filter):
    """Drops the hub client's "Couldn't connect to the Hub … Will try to load from local cache": offline, the cache is
    what bwl reads anyway, and a model found in neither place gets :class:`ModelNotFound`, one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Couldn't connect to the Hub")


diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils").addFilter(_NoOfflineChatter())


@contextmanager
def quiet_loading(enabled: bool = True) -> Iterator[None]:
    """No "Loading pipeline components" / "Loading weights" progress bars (loading a local folder takes a second;
    a hub download keeps its bars)."""
    if not enabled:
        yield
        return
    was_diffusers, was_transformers = (
        diffusers_logging.is_progress_bar_enabled(),
        transformers_logging.is_progress_bar_enabled(),
    )
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_diffusers:
            diffusers_logging.enable_progress_bar()
        if was_transformers:
            transformers_logging.enable_progress_bar()


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
    local = Path(model)
    if local.exists() and not (local / "model_index.json").is_file():
        raise ModelNotFound(f"{model}: not a pipeline directory (it has no model_index.json); pass a folder written by "
                            "save_pretrained, or a hub id")
    if local_files_only is None:
        local_files_only = local.is_dir()
    try:
        with quiet_loading(local.is_dir()):
            pipe = StableDiffusionPipeline.from_pretrained(
                str(model),
                dtype=dtype or torch.float32,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                local_files_only=local_files_only,
            )
    except (OSError, ValueError) as error:  # the hub client's not-found, offline and invalid-id errors
        if local.is_dir():
            raise
        raise ModelNotFound(
            f"model {str(model)!r}: no such local directory, and not a hub id that is cached here or can be downloaded "
            f"now; fetch it where there is internet (`hf download {model}`) or pass a directory saved with "
            "save_pretrained"
        ) from error
    pipe.scheduler = dpmpp_2m_karras(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    pipe.unet.requires_grad_(False)
    if device is not None:
        pipe.to(device)
    return pipe
