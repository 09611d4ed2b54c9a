"""Tiny SD1.x-shaped pipelines built from configs, saved with ``save_pretrained`` (no downloads).

They have SD1.x's layout: 4 down blocks (cross-attention in the first three), a cross-attention mid block,
4 up blocks (cross-attention in the last three), 2 layers per block, so every block name, fine block and
adapter target is the same as in SD 1.4; only the widths are small.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    Dinov2Config,
    Dinov2Model,
)

from bwl.sd.pipeline import load_pipeline, quiet_loading
from bwl.sd.tokenizer import word_tokenizer

TINY_WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "in",
    "with",
    "and",
    "style",
    "dog",
    "cat",
    "person",
    "man",
    "woman",
    "sks",
    "ohwx",
    "toy",
    "painting",
    "drawing",
    "red",
    "green",
    "blue",
    "black",
    "white",
    "yellow",
    "background",
    "portrait",
    "cartoon",
]

SD1_SCHEDULE = dict(  # SD 1.4's scheduler_config

    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True, prediction_type="epsilon",
)


def sd1_unet(
    block_out_channels: tuple[int, ...] = (32, 32, 64, 64),
    cross_attention_dim: int = 32,
    attention_head_dim: int = 8,
    sample_size: int = 8,
    in_channels: int = 4,
    norm_num_groups: int = 32,
) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` with SD1.x's block layout; the defaults are the tiny test model."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=2,
        block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
    )


def full_size_sd1_unet() -> UNet2DConditionModel:
    """The SD 1.x U-Net architecture (859.5 M parameters), with random weights, for benchmarks."""
    return sd1_unet((320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8, sample_size=64)


def assemble_pipeline(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                      words: tuple[str, ...] = TINY_WORDS) -> StableDiffusionPipeline:
    """An SD 1.x pipeline from these parts, a word-level tokenizer over ``words`` and SD 1.4's scheduler config."""
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=word_tokenizer(words), unet=unet,
        scheduler=PNDMScheduler(**SD1_SCHEDULE), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_pipeline(directory: str | Path, seed: int = 0, words: tuple[str, ...] = TINY_WORDS) -> Path:
    """Build a random tiny SD1.x pipeline (64 px images, 8x8x4 latents) and ``save_pretrained`` it.

    Returns the directory, which :func:`bwl.pipeline.load_pipeline` loads exactly as it loads SD 1.4.
    """
    directory = Path(directory)
    torch.manual_seed(seed)
    unet = sd1_unet()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, norm_num_groups=8,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(word_tokenizer(words).get_vocab()), hidden_size=32, intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    with quiet_loading():  # no "Writing model shards" bar for a 2 MB model
        assemble_pipeline(unet, vae, text_encoder, words).save_pretrained(directory, safe_serialization=True)
    return directory


def tiny_pipeline(directory: str | Path, seed: int = 0) -> StableDiffusionPipeline:
    """Build (once) and load a tiny pipeline from ``directory`` through ``from_pretrained``."""
    directory = Path(directory)
    if not (directory / "model_index.json").exists():
        build_tiny_pipeline(directory, seed=seed)
    return load_pipeline(directory)


def build_tiny_encoders(directory: str | Path, seed: int = 0, words: tuple[str, ...] = TINY_WORDS,
                        image_size: int = 32) -> tuple[Path, Path]:
    """Random tiny CLIP and DINOv2 models, with their processors (and CLIP's word-level tokenizer), each written with
    ``save_pretrained`` to ``directory/clip`` and ``directory/dino``: the same classes and loading path as
    ``openai/clip-vit-large-patch14`` and ``facebook/dinov2-base``. Returns the two directories."""
    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(words)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=vision, projection_dim=16))
    dino = Dinov2Model(Dinov2Config(**vision))
    crop = {"height": image_size, "width": image_size}
    with quiet_loading():
        clip.save_pretrained(directory / "clip")
        tokenizer.save_pretrained(directory / "clip")
        CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop).save_pretrained(directory / "clip")
        dino.save_pretrained(directory / "dino")
        BitImageProcessor(size={"shortest_edge": image_size}, crop_size=crop, do_convert_rgb=True,
                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(
            directory / "dino")
    return directory / "clip", directory / "dino"
