"""One prepared training run and its step: the fast path of block-wise adapter training.

images + tag captions -> cached latents/text embeddings -> noise-prediction loss on the selected blocks' adapter.
Every random choice of step ``s`` (batch order, flips, caption shuffles, noise, timesteps) is drawn from
generators seeded by ``(seed, s)``, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler

from bwl.adapters.block_lr import parameter_multiplier
from bwl.adapters.spec import adapted_modules, add_adapter
from bwl.adapters.text_encoder import add_text_encoder_adapter
from bwl.data.datasets import Example, load_images, scan_dataset, shuffle_caption
from bwl.sd.pipeline import load_pipeline
from bwl.train import fast
from bwl.train.cache import LatentCache, TextCache, encode_distribution, sample_latents, to_pixels
from bwl.train.config import TrainConfig
from bwl.train.fast import cpu_convolutions

ADAPTER = "default"


@dataclass
class TrainData:
    """Examples flattened by repeats, with their images and captions ready for batching."""

    examples: list[Example]
    order: list[int]
    images: list
    skipped: list


def prepare_data(config: TrainConfig) -> TrainData:
    """Scan instance (and regularisation) folders; reg images are repeated or cut to match the instance count."""
    fallback = ", ".join(w for w in (config.trigger, config.class_word) if w)
    instance, skipped = scan_dataset(config.instance_dir, config.repeats, fallback)
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


def denoising_loss(unet, noise_scheduler, latents, text, generator, fixed_timestep=None, weights=None) -> torch.Tensor:
    """Mean noise-prediction MSE (epsilon or v-prediction target, per the scheduler config)."""
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device, latents.dtype)
    if fixed_timestep is None:
        timesteps = torch.randint(
            0,
            noise_scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            generator=generator,
            device=generator.device,
        )
    else:
        timesteps = torch.full((latents.shape[0],), fixed_timestep, dtype=torch.long)
    timesteps = timesteps.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy, timesteps, text).sample
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_example = per_example * weights
    return per_example.mean()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to ``device`` without a host sync on CUDA (pinned, non-blocking)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def parameter_groups(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None, config: TrainConfig
) -> list[dict]:
    """The optimizer's parameter groups: the U-Net adapter's at ``learning_rate`` times each fine block's multiplier
    (``block_lr``) and, for LoRA's B matrices, the LoRA+ ratio, one group per distinct rate in parameter order; then
    the text encoder's at ``text_encoder_lr``. Each group records its ``multiplier``."""
    weights = config.block_lr_weights()
    by_multiplier: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in unet.named_parameters():
        if param.requires_grad:
            by_multiplier.setdefault(parameter_multiplier(name, weights, config.loraplus_lr_ratio), []).append(param)
    groups = [{"params": params, "lr": config.learning_rate * m, "multiplier": m}
              for m, params in by_multiplier.items()]
    trained = [p for p in text_encoder.parameters() if p.requires_grad] if text_encoder is not None else []
    if trained:
        rate = config.text_encoder_lr or config.learning_rate
        groups.append({"params": trained, "lr": rate, "multiplier": rate / config.learning_rate})
    return groups


