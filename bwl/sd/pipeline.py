"""Loading the pipeline the paper samples with (DPM++ 2M Karras, 25 steps, CFG 7): an SD 1.x/2.x or an SDXL one,
chosen by the model's own ``model_index.json``."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from bwl.core.config import ConfigError

PAPER_MODEL = "CompVis/stable-diffusion-v1-4"
PAPER_STEPS = 25
PAPER_CFG = 7.0
Pipeline = StableDiffusionPipeline | StableDiffusionXLPipeline
PIPELINE_CLASSES: dict[str, type] = {"StableDiffusionPipeline": StableDiffusionPipeline,
                                     "StableDiffusionXLPipeline": StableDiffusionXLPipeline}


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


def text_encoders(pipe: Pipeline) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoders by attribute: ``text_encoder`` (and SDXL's ``text_encoder_2``)."""
    return {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None}


def unet_config(model: str | Path) -> dict:
    """The U-Net's config of a pipeline (hub id or directory), without loading any weights."""
    local = Path(model).is_dir()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return dict(UNet2DConditionModel.load_config(str(model), subfolder="unet", local_files_only=local))
    except (OSError, ValueError) as error:
        raise ModelNotFound(f"model {str(model)!r}: no U-Net config found ({error})") from None


def _pipeline_class(model: str | Path, local_files_only: bool) -> type:
    with warnings.catch_warnings():  # the hub client's notice about an argument diffusers still passes
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        name = DiffusionPipeline.load_config(str(model), local_files_only=local_files_only).get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise ModelNotFound(f"model {str(model)!r} is a {name}; bwl loads {' and '.join(PIPELINE_CLASSES)}")
    return PIPELINE_CLASSES[name]


def load_pipeline(
    model: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    local_files_only: bool | None = None,
) -> Pipeline:
    """Load an SD 1.x/2.x or SDXL pipeline from a hub id or a local directory with ``from_pretrained``, the class
    its ``model_index.json`` names.

    The sampler is DPM++ 2M Karras; the safety checker and SDXL's watermark are off (bwl studies the model, not its
    filters). A local directory never touches the network.
    """
    local = Path(model)
    if local.exists() and not (local / "model_index.json").is_file():
        raise ModelNotFound(f"{model}: not a pipeline directory (it has no model_index.json); pass a folder written by "
                            "save_pretrained, or a hub id")
    if local_files_only is None:
        local_files_only = local.is_dir()
    try:
        with quiet_loading(local.is_dir()):
            cls = _pipeline_class(model, local_files_only)
            extra = (dict(add_watermarker=False) if cls is StableDiffusionXLPipeline else
                     dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False))
            pipe = cls.from_pretrained(str(model), dtype=dtype or torch.float32, local_files_only=local_files_only,
                                       **extra)
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
    for encoder in text_encoders(pipe).values():
        encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    pipe.unet.requires_grad_(False)
    if device is not None:
        pipe.to(device)
    return pipe
