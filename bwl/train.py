"""Block-wise adapter training: the DreamBooth-style loop the paper runs, top to bottom.

images + tag captions -> cached latents/text embeddings -> noise-prediction loss on the selected blocks' LoRA
-> checkpoints (adapter, optimizer, LR schedule, RNG, step) -> final adapter file + config beside it.

Every random choice of step ``s`` (batch order, flips, caption shuffles, noise, timesteps) is drawn from
generators seeded by ``(seed, s)``, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from peft.utils import set_peft_model_state_dict
from tqdm import tqdm

from . import __version__, autocast_norms, channels_last, cpu_convolutions
from .adapter_file import adapter_state_dict, save_adapter
from .adapters import AdapterSpec, add_adapter, adapted_modules
from .atomic import atomic_path, write_json
from .checkpoint import latest, load_state, save_state
from .cache import LatentCache, TextCache, encode_distribution, sample_latents, to_pixels
from .data import Example, load_images, scan_dataset, shuffle_caption
from .pipeline import PAPER_MODEL, load_pipeline

ADAPTER = "default"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything that determines a training run. Defaults are the paper's (the learning rate is ours)."""

    output_dir: str = "runs/train"
    model: str = PAPER_MODEL
    instance_dir: str = "data/identity"
    trigger: str = "sks"
    class_word: str = ""
    repeats: int = 25
    reg_dir: str | None = None
    prior_loss_weight: float = 1.0
    method: Literal["lora", "locon"] = "lora"
    blocks: str = "all"
    rank: int = 4
    alpha: float | None = None
    conv_rank: int | None = None
    conv_alpha: float | None = None
    block_ranks: dict[str, int] = field(default_factory=dict)
    resolution: int = 512
    random_flip: bool = False
    random_crop: bool = False
    shuffle_tags: bool = False
    keep_tokens: int = 1
    caption_dropout: float = 0.0
    steps: int = 11000
    batch_size: int = 2
    learning_rate: float = 1e-4  # the paper gives none; 1e-4 is the common LoRA DreamBooth value
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    channels_last: bool | None = None  # None: on for CUDA, off on CPU (where it is slower)
    compile_unet: bool = False
    compile_backend: str = "inductor"
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    norms_in_compute_dtype: bool = True  # under mixed precision, GroupNorm/LayerNorm in bf16/fp16 (autocast_norms)
    cpu_convolutions: Literal["auto", "onednn", "native"] = "auto"  # auto: native kernels for tiny convs (cpu_convolutions)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    fixed_timestep: int | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    resume: bool = False
    stop_after: int | None = None

    def __post_init__(self) -> None:
        choices = {"optimizer": ("adamw", "adamw8bit"), "mixed_precision": ("no", "fp16", "bf16"),
                   "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   "cpu_convolutions": cpu_convolutions.CHOICES}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is not one of {', '.join(valid)}")

    def adapter_spec(self) -> AdapterSpec:
        """The adapter part of this config (its keys are AdapterSpec's, kept flat for YAML and the CLI)."""
        return AdapterSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AdapterSpec)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=generator.device)
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


# --- checkpoints: one safetensors file each, written atomically -------------------------------------------------


def save_checkpoint(path: Path, unet, optimizer, lr_scheduler, step: int, config: TrainConfig) -> None:
    """Adapter, optimizer, LR schedule, RNG states and step in one safetensors file (no pickle)."""
    save_state(path, adapter_state_dict(unet, ADAPTER), optimizer, lr_scheduler, step, {"config": json.dumps(config.to_dict())})