def make_optimizer(groups: list[dict], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (:func:`parameter_groups`).

    Fused where the device has a fused kernel, 8-bit (bitsandbytes) when ``optimizer='adamw8bit'``.
    """
    params = groups
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError as error:
            raise ImportError("optimizer='adamw8bit' needs bitsandbytes (pip install bitsandbytes)") from error
        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=device.type in ("cuda", "cpu"), **kwargs)


class TrainingRun:
    """One prepared run: the U-Net with its adapter, optimizer, LR schedule and caches. :meth:`step` is the fast
    path (cached latents and text, device-side noise, no host sync); :func:`train` adds logging and checkpoints."""

    def __init__(self, config: TrainConfig, pipe: StableDiffusionPipeline | None = None):
        if config.random_crop and config.cache_latents:
            raise ValueError("random_crop needs cache_latents=False: cached latents are of the fixed center crop")
        self.config = config
        self.spec = config.adapter_spec()
        if AcceleratorState._shared_state and AcceleratorState().mixed_precision != config.mixed_precision:
            AcceleratorState._reset_state(reset_partial_state=True)  # a new precision in the same process (notebooks)
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, log_with=config.log_with,
                                       project_dir=f"{config.output_dir}/logs" if config.log_with else None)
        self.device = device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
        self.data = prepare_data(config)
        self.pipe = pipe = pipe or load_pipeline(config.model)
        unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        for module in (unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.to(device) if self.weight_dtype == torch.float32 else module.to(device, dtype=self.weight_dtype)
        set_seed(config.seed)  # the LoRA init draws from the global RNGs
        add_adapter(unet, self.spec, ADAPTER)
        adapted = [unet]
        if self.spec.text_encoder:
            add_text_encoder_adapter(self.text_encoder, self.spec.rank, self.spec.alpha, ADAPTER)
            self.text_encoder.train()
            adapted.append(self.text_encoder)
        for param in (p for model in adapted for p in model.parameters()):
            if param.requires_grad:
                param.data = param.data.float()
        if (
            self.weight_dtype != torch.float32
        ):  # autocast picks the dtypes; peft's casts of every input to fp32 only copy
            for module in adapted_modules(unet, ADAPTER).values():
                module.cast_input_dtype_enabled = False
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.fast = fast.prepare(unet, device, config.norms_in_compute_dtype, config.channels_last)
        unet.train()

        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.latent_cache = (
            LatentCache(self.vae, self.data.images, config.random_flip) if config.cache_latents else None
        )
        self.pixels = None if config.cache_latents else to_pixels(self.data.images)
        text_forward = self.accelerator.prepare(self.text_encoder) if self.spec.text_encoder else self.text_encoder
        self.text_cache = TextCache(pipe.tokenizer, text_forward, memoize=not config.shuffle_tags,
                                    trainable=self.spec.text_encoder)
        self.reg_weight = torch.tensor([config.prior_loss_weight if ex.is_reg else 1.0 for ex in self.data.examples])
        groups = parameter_groups(unet, self.text_encoder if self.spec.text_encoder else None, config)
        self.trainable = [p for group in groups for p in group["params"]]
        self.optimizer = make_optimizer(groups, config, device)
        self.lr_scheduler = get_scheduler(config.lr_scheduler, self.optimizer, num_warmup_steps=config.lr_warmup_steps,
                                          num_training_steps=config.steps)
        self.unet = unet
        self.compiled = fast.CompiledUNet(self.accelerator.prepare(unet), config.compile_backend,
                                          config.compile_mode) if config.compile_unet else None
        self.forward_unet = self.compiled or self.accelerator.prepare(unet)
        self.optimizer = self.accelerator.prepare(self.optimizer)
        if device.type == "cpu":  # zeros of the training shape: the choice needs shapes, not an encoded batch
            side = config.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
            latents = torch.zeros(config.batch_size, unet.config.in_channels, side, side)
            text = torch.zeros(config.batch_size, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
            self.fast.cpu_convolutions = cpu_convolutions.choose(config.cpu_convolutions, unet, latents, text)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
        """Latents, text embeddings and loss weights of ``step``, plus the generator for its noise and timesteps.

        On CPU one generator seeded by ``(seed, step)`` draws everything; on CUDA the flips come from it and the
        latent samples, noise and timesteps from a CUDA generator with the same seed (so GPU runs differ from CPU).
        """
        config, device = self.config, self.device
        host = step_generator(config.seed, step)
        on_device = host if device.type == "cpu" else step_generator(config.seed, step, device)
        rng = random.Random(config.seed * 1_000_003 + step)
        indices = batch_indices(self.data.order, config.seed, step, config.batch_size,
                                self.accelerator.process_index, self.accelerator.num_processes)
        index = torch.tensor(indices)
        flip = (
            torch.rand(len(indices), generator=host) < 0.5
            if config.random_flip
            else torch.zeros(len(indices), dtype=torch.bool)
        )
        if self.latent_cache is not None:
            latents = self.latent_cache.sample(to_device(index, device), to_device(flip, device), on_device)
        else:
            batch_pixels = torch.where(flip[:, None, None, None], self.pixels[index].flip(-1), self.pixels[index])
            mean, std = encode_distribution(self.vae, to_device(batch_pixels, device))
            latents = sample_latents(mean, std, self.vae.config.scaling_factor, on_device)
        latents = latents.to(device, self.weight_dtype)
        if self.fast.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        text = self.text_cache(captions_for(self.data, indices, config, rng)).to(device, self.weight_dtype)
        return latents, text, to_device(self.reg_weight[index], device), on_device

    def kernels(self):
        """The step's kernel choices (:meth:`bwl.train.fast.FastPath.kernels`)."""
        return self.fast.kernels()

    def forward_backward(self, step: int) -> torch.Tensor:
        """The loss of ``step`` and its gradients (accumulated into the adapter's parameters)."""
        latents, text, weights, generator = self.batch(step)
        if self.config.compile_unet and self.config.compile_mode in ("reduce-overhead", "max-autotune"):
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: the last step's outputs are no longer read
        with self.kernels():  # forward and backward: checkpointing recomputes in backward
            with self.accelerator.autocast():
                loss = denoising_loss(self.forward_unet, self.noise_scheduler, latents, text, generator,
                                      self.config.fixed_timestep, weights)
            self.accelerator.backward(loss)
        return loss

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step; returns the loss as a device tensor (reading it is the caller's sync).

        With ``compile_unet``, a failed compilation in the first step is retried eagerly (the batch redrawn from its
        seed), so the run goes on as an eager one (:class:`bwl.train.fast.CompiledUNet`).
        """
        if self.compiled is None:
            loss = self.forward_backward(step)
        else:
            loss = self.compiled.run(
                lambda: self.forward_backward(step), lambda: self.optimizer.zero_grad(set_to_none=True)
            )
        if self.config.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def record(self) -> dict:
        """What this run chose beyond its config, for ``config.json``: kernels, threads and any compile fallback."""
        return {
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),  # CPU sums depend on these
            "cpu_convolutions": self.fast.cpu_convolutions,
            "channels_last": self.fast.channels_last,
            "compile_fallback": self.compiled.fallback if self.compiled else None,
        }
