"""kohya/A1111 interchange: export, import and inspect ``lora_unet_*`` adapter files.

kohya names a module ``lora_unet_`` + its diffusers name with dots as underscores, and stores
``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` (scale = alpha / rank). Training settings live in
``ss_*`` metadata; per-block ranks in ``ss_network_args`` as 25-value ``block_dims``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

from bwl.adapters.blocks import FINE_BLOCKS, PAPER_BLOCKS, fine_block, format_blocks, paper_block
from bwl.adapters.files import AdapterFileError, read_metadata, read_tensors, write_adapter_file
from bwl.adapters.spec import config_for_modules
from bwl.core.atomic import atomic_path

_PEFT_KEY = re.compile(r"^(unet|text_encoder)\.(.+)\.lora_([AB])\.weight$")
_KOHYA_KEY = re.compile(r"^lora_(unet|te\d?)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


@dataclass
class ModuleLoRA:
    """One adapted module as stored in a file."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def is_conv3x3(self) -> bool:
        return self.down.ndim == 4 and tuple(self.down.shape[-2:]) != (1, 1)

    @property
    def is_resnet_side(self) -> bool:
        return any(c in self.name for c in ("resnets", "downsamplers", "upsamplers"))


@dataclass
class AdapterReport:
    """What ``inspect`` tells about an adapter file."""

    path: str
    format: str
    method: str
    blocks: str
    ranks: dict[str, list[int]]
    alphas: dict[str, list[float]]
    parameters: dict[str, int]
    fine_ranks: dict[str, int]
    text_encoder_modules: int
    metadata: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        """A plain-text report, one row per paper block."""
        lines = [
            f"file:    {self.path}",
            f"format:  {self.format}",
            f"method:  {self.method}",
            f"blocks:  {self.blocks}",
        ]
        for key in ("bwl_trigger", "bwl_base_model", "bwl_steps", "ss_sd_model_name", "ss_max_train_steps"):
            if self.metadata.get(key):
                lines.append(f"{key}: {self.metadata[key]}")
        lines.append(f"{'block':<6} {'ranks':<10} {'alphas':<14} {'params':>10}")
        for block in PAPER_BLOCKS:
            ranks = ",".join(map(str, self.ranks.get(block, []))) or "0"
            alphas = ",".join(f"{a:g}" for a in self.alphas.get(block, [])) or "-"
            lines.append(f"{block:<6} {ranks:<10} {alphas:<14} {self.parameters.get(block, 0):>10,}")
        lines.append(f"{'total':<6} {'':<10} {'':<14} {sum(self.parameters.values()):>10,}")
        if self.text_encoder_modules:
            lines.append(f"text encoder: {self.text_encoder_modules} modules (BASE)")
        return "\n".join(lines)


def _peft_alpha(config: dict, module: str, rank: int) -> float:
    key = get_pattern_key(list(config.get("alpha_pattern") or {}), module)
    return float((config.get("alpha_pattern") or {}).get(key, config.get("lora_alpha", rank)))


def read_modules(path: str | Path) -> tuple[str, list[ModuleLoRA], int]:
    """Read an adapter file in bwl/diffusers (peft) or kohya format: (format, U-Net modules, text-encoder modules)."""
    tensors = read_tensors(path)
    meta = read_metadata(path)
    if any(_KOHYA_KEY.match(k) for k in tensors):
        parts: dict[str, dict[str, torch.Tensor]] = {}
        te_modules = set()
        for key, tensor in tensors.items():
            m = _KOHYA_KEY.match(key)
            if not m:
                raise AdapterFileError(f"{path}: unexpected key {key!r} in a kohya-format file")
            if m.group(1) != "unet":
                te_modules.add(m.group(2))
                continue
            parts.setdefault(m.group(2), {})[m.group(3)] = tensor
        modules = []
        for name, p in parts.items():
            if "lora_down.weight" not in p or "lora_up.weight" not in p:
                raise AdapterFileError(f"{path}: module lora_unet_{name} lacks lora_down or lora_up")
            rank = p["lora_down.weight"].shape[0]
            alpha = float(p["alpha"]) if "alpha" in p else float(rank)
            modules.append(ModuleLoRA(name, p["lora_down.weight"], p["lora_up.weight"], alpha))
        return "kohya", modules, len(te_modules)
    config = json.loads(meta.get("lora_adapter_metadata", "{}"))
    config = {k[len("unet."):]: v for k, v in config.items() if k.startswith("unet.")}
    parts_ab: dict[str, dict[str, torch.Tensor]] = {}
    te = set()
    for key, tensor in tensors.items():
        m = _PEFT_KEY.match(key)
        if not m:
            raise AdapterFileError(
                f"{path}: unexpected key {key!r}; expected unet.<module>.lora_A/B.weight or lora_unet_*"
            )
        if m.group(1) == "text_encoder":
            te.add(m.group(2))
            continue
        parts_ab.setdefault(m.group(2), {})[m.group(3)] = tensor
    modules = []
    for name, p in parts_ab.items():
        if set(p) != {"A", "B"}:
            raise AdapterFileError(f"{path}: module {name} lacks lora_A or lora_B")
        rank = p["A"].shape[0]
        modules.append(ModuleLoRA(name, p["A"], p["B"], _peft_alpha(config, name, rank) if config else float(rank)))
    return "diffusers", modules, len(te)


