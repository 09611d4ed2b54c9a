"""Pretraining the toy world's micro SD, resumable: ``python -m bwl pretrain``.

Stage 1 trains a factor-2 ``AutoencoderKL`` on every concept, held-out ones included (SD's VAE is general too).
Stage 2 trains an SD1.x-shaped ``UNet2DConditionModel`` and a small ``CLIPTextModel`` jointly on the pretraining
sampler, which never draws the held-out identity or style. The result is saved with ``save_pretrained`` (fp16
safetensors) to ``data/toy-sd`` and loads through the same ``from_pretrained`` path as SD 1.4.

``--architecture sdxl`` makes the SDXL-shaped micro model instead (``data/toy-sdxl``): SDXL's layout scaled down
(three levels, no attention in the first, deeper transformer stacks below), two text encoders whose penultimate
hidden states are concatenated, the second's pooled embedding and the size ids (``add_time_ids``), conditioned
exactly as ``StableDiffusionXLPipeline`` conditions it (:class:`bwl.train.conditioning.TextCache`). It reuses the SD
toy's VAE (``vae_from``), so both models share one latent space: its ``vae`` folder is a relative link to
``data/toy-sd/vae`` rather than a second copy. It loads with ``StableDiffusionXLPipeline.from_pretrained`` as SDXL
base does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from bwl.core.atomic import write_json
from bwl.core.config import coerce_fields, require
from bwl.sd.tiny import SD1_SCHEDULE, SDXL_SCHEDULE, sd1_unet, sdxl_unet
from bwl.sd.tokenizer import word_tokenizer
from bwl.toy.world import any_batch, pretraining_caption, render, sample_character, vocabulary
from bwl.train.cache import to_pixels
from bwl.train.checkpoint import latest, load_state, save_state
from bwl.train.conditioning import TextCache, unet_inputs

TEXT_LENGTH = 32


@dataclass
class PretrainConfig:
    """Pretraining settings. The shipped ``data/toy-sd`` was made with these defaults at ``unet_steps=1600``, then
    resumed to the default ``unet_steps`` (see its ``pretrain.json``)."""

    architecture: str = "sd1"  # sd1, or sdxl (the SDXL-shaped micro model)
    work_dir: str = ""  # "": runs/pretrain (sd1), runs/pretrain-sdxl
    model_dir: str = ""  # "": data/toy-sd (sd1), data/toy-sdxl
    vae_from: str | None = None  # a saved pipeline whose VAE is reused instead of stage 1; None: data/toy-sd's for
    # sdxl, stage 1 for sd1
    seed: int = 0
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    unet_steps: int = 3600
    unet_batch: int = 64
    unet_lr: float = 8e-4
    dataset_size: int = 16384
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 100
    log_every: int = 25
    threads: int = 0

    def __post_init__(self) -> None:
        coerce_fields(self)
        require(self, [(name, getattr(self, name) >= 1, "an integer >= 1")
                       for name in ("vae_batch", "unet_batch", "dataset_size", "log_every")])
        require(self, [(name, getattr(self, name) >= 0, ">= 0")
                       for name in ("vae_steps", "unet_steps", "checkpoint_every", "threads", "min_snr_gamma")])
        require(self, [(name, getattr(self, name) > 0, "> 0") for name in ("vae_lr", "unet_lr")])
        require(self, [("architecture", self.architecture in DEFAULT_FOLDERS, f"one of {', '.join(DEFAULT_FOLDERS)}")])
        work_dir, model_dir, vae_from = DEFAULT_FOLDERS[self.architecture]
        self.work_dir, self.model_dir = self.work_dir or work_dir, self.model_dir or model_dir
        self.vae_from = vae_from if self.vae_from is None else self.vae_from


DEFAULT_FOLDERS = {"sd1": ("runs/pretrain", "data/toy-sd", ""),  # per architecture: work_dir, model_dir, vae_from
                   "sdxl": ("runs/pretrain-sdxl", "data/toy-sdxl", "data/toy-sd")}


def toy_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=32,
        norm_num_groups=16,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )


def toy_text_encoder(vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))


def toy_unet() -> torch.nn.Module:
    return sd1_unet((48, 64, 96, 96), cross_attention_dim=64, attention_head_dim=8, sample_size=16, norm_num_groups=16)


XL_TEXT = (32, 64)  # the two text encoders' widths (SDXL: 768, 1280); the U-Net attends to both side by side


def toy_sdxl_unet() -> torch.nn.Module:
    """SDXL's layout at toy size (2.7 M parameters, the SD toy's 6.0 M): levels of 32, 48 and 64 channels (16, 8 and
    4 latent pixels), no attention in the first, one transformer layer per attention in the second and two in the
    third and the middle (SDXL: none, 2, 10), 8-channel heads."""
    return sdxl_unet((32, 48, 64), (1, 1, 2), (4, 6, 8), cross_attention_dim=sum(XL_TEXT), pooled_dim=XL_TEXT[1],
                     addition_time_embed_dim=8, sample_size=16, norm_num_groups=16)


def toy_sdxl_text_encoders(vocab_size: int) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    common = {"vocab_size": vocab_size, "num_attention_heads": 4, "max_position_embeddings": TEXT_LENGTH,
              "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    return (CLIPTextModel(CLIPTextConfig(hidden_size=XL_TEXT[0], intermediate_size=64, num_hidden_layers=2, **common)),
            CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=XL_TEXT[1], intermediate_size=128,
                                                       num_hidden_layers=3, projection_dim=XL_TEXT[1], **common)))


def _resume(stage_dir: Path, modules: dict[str, torch.nn.Module], optimizer, scheduler) -> tuple[int, float]:
    """The step of the stage's last checkpoint (0 without one) and the minutes recorded in it (see
    :func:`_checkpoint`), its state loaded into ``modules``, ``optimizer`` and ``scheduler``."""
    found = latest(stage_dir)
    if not found:
        return 0, 0.0
    tensors, step, metadata = load_state(found[-1], optimizer, scheduler)
    for prefix, module in modules.items():
        module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
    print(f"resumed {stage_dir.name} at step {step} from {found[-1].name}", flush=True)
    return step, float(metadata.get("minutes", 0.0))


def _checkpoint(stage_dir: Path, modules: dict[str, torch.nn.Module], optimizer, scheduler, step: int,
                minutes: float = 0.0) -> None:
    """Save the stage's state with ``minutes``: the wall minutes every run of ``pretrain`` has spent to reach it, so
    that a run killed between checkpoints still counts up to its last one."""
    tensors = {f"{p}.{k}": v for p, m in modules.items() for k, v in m.state_dict().items()}
    save_state(stage_dir / f"checkpoint-{step:07d}.safetensors", tensors, optimizer, scheduler, step,
               {"minutes": f"{minutes:.3f}"})
    for old in latest(stage_dir)[:-2]:
        old.unlink()


def train_vae(config: PretrainConfig) -> AutoencoderKL:
    """Stage 1: reconstruct every concept (L1 + MSE, a light KL), then set the latent scaling factor; or the VAE of
    the pipeline in ``vae_from``, in float32."""
    if config.vae_from:
        if not (Path(config.vae_from) / "vae" / "config.json").exists():
            raise FileNotFoundError(f"vae_from={config.vae_from!r}: no saved pipeline with a vae/ folder there")
        return AutoencoderKL.from_pretrained(config.vae_from, subfolder="vae").float().eval().requires_grad_(False)
    stage = Path(config.work_dir) / "vae"
    torch.manual_seed(config.seed)
    vae = toy_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=50, num_training_steps=config.vae_steps)
    start, _ = _resume(stage, {"vae": vae}, optimizer, scheduler)
    t0 = time.time()
    for step in range(start, config.vae_steps):
        rng = np.random.default_rng([config.seed, 1, step])
        pixels = to_pixels(any_batch(rng, config.vae_batch)[0])
        dist = vae.encode(pixels).latent_dist
        recon = vae.decode(dist.sample(torch.Generator().manual_seed(step))).sample
        loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + 1e-6 * dist.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % config.log_every == 0:
            print(
                f"vae step {step + 1}/{config.vae_steps} loss {loss.item():.4f} "
                f"({(time.time() - t0) / (step + 1 - start):.2f} s/step)",
                flush=True,
            )
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.vae_steps:
            _checkpoint(stage, {"vae": vae}, optimizer, scheduler, step + 1)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        pixels = to_pixels(any_batch(np.random.default_rng([config.seed, 9]), 256)[0])
        std = vae.encode(pixels).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


def encode_dataset(vae: AutoencoderKL, config: PretrainConfig) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Render the pretraining set (seen concepts only) once and keep its latent distributions."""
    rng = np.random.default_rng([config.seed, 2])
    characters = [sample_character(rng) for _ in range(config.dataset_size)]
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(characters), 256):
            chunk = characters[start:start + 256]
            pixels = to_pixels([render(c, seed=start + i) for i, c in enumerate(chunk)])
            dist = vae.encode(pixels).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds), characters


