"""Composition at inference: several adapters in one pipeline, each scaled per block.

diffusers' ``set_adapters`` block dicts only reach attention layers (IN3, OUT0 and resnets are silently left at
1.0). Here every LoRA layer, LoCon convs included, gets the weight of the kohya fine block its name falls in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from diffusers import StableDiffusionPipeline
from peft.tuners.lora import LoraLayer

from bwl.adapters.blocks import block_weights, fine_block
from bwl.adapters.files import load_adapter

BlockWeights = float | str | Mapping[str, float] | Sequence[float]


def load_adapters(pipe: StableDiffusionPipeline, files: Mapping[str, str | Path]) -> None:
    """Load adapter files into ``pipe`` under the given names (already loaded names are skipped)."""
    loaded = set(pipe.get_list_adapters().get("unet", [])) | set(pipe.get_list_adapters().get("text_encoder", []))
    for name, path in files.items():
        if name not in loaded:
            load_adapter(pipe, path, name)


def _weight_key(module_name: str) -> str | None:
    if module_name == "conv_in" or module_name.startswith("conv_in."):
        return "IN00"
    return fine_block(module_name)


def set_block_weights(
    pipe: StableDiffusionPipeline, adapters: Mapping[str, BlockWeights]
) -> dict[str, dict[str, float]]:
    """Activate exactly ``adapters`` (name -> weights) and scale every LoRA layer by its block's weight.

    Weights per adapter are anything :func:`bwl.blocks.block_weights` reads: a number, a paper spec such as
    ``"upper"``, an LBW preset or vector, or a per-block dict. Text-encoder layers take ``BASE``; U-Net layers
    outside the 25 fine blocks (time embedding, conv_out) take 1.0, or the number when the weight is a number.
    Adapters not named are deactivated. Returns the resolved per-block weights.
    """
    names = list(adapters)
    available = set(pipe.get_list_adapters().get("unet", [])) | set(pipe.get_list_adapters().get("text_encoder", []))
    missing = [n for n in names if n not in available]
    if missing:
        raise KeyError(f"adapters not loaded: {missing}; loaded: {sorted(available)}")
    resolved = {name: block_weights(w) for name, w in adapters.items()}
    if not names:
        pipe.disable_lora()
        return resolved
    pipe.enable_lora()
    pipe.set_adapters(names)
    scalar = {n: float(w) for n, w in adapters.items() if isinstance(w, (int, float)) and not isinstance(w, bool)}
    for component, is_text_encoder in ((pipe.unet, False), (getattr(pipe, "text_encoder", None), True)):
        if component is None:
            continue
        for module_name, module in component.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            key = "BASE" if is_text_encoder else _weight_key(module_name)
            for name in names:
                if name in module.lora_A:
                    weight = resolved[name][key] if key else scalar.get(name, 1.0)
                    module.set_scale(name, weight)
    return resolved
