"""The reference training step: the per-step behaviour of diffusers' ``examples/dreambooth/train_dreambooth_lora.py``.

Written from that script's behaviour, not its code: every step moves the batch's pixels to the device, runs the
VAE encoder and samples a latent, runs the text encoder on the pre-tokenized caption ids, predicts noise with the
U-Net, takes the MSE, steps a default ``torch.optim.AdamW`` after gradient clipping, and reads the loss with
``.item()`` for its progress bar and logger. It shares bwl's U-Net (same LoRA targets), uncompiled, so both time
the same model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler

from bwl.train import TrainingRun
from bwl.train.cache import to_pixels


class ReferenceStep:
    """``step(i)``: one DreamBooth-LoRA optimizer step on ``run``'s U-Net, encoders and data."""

    def __init__(self, run: TrainingRun):
        self.run = run
        config = run.config
        self.pixels = to_pixels(run.data.images)
        captions = [ex.caption for ex in run.data.examples]
        self.input_ids = run.pipe.tokenizer(
            captions,
            padding="max_length",
            max_length=run.pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        self.noise_scheduler = DDPMScheduler.from_config(run.pipe.scheduler.config)
        self.optimizer = run.accelerator.prepare(torch.optim.AdamW(
            run.trainable, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay, eps=config.adam_epsilon))
        self.lr_scheduler = get_scheduler(config.lr_scheduler, self.optimizer, num_training_steps=config.steps)
        self.losses: list[float] = []

    def __call__(self, step: int) -> float:
        run, config = self.run, self.run.config
        index = torch.tensor(
            [i % len(self.pixels) for i in range(step * config.batch_size, (step + 1) * config.batch_size)]
        )
        pixel_values = self.pixels[index].to(run.device, run.weight_dtype)
        input_ids = self.input_ids[index].to(run.device)
        with run.accelerator.autocast():
            latents = run.vae.encode(pixel_values).latent_dist.sample() * run.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(
                0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
            )
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = run.text_encoder(input_ids)[0]
            prediction = run.unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
        run.accelerator.backward(loss)
        run.accelerator.clip_grad_norm_(run.trainable, config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.losses.append(loss.detach().item())
        return self.losses[-1]
