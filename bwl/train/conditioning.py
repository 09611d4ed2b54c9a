"""What the U-Net is conditioned on besides the timestep, encoded once per caption: the text encoder's hidden states
(SD 1.x/2.x), or SDXL's two encoders' penultimate hidden states side by side with the second's pooled embedding and
the size conditioning (``add_time_ids``), exactly as ``StableDiffusionXLPipeline.encode_prompt`` builds them.

SDXL's size ids are (original height, width, crop top, left, target height, width): the training images are resized
and center-cropped to the resolution, so they are (resolution, resolution, 0, 0, resolution, resolution), which is
what the pipeline passes at that size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TextCondition:
    """SDXL's conditioning for a batch: token embeddings, the pooled text embedding and the size ids."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextCondition:
        return TextCondition(*(t.to(device, dtype) for t in (self.embeds, self.pooled, self.time_ids)))

    @property
    def shape(self) -> torch.Size:
        return self.embeds.shape


Conditioning = torch.Tensor | TextCondition


def unet_inputs(text: Conditioning) -> tuple[torch.Tensor, dict]:
    """``encoder_hidden_states`` and the extra keyword arguments of a U-Net call on ``text``."""
    if isinstance(text, TextCondition):
        return text.embeds, {"added_cond_kwargs": {"text_embeds": text.pooled, "time_ids": text.time_ids}}
    return text, {}


def zeros_like_training(unet: torch.nn.Module, batch: int, tokens: int) -> Conditioning:
    """Conditioning of the training shape filled with zeros (to choose kernels without encoding a batch)."""
    config = unet.config
    embeds = torch.zeros(batch, tokens, config.cross_attention_dim)
    if config.get("addition_embed_type") != "text_time":
        return embeds
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return TextCondition(embeds, torch.zeros(batch, pooled), torch.zeros(batch, 6))


class TextCache:
    """Conditioning per caption; memoized unless captions are randomly shuffled or a text encoder is being trained
    (then every step encodes its captions with gradients). One (tokenizer, encoder) pair is SD 1.x/2.x; two are
    SDXL's, with ``resolution`` for the size ids."""

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence[torch.nn.Module], memoize: bool = True,
                 trainable: bool = False, resolution: int | None = None):
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.memoize, self.trainable = memoize and not trainable, trainable
        self.device = next(self.text_encoders[0].parameters()).device
        self.resolution = resolution
        self.store: dict[str, tuple[torch.Tensor, ...]] = {}

    def _ids(self, tokenizer, captions: Sequence[str]) -> torch.Tensor:
        return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(self.device)

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """Per caption: (hidden states,) or SDXL's (hidden states, pooled embedding)."""
        with torch.set_grad_enabled(self.trainable):
            if len(self.text_encoders) == 1:
                return (self.text_encoders[0](self._ids(self.tokenizers[0], captions))[0],)
            states, pooled = [], None
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
                output = encoder(self._ids(tokenizer, captions), output_hidden_states=True)
                states.append(output.hidden_states[-2])
                pooled = output[0]  # the last encoder's projected embedding, as encode_prompt keeps it
            return torch.cat(states, dim=-1), pooled

    def __call__(self, captions: Sequence[str]) -> Conditioning:
        if self.memoize:
            missing = [c for c in dict.fromkeys(captions) if c not in self.store]
            if missing:
                self.store.update(zip(missing, zip(*self.encode(missing))))
            parts = tuple(torch.stack(rows) for rows in zip(*(self.store[c] for c in captions)))
        else:
            parts = self.encode(captions)
        if len(parts) == 1:
            return parts[0]
        size = self.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=parts[0].dtype, device=parts[0].device)
        return TextCondition(parts[0], parts[1], time_ids.expand(len(captions), 6))
