"""Training the probes on a shared pool of renders, with augmentations for what generation does to an image.

The pool is rendered once (every concept, held-out ones included) and shared by every probe:

- *partial textures*: a textured head whose texture covers only part of it (the rest flat), labelled with the
  texture, as the eye-check's rule reads such heads;
- *holes*: discs of the background color punched into the head region (labels unchanged);
- half of the pool passes through the toy VAE (what every generated image does);

and each batch drawn from it gets *blur* (a Gaussian of random width), *color shifts* (per-channel gain and offset,
small enough to keep the world's colors apart) and pixel noise.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bwl.toy.probes import Probe
from bwl.toy.world import ATTRIBUTES, BACKGROUNDS, SIZE, TEXTURES, Character, any_batch, render
from bwl.train.cache import to_pixels

PARTIAL_RATE = 0.3  # of textured heads
HOLE_RATE = 0.2


@dataclass
class Pool:
    """Rendered training images (uint8, [N, 32, 32, 3]) and their labels (class indices per attribute)."""

    images: np.ndarray
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.images)


def _partial(character: Character, seed: int, rng: np.random.Generator) -> Image.Image:
    """The character with its texture on a random half-plane's side of the head only (the rest flat)."""
    textured = np.asarray(render(character, seed), dtype=np.float32)
    flat = np.asarray(render(Character(**{**character.labels(), "style": "flat"}), seed), dtype=np.float32)
    y, x = np.mgrid[0:SIZE, 0:SIZE] - SIZE / 2
    angle = rng.uniform(0, 2 * np.pi)
    keep = (x * np.cos(angle) + y * np.sin(angle) > rng.uniform(-6, 3))[..., None]
    return Image.fromarray(np.where(keep, textured, flat).astype(np.uint8))


def _holes(image: Image.Image, background: str, rng: np.random.Generator) -> Image.Image:
    pixels = np.array(image)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    for _ in range(int(rng.integers(1, 4))):
        cx, cy, r = rng.uniform(10, 22), rng.uniform(11, 25), rng.uniform(1.5, 3.5)
        pixels[(x - cx) ** 2 + (y - cy) ** 2 <= r * r] = BACKGROUNDS[background]
    return Image.fromarray(pixels)


def _through_vae(vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        return vae.decode(dist.sample(generator)).sample.float().clamp(-1, 1)


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def build_pool(count: int, seed: int = 0, vae=None, chunk: int = 256) -> Pool:
    """``count`` renders of every concept with partial textures and holes, half through ``vae`` when given."""
    images: list[np.ndarray] = []
    labels: dict[str, list[int]] = {k: [] for k in ATTRIBUTES}
    g = torch.Generator().manual_seed(seed)
    for start in range(0, count, chunk):
        rng = np.random.default_rng([seed, 11, start])
        _, characters = any_batch(rng, min(chunk, count - start))
        batch = []
        for c in characters:
            render_seed = int(rng.integers(1 << 31))
            partial = c.style in TEXTURES and rng.random() < PARTIAL_RATE
            image = _partial(c, render_seed, rng) if partial else render(c, render_seed)
            batch.append(_holes(image, c.background, rng) if rng.random() < HOLE_RATE else image)
            for k, values in ATTRIBUTES.items():
                labels[k].append(values.index(getattr(c, k)))
        pixels = to_pixels(batch)
        if vae is not None:
            half = len(batch) // 2
            pixels[:half] = _through_vae(vae, pixels[:half], g)
        images.append(_to_uint8(pixels))
    return Pool(np.concatenate(images), {k: np.asarray(v) for k, v in labels.items()})


def _gaussian_blur(pixels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image blurred with its own Gaussian width (``sigma`` per image, in pixels; 0 leaves it as is)."""
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    kernels = torch.exp(-(offsets[None] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)
    n, c, h, w = pixels.shape
    flat = pixels.reshape(1, n * c, h, w)
    k = kernels.repeat_interleave(c, 0)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), k[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur (half the images, sigma up to 0.9 px), color shifts and noise on a [N, 3, H, W] batch in [-1, 1]."""
    n = len(pixels)
    sigma = torch.rand(n, generator=generator) * 0.9 * (torch.rand(n, generator=generator) < 0.5)
    pixels = _gaussian_blur(pixels, sigma)
    gain = 1 + 0.06 * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    offset = 0.06 * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    noise = 0.03 * torch.randn(pixels.shape, generator=generator)
    return (pixels * gain + offset + noise).clamp(-1, 1)


def train_probe(pool: Pool, architecture: str = "cnn", steps: int = 1500, batch_size: int = 128, seed: int = 0,
                lr: float = 2e-3, log_every: int = 100) -> Probe:
    """Train a probe of ``architecture`` on batches drawn from ``pool``, each augmented (:func:`augment`)."""
    torch.manual_seed(seed)
    probe = Probe(ATTRIBUTES, architecture)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(pool.images).permute(0, 3, 1, 2)
    labels = {k: torch.from_numpy(v) for k, v in pool.labels.items()}
    started = time.time()
    for step in range(steps):
        index = torch.randint(0, len(pool), (batch_size,), generator=g)
        pixels = augment(images[index].float() / 127.5 - 1, g)
        logits = probe.train()(pixels)
        loss = sum(F.cross_entropy(logits[k], labels[k][index]) for k in logits)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0:
            print(f"probe {architecture} step {step + 1}/{steps} loss {loss.item():.4f} "
                  f"({(time.time() - started) / (step + 1):.2f} s/step)", flush=True)
    return probe.eval()


def _decoded(images: Sequence[Image.Image], vae, seed: int) -> list[Image.Image]:
    pixels = _through_vae(vae, to_pixels(images), torch.Generator().manual_seed(seed))
    return [Image.fromarray(p) for p in _to_uint8(pixels)]


def accuracy(probe: Probe, count: int = 512, seed: int = 12345, vae=None) -> dict[str, float]:
    """Per-attribute accuracy on fresh renders of every concept (through ``vae`` when given), never trained on."""
    images, characters = any_batch(np.random.default_rng([seed, 6]), count)
    readings = probe.read(_decoded(images, vae, seed) if vae is not None else images)
    return {k: float(np.mean([r[k] == getattr(c, k) for r, c in zip(readings, characters)])) for k in probe.attributes}


def concept_accuracy(probe: Probe, values: dict[str, Sequence[str]], count: int = 128, seed: int = 4321,
                     vae=None) -> dict[str, float]:
    """For each value of an attribute (``{"shape": ["star"], ...}``), the probe's accuracy on fresh renders of
    characters that have it (through ``vae`` when given): whether each concept survives the VAE and is read."""
    out = {}
    for attribute, wanted in values.items():
        for value in wanted:
            _, characters = any_batch(np.random.default_rng([seed, len(out)]), count)
            characters = [Character(**{**c.labels(), attribute: value}) for c in characters]
            images = [render(c, seed + i) for i, c in enumerate(characters)]
            readings = probe.read(_decoded(images, vae, seed) if vae is not None else images)
            out[value] = float(np.mean([r[attribute] == value for r in readings]))
    return out
