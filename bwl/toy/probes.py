"""Probes: small networks that read every world attribute from a 32 px image. They are the toy study's instruments
(metrics), and the first is the data-prep notebook's ``toy`` tagger. Three architectures (:data:`ARCHITECTURES`) so
that independently trained probes do not share one network's blind spots; training is in
:mod:`bwl.toy.probe_training`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bwl.core.atomic import atomic_path
from bwl.toy.world import ATTRIBUTES, SIZE
from bwl.train.cache import to_pixels


def _vgg(c_in: int, c_out: int) -> list[torch.nn.Module]:
    return [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU(),
            torch.nn.Conv2d(c_out, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2)]


class _Residual(torch.nn.Module):
    """A pre-activation residual block (GroupNorm, SiLU), strided when the width changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.GroupNorm(8, c_in), torch.nn.SiLU(), torch.nn.Conv2d(c_in, c_out, 3, stride, 1),
            torch.nn.GroupNorm(8, c_out), torch.nn.SiLU(), torch.nn.Conv2d(c_out, c_out, 3, 1, 1))
        self.skip = torch.nn.Conv2d(c_in, c_out, 1, stride) if (c_in, stride) != (c_out, 1) else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


def _trunk(architecture: str) -> torch.nn.Sequential:
    """A trunk that maps a [N, 3, 32, 32] image to [N, 256] features."""
    if architecture == "cnn":  # VGG-style: 3x3 conv pairs, batch norm, max pooling, a dense layer
        return torch.nn.Sequential(*_vgg(3, 32), *_vgg(32, 64), *_vgg(64, 128), torch.nn.Flatten(),
                                   torch.nn.Linear(128 * 4 * 4, 256), torch.nn.ReLU(), torch.nn.Dropout(0.2))
    if architecture == "resnet":  # residual blocks, group norm, strided convs, global average pooling
        return torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), _Residual(32, 32, 1), _Residual(32, 64, 2),
                                   _Residual(64, 128, 2), _Residual(128, 256, 2), torch.nn.GroupNorm(8, 256),
                                   torch.nn.SiLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    if architecture == "patch":  # a patchify stem (4 px patches, the texture grid) and 5x5 depthwise mixing
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 96, 4, stride=4), torch.nn.GELU(), torch.nn.BatchNorm2d(96),
            torch.nn.Conv2d(96, 96, 5, padding=2, groups=96), torch.nn.GELU(), torch.nn.BatchNorm2d(96),
            torch.nn.Conv2d(96, 192, 1), torch.nn.GELU(), torch.nn.BatchNorm2d(192),
            torch.nn.Conv2d(192, 192, 5, padding=2, groups=192), torch.nn.GELU(), torch.nn.BatchNorm2d(192),
            torch.nn.Flatten(), torch.nn.Linear(192 * 8 * 8, 256), torch.nn.GELU(), torch.nn.Dropout(0.2))
    raise ValueError(f"unknown probe architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}")


ARCHITECTURES = ("cnn", "resnet", "patch")


class Probe(torch.nn.Module):
    """A trunk (:data:`ARCHITECTURES`) + one linear head per attribute."""

    def __init__(self, attributes: dict[str, Sequence[str]] = ATTRIBUTES, architecture: str = "cnn"):
        super().__init__()
        self.attributes = {k: tuple(v) for k, v in attributes.items()}
        self.architecture = architecture
        self.trunk = _trunk(architecture)
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
        return self.most_likely(self.probabilities(images))

    def most_likely(self, probs: dict[str, torch.Tensor]) -> list[dict[str, str]]:
        """The most likely value of every attribute, per image, from :meth:`probabilities`' output."""
        count = len(next(iter(probs.values())))
        return [{k: self.attributes[k][int(probs[k][i].argmax())] for k in self.attributes} for i in range(count)]


def save_probe(probe: Probe, path: str | Path, report: dict | None = None) -> Path:
    metadata = {"attributes": json.dumps(probe.attributes), "architecture": probe.architecture,
                "report": json.dumps(report or {})}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(tmp), metadata=metadata)
    return Path(path)


def load_probe(path: str | Path) -> Probe:
    """A probe saved by :func:`save_probe`, in eval mode (files from before the architectures were named: ``cnn``)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    probe = Probe(json.loads(metadata["attributes"]), metadata.get("architecture", "cnn"))
    probe.load_state_dict(load_file(str(path)))
    return probe.eval()
