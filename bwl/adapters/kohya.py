"""kohya/A1111 and LyCORIS interchange: export bwl adapters to ``lora_unet_*``/``lora_te_*`` files, import such files.

kohya names an SD 1.x/2.x U-Net module ``lora_unet_`` + its diffusers name with dots as underscores, an SDXL one by
the original model's name (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), a text-encoder module
``lora_te_text_model_...`` (SDXL: ``lora_te1_``, ``lora_te2_``), and stores ``.lora_down.weight``, ``.lora_up.weight``
and ``.alpha`` (scale = alpha / rank).
LyCORIS, which A1111 and ComfyUI also read, adds per method:

- DoRA: ``.dora_scale``, one magnitude per output channel (``wd_on_output``), shaped ``(out, 1)`` or ``(out, 1, 1, 1)``;
- LoHa: ``.hada_w1_a``, ``.hada_w1_b``, ``.hada_w2_a``, ``.hada_w2_b`` (scale = alpha / rank);
- LoKr: ``.lokr_w1`` or ``.lokr_w1_a``/``_b``, and ``.lokr_w2`` or ``.lokr_w2_a``/``_b``; scale = alpha / rank, except
  that a module whose two factors are both kept whole is scaled by 1 (bwl folds peft's scale into ``lokr_w1`` then).

Training settings live in ``ss_*`` metadata: ``ss_network_module`` (``networks.lora``, or ``lycoris.kohya`` with
``algo``, ``conv_dim``, ``conv_alpha`` and ``dora_wd`` in ``ss_network_args``), per-block ranks as ``block_dims``
(25 values on SD 1.x, 23 on SDXL), and the base model's kind in ``ss_base_model_version``. OFT files are not
exported: LyCORIS' Diag-OFT parametrizes the rotation differently from peft's.
Import checks every module's name and shapes against the target model before it writes anything.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from bwl.adapters.architectures import Architecture, fine_block_of_slot, kohya_slots, sgm_name
from bwl.adapters.blocks import fine_block, format_blocks, paper_block
from bwl.adapters.files import write_adapter_file
from bwl.adapters.fitting import check_fits, lokr_options
from bwl.adapters.metadata import AdapterFileError, bwl_fields, kohya_fields
from bwl.adapters.methods import METHODS, method_label, plain_lora
from bwl.adapters.modules import ModuleAdapter, read_modules
from bwl.adapters.spec import config_for_modules, unet_architecture
from bwl.adapters.text_encoder import kohya_module_name, kohya_prefix
from bwl.core.atomic import atomic_path
from bwl.sd.pipeline import Pipeline, text_encoders


def _block_list(values: dict[str, float], arch: Architecture, default: float = 0) -> str:
    """One value per kohya slot (SDXL's three middle slots take M00's, its EMB and OUT slots 0)."""
    slots = [fine_block_of_slot(slot) for slot in kohya_slots(arch)]
    return ",".join(f"{values.get(f, default) if f else 0:g}" for f in slots)


def kohya_unet_name(module_name: str, arch: Architecture) -> str:
    """kohya's key (``lora_unet_…``) for a diffusers U-Net module name in layout ``arch``."""
    name = (sgm_name(module_name, arch) or module_name) if arch.kohya_sgm_names else module_name
    return f"lora_unet_{name.replace('.', '_')}"


def _most_common(modules: list[ModuleAdapter]) -> tuple[int, float]:
    return Counter((m.rank, m.alpha) for m in modules).most_common(1)[0][0]


