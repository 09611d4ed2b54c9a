"""The adapter methods bwl trains block-wise, each built on peft's own config and layers.

| method  | peft                         | targets                        | ``rank`` means | block weight     |
|---------|------------------------------|--------------------------------|----------------|------------------|
| lora    | ``LoraConfig``               | attention (kohya's LoRA)       | rank           | any scale        |
| locon   | ``LoraConfig``               | attention + resnet side (LoCon)| rank           | any scale        |
| loha    | ``LoHaConfig``               | attention + resnet side        | rank           | any scale        |
| lokr    | ``LoKrConfig``               | attention + resnet side        | rank           | any scale        |
| oft     | ``OFTConfig``                | as locon, but no 3x3 conv      | block size     | 0 or 1 only      |

DoRA (``dora=True``, peft's ``use_dora``) decomposes a ``lora`` or ``locon`` update into magnitude and direction.
LoHa and LoKr adapt convolutions, 3x3 included, as LyCORIS does with ``conv_dim``. OFT adapts the resnet side's
Linear and 1x1 layers but no 3x3 conv: peft's OFT rotates a 3x3 conv's unpadded input patches, which fails on
feature maps smaller than the kernel (the deep blocks of a 32 px toy model) and is not the padded conv's rotation.
OFT's block size (kohya's ``network_dim`` for Diag-OFT) must divide each adapted layer's input features.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cache

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, PeftConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from bwl.adapters.blocks import BlockSpecError


@dataclass(frozen=True)
class Method:
    """One reparameterization of a layer's weight update."""

    name: str
    peft_type: str  # peft's PeftType value, as adapter-file configs record it
    conv: bool  # adapts the resnet side too (resnets, down/upsamplers)
    conv3x3: bool  # and, there, the 3x3 convolutions
    rank_is_block_size: bool  # OFT: ``rank`` is the orthogonal blocks' size
    scalable: bool  # a block weight strictly between 0 and 1 means something
    lycoris_algo: str | None  # ``algo`` in LyCORIS' ss_network_args (None: kohya's own networks.lora)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", "LORA", conv=False, conv3x3=False, rank_is_block_size=False, scalable=True, lycoris_algo=None),
    Method("locon", "LORA", conv=True, conv3x3=True, rank_is_block_size=False, scalable=True, lycoris_algo=None),
    Method("loha", "LOHA", conv=True, conv3x3=True, rank_is_block_size=False, scalable=True, lycoris_algo="loha"),
    Method("lokr", "LOKR", conv=True, conv3x3=True, rank_is_block_size=False, scalable=True, lycoris_algo="lokr"),
    Method("oft", "OFT", conv=True, conv3x3=False, rank_is_block_size=True, scalable=False, lycoris_algo=None),
)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
DORA_METHODS: tuple[str, ...] = ("lora", "locon")

# peft's per-module tensor names (the state-dict key after the module's name) for each peft type.
TENSOR_NAMES: dict[str, tuple[str, ...]] = {
    "LORA": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "OFT": ("oft_R.weight",),
}
ALL_TENSOR_NAMES: tuple[str, ...] = tuple(n for names in TENSOR_NAMES.values() for n in names)


def get_method(name: str, dora: bool = False) -> Method:
    """The method called ``name``; an unknown one, or DoRA on a method peft cannot decompose, raises naming it."""
    if name not in METHODS:
        raise BlockSpecError(f"unknown method {name!r}; valid: {', '.join(METHOD_NAMES)}")
    if dora and name not in DORA_METHODS:
        raise BlockSpecError(f"dora is supported on {' and '.join(DORA_METHODS)} (peft's use_dora), not on {name!r}")
    return METHODS[name]


def plain_lora(name: str, dora: bool) -> bool:
    """Whether a method variant is plain LoRA/LoCon: what diffusers' ``load_lora_weights`` and text encoders take."""
    return name in ("lora", "locon") and not dora


def method_label(name: str, dora: bool) -> str:
    """How tables and keys name a method variant: ``locon``, or ``locon-dora`` with DoRA."""
    return f"{name}-dora" if dora else name


def parse_method_label(label: str) -> tuple[str, bool]:
    """``"locon-dora"`` -> ``("locon", True)``; ``"loha"`` -> ``("loha", False)``; checked."""
    name, _, suffix = label.partition("-")
    if suffix not in ("", "dora"):
        raise BlockSpecError(f"unknown method {label!r}; valid: {', '.join(METHOD_NAMES)}, or lora-dora/locon-dora")
    get_method(name, dora=suffix == "dora")
    return name, suffix == "dora"


