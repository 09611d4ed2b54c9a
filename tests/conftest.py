"""Shared fixtures: one tiny SD1.x pipeline saved once per session, loaded fresh per test via from_pretrained; and
how far apart two float32 code paths for one function may be (:func:`float32_bound`)."""

from __future__ import annotations

import math
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


FLOAT32_EPS = torch.finfo(torch.float32).eps


def float32_bound(model: torch.nn.Module, passes: int = 1) -> float:
    """How far apart, relative to the output's largest magnitude, two float32 evaluations of one function by ``model``
    may be when they differ only in the order of their sums (other CPU kernels, a loaded or an in-memory adapter).

    Derived, not fitted: a dot product of length n rounds n times, which leaves a relative error of about
    sqrt(n)*eps (the random-walk bound); each of the model's weighted layers (Linear, Conv2d) adds at most that of
    its widest fan-in, taken as if all ran in sequence; ``passes`` evaluations in a row (sampling steps) add up. Any
    two correct paths on any x86 CPU stay far inside it; a wrong scale or a missing block is orders of magnitude
    outside (callers check that the effect they test is, with :func:`assert_float32_equal`'s ``effect``).
    """
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    widest = max(m.weight[0].numel() for m in layers)
    return passes * len(layers) * math.sqrt(widest) * FLOAT32_EPS


def pipeline_bound(pipe, steps: int = 4) -> float:
    """:func:`float32_bound` of a :func:`render`: the text encoder once, the U-Net once per sampling step (both
    guidance branches in one batch), the VAE's decoder once; the image's values lie in [0, 1]."""
    return (float32_bound(pipe.text_encoder) + float32_bound(pipe.unet, passes=steps)
            + float32_bound(pipe.vae.decoder))


def assert_float32_equal(actual, expected, bound: float, effect=None) -> None:
    """``actual`` equals ``expected`` up to float32 rounding (``bound``, relative to ``expected``'s largest magnitude:
    :func:`float32_bound`). ``effect``: a tensor the compared computation must differ from by far more than that
    (the base model's output, where an adapter is compared), so the check stays able to fail."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    scale = expected.abs().max().item()
    difference = (actual - expected).abs().max().item()
    assert difference <= bound * scale, f"differ by {difference:.3g}, beyond float32 rounding ({bound * scale:.3g})"
    if effect is not None:
        size = (expected - torch.as_tensor(effect)).abs().max().item()
        assert size > 10 * bound * scale, f"the effect under test ({size:.3g}) is within 10x the rounding bound"
