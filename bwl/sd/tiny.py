"""Tiny pipelines built from configs, saved with ``save_pretrained`` (no downloads), in each layout bwl knows.

- SD 1.x: 4 down blocks (cross-attention in the first three), a cross-attention mid block, 4 up blocks
  (cross-attention in the last three), 2 layers per block, so every block name, fine block and adapter target is
  the same as in SD 1.4; only the widths are small.
- SD 2.x: the same blocks with linear projections in the transformers (``use_linear_projection``), as SD 2.1.
- SDXL: 3 levels (no attention in the first, deeper transformer stacks further down), two text encoders
  (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, whose pooled embedding conditions the U-Net together with
  ``add_time_ids``), loaded by ``StableDiffusionXLPipeline`` exactly as SDXL base 1.0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
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
    attention_head_dim: int | tuple[int, ...] = 8,
    sample_size: int = 8,
    in_channels: int = 4,
    norm_num_groups: int = 32,
    use_linear_projection: bool = False,
) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` with SD1.x's block layout (SD 2.x's with ``use_linear_projection``); the defaults
    are the tiny test model."""
    return UNet2DConditionModel(
        use_linear_projection=use_linear_projection,
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


SDXL_SCHEDULE = dict(  # SDXL base 1.0's scheduler_config
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
    timestep_spacing="leading", prediction_type="epsilon",
)


def sdxl_unet(
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 2),
    attention_head_dim: tuple[int, ...] = (2, 4, 4),
    cross_attention_dim: int = 64,
    pooled_dim: int = 32,
    addition_time_embed_dim: int = 8,
    sample_size: int = 8,
    norm_num_groups: int = 32,
) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` with SDXL's block layout; the defaults are the tiny test model (SDXL base:
    (320, 640, 1280), (1, 2, 10), (5, 10, 20), 2048, 1280, 256, 128)."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=block_out_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=transformer_layers_per_block, attention_head_dim=attention_head_dim,
        cross_attention_dim=cross_attention_dim, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + pooled_dim, norm_num_groups=norm_num_groups,
    )


def full_size_sdxl_unet() -> UNet2DConditionModel:
    """The SDXL base U-Net architecture (2.57 B parameters), with random weights, for benchmarks."""
    return sdxl_unet((320, 640, 1280), (1, 2, 10), (5, 10, 20), 2048, 1280, 256, 128)


def _text_config(words: tuple[str, ...], hidden_size: int = 32, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(word_tokenizer(words).get_vocab()), hidden_size=hidden_size, intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, **extra)


def _tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, norm_num_groups=8,
        block_out_channels=(8, 8, 16, 16), scaling_factor=scaling_factor,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def build_tiny_sdxl_pipeline(directory: str | Path, seed: int = 0, words: tuple[str, ...] = TINY_WORDS) -> Path:
    """Build a random tiny SDXL pipeline (64 px images, 8x8x4 latents) and ``save_pretrained`` it; it loads with
    ``StableDiffusionXLPipeline.from_pretrained`` (and :func:`bwl.sd.pipeline.load_pipeline`) as SDXL base does."""
    directory = Path(directory)
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(0.13025), text_encoder=CLIPTextModel(_text_config(words)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(words, projection_dim=32)),
        tokenizer=word_tokenizer(words), tokenizer_2=word_tokenizer(words), unet=sdxl_unet(),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULE), force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    with quiet_loading():
        pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def build_tiny_sd2_pipeline(directory: str | Path, seed: int = 0, words: tuple[str, ...] = TINY_WORDS) -> Path:
    """Build a random tiny SD 2.x-shaped pipeline (linear projections in the transformers) and save it."""
    directory = Path(directory)
    torch.manual_seed(seed)
    unet = sd1_unet(attention_head_dim=(2, 4, 8, 8), use_linear_projection=True)
    with quiet_loading():
        assemble_pipeline(unet, _tiny_vae(), CLIPTextModel(_text_config(words)), words).save_pretrained(
            directory, safe_serialization=True)
    return directory


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
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_text_config(words))
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
