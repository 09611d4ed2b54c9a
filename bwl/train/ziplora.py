"""ZipLoRA (Shah et al. 2023): merge an identity and a style LoRA with a learned coefficient per column of each
weight update, so that the merged model reproduces each LoRA on its own concept, with a penalty on the two
coefficient vectors' overlap.

In every layer adapter ``i`` holds, its update ``B_i A_i`` is multiplied column by column by a merger ``m_i`` (one
value per input feature or channel, started at 1). Each step draws one example of each concept, noises it at a random
timestep and asks the merged U-Net for the prediction that concept's LoRA alone makes; the loss is the two mean
squared errors plus ``similarity_lambda`` times the sum over shared layers of ``mean |m_1 · m_2|``. After training,
``B_1 A_1 diag(m_1) + B_2 A_2 diag(m_2)`` is one LoRA of rank ``r_1 + r_2`` (``[B_1 B_2] [A_1 diag(m_1); A_2
diag(m_2)]``), written as an ordinary bwl file: it loads with diffusers and exports to kohya like any other. A layer
only one adapter holds keeps its learned merger too. Text-encoder LoRA is summed, as ZipLoRA merges the U-Net only.

Defaults follow the ZipLoRA paper: 100 steps, learning rate 0.01, lambda 0.01, batch 1 (mkshing/ziplora-pytorch's
example runs at 5e-5, which moves the mergers by about 0.005 in 100 Adam steps). The examples are the concepts'
training images where given, else latents the LoRA itself generates for its prompts (``samples`` each): ZipLoRA asks
the merged model to do what each LoRA does, and without images each LoRA's own outputs are what it does.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft.tuners.lora import LoraLayer
from torch.nn.utils import parametrize

from bwl.adapters.blocks import format_blocks, paper_block
from bwl.adapters.compose import load_adapters, set_block_weights
from bwl.adapters.files import write_adapter_file
from bwl.adapters.metadata import AdapterFileError
from bwl.adapters.methods import carries
from bwl.adapters.modes import activate_in_unet
from bwl.adapters.modules import read_modules
from bwl.adapters.spec import config_for_modules, unet_architecture
from bwl.core.hashing import file_hash
from bwl.data.datasets import load_images, scan_images
from bwl.sd.pipeline import Pipeline, text_encoders
from bwl.train.cache import encode_distribution, sample_latents, to_pixels
from bwl.train.conditioning import TextCache, unet_inputs

NAMES = ("identity", "style")


@dataclass
class ZipConfig:
    """One ZipLoRA merge: the two files, their prompts (default: each file's trigger) and the optimization."""

    identity: str
    style: str
    out: str
    identity_prompts: list[str] = field(default_factory=list)
    style_prompts: list[str] = field(default_factory=list)
    identity_images: str | None = None
    style_images: str | None = None
    steps: int = 100
    learning_rate: float = 0.01
    similarity_lambda: float = 0.01
    samples: int = 4
    sample_steps: int = 25
    seed: int = 0


class ColumnScale(torch.nn.Module):
    """A merger: scales the columns (input features or channels) of a LoRA down matrix, while ``on``."""

    def __init__(self, width: int):
        super().__init__()
        self.merger = torch.nn.Parameter(torch.ones(width))
        self.on = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return weight
        return weight * self.merger.view(1, -1, *([1] * (weight.ndim - 2))).to(weight.dtype)


def _prompts(config: ZipConfig, which: str) -> list[str]:
    given = getattr(config, f"{which}_prompts")
    if given:
        return list(given)
    trigger = read_modules(getattr(config, which)).metadata.get("bwl_trigger", "")
    if not trigger:
        raise AdapterFileError(f"{getattr(config, which)}: records no trigger word; give the {which} prompts")
    return [trigger]


def _examples(pipe: Pipeline, config: ZipConfig, which: str, prompts: list[str]) -> torch.Tensor:
    """Latent distributions' samples of the concept: its images encoded, or its LoRA's own generations."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    folder = getattr(config, f"{which}_images")
    if folder:
        images, _ = scan_images(Path(folder))
        mean, std = encode_distribution(pipe.vae, to_pixels(load_images(images, size)))
        return sample_latents(mean, std, pipe.vae.config.scaling_factor, torch.Generator().manual_seed(config.seed))
    set_block_weights(pipe, {which: 1.0})
    generators = [torch.Generator().manual_seed(config.seed + i) for i in range(config.samples)]
    chosen = [prompts[i % len(prompts)] for i in range(config.samples)]
    with torch.no_grad():
        return pipe(chosen, num_inference_steps=config.sample_steps, height=size, width=size, generator=generators,
                    output_type="latent").images


def _shared_layers(pipe: Pipeline) -> dict[str, LoraLayer]:
    layers = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)
              and any(carries(m, name) for name in NAMES)}
    for name, layer in layers.items():
        for adapter in NAMES:
            if carries(layer, adapter) and adapter not in layer.lora_A:
                raise AdapterFileError(f"ZipLoRA merges LoRA and LoCon; {adapter} holds another method in {name}")
            if carries(layer, adapter) and layer.use_dora.get(adapter):
                raise AdapterFileError(f"ZipLoRA merges LoRA and LoCon; {adapter} is DoRA in {name}")
    return layers


def _zipped_tensors(layers: dict[str, LoraLayer], mergers: dict[tuple[str, str], ColumnScale]) -> tuple[dict, dict]:
    """The merged LoRA per module: A rows and B columns of both adapters side by side, scales folded into B."""
    tensors, ranks = {}, {}
    with torch.no_grad():
        for name, layer in layers.items():
            downs, ups = [], []
            for adapter in NAMES:
                if adapter in layer.lora_A:
                    scale = mergers[(name, adapter)]
                    downs.append(scale(layer.lora_A[adapter].parametrizations.weight.original))
                    ups.append(layer.lora_B[adapter].weight * layer.scaling[adapter])
            tensors[f"unet.{name}.lora_A.weight"] = torch.cat(downs).contiguous()
            tensors[f"unet.{name}.lora_B.weight"] = torch.cat(ups, dim=1).contiguous()
            rank = sum(d.shape[0] for d in downs)
            ranks[name] = (rank, float(rank))
    return tensors, ranks


def _text_encoder_tensors(config: ZipConfig) -> tuple[dict, dict]:
    """Both files' text-encoder LoRA, summed as one LoRA of the two ranks (ZipLoRA learns no mergers there)."""
    tensors, configs = {}, {}
    files = [read_modules(getattr(config, which)) for which in NAMES]
    for component in ("text_encoder", "text_encoder_2"):
        modules: dict[str, list] = {}
        for contents in files:
            for module in contents.text_encoders.get(component, []):
                modules.setdefault(module.name, []).append(module)
        if not modules:
            continue
        if any(c.format != "diffusers" for c in files):
            raise AdapterFileError("ZipLoRA sums text-encoder LoRA of bwl files only; import kohya files first")
        ranks = {}
        for name, parts in modules.items():
            tensors[f"{component}.{name}.lora_A.weight"] = torch.cat([m.down for m in parts]).contiguous()
            tensors[f"{component}.{name}.lora_B.weight"] = torch.cat(
                [m.up * (m.alpha / m.rank) for m in parts], dim=1).contiguous()
            rank = sum(m.rank for m in parts)
            ranks[name] = (rank, float(rank))
        configs[component] = config_for_modules(ranks).to_dict()
    return tensors, configs


def zip_loras(pipe: Pipeline, config: ZipConfig) -> tuple[Path, list[float]]:
    """Learn the mergers of ``config``'s two files on ``pipe``'s model and write the merged LoRA to ``config.out``;
    returns the file and the loss of every step."""
    load_adapters(pipe, {"identity": config.identity, "style": config.style})
    layers = _shared_layers(pipe)
    prompts = {which: _prompts(config, which) for which in NAMES}
    examples = {which: _examples(pipe, config, which, prompts[which]) for which in NAMES}
    set_block_weights(pipe, dict.fromkeys(NAMES, 1.0))
    mergers: dict[tuple[str, str], ColumnScale] = {}
    for name, layer in layers.items():
        for adapter in NAMES:
            if adapter in layer.lora_A:
                down = layer.lora_A[adapter]
                mergers[(name, adapter)] = ColumnScale(down.weight.shape[1])
                parametrize.register_parametrization(down, "weight", mergers[(name, adapter)])
    shared = [(mergers[(n, "identity")], mergers[(n, "style")]) for n in layers
              if (n, "identity") in mergers and (n, "style") in mergers]
    optimizer = torch.optim.Adam([m.merger for m in mergers.values()], lr=config.learning_rate)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    encoders = list(text_encoders(pipe).values())
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if len(encoders) > 1 else [])
    texts = TextCache(tokenizers, encoders, resolution=pipe.unet.config.sample_size * pipe.vae_scale_factor)
    rng, generator, losses = random.Random(config.seed), torch.Generator().manual_seed(config.seed), []
    for _ in range(config.steps):
        loss = torch.zeros(())
        for which in NAMES:
            x0 = examples[which][rng.randrange(len(examples[which]))][None]
            noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator).to(x0.device)
            states, extra = unet_inputs(texts([rng.choice(prompts[which])]))
            noisy = scheduler.add_noise(x0, noise, t)
            with torch.no_grad():
                for m in mergers.values():
                    m.on = False
                activate_in_unet(pipe, [which])
                target = pipe.unet(noisy, t, states, **extra).sample
                for m in mergers.values():
                    m.on = True
                activate_in_unet(pipe, NAMES)
                pipe.unet.requires_grad_(False)  # peft's set_adapter marks the LoRA trainable; only mergers learn
                for m in mergers.values():
                    m.merger.requires_grad_(True)
            loss = loss + F.mse_loss(pipe.unet(noisy, t, states, **extra).sample.float(), target.float())
        overlap = sum(((a.merger * b.merger).abs().mean() for a, b in shared), torch.zeros(()))
        total = loss + config.similarity_lambda * overlap
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        losses.append(float(total.detach()))
    tensors, ranks = _zipped_tensors(layers, mergers)
    text_tensors, text_configs = _text_encoder_tensors(config)
    arch = unet_architecture(pipe.unet)
    record = {**asdict(config), "identity_prompts": prompts["identity"], "style_prompts": prompts["style"],
              "sources": {which: file_hash(getattr(config, which)) for which in NAMES},
              "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
    resnet_side = any(k in name for name in ranks for k in ("resnets", "samplers"))
    metadata = {"bwl_method": "locon" if resnet_side else "lora", "bwl_architecture": arch.name,
                "bwl_blocks": format_blocks({paper_block(n, arch) for n in ranks}, arch),
                "bwl_trigger": ", ".join(dict.fromkeys(prompts["identity"] + prompts["style"])),
                "bwl_steps": str(config.steps), "bwl_zip": json.dumps(record, sort_keys=True)}
    configs = {"unet": config_for_modules(ranks).to_dict(), **text_configs}
    out = write_adapter_file(config.out, {**tensors, **text_tensors}, configs, metadata)
    for (name, adapter), _ in mergers.items():
        parametrize.remove_parametrizations(layers[name].lora_A[adapter], "weight", leave_parametrized=False)
    return out, losses