def inspect_adapter(path: str | Path) -> AdapterReport:
    """Method, blocks, ranks, alphas and parameters per block of any SD1.x LoRA/LoCon file (bwl or kohya)."""
    fmt, modules, te_count = read_modules(path)
    ranks: dict[str, set[int]] = {}
    alphas: dict[str, set[float]] = {}
    params = dict.fromkeys(PAPER_BLOCKS, 0)
    fine: dict[str, int] = {}
    for module in modules:
        block = paper_block(module.name)
        if block is None:
            raise AdapterFileError(f"{path}: module {module.name!r} is outside the SD1.x U-Net blocks")
        ranks.setdefault(block, set()).add(module.rank)
        alphas.setdefault(block, set()).add(module.alpha)
        params[block] += module.down.numel() + module.up.numel()
        fb = fine_block(module.name)
        if fb is not None and not module.is_conv3x3:
            fine[fb] = max(fine.get(fb, 0), module.rank)
    method = "locon" if any(m.is_resnet_side for m in modules) else "lora"
    return AdapterReport(
        path=str(path),
        format=fmt,
        method=method,
        blocks=format_blocks(ranks),
        ranks={b: sorted(r) for b, r in ranks.items()},
        alphas={b: sorted(a) for b, a in alphas.items()},
        parameters=params,
        fine_ranks={f: fine[f] for f in FINE_BLOCKS if f in fine},
        text_encoder_modules=te_count,
        metadata={k: v for k, v in read_metadata(path).items() if k.startswith(("bwl_", "ss_"))},
    )


def _block_list(values: dict[str, float], default: float = 0) -> str:
    return ",".join(f"{values.get(f, default):g}" for f in FINE_BLOCKS)


def export_kohya(path: str | Path, out: str | Path) -> Path:
    """Convert a bwl adapter file to kohya/A1111 format (``lora_unet_*`` keys, true alphas, ``ss_*`` metadata)."""
    fmt, modules, te_count = read_modules(path)
    if fmt != "diffusers":
        raise AdapterFileError(f"{path}: already in kohya format")
    peft_state = {}
    for m in modules:
        peft_state[f"unet.{m.name}.lora_A.weight"] = m.down
        peft_state[f"unet.{m.name}.lora_B.weight"] = m.up
    kohya = convert_state_dict_to_kohya(peft_state)
    for m in modules:
        kohya[f"lora_unet_{m.name.replace('.', '_')}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    kohya = {k: v.contiguous() for k, v in kohya.items()}
    meta = read_metadata(path)
    linear = [m for m in modules if not m.is_conv3x3]
    conv = [m for m in modules if m.is_conv3x3]
    dim, alpha = Counter((m.rank, m.alpha) for m in linear or modules).most_common(1)[0][0]
    if "bwl_spec" in meta:  # kohya's network_dim is the default rank that block_dims override: the spec's rank
        spec = json.loads(meta["bwl_spec"])
        dim, alpha = spec["rank"], float(spec["alpha"] if spec["alpha"] is not None else spec["rank"])
    args: dict[str, str] = {}
    block_dims = {fine_block(m.name): m.rank for m in linear}
    block_alphas = {fine_block(m.name): m.alpha for m in linear}
    args["block_dims"] = _block_list(block_dims)
    args["block_alphas"] = _block_list(block_alphas, alpha)
    if conv:
        conv_dim, conv_alpha = Counter((m.rank, m.alpha) for m in conv).most_common(1)[0][0]
        if "bwl_spec" in meta and spec.get("conv_rank"):
            conv_dim = spec["conv_rank"]
            conv_alpha = float(spec["conv_alpha"] if spec.get("conv_alpha") is not None else conv_dim)
        args.update(
            conv_dim=str(conv_dim),
            conv_alpha=f"{conv_alpha:g}",
            conv_block_dims=_block_list({fine_block(m.name): m.rank for m in conv}),
            conv_block_alphas=_block_list({fine_block(m.name): m.alpha for m in conv}, conv_alpha),
        )
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": f"{alpha:g}",
        "ss_network_args": json.dumps(args),
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


def import_kohya(path: str | Path, unet: torch.nn.Module, out: str | Path) -> Path:
    """Convert a kohya-format SD1.x LoRA/LoCon to a bwl adapter file, resolving names against ``unet``.

    Text-encoder LoRA is not part of a bwl adapter: a file that has it is refused here (load it directly
    with :func:`bwl.adapter_file.load_adapter`, which keeps it).
    """
    fmt, modules, te_count = read_modules(path)
    if fmt != "kohya":
        raise AdapterFileError(f"{path}: not a kohya-format file (no lora_unet_* keys)")
    if te_count:
        raise AdapterFileError(f"{path}: has {te_count} text-encoder LoRA modules, which a bwl adapter cannot hold")
    names = {n.replace(".", "_"): n for n, _ in unet.named_modules()}
    tensors: dict[str, torch.Tensor] = {}
    chosen: dict[str, tuple[int, float]] = {}
    for m in modules:
        name = names.get(m.name)
        if name is None:
            raise AdapterFileError(f"{path}: module lora_unet_{m.name} does not exist in this U-Net")
        tensors[f"unet.{name}.lora_A.weight"] = m.down.contiguous()
        tensors[f"unet.{name}.lora_B.weight"] = m.up.contiguous()
        chosen[name] = (m.rank, m.alpha)
    config = config_for_modules(chosen)
    method = "locon" if any(m.is_resnet_side for m in modules) else "lora"
    source = read_metadata(path)
    metadata = {
        "bwl_method": method,
        "bwl_blocks": format_blocks({paper_block(n) for n in chosen}),
        "bwl_block_ranks": json.dumps({fine_block(n): r for n, (r, _) in chosen.items()}),
        "bwl_alpha": json.dumps(config.lora_alpha),
        "bwl_base_model": source.get("ss_sd_model_name", ""),
        "bwl_trigger": "",
        "bwl_steps": source.get("ss_max_train_steps", "") or "0",
        "bwl_imported_from": Path(path).name,
    }
    return write_adapter_file(out, tensors, config.to_dict(), metadata)
