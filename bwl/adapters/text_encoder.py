"""The text encoders as one more block: lora-block-weight's BASE slot, and kohya's ``lora_te_`` modules (SDXL's
``lora_te1_`` and ``lora_te2_``, for ``text_encoder`` and ``text_encoder_2``).

kohya adapts every Linear inside CLIP's attention and MLP (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``fc1``,
``fc2`` of each encoder layer) at the network's rank, and names them ``lora_te_text_model_encoder_layers_<i>_...``.
transformers 5's ``CLIPTextModel`` has no ``text_model.`` level in its module names, so the kohya name adds it back.
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

from bwl.adapters.architectures import Architecture
from bwl.adapters.spec import config_for_modules

TEXT_ENCODER_CONTAINERS: tuple[type, ...] = (CLIPAttention, CLIPMLP)
KOHYA_PREFIX = "lora_te_"
_KOHYA_ROOT = "text_model"


def text_encoder_targets(text_encoder: torch.nn.Module) -> list[str]:
    """Names of the Linear layers kohya adapts in a CLIP text encoder, in module order."""
    names = []
    for container_name, container in text_encoder.named_modules():
        if not isinstance(container, TEXT_ENCODER_CONTAINERS):
            continue
        for child_name, child in container.named_children():
            base = child.get_base_layer() if isinstance(child, LoraLayer) else child
            if isinstance(base, torch.nn.Linear):
                names.append(f"{container_name}.{child_name}")
    return names


def text_encoder_config(text_encoder: torch.nn.Module, rank: int, alpha: float | None) -> LoraConfig:
    """A peft config adapting every kohya text-encoder target at ``rank`` (alpha defaults to the rank)."""
    value = (rank, float(alpha if alpha is not None else rank))
    return config_for_modules(dict.fromkeys(text_encoder_targets(text_encoder), value))


def add_text_encoder_adapter(
    text_encoder: torch.nn.Module, rank: int, alpha: float | None, name: str = "default"
) -> LoraConfig:
    """Add LoRA ``name`` to the text encoder's attention and MLP layers; only its LoRA tensors are trainable."""
    config = text_encoder_config(text_encoder, rank, alpha)
    text_encoder.requires_grad_(False)
    text_encoder.add_adapter(config, adapter_name=name)
    for param_name, param in text_encoder.named_parameters():
        param.requires_grad_(f".{name}." in param_name and ".lora_" in param_name)
    return config


def kohya_prefix(component: str, arch: Architecture) -> str:
    """kohya's key prefix for a pipeline's text encoder (``text_encoder``/``text_encoder_2``) in layout ``arch``."""
    return arch.kohya_te_prefixes[arch.text_encoders.index(component)]


def kohya_module_name(module_name: str) -> str:
    """kohya's name (less ``lora_te_``) of a text-encoder module: ``text_model_encoder_layers_0_self_attn_q_proj``."""
    underscored = module_name.replace(".", "_")
    return underscored if underscored.startswith(_KOHYA_ROOT + "_") else f"{_KOHYA_ROOT}_{underscored}"


def modules_by_kohya_name(text_encoder: torch.nn.Module) -> dict[str, str]:
    """The text encoder's module names keyed by their kohya names (with or without the ``text_model`` level)."""
    index = {}
    for name, _ in text_encoder.named_modules():
        if name:
            index[kohya_module_name(name)] = name
            index[name.replace(".", "_")] = name
    return index
