"""Probes: a small CNN that reads every world attribute from a 32 px image. It is the toy study's instrument
(metrics) and the data-prep notebook's ``toy`` tagger. Trained on fresh renders of every concept, held-out
ones included, half of them passed through the toy VAE so that decoded samples look familiar to it."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bwl.core.atomic import atomic_path
from bwl.toy.world import ATTRIBUTES, SIZE, Character, any_batch
from bwl.train.cache import to_pixels


class Probe(torch.nn.Module):
    """Conv trunk + one linear head per attribute."""

    def __init__(self, attributes: dict[str, Sequence[str]] = ATTRIBUTES):
        super().__init__()
        self.attributes = {k: tuple(v) for k, v in attributes.items()}

        def block(c_in: int, c_out: int) -> list[torch.nn.Module]:
            return [
                torch.nn.Conv2d(c_in, c_out, 3, padding=1),
                torch.nn.BatchNorm2d(c_out),
                torch.nn.ReLU(),
                torch.nn.Conv2d(c_out, c_out, 3, padding=1),
                torch.nn.BatchNorm2d(c_out),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
            ]

        self.trunk = torch.nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), torch.nn.Flatten(),
                                         torch.nn.Linear(128 * 4 * 4, 256), torch.nn.ReLU(), torch.nn.Dropout(0.2))
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(256, len(v)) for k, v in self.attributes.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(pixels)
        return {k: head(features) for k, head in self.heads.items()}

    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image], batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Per attribute, an [N, classes] tensor of probabilities."""
        self.eval()
        out: dict[str, list[torch.Tensor]] = {k: [] for k in self.attributes}
        for start in range(0, len(images), batch_size):
            chunk = [
                img.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX)
                if img.size != (SIZE, SIZE)
                else img.convert("RGB")
                for img in images[start : start + batch_size]
            ]
            logits = self(to_pixels(chunk))
            for k, v in logits.items():
                out[k].append(v.softmax(-1))
        return {k: torch.cat(v) for k, v in out.items()}

    def read(self, images: Sequence[Image.Image]) -> list[dict[str, str]]:
        """The most likely value of every attribute, per image."""
        probs = self.probabilities(images)
        return [{k: self.attributes[k][int(probs[k][i].argmax())] for k in self.attributes} for i in range(len(images))]


def _labels(characters: Sequence[Character], attributes: dict[str, tuple[str, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([values.index(getattr(c, k)) for c in characters]) for k, values in attributes.items()}


def _through_vae(vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        return vae.decode(dist.sample(generator)).sample.float().clamp(-1, 1)


def train_probe(
    steps: int = 1500, batch_size: int = 128, seed: int = 0, vae=None, lr: float = 2e-3, log_every: int = 100
) -> Probe:
    """Train a probe on fresh renders of every concept (half through ``vae`` when one is given)."""
    torch.manual_seed(seed)
    probe = Probe()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    t0 = time.time()
    for step in range(steps):
        rng = np.random.default_rng([seed, 5, step])
        g = torch.Generator().manual_seed(seed * 7919 + step)
        images, characters = any_batch(rng, batch_size)
        pixels = to_pixels(images)
        if vae is not None:
            half = batch_size // 2
            pixels[:half] = _through_vae(vae, pixels[:half], g)
        pixels = pixels + 0.03 * torch.randn(pixels.shape, generator=g)
        logits = probe.train()(pixels)
        labels = _labels(characters, probe.attributes)
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in logits)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0:
            print(
                f"probe step {step + 1}/{steps} loss {loss.item():.4f} ({(time.time() - t0) / (step + 1):.2f} s/step)",
                flush=True,
            )
    return probe.eval()


def accuracy(probe: Probe, count: int = 512, seed: int = 12345, vae=None) -> dict[str, float]:
    """Per-attribute accuracy on fresh renders (through ``vae`` when given), never seen in training."""
    images, characters = any_batch(np.random.default_rng([seed, 6]), count)
    if vae is not None:
        pixels = _through_vae(vae, to_pixels(images), torch.Generator().manual_seed(seed))
        images = [
            Image.fromarray(((p.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
            for p in pixels
        ]
    readings = probe.read(images)
    return {k: float(np.mean([r[k] == getattr(c, k) for r, c in zip(readings, characters)])) for k in probe.attributes}


def save_probe(probe: Probe, path: str | Path, report: dict | None = None) -> Path:
    metadata = {"attributes": json.dumps(probe.attributes), "report": json.dumps(report or {})}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(tmp), metadata=metadata)
    return Path(path)


def load_probe(path: str | Path) -> Probe:
    """A probe saved by :func:`save_probe`, in eval mode."""
    with safe_open(str(path), framework="pt") as f:
        attributes = json.loads(f.metadata()["attributes"])
    probe = Probe(attributes)
    probe.load_state_dict(load_file(str(path)))
    return probe.eval()