def _network_args(linear: list[ModuleAdapter], conv: list[ModuleAdapter], alpha: float, spec: dict,
                  arch: Architecture) -> dict[str, str]:
    """kohya's ``ss_network_args``: per-block dims and alphas, and the conv settings of a LoCon."""
    args = {
        "block_dims": _block_list({fine_block(m.name): m.rank for m in linear}, arch),
        "block_alphas": _block_list({fine_block(m.name): m.alpha for m in linear}, arch, alpha),
    }
    if conv:
        conv_dim, conv_alpha = _most_common(conv)
        if spec.get("conv_rank"):
            conv_dim = spec["conv_rank"]
            conv_alpha = float(spec["conv_alpha"] if spec.get("conv_alpha") is not None else conv_dim)
        args.update(
            conv_dim=str(conv_dim),
            conv_alpha=f"{conv_alpha:g}",
            conv_block_dims=_block_list({fine_block(m.name): m.rank for m in conv}, arch),
            conv_block_alphas=_block_list({fine_block(m.name): m.alpha for m in conv}, arch, conv_alpha),
        )
    return args


def kohya_tensors(module: ModuleAdapter, key: str) -> dict[str, torch.Tensor]:
    """One module's tensors under kohya/LyCORIS names (``key`` is its ``lora_unet_…``/``lora_te_…`` name)."""
    tensors, alpha = dict(module.tensors), module.alpha
    if module.peft_type == "LORA":
        out = {f"{key}.lora_down.weight": tensors["lora_A.weight"], f"{key}.lora_up.weight": tensors["lora_B.weight"]}
        if module.dora:
            shape = (-1, 1, 1, 1) if module.down.ndim == 4 else (-1, 1)
            out[f"{key}.dora_scale"] = tensors["lora_magnitude_vector"].reshape(shape)
    elif module.peft_type in ("LOHA", "LOKR"):
        if "lokr_w1" in tensors and "lokr_w2" in tensors:  # LyCORIS scales two whole factors by 1, peft by alpha/r
            tensors["lokr_w1"] = tensors["lokr_w1"] * (module.alpha / module.rank)
            alpha = float(module.rank)
        out = {f"{key}.{name}": value for name, value in tensors.items()}
    else:
        raise AdapterFileError(f"module {module.name}: {module.peft_type} has no LyCORIS layout bwl writes "
                               "(LyCORIS' Diag-OFT parametrizes the rotation differently from peft's OFT)")
    out[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return {k: v.contiguous() for k, v in out.items()}


def _lycoris_args(contents, linear: list[ModuleAdapter], conv: list[ModuleAdapter], alpha: float, spec: dict):
    """``ss_network_module`` and ``ss_network_args`` as kohya (plain LoRA/LoCon) or LyCORIS (the rest) write them."""
    args = _network_args(linear, conv, alpha, spec, contents.arch)
    method = METHODS[contents.method]
    if method.lycoris_algo is None and not contents.dora:
        return "networks.lora", args
    args["algo"] = method.lycoris_algo or contents.method
    if contents.dora:
        args.update(dora_wd="True", wd_on_output="True")
    if contents.method == "lokr":
        args["factor"] = str(lokr_options(contents.path, contents.unet)["decompose_factor"])
    return "lycoris.kohya", args


def export_kohya(path: str | Path, out: str | Path) -> Path:
    """Convert a bwl adapter file to kohya/A1111 (LoRA, LoCon) or LyCORIS (DoRA, LoHa, LoKr) format, with true alphas
    and ``ss_*`` metadata; SDXL files get the original model's module names and ``lora_te1_``/``lora_te2_``. OFT is
    refused by name."""
    contents = read_modules(path)
    if contents.format != "diffusers":
        raise AdapterFileError(f"{path}: already in kohya format")
    meta, arch = contents.metadata, contents.arch
    spec = bwl_fields(path, meta).get("bwl_spec", {})
    kohya: dict[str, torch.Tensor] = {}
    try:
        for m in contents.unet + contents.unplaced:
            kohya.update(kohya_tensors(m, kohya_unet_name(m.name, arch)))
        for component, modules in contents.text_encoders.items():
            for m in modules:
                kohya.update(kohya_tensors(m, kohya_prefix(component, arch) + kohya_module_name(m.name)))
    except AdapterFileError as err:
        raise AdapterFileError(f"{path}: {err}") from None
    linear = [m for m in contents.unet if not m.is_conv3x3]
    conv = [m for m in contents.unet if m.is_conv3x3]
    dim, alpha = _most_common(linear or contents.unet or contents.text_encoder)
    if spec:  # kohya's network_dim is the default rank that block_dims override: the spec's rank
        dim, alpha = spec["rank"], float(spec["alpha"] if spec["alpha"] is not None else spec["rank"])
    network_module, args = _lycoris_args(contents, linear, conv, alpha, spec)
    metadata = {
        "ss_network_module": network_module,
        "ss_network_dim": str(dim),
        "ss_network_alpha": f"{alpha:g}",
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": arch.kohya_version,
        "ss_v2": str(arch.name == "sd2"),
        "ss_sd_model_name": meta.get("bwl_base_model", ""),
        "ss_max_train_steps": meta.get("bwl_steps", ""),
        "ss_output_name": Path(out).stem,
        **{k: v for k, v in meta.items() if k.startswith("bwl_")},
    }
    with atomic_path(out) as tmp:
        save_file(kohya, str(tmp), metadata=metadata)
    return Path(out)


def import_kohya(path: str | Path, pipe: Pipeline, out: str | Path, drop_unplaced: bool = False) -> Path:
    """Convert a kohya/LyCORIS SD 1.x/2.x or SDXL LoRA, LoCon, DoRA, LoHa or LoKr file (U-Net and text encoders) to a
    bwl adapter file for ``pipe``'s model.

    Every module is checked against ``pipe``'s U-Net and text encoders, names and shapes, before anything is written.
    U-Net modules outside the paper blocks (``conv_in``, ``time_embedding``) are refused by name unless
    ``drop_unplaced`` is set, which leaves them out.
    """
    contents = read_modules(path)
    if contents.format != "kohya":
        raise AdapterFileError(f"{path}: not a kohya-format file (no lora_unet_* or lora_te_* keys)")
    if contents.unplaced and not drop_unplaced:
        names = ", ".join(f"lora_unet_{m.name}" for m in contents.unplaced)
        raise AdapterFileError(f"{path}: modules outside the U-Net's paper blocks, which a bwl adapter does not place: "
                               f"{names}; pass drop_unplaced=True (--drop-unplaced) to import without them")
    contents.unplaced = []
    if contents.text_encoder and not plain_lora(contents.method, contents.dora):
        raise AdapterFileError(f"{path}: text-encoder modules in a {method_label(contents.method, contents.dora)} "
                               "file; bwl's text encoder takes plain LoRA only")
    resolved = check_fits(contents, pipe.unet, text_encoders(pipe))
    arch = unet_architecture(pipe.unet)
    tensors: dict[str, torch.Tensor] = {}
    configs = {}
    for component, modules in resolved.items():
        for name, m in modules.items():
            tensors.update({f"{component}.{name}.{t}": v.contiguous() for t, v in m.tensors.items()})
        if modules:
            method = contents.method if component == "unet" else "lora"
            config = config_for_modules({n: (m.rank, m.alpha) for n, m in modules.items()}, method, contents.dora)
            if method == "lokr":  # peft's decompose_both and decompose_factor, as the tensors imply
                for option, value in lokr_options(contents.path, list(modules.values())).items():
                    setattr(config, option, value)
            configs[component] = config.to_dict()
    source = kohya_fields(contents.metadata)
    steps = source.get("ss_max_train_steps", "")
    unet = resolved["unet"]
    metadata = {
        "bwl_method": contents.method,
        "bwl_blocks": format_blocks({paper_block(n, arch) for n in unet}, arch),
        "bwl_architecture": arch.name,
        "bwl_block_ranks": json.dumps({fine_block(n): m.rank for n, m in unet.items()}),
        "bwl_alpha": json.dumps(configs["unet"].get("lora_alpha", configs["unet"].get("alpha")) if unet else None),
        "bwl_base_model": source.get("ss_sd_model_name", ""),
        "bwl_trigger": "",
        "bwl_steps": steps if steps.isdigit() else "0",
        "bwl_imported_from": Path(path).name,
    }
    return write_adapter_file(out, tensors, configs, metadata)