def load_checkpoint(path: Path, unet, optimizer, lr_scheduler) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its step."""
    tensors, step, _ = load_state(path, optimizer, lr_scheduler)
    adapter = {k[len("unet."):]: v for k, v in tensors.items()}
    result = set_peft_model_state_dict(unet, adapter, adapter_name=ADAPTER)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{path}: checkpoint does not match this adapter ({result.unexpected_keys[:3]} ...)")
    return step


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return latest(output_dir / "checkpoints")


# --- the loop -------------------------------------------------------------------------------------------------


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to ``device`` without a host sync on CUDA (pinned, non-blocking)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW: fused where the device has a fused kernel, 8-bit (bitsandbytes) when ``optimizer='adamw8bit'``."""
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
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision)
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
        for param in unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        if self.weight_dtype != torch.float32:  # autocast picks the dtypes; peft's casts of every input to fp32 only copy
            for module in adapted_modules(unet, ADAPTER).values():
                module.cast_input_dtype_enabled = False
        if config.norms_in_compute_dtype:
            autocast_norms.install(unet)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)
            channels_last.install(unet)
        self.keep_transformer_layout = self.channels_last  # channels_last transformer outputs (an attribute for ablations)
        unet.train()

        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.latent_cache = LatentCache(self.vae, self.data.images, config.random_flip) if config.cache_latents else None
        self.pixels = None if config.cache_latents else to_pixels(self.data.images)
        self.text_cache = TextCache(pipe.tokenizer, self.text_encoder, memoize=not config.shuffle_tags)
        self.reg_weight = torch.tensor([config.prior_loss_weight if ex.is_reg else 1.0 for ex in self.data.examples])
        self.trainable = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.trainable, config, device)
        self.lr_scheduler = get_scheduler(config.lr_scheduler, self.optimizer, num_warmup_steps=config.lr_warmup_steps,
                                          num_training_steps=config.steps)
        self.unet = unet
        self.forward_unet = self.accelerator.prepare(unet)
        if config.compile_unet:
            self.forward_unet = torch.compile(self.forward_unet, backend=config.compile_backend, mode=config.compile_mode)
        self.optimizer = self.accelerator.prepare(self.optimizer)
        self.cpu_convolutions = None  # on CPU: "onednn" or "native", chosen once for the training shape
        if device.type == "cpu":  # zeros of the training shape: the choice needs shapes, not an encoded batch
            side = config.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
            latents = torch.zeros(config.batch_size, unet.config.in_channels, side, side)
            text = torch.zeros(config.batch_size, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
            self.cpu_convolutions = cpu_convolutions.choose(config.cpu_convolutions, unet, latents, text)

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
        flip = torch.rand(len(indices), generator=host) < 0.5 if config.random_flip else torch.zeros(len(indices), dtype=torch.bool)
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

    @contextmanager
    def kernels(self) -> Iterator[None]:
        """The step's kernel choices: norms in the compute dtype, transformer outputs kept channels_last, and on CPU
        the convolution kernels."""
        with ExitStack() as stack:
            stack.enter_context(autocast_norms.norms_in_compute_dtype(self.config.norms_in_compute_dtype))
            stack.enter_context(channels_last.keep_layout(self.keep_transformer_layout))
            if self.cpu_convolutions is not None:
                stack.enter_context(cpu_convolutions.kernels(self.cpu_convolutions))
            yield

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step; returns the loss as a device tensor (reading it is the caller's sync)."""
        latents, text, weights, generator = self.batch(step)
        if self.config.compile_unet and self.config.compile_mode in ("reduce-overhead", "max-autotune"):
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: the last step's outputs are no longer read
        with self.kernels():  # forward and backward: checkpointing recomputes in backward
            with self.accelerator.autocast():
                loss = denoising_loss(self.forward_unet, self.noise_scheduler, latents, text, generator,
                                      self.config.fixed_timestep, weights)
            self.accelerator.backward(loss)
        if self.config.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def train(config: TrainConfig, pipe: StableDiffusionPipeline | None = None) -> Path:
    """Train one block-wise adapter; returns the final adapter file (``<output_dir>/adapter.safetensors``)."""
    out = Path(config.output_dir)
    run = TrainingRun(config, pipe)
    accelerator, unet, optimizer, lr_scheduler = run.accelerator, run.unet, run.optimizer, run.lr_scheduler

    start = 0
    existing = checkpoints(out)
    if config.resume and existing:
        start = load_checkpoint(existing[-1], unet, optimizer, lr_scheduler)
        print(f"resumed from {existing[-1]} at step {start}", flush=True)
    elif (out / "adapter.safetensors").exists() or existing:
        raise FileExistsError(f"{out}: already holds a run; pass resume=True to continue it or choose a new output_dir")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"bwl_version": __version__, "train": config.to_dict(), "adapter": run.spec.to_dict(),
                                     "torch": torch.__version__, "torch_threads": torch.get_num_threads(),  # CPU sums depend on these
                                     "cpu_convolutions": run.cpu_convolutions})
    log = LossLog(out, start)

    end = min(config.steps, config.stop_after or config.steps)
    progress = tqdm(total=config.steps, initial=start, desc=f"train {run.spec.method} {run.spec.blocks}", file=sys.stdout,
                    disable=not sys.stdout.isatty(), dynamic_ncols=True)
    running, count, last_good, t0 = torch.zeros((), device=run.device), 0, start, time.time()
    for step in range(start, end):
        running += run.step(step)
        count += 1
        done = step + 1
        if done % config.log_every == 0 or done == end:
            mean_loss = (running / count).item()
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(
                    f"loss became {mean_loss} between steps {done - count + 1} and {done}; "
                    f"kept the last good checkpoint (step {last_good}) in {out / 'checkpoints'}"
                )
            log.write(done, mean_loss, lr_scheduler.get_last_lr()[0])
            progress.update(done - progress.n)
            if not sys.stdout.isatty():
                print(f"step {done}/{config.steps} loss {mean_loss:.4f} ({(time.time() - t0) / count:.3f} s/step)", flush=True)
            running, count, t0 = torch.zeros((), device=run.device), 0, time.time()
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            if count:
                pending = (running / count).item()
                if not math.isfinite(pending):
                    raise TrainingDiverged(f"loss became {pending} before step {done}; kept checkpoint step {last_good}")
            if accelerator.is_main_process:
                save_checkpoint(out / "checkpoints" / f"checkpoint-{done:07d}.safetensors", unet, optimizer, lr_scheduler, done, config)
                for old in checkpoints(out)[: -config.keep_checkpoints]:
                    old.unlink()
            last_good = done
        if config.sample_every and config.sample_prompts and done % config.sample_every == 0:
            save_samples(run.pipe, config, out / "samples" / f"step-{done:07d}.png")
    progress.close()
    log.close()
    if end < config.steps:
        if accelerator.is_main_process and not (out / "checkpoints" / f"checkpoint-{end:07d}.safetensors").exists():
            save_checkpoint(out / "checkpoints" / f"checkpoint-{end:07d}.safetensors", unet, optimizer, lr_scheduler, end, config)
        print(f"stopped at step {end} of {config.steps}; rerun with resume=True to continue", flush=True)
        return out / "checkpoints" / f"checkpoint-{end:07d}.safetensors"
    final = out / "adapter.safetensors"
    if accelerator.is_main_process:
        save_adapter(unet, final, run.spec, ADAPTER, base_model=config.model, trigger=config.trigger, steps=config.steps)
    return final


def save_samples(pipe: StableDiffusionPipeline, config: TrainConfig, path: Path) -> None:
    """A row of sample images for the configured prompts at a fixed seed."""
    from .figures import image_row

    was_training = pipe.unet.training
    pipe.unet.eval()
    images = pipe(config.sample_prompts, num_inference_steps=25, guidance_scale=7.0,
                  generator=torch.Generator().manual_seed(config.seed)).images
    pipe.unet.train(was_training)
    with atomic_path(path) as tmp:
        image_row(images).save(tmp, format="PNG")


class LossLog:
    """Loss per logged step to ``loss.csv`` (truncated to the resume step) and to TensorBoard when installed."""

    def __init__(self, out: Path, start: int):
        self.path = out / "loss.csv"
        rows = []
        if start and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr"])
                writer.writeheader()
                writer.writerows(rows)
        self.file = open(self.path, "a", newline="")
        self.writer = csv.writer(self.file)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tensorboard = None

    def write(self, step: int, loss: float, lr: float) -> None:
        self.writer.writerow([step, f"{loss:.6f}", f"{lr:.3e}"])
        self.file.flush()
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("loss", loss, step)
            self.tensorboard.add_scalar("lr", lr, step)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
