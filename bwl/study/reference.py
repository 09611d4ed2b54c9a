"""Reference metrics for real images (issue "numbers for real models"): the measures, on embeddings and features.

- **identity**: cosine similarity of an image's embedding to the *centroid* of the identity's training images'
  embeddings (each unit length; the centroid re-normalized), as DreamBooth's DINO/CLIP-I average over references;
- **style**: cosine similarity between the image's Gram matrices of an encoder's patch features and the mean Gram
  matrices of the style's training images, averaged over the chosen layers (LyCORIS' evaluation compares VGG-19 Gram
  matrices; bwl reads the encoders transformers loads, with no torchvision);
- **prompt**: CLIP text-image similarity to the prompt with each trigger replaced by plain words;
- **preservation**: similarity of an image to the base model's image for the same prompt and seed;
- **diversity**: the Vendi score of a set of images (Friedman & Dieng 2023): ``exp`` of the entropy of the
  eigenvalues of ``K / n``, ``K`` the cosine-similarity matrix; 1 for identical images, ``n`` for orthogonal ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from bwl.data.datasets import split_tags


def vendi_score(embeddings: torch.Tensor) -> float:
    """The Vendi score of ``embeddings`` (one row per item) under cosine similarity."""
    x = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    kernel = x @ x.T / len(x)
    eigenvalues = torch.linalg.eigvalsh(kernel).clamp_min(0)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(torch.exp(-(eigenvalues * eigenvalues.log()).sum()))


def centroid_similarity(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of ``embeddings`` to the normalized mean of ``references``."""
    centroid = torch.nn.functional.normalize(
        torch.nn.functional.normalize(references.double(), dim=-1).mean(0), dim=0)
    return torch.nn.functional.normalize(embeddings.double(), dim=-1) @ centroid


def gram_matrices(features: torch.Tensor) -> torch.Tensor:
    """Gram matrices ``FᵀF / T`` of patch features (batch, tokens T, channels C): (batch, C, C)."""
    return features.double().transpose(1, 2) @ features.double() / features.shape[1]


def gram_similarity(image_layers: Sequence[torch.Tensor], reference_layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per image: the cosine similarity of its Gram matrices to the references' mean Gram matrix, averaged over
    layers. Each argument is one (batch, tokens, channels) tensor per layer."""
    per_layer = []
    for images, references in zip(image_layers, reference_layers, strict=True):
        target = gram_matrices(references).mean(0).flatten()
        grams = gram_matrices(images).flatten(1)
        per_layer.append(torch.nn.functional.cosine_similarity(grams, target[None], dim=-1))
    return torch.stack(per_layer).mean(0)


def plain_prompt(prompt: str, replacements: Mapping[str, str]) -> str:
    """``prompt`` with each trigger tag replaced by plain words (``{"zkc": "a person"}``), as LyCORIS' evaluation
    replaces the trigger with a description before CLIP text-image similarity."""
    tags = []
    for tag in split_tags(prompt):
        words = tag.split()
        if words and words[0] in replacements:
            words = replacements[words[0]].split() + words[1:]
        tags.append(" ".join(words))
    return ", ".join(t for t in tags if t)
