"""One prepared training run and its step: the fast path of block-wise adapter training.

images + tag captions -> cached latents/text embeddings (:mod:`bwl.train.batches`) -> noise-prediction loss on the
selected blocks' adapter -> one optimizer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler

from bwl.adapters.block_lr import parameter_multiplier
from bwl.adapters.spec import adapted_modules, add_adapter, unet_architecture
from bwl.adapters.text_encoder import add_text_encoder_adapter
from bwl.sd.pipeline import Pipeline, load_pipeline, text_encoders
from bwl.train import fast
from bwl.train.batches import Batches
from bwl.train.conditioning import Conditioning, unet_inputs, zeros_like_training
from bwl.train.config import TrainConfig
from bwl.train.fast import cpu_convolutions

ADAPTER = "default"


def denoising_loss(unet, noise_scheduler, latents, text: Conditioning, generator, fixed_timestep=None,
                   weights=None) -> torch.Tensor:
    """Mean noise-prediction MSE (epsilon or v-prediction target, per the scheduler config); ``text`` is the text
    embeddings, or SDXL's :class:`~bwl.train.conditioning.TextCondition`."""
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
    states, extra = unet_inputs(text)
    prediction = unet(noisy, timesteps, states, **extra).sample
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_example = per_example * weights
    return per_example.mean()


def parameter_groups(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | list[torch.nn.Module] | None, config: TrainConfig
) -> list[dict]:
    """The optimizer's parameter groups: the U-Net adapter's at ``learning_rate`` times each fine block's multiplier
    (``block_lr``) and, for LoRA's B matrices, the LoRA+ ratio, one group per distinct rate in parameter order; then
    the text encoders' at ``text_encoder_lr``. Each group records its ``multiplier``."""
    weights = config.block_lr_weights(unet_architecture(unet))
    by_multiplier: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in unet.named_parameters():
        if param.requires_grad:
            by_multiplier.setdefault(parameter_multiplier(name, weights, config.loraplus_lr_ratio), []).append(param)
    groups = [{"params": params, "lr": config.learning_rate * m, "multiplier": m}
              for m, params in by_multiplier.items()]
    encoders = [] if text_encoder is None else text_encoder if isinstance(text_encoder, list) else [text_encoder]
    trained = [p for encoder in encoders for p in encoder.parameters() if p.requires_grad]
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


def prepare_models(pipe: Pipeline, config: TrainConfig, device: torch.device,
                   weight_dtype: torch.dtype) -> fast.FastPath:
    """Freeze the pipeline's models on ``device``, add the adapter (the U-Net's, and the text encoders' where they
    train) in float32, and apply the fast path's choices to the U-Net."""
    unet, spec = pipe.unet, config.adapter_spec(unet_architecture(pipe.unet))
    encoders = list(text_encoders(pipe).values())
    for module in (unet, pipe.vae, *encoders):
        module.requires_grad_(False)
        module.to(device) if weight_dtype == torch.float32 else module.to(device, dtype=weight_dtype)
    set_seed(config.seed)  # the LoRA init draws from the global RNGs
    add_adapter(unet, spec, ADAPTER)
    adapted = [unet]
    if spec.text_encoder:
        for encoder in encoders:
            add_text_encoder_adapter(encoder, spec.rank, spec.alpha, ADAPTER)
            encoder.train()
            adapted.append(encoder)
    for param in (p for model in adapted for p in model.parameters()):
        if param.requires_grad:
            param.data = param.data.float()
    if weight_dtype != torch.float32:  # autocast picks the dtypes; peft's casts of every input to fp32 only copy
        for module in adapted_modules(unet, ADAPTER).values():
            module.cast_input_dtype_enabled = False
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    path = fast.prepare(unet, device, config.norms_in_compute_dtype, config.channels_last)
    unet.train()
    return path


class TrainingRun:
    """One prepared run: the U-Net with its adapter, its batches, optimizer and LR schedule. :meth:`step` is the fast
    path (cached latents and text, device-side noise, no host sync); :func:`train` adds logging and checkpoints."""

    def __init__(self, config: TrainConfig, pipe: Pipeline | None = None):
        if config.random_crop and config.cache_latents:
            raise ValueError("random_crop needs cache_latents=False: cached latents are of the fixed center crop")
        self.config = config
        if AcceleratorState._shared_state and AcceleratorState().mixed_precision != config.mixed_precision:
            AcceleratorState._reset_state(reset_partial_state=True)  # a new precision in the same process (notebooks)
        self.accelerator = accelerator = Accelerator(
            mixed_precision=config.mixed_precision, log_with=config.log_with,
            project_dir=f"{config.output_dir}/logs" if config.log_with else None)
        self.device = device = accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
        self.pipe = pipe = pipe or load_pipeline(config.model)  # the model is checked before the data are read
        self.spec = config.adapter_spec(unet_architecture(pipe.unet))  # the blocks read in the model's layout
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        self.text_encoders = text_encoders(pipe)
        self.fast = prepare_models(pipe, config, device, self.weight_dtype)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        encoders = list(self.text_encoders.values())
        text_forward = [accelerator.prepare(e) for e in encoders] if self.spec.text_encoder else encoders
        self.batches = Batches(config, pipe, text_forward, device, self.weight_dtype, accelerator.process_index,
                               accelerator.num_processes, self.fast.channels_last)
        self.data = self.batches.data
        groups = parameter_groups(self.unet, encoders if self.spec.text_encoder else None, config)
        self.trainable = [p for group in groups for p in group["params"]]
        self.optimizer = make_optimizer(groups, config, device)
        self.lr_scheduler = get_scheduler(config.lr_scheduler, self.optimizer, num_warmup_steps=config.lr_warmup_steps,
                                          num_training_steps=config.steps)
        self.compiled = fast.CompiledUNet(accelerator.prepare(self.unet), config.compile_backend,
                                          config.compile_mode) if config.compile_unet else None
        self.forward_unet = self.compiled or accelerator.prepare(self.unet)
        self.optimizer = accelerator.prepare(self.optimizer)
        if device.type == "cpu":  # zeros of the training shape: the choice needs shapes, not an encoded batch
            side = config.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
            latents = torch.zeros(config.batch_size, self.unet.config.in_channels, side, side)
            text = zeros_like_training(self.unet, config.batch_size, pipe.tokenizer.model_max_length)
            states, extra = unet_inputs(text)
            self.fast.cpu_convolutions = cpu_convolutions.choose(config.cpu_convolutions, self.unet, latents, states,
                                                                 **extra)

    def batch(self, step: int) -> tuple[torch.Tensor, Conditioning, torch.Tensor, torch.Generator]:
        """The batch of ``step`` (:class:`bwl.train.batches.Batches`)."""
        return self.batches(step)

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
