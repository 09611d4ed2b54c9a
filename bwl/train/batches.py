"""A run's batches: the dataset flattened by repeats, cached latents and text, and the batch of each step.

Every random choice of step ``s`` (batch order, flips, caption shuffles, noise, timesteps) is drawn from generators
seeded by ``(seed, s)``, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from bwl.data.datasets import Example, load_images, scan_dataset, shuffle_caption
from bwl.sd.pipeline import Pipeline
from bwl.train.cache import LatentCache, encode_distribution, sample_latents, to_pixels
from bwl.train.conditioning import Conditioning, TextCache
from bwl.train.config import TrainConfig


@dataclass
class TrainData:
    """Examples flattened by repeats, with their images and captions ready for batching."""

    examples: list[Example]
    order: list[int]
    images: list
    skipped: list


def prepare_data(config: TrainConfig) -> TrainData:
    """Scan instance (and joint, and regularisation) folders; reg images are repeated or cut to match the instance
    count. Joint training puts a second concept's folder, with its own trigger, in the same adapter."""
    fallback = ", ".join(w for w in (config.trigger, config.class_word) if w)
    instance, skipped = scan_dataset(config.instance_dir, config.repeats, fallback)
    if config.joint_dir:
        joint, joint_skipped = scan_dataset(config.joint_dir, config.repeats, config.joint_trigger or fallback)
        instance, skipped = instance + joint, skipped + joint_skipped
    order = [i for i, ex in enumerate(instance) for _ in range(ex.repeats)]
    examples = list(instance)
    if config.reg_dir:
        reg, reg_skipped = scan_dataset(config.reg_dir, 1, config.class_word or fallback, is_reg=True)
        skipped += reg_skipped
        reg_order = [len(examples) + i for i, ex in enumerate(reg) for _ in range(ex.repeats)]
        examples += reg
        order += [reg_order[k % len(reg_order)] for k in range(len(order))]
    images = load_images([ex.image for ex in examples], config.resolution)
    return TrainData(examples, order, images, skipped)


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def batch_indices(order: list[int], seed: int, step: int, batch_size: int, rank: int = 0, world: int = 1) -> list[int]:
    """Example indices for a step: epochs of ``order`` shuffled by ``(seed, epoch)``, read sequentially."""
    per_step = batch_size * world
    start = step * per_step + rank * batch_size
    out = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, len(order))
        permutation = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed + 7919 * epoch))
        out.append(order[permutation[offset]])
    return out


def captions_for(data: TrainData, indices: list[int], config: TrainConfig, rng: random.Random) -> list[str]:
    captions = []
    for i in indices:
        caption = data.examples[i].caption
        if config.shuffle_tags:
            caption = shuffle_caption(caption, config.keep_tokens, rng)
        if config.caption_dropout and rng.random() < config.caption_dropout:
            caption = ""
        captions.append(caption)
    return captions


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to ``device`` without a host sync on CUDA (pinned, non-blocking)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class Batches:
    """The batches of one run: latents (cached, or encoded per step), text embeddings (cached where captions are
    fixed) and per-example loss weights (``prior_loss_weight`` for regularization images)."""

    def __init__(self, config: TrainConfig, pipe: Pipeline, text_forward: list[torch.nn.Module],
                 device: torch.device, weight_dtype: torch.dtype, rank: int = 0, world: int = 1,
                 channels_last: bool = False):
        """``text_forward``: the text encoders as the step calls them (prepared by accelerate when they train);
        ``rank``/``world``: this process's share of each step's examples; ``channels_last``: the latents' layout."""
        self.config, self.device, self.weight_dtype, self.rank, self.world = config, device, weight_dtype, rank, world
        self.data = prepare_data(config)
        self.vae = pipe.vae
        cached = config.cache_latents
        self.latent_cache = LatentCache(self.vae, self.data.images, config.random_flip) if cached else None
        self.pixels = None if config.cache_latents else to_pixels(self.data.images)
        trainable = config.adapter_spec().text_encoder
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if len(text_forward) > 1 else [])
        self.text_cache = TextCache(tokenizers, text_forward, memoize=not config.shuffle_tags, trainable=trainable,
                                    resolution=config.resolution)
        self.reg_weight = torch.tensor([config.prior_loss_weight if ex.is_reg else 1.0 for ex in self.data.examples])
        self.channels_last = channels_last

    def __call__(self, step: int) -> tuple[torch.Tensor, Conditioning, torch.Tensor, torch.Generator]:
        """Latents, text conditioning and loss weights of ``step``, plus the generator for its noise and timesteps.

        On CPU one generator seeded by ``(seed, step)`` draws everything; on CUDA the flips come from it and the
        latent samples, noise and timesteps from a CUDA generator with the same seed (so GPU runs differ from CPU).
        """
        config, device = self.config, self.device
        host = step_generator(config.seed, step)
        on_device = host if device.type == "cpu" else step_generator(config.seed, step, device)
        rng = random.Random(config.seed * 1_000_003 + step)
        indices = batch_indices(self.data.order, config.seed, step, config.batch_size, self.rank, self.world)
        index = torch.tensor(indices)
        flip = (torch.rand(len(indices), generator=host) < 0.5 if config.random_flip
                else torch.zeros(len(indices), dtype=torch.bool))
        if self.latent_cache is not None:
            latents = self.latent_cache.sample(to_device(index, device), to_device(flip, device), on_device)
        else:
            batch_pixels = torch.where(flip[:, None, None, None], self.pixels[index].flip(-1), self.pixels[index])
            mean, std = encode_distribution(self.vae, to_device(batch_pixels, device))
            latents = sample_latents(mean, std, self.vae.config.scaling_factor, on_device)
        latents = latents.to(device, self.weight_dtype)
        if self.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        text = self.text_cache(captions_for(self.data, indices, config, rng)).to(device, self.weight_dtype)
        return latents, text, to_device(self.reg_weight[index], device), on_device
