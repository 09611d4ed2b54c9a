"""What the benchmarks share: models, a synthetic dataset, timing and peak memory, and result tables."""

from __future__ import annotations

import csv
import datetime
import gc
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from bwl.core.atomic import atomic_path, write_text
from bwl.sd.pipeline import load_pipeline
from bwl.sd.tiny import (
    SDXL_SCHEDULE,
    TINY_WORDS,
    assemble_pipeline,
    build_tiny_sdxl_pipeline,
    full_size_sd1_unet,
    full_size_sdxl_unet,
    tiny_pipeline,
)
from bwl.sd.tokenizer import word_tokenizer
from bwl.toy.assets import TOY_MODEL

RESULTS = Path(__file__).resolve().parent / "results"
TINY_DIR = Path(__file__).resolve().parent.parent / "runs" / "bench" / "tiny-sd"
TINY_XL_DIR = TINY_DIR.parent / "tiny-sdxl"

# bf16 dense tensor-core peaks (TFLOP/s) for model-FLOPs utilization; the SXM parts' datasheet values.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"


def peak_tflops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def full_size_sd1_pipeline(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> StableDiffusionPipeline:
    """SD 1.x's U-Net, VAE and CLIP ViT-L text encoder with random weights (speed does not depend on weights)."""
    with torch.device(device):
        unet, vae, text_encoder = full_size_sd1_unet(), _full_vae(512, 0.18215), _clip_text(768, 12, 12, 3072)
    pipe = assemble_pipeline(unet, vae, text_encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def _full_vae(sample_size: int, scaling_factor: float) -> AutoencoderKL:
    """SD's VAE architecture (the same for SD 1.x and SDXL), with random weights."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=sample_size, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512), scaling_factor=scaling_factor,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def _clip_text(hidden: int, layers: int, heads: int, intermediate: int, projection: int | None = None):
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            hidden_act="quick_gelu" if projection is None else "gelu", bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, **({"projection_dim": projection} if projection else {}))
    return CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)


def full_size_sdxl_pipeline(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> StableDiffusionXLPipeline:
    """SDXL base's U-Net, VAE, CLIP ViT-L and OpenCLIP ViT-bigG text encoders with random weights."""
    with torch.device(device):
        unet, vae = full_size_sdxl_unet(), _full_vae(1024, 0.13025)
        first, second = _clip_text(768, 12, 12, 3072), _clip_text(1280, 32, 20, 5120, projection=1280)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=first, text_encoder_2=second,
                                     tokenizer=word_tokenizer(TINY_WORDS), tokenizer_2=word_tokenizer(TINY_WORDS),
                                     unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULE),
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def load_model(kind: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """``tiny`` (the test model, through from_pretrained), ``toy`` (the shipped micro SD), ``full`` (SD 1.x's
    architecture, random weights), ``xl-tiny`` (a tiny SDXL, through from_pretrained) or ``xl-full`` (SDXL base's
    architecture, random weights).

    Frees what earlier settings left first, so one setting's peak memory never includes another's model.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if kind == "tiny":
        pipe = tiny_pipeline(TINY_DIR)
        return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)
    if kind == "toy":
        pipe = load_pipeline(TOY_MODEL)
        return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)
    if kind == "full":
        return full_size_sd1_pipeline(dtype, device)
    if kind == "xl-tiny":
        if not (TINY_XL_DIR / "model_index.json").exists():
            build_tiny_sdxl_pipeline(TINY_XL_DIR)
        pipe = load_pipeline(TINY_XL_DIR)
        return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)
    if kind == "xl-full":
        return full_size_sdxl_pipeline(dtype, device)
    raise ValueError(f"unknown model {kind!r}; valid: tiny, toy, full, xl-tiny, xl-full")


def write_dataset(folder: Path, resolution: int, count: int = 8, seed: int = 0) -> Path:
    """``count`` random-block images at ``resolution`` with tag captions (content does not change speed)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        if (folder / f"{i:02d}.png").exists():
            continue
        blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((resolution, resolution), Image.Resampling.NEAREST).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"sks, dog, {'red' if i % 2 else 'blue'} background\n")
    return folder


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a block of work: CUDA's allocator peak on GPU, else the process's peak RSS above its start
    (sampled every 5 ms, so short spikes can be missed)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.process = psutil.Process()
            self.start = self.process.memory_info().rss
            self.running = True
            self.highest = self.start
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.highest = max(self.highest, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.running = False
            self.thread.join()
            self.peak = self.highest - self.start


def time_steps(step: Callable[[int], object], first: int, count: int, device: torch.device) -> float:
    """Seconds per call of ``step(i)`` for ``count`` calls, synchronized at both ends only."""
    synchronize(device)
    start = time.perf_counter()
    for i in range(first, first + count):
        step(i)
    synchronize(device)
    return (time.perf_counter() - start) / count


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f}"


def size(n_bytes: float) -> str:
    """Bytes as GiB, or MiB below 1 GiB."""
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def write_table(name: str, rows: list[dict], command: str) -> tuple[Path, Path]:
    """``benchmarks/results/<name>.csv`` and ``.md`` (with date, machine and command), written atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = RESULTS / f"{name}.csv", RESULTS / f"{name}.md"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    header = list(dict.fromkeys(k for row in rows for k in row))
    lines = [
        f"Measured {datetime.date.today()} on {machine()}, torch {torch.__version__}: `{command}`",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(str(r.get(k, "")) for k in header) + " |" for r in rows],
    ]
    write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path