def train_unet(config: PretrainConfig, vae: AutoencoderKL, started: float | None = None):
    """Stage 2: U-Net + text encoder, epsilon prediction on SD1's schedule, min-SNR weighted, 10 % empty captions.
    Returns the modules, the tokenizer, the step it resumed at and the minutes its checkpoint recorded; each checkpoint
    records those minutes plus this run's since ``started``."""
    started = time.time() if started is None else started
    stage = Path(config.work_dir) / "unet"
    tokenizer = word_tokenizer(vocabulary(), max_length=TEXT_LENGTH)
    torch.manual_seed(config.seed + 1)
    if config.architecture == "sdxl":
        unet, encoders = toy_sdxl_unet(), dict(zip(("text_encoder", "text_encoder_2"),
                                                   toy_sdxl_text_encoders(len(tokenizer.get_vocab()))))
    else:
        unet, encoders = toy_unet(), {"text_encoder": toy_text_encoder(len(tokenizer.get_vocab()))}
    texts = TextCache([tokenizer] * len(encoders), list(encoders.values()), trainable=True,
                      resolution=unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1))
    params = list(unet.parameters()) + [p for e in encoders.values() for p in e.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=100, num_training_steps=config.unet_steps)
    start, carried = _resume(stage, {"unet": unet, **encoders}, optimizer, scheduler)
    noise_scheduler = DDPMScheduler(
        **{k: v for k, v in SD1_SCHEDULE.items() if k not in ("set_alpha_to_one", "skip_prk_steps")}
    )
    snr = noise_scheduler.alphas_cumprod / (1 - noise_scheduler.alphas_cumprod)
    mean, std, characters = encode_dataset(vae, config)
    scale = vae.config.scaling_factor
    t0 = time.time()
    for step in range(start, config.unet_steps):
        rng = np.random.default_rng([config.seed, 3, step])
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        index = torch.from_numpy(rng.integers(0, len(characters), config.unet_batch))
        captions = [pretraining_caption(characters[i], rng) for i in index.tolist()]
        latents = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=g)) * scale
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=g)
        states, extra = unet_inputs(texts(captions))
        prediction = unet(noise_scheduler.add_noise(latents, noise, t), t, states, **extra).sample
        weight = torch.clamp(snr[t], max=config.min_snr_gamma) / snr[t]
        loss = (F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % config.log_every == 0:
            print(
                f"unet step {step + 1}/{config.unet_steps} loss {loss.item():.4f} "
                f"({(time.time() - t0) / (step + 1 - start):.2f} s/step)",
                flush=True,
            )
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.unet_steps:
            _checkpoint(stage, {"unet": unet, **encoders}, optimizer, scheduler, step + 1,
                        carried + (time.time() - started) / 60)
    return unet.eval(), {name: e.eval() for name, e in encoders.items()}, tokenizer, start, carried


def pretrain(config: PretrainConfig) -> Path:
    """Both stages, then save the pipeline (fp16 safetensors) and a record of how it was made.

    Raising ``unet_steps`` and rerunning continues from the last U-Net checkpoint (the cosine schedule restarts at the
    new horizon's point); ``pretrain.json`` keeps one entry per session, so the record shows how the model was made.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.time()
    vae = train_vae(config)
    vae_minutes = (time.time() - started) / 60
    unet, encoders, tokenizer, unet_start, carried = train_unet(config, vae, started)
    if config.architecture == "sdxl":  # the empty caption was trained as the unconditional one: no zeroed negative
        pipe = StableDiffusionXLPipeline(
            vae=vae, unet=unet, tokenizer=tokenizer, tokenizer_2=tokenizer, **encoders,
            scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULE), force_zeros_for_empty_prompt=False,
            add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, tokenizer=tokenizer, unet=unet, scheduler=PNDMScheduler(**SD1_SCHEDULE), **encoders,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    model_dir = Path(config.model_dir)
    record_path = model_dir / "pretrain.json"
    sessions = _sessions(record_path)
    if (model_dir / "vae").is_symlink():  # never write through a link into the model it points to
        (model_dir / "vae").unlink()
    pipe.to(torch.float16).save_pretrained(model_dir, safe_serialization=True)
    if config.vae_from:
        _link_vae(model_dir, Path(config.vae_from))
    minutes = (time.time() - started) / 60
    interrupted = max(0.0, carried - (sessions[-1].get("minutes_through", 0.0) if sessions else 0.0))
    sessions.append({
        "config": dataclasses.asdict(config),
        "resumed_unet_at": unet_start,
        "minutes": {"vae": round(vae_minutes, 1), "total": round(minutes + interrupted, 1),
                    "interrupted_runs": round(interrupted, 1)},
        "minutes_through": round(carried + minutes, 3),
        "threads": torch.get_num_threads(),
    })
    write_json(record_path, {
        "command": "python -m bwl pretrain" + (f" --architecture {config.architecture}"
                                                if config.architecture != "sd1" else ""),
        "sessions": sessions,
        "minutes": round(sum(s["minutes"]["total"] for s in sessions), 1),
    })
    return model_dir


def _link_vae(model_dir: Path, vae_from: Path) -> None:
    """Replace the saved copy of a reused VAE with a relative link to the pipeline it came from, after checking that
    the copy holds the same weights (it does: both are fp16 safetensors of one module)."""
    copy, source = model_dir / "vae", vae_from / "vae"
    weights = "diffusion_pytorch_model.safetensors"
    mine, theirs = load_file(copy / weights), load_file(source / weights)
    if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
        return
    shutil.rmtree(copy)
    copy.symlink_to(os.path.relpath(source.resolve(), model_dir.resolve()), target_is_directory=True)


def _sessions(record_path: Path) -> list[dict]:
    """Earlier pretraining sessions of the model in ``record_path`` (a resumed run extends them)."""
    if not record_path.exists():
        return []
    record = json.loads(record_path.read_text())
    if "sessions" in record:
        return record["sessions"]
    return [
        {"config": record["config"], "resumed_unet_at": 0, "minutes": record["minutes"], "threads": record["threads"]}
    ]
