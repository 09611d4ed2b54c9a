"""kohya/A1111 interchange: export bwl adapters to ``lora_unet_*``/``lora_te_*`` files and import such files.

kohya names a U-Net module ``lora_unet_`` + its diffusers name with dots as underscores, a text-encoder module
``lora_te_text_model_...``, and stores ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` (scale = alpha / rank).
Training settings live in ``ss_*`` metadata; per-block ranks in ``ss_network_args`` as 25-value ``block_dims``.
Import checks every module's name and shapes against the target model before it writes anything.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya
from safetensors.torch import save_file

from bwl.adapters.blocks import FINE_BLOCKS, fine_block, format_blocks, paper_block
from bwl.adapters.files import write_adapter_file
from bwl.adapters.metadata import AdapterFileError, bwl_fields, kohya_fields
from bwl.adapters.modules import ModuleLoRA, check_fits, read_modules
from bwl.adapters.spec import config_for_modules
from bwl.adapters.text_encoder import KOHYA_PREFIX, kohya_module_name
from bwl.core.atomic import atomic_path


def _block_list(values: dict[str, float], default: float = 0) -> str:
    return ",".join(f"{values.get(f, default):g}" for f in FINE_BLOCKS)


def _most_common(modules: list[ModuleLoRA]) -> tuple[int, float]:
    return Counter((m.rank, m.alpha) for m in modules).most_common(1)[0][0]


def _network_args(linear: list[ModuleLoRA], conv: list[ModuleLoRA], alpha: float, spec: dict) -> dict[str, str]:
    """kohya's ``ss_network_args``: per-block dims and alphas, and the conv settings of a LoCon."""
    args = {
        "block_dims": _block_list({fine_block(m.name): m.rank for m in linear}),
        "block_alphas": _block_list({fine_block(m.name): m.alpha for m in linear}, alpha),
    }
    if conv:
        conv_dim, conv_alpha = _most_common(conv)
        if spec.get("conv_rank"):
            conv_dim = spec["conv_rank"]
            conv_alpha = float(spec["conv_alpha"] if spec.get("conv_alpha") is not None else conv_dim)
        args.update(
            conv_dim=str(conv_dim),
            conv_alpha=f"{conv_alpha:g}",
            conv_block_dims=_block_list({fine_block(m.name): m.rank for m in conv}),
            conv_block_alphas=_block_list({fine_block(m.name): m.alpha for m in conv}, conv_alpha),
        )
    return args


def export_kohya(path: str | Path, out: str | Path) -> Path:
    """Convert a bwl adapter file to kohya/A1111 format (``lora_unet_*``/``lora_te_*`` keys, true alphas, ``ss_*``)."""
    contents = read_modules(path)
    if contents.format != "diffusers":
        raise AdapterFileError(f"{path}: already in kohya format")
    meta = contents.metadata
    spec = bwl_fields(path, meta).get("bwl_spec", {})
    unet_modules = contents.unet + contents.unplaced
    peft_state = {}
    for m in unet_modules:
        peft_state[f"unet.{m.name}.lora_A.weight"] = m.down
        peft_state[f"unet.{m.name}.lora_B.weight"] = m.up
    kohya = convert_state_dict_to_kohya(peft_state) if peft_state else {}
    for m in unet_modules:
        kohya[f"lora_unet_{m.name.replace('.', '_')}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    for m in contents.text_encoder:  # diffusers' converter names SD1's text encoder lora_te1 (SDXL's name)
        key = KOHYA_PREFIX + kohya_module_name(m.name)
        kohya[f"{key}.lora_down.weight"] = m.down
        kohya[f"{key}.lora_up.weight"] = m.up
        kohya[f"{key}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    kohya = {k: v.contiguous() for k, v in kohya.items()}
    linear = [m for m in contents.unet if not m.is_conv3x3]
    conv = [m for m in contents.unet if m.is_conv3x3]
    dim, alpha = _most_common(linear or contents.unet or contents.text_encoder)
    if spec:  # kohya's network_dim is the default rank that block_dims override: the spec's rank
        dim, alpha = spec["rank"], float(spec["alpha"] if spec["alpha"] is not None else spec["rank"])
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": f"{alpha:g}",
        "ss_network_args": json.dumps(_network_args(linear, conv, alpha, spec)),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_sd_model_name": meta.get("bwl_base_model", ""),
        "ss_max_train_steps": meta.get("bwl_steps", ""),
        "ss_output_name": Path(out).stem,
        **{k: v for k, v in meta.items() if k.startswith("bwl_")},
    }
    with atomic_path(out) as tmp:
        save_file(kohya, str(tmp), metadata=metadata)
    return Path(out)


def import_kohya(
    path: str | Path, pipe: StableDiffusionPipeline, out: str | Path, drop_unplaced: bool = False
) -> Path:
    """Convert a kohya-format SD1.x LoRA/LoCon (U-Net and text encoder) to a bwl adapter file for ``pipe``'s model.

    Every module is checked against ``pipe``'s U-Net and text encoder, names and shapes, before anything is written.
    U-Net modules outside the nine blocks (``conv_in``, ``time_embedding``) are refused by name unless
    ``drop_unplaced`` is set, which leaves them out.
    """
    contents = read_modules(path)
    if contents.format != "kohya":
        raise AdapterFileError(f"{path}: not a kohya-format file (no lora_unet_* or lora_te_* keys)")
    if contents.unplaced and not drop_unplaced:
        names = ", ".join(f"lora_unet_{m.name}" for m in contents.unplaced)
        raise AdapterFileError(f"{path}: modules outside the nine U-Net blocks, which a bwl adapter does not place: "
                               f"{names}; pass drop_unplaced=True (--drop-unplaced) to import without them")
    contents.unplaced = []
    resolved = check_fits(contents, pipe.unet, pipe.text_encoder)
    tensors: dict[str, torch.Tensor] = {}
    configs = {}
    for component, modules in resolved.items():
        for name, m in modules.items():
            tensors[f"{component}.{name}.lora_A.weight"] = m.down.contiguous()
            tensors[f"{component}.{name}.lora_B.weight"] = m.up.contiguous()
        if modules:
            configs[component] = config_for_modules({n: (m.rank, m.alpha) for n, m in modules.items()}).to_dict()
    source = kohya_fields(contents.metadata)
    steps = source.get("ss_max_train_steps", "")
    unet = resolved["unet"]
    metadata = {
        "bwl_method": contents.method,
        "bwl_blocks": format_blocks({paper_block(n) for n in unet}),
        "bwl_block_ranks": json.dumps({fine_block(n): m.rank for n, m in unet.items()}),
        "bwl_alpha": json.dumps(configs["unet"]["lora_alpha"] if unet else None),
        "bwl_base_model": source.get("ss_sd_model_name", ""),
        "bwl_trigger": "",
        "bwl_steps": steps if steps.isdigit() else "0",
        "bwl_imported_from": Path(path).name,
    }
    return write_adapter_file(out, tensors, configs, metadata)
