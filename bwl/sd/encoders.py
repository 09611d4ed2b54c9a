"""Image and text encoders for reference metrics, loaded by hub id or local path through transformers'
``from_pretrained``: CLIP (image-image and text-image similarity, and the features the style measure reads) and
DINOv2 (image-image similarity). Nothing here knows the study; :mod:`bwl.study.scoring.reference` builds the metrics.

Defaults are the public checkpoints peers report with (``openai/clip-vit-large-patch14``, ``facebook/dinov2-base``);
a profile may name others, or a directory written by ``save_pretrained`` (the tests' tiny encoders, the toy CLIP).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, Dinov2Model

from bwl.core.hashing import fingerprint
from bwl.sd.pipeline import ModelNotFound, quiet_loading

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dinov2-base"


def _load(kind: str, model_id: str | Path, load):
    local = Path(model_id).is_dir()
    try:
        with quiet_loading(local):
            return load(model_id, local_files_only=local)
    except (OSError, ValueError) as error:  # the hub client's not-found and offline errors
        if local:
            raise ModelNotFound(f"{kind} encoder {model_id}: not a directory written by save_pretrained ({error})"
                                ) from None
        raise ModelNotFound(
            f"{kind} encoder {model_id!r}: not a local directory, and not a hub id that is cached here or can be "
            f"downloaded now; fetch it where there is internet (`hf download {model_id}`) or set the profile's "
            f"{kind.lower()}_model to a directory saved with save_pretrained"
        ) from error


@dataclass
class ImageEncoder:
    """One image encoder with its preprocessing: CLIP's image tower (projected) or DINOv2 (its CLS token)."""

    name: str
    model: torch.nn.Module
    processor: object
    tokenizer: object | None = None  # CLIP only: text-image similarity

    @property
    def identity(self) -> str:
        """What the encoder is: a local directory by content, a hub id by name."""
        return fingerprint(self.name) if Path(self.name).is_dir() else self.name

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """Unit-length embeddings, one row per image, in batches."""
        rows = []
        for start in range(0, len(images), batch_size):
            pixels = self.processor(images=[im.convert("RGB") for im in images[start:start + batch_size]],
                                    return_tensors="pt")["pixel_values"]
            if isinstance(self.model, CLIPModel):
                features = self.model.get_image_features(pixel_values=pixels)
                features = getattr(features, "pooler_output", features)
            else:
                features = self.model(pixel_values=pixels).last_hidden_state[:, 0]
            rows.append(torch.nn.functional.normalize(features.float(), dim=-1))
        return torch.cat(rows)

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length CLIP text embeddings (CLIP only)."""
        if self.tokenizer is None:
            raise ValueError(f"{self.name}: text embeddings need a CLIP model")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        features = self.model.get_text_features(**tokens)
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def hidden_states(self, images: Sequence[Image.Image], layers: Sequence[int]) -> list[torch.Tensor]:
        """The patch tokens (batch, tokens, channels) of the image tower's given layers, class token dropped."""
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        tower = self.model.vision_model if isinstance(self.model, CLIPModel) else self.model
        states = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        return [states[i][:, 1:].float() for i in layers]


def load_clip(model_id: str | Path = DEFAULT_CLIP) -> ImageEncoder:
    """A CLIP model (``CLIPModel``), its image processor and tokenizer, by hub id or local directory."""
    model = _load("CLIP", model_id, CLIPModel.from_pretrained).eval()
    processor = _load("CLIP", model_id, AutoImageProcessor.from_pretrained)
    tokenizer = _load("CLIP", model_id, AutoTokenizer.from_pretrained)
    return ImageEncoder(str(model_id), model, processor, tokenizer)


def load_dino(model_id: str | Path = DEFAULT_DINO) -> ImageEncoder:
    """A DINOv2 model (``Dinov2Model``) and its image processor, by hub id or local directory."""
    model = _load("DINO", model_id, Dinov2Model.from_pretrained).eval()
    return ImageEncoder(str(model_id), model, _load("DINO", model_id, AutoImageProcessor.from_pretrained))
