"""Shared fixtures: one tiny SD1.x pipeline saved once per session, loaded fresh per test via from_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[2] / "shared"
DREAMBOOTH = SHARED / "datasets" / "dreambooth"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from bwl.sd.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture
def pipe(tiny_dir):
    from bwl.sd.pipeline import load_pipeline

    return load_pipeline(tiny_dir)


@pytest.fixture
def dreambooth() -> Path:
    if not DREAMBOOTH.is_dir():
        pytest.skip(f"real photos not available: {DREAMBOOTH} is absent (../shared is not beside this checkout)")
    return DREAMBOOTH


def render(pipe, prompt: str = "a photo of sks dog", seed: int = 0, steps: int = 4) -> np.ndarray:
    """One image as float array, at a fixed seed, with the paper's CFG."""
    return pipe(prompt, num_inference_steps=steps, guidance_scale=7.0,
                generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


def randomize_lora(unet, std: float = 0.2, seed: int = 0) -> None:
    """Give lora_B non-zero values so an untrained adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=g) * std