def method_config(
    method: str, chosen: dict[str, tuple[int, float]], dora: bool = False, patterns: bool = True
) -> PeftConfig:
    """The peft config adapting exactly ``chosen`` (regex-escaped full module name -> (rank, alpha)) with ``method``.

    The most common (rank, alpha) becomes the default; the rest go in peft's ``rank_pattern``/``alpha_pattern``
    (keys matched against the end of each module name). OFT takes one block size for all its modules (peft's OFT has
    no per-module pattern), so per-block sizes are an error naming the method.
    """
    m = get_method(method, dora)
    rank, alpha = Counter(chosen.values()).most_common(1)[0][0]
    targets = "|".join(chosen)
    rank_pattern = {n: r for n, (r, _) in chosen.items() if r != rank} if patterns else {}
    alpha_pattern = {n: a for n, (_, a) in chosen.items() if a != alpha} if patterns else {}
    if m.peft_type == "LORA":
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, rank_pattern=rank_pattern,
                          alpha_pattern=alpha_pattern, use_dora=dora, init_lora_weights=True)
    if m.peft_type in ("LOHA", "LOKR"):
        config = LoHaConfig if m.peft_type == "LOHA" else LoKrConfig
        return config(r=rank, alpha=alpha, target_modules=targets, rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, init_weights=True)
    if len({r for r, _ in chosen.values()}) > 1:
        raise BlockSpecError(f"method {method!r}: one block size for every block (peft's OFT has no per-module "
                             f"sizes); got {sorted({r for r, _ in chosen.values()})}")
    return OFTConfig(r=0, oft_block_size=rank, target_modules=targets, init_weights=True)


def config_from_dict(values: dict) -> PeftConfig:
    """A peft config from its ``to_dict()`` (as adapter files store it), of the class its ``peft_type`` names."""
    values = dict(values)
    values.setdefault("peft_type", "LORA")
    return PeftConfig.from_peft_type(**values)


def method_of_config(config: dict, conv: bool) -> tuple[str, bool]:
    """(method, dora) of a stored peft config; ``conv``: whether it adapts resnet-side modules."""
    peft_type = str(config.get("peft_type", "LORA"))
    if peft_type == "LORA":
        return ("locon" if conv else "lora"), bool(config.get("use_dora"))
    found = [m.name for m in METHODS.values() if m.peft_type == peft_type]
    if not found:
        raise BlockSpecError(f"peft type {peft_type!r} is not a method bwl reads; valid: "
                             f"{', '.join(sorted({m.peft_type for m in METHODS.values()}))}")
    return found[0], False


def is_adapter_layer(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a peft adapter layer (of any method)."""
    return isinstance(module, BaseTunerLayer)


def carries(module: torch.nn.Module, name: str) -> bool:
    """Whether the peft layer ``module`` holds adapter ``name`` (under any of its method's parameter names)."""
    return isinstance(module, BaseTunerLayer) and any(
        name in getattr(module, layer, {}) for layer in module.adapter_layer_names
    )


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The layer a peft wrapper adapts (the module itself when it is not wrapped)."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _layer_signature(layer: torch.nn.Module) -> tuple:
    if isinstance(layer, torch.nn.Conv2d):
        return ("conv", layer.in_channels, layer.out_channels, tuple(layer.kernel_size))
    if isinstance(layer, torch.nn.Linear):
        return ("linear", layer.in_features, layer.out_features)
    raise BlockSpecError(f"cannot adapt a {type(layer).__name__}; bwl adapts Linear and Conv2d layers")


class _Holder(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer


@cache
def _shapes(signature: tuple, method: str, dora: bool, rank: int, alpha: float, options: tuple) -> dict:
    kind, *dims = signature
    with torch.device("meta"):
        layer = torch.nn.Conv2d(dims[0], dims[1], dims[2]) if kind == "conv" else torch.nn.Linear(dims[0], dims[1])
    config = method_config(method, {"layer": (rank, alpha)}, dora)
    for key, value in options:
        setattr(config, key, value)
    try:
        holder = inject_adapter_in_model(config, _Holder(layer), adapter_name="shape", low_cpu_mem_usage=True)
    except (ValueError, RuntimeError, NotImplementedError) as err:
        raise BlockSpecError(f"method {method_label(method, dora)!r} at rank {rank} cannot adapt a {kind} layer "
                             f"{tuple(dims)}: {err}") from None
    shapes = {}
    for key, param in holder.named_parameters():
        if ".shape" in key:  # layer.<tensor>.shape[.weight]: peft's state-dict name drops the adapter name
            tensor = key.split(".", 1)[1].replace(".shape", "")
            tensor = tensor.removesuffix(".weight") if tensor.startswith("lora_magnitude") else tensor
            shapes[tensor] = tuple(param.shape)
    return shapes


def expected_shapes(
    method: str, layer: torch.nn.Module, rank: int, alpha: float, dora: bool = False, **options
) -> dict[str, tuple[int, ...]]:
    """The tensors peft builds to adapt ``layer`` with ``method`` at ``rank``: tensor name -> shape (built on the meta
    device, nothing allocated). ``options`` are extra config fields (LoKr's ``decompose_both``).

    A combination peft refuses (an OFT block size that does not divide the layer) raises :class:`BlockSpecError`
    naming the method, the rank and the layer.
    """
    return _shapes(_layer_signature(base_layer(layer)), method, dora, rank, float(alpha),
                   tuple(sorted(options.items())))
