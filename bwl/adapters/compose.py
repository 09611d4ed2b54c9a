"""Composition at inference: several adapters in one pipeline, each scaled per block.

diffusers' ``set_adapters`` block dicts only reach attention layers (IN3, OUT0 and resnets are silently left at
1.0). Here every adapter layer, LoCon convs included, gets the weight of the kohya fine block its name falls in. A
weight of 0 switches the adapter off in that layer (exactly the base layer, DoRA's magnitude included); OFT, a
rotation, takes only 0 or 1.

Plain LoRA/LoCon files load through diffusers' ``load_lora_weights``; DoRA, LoHa, LoKr and OFT files through peft
(the config their tensors imply, then ``set_peft_model_state_dict``), after the same name and shape checks.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from peft.tuners.lora import LoraLayer
from peft.utils import set_peft_model_state_dict

from bwl.adapters.blocks import block_weights, fine_block
from bwl.adapters.files import check_safetensors
from bwl.adapters.fitting import fitted_modules, lokr_options
from bwl.adapters.metadata import AdapterFileError
from bwl.adapters.methods import carries, is_adapter_layer, plain_lora
from bwl.adapters.modules import AdapterContents, ModuleAdapter, read_modules
from bwl.adapters.spec import config_for_modules, unet_architecture
from bwl.sd.pipeline import Pipeline, quiet_loading, text_encoders

BlockWeights = float | str | Mapping[str, float] | Sequence[float]


def _no_text_encoder_notice(record: logging.LogRecord) -> bool:
    """False for diffusers' notice that a file has no text-encoder LoRA (most of bwl's files are U-Net only)."""
    return not record.getMessage().startswith("No LoRA keys associated to CLIPTextModel")  # (WithProjection too)


def _base_weights_missing_report(record: logging.LogRecord) -> bool:
    """False for transformers' load report when it only lists the *base* weights as missing, which an adapter file
    never holds (transformers 5 reports them when loading text-encoder LoRA). Any row about LoRA tensors is kept."""
    message = record.getMessage()
    if "LOAD REPORT" not in message:
        return True
    rows = [line for line in message.splitlines() if "|" in line and not line.startswith(("Key", "-"))]
    return not rows or any("MISSING" not in row or "lora_" in row for row in rows)


def load_adapter(pipe: Pipeline, path: str | Path, name: str) -> None:
    """Load a bwl or kohya/A1111 adapter file into ``pipe`` as adapter ``name``, U-Net and text encoders alike.

    The file is read and checked first (:func:`bwl.adapters.modules.fitted_modules`): a module the model does not have,
    or one whose shapes do not fit, is an :class:`AdapterFileError` naming it and both shapes.
    """
    path = check_safetensors(path)
    contents, resolved = fitted_modules(path, pipe.unet, text_encoders(pipe))
    if contents.method in ("lora", "locon"):
        stacked = sorted({n for m in pipe.unet.modules() if is_adapter_layer(m) and not isinstance(m, LoraLayer)
                          for layer in m.adapter_layer_names for n in getattr(m, layer, {})})
        if stacked:
            raise AdapterFileError(
                f"{path}: peft cannot put LoRA/LoCon/DoRA layers on layers that already carry LoHa, LoKr or OFT "
                f"adapters ({', '.join(stacked)}); load the LoRA-family adapters first (load_adapters does)")
    if not plain_lora(contents.method, contents.dora):
        _load_with_peft(pipe, contents, resolved["unet"], name)
        return
    filters = {"diffusers.loaders.lora_base": _no_text_encoder_notice,
               "transformers.integrations.peft": _base_weights_missing_report}
    for logger, drop in filters.items():
        logging.getLogger(logger).addFilter(drop)
    try:
        with warnings.catch_warnings(), quiet_loading():  # peft's note that a model now holds several adapters
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
            pipe.load_lora_weights(str(path), adapter_name=name)
    finally:
        for logger, drop in filters.items():
            logging.getLogger(logger).removeFilter(drop)


def _load_with_peft(
    pipe: Pipeline, contents: AdapterContents, modules: dict[str, ModuleAdapter], name: str
) -> None:
    """Add adapter ``name`` to the U-Net with the peft config ``modules`` imply, and load their tensors into it."""
    if contents.text_encoder:
        raise AdapterFileError(f"{contents.path}: text-encoder modules with method {contents.method!r}; the text "
                               "encoder takes plain LoRA only")
    config = config_for_modules({n: (m.rank, m.alpha) for n, m in modules.items()}, contents.method, contents.dora)
    if contents.method == "lokr":  # peft's decompose_both and decompose_factor, as the tensors imply
        for option, value in lokr_options(contents.path, list(modules.values())).items():
            setattr(config, option, value)
    pipe.unet.add_adapter(config, adapter_name=name)
    state = {f"{module}.{tensor}": value for module, m in modules.items() for tensor, value in m.tensors.items()}
    result = set_peft_model_state_dict(pipe.unet, state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        pipe.unet.delete_adapters(name)
        raise AdapterFileError(f"{contents.path}: peft did not place {unexpected[0]} (and {len(unexpected) - 1} more)")
    pipe.unet.requires_grad_(False)


def load_adapters(pipe: Pipeline, files: Mapping[str, str | Path]) -> None:
    """Load adapter files into ``pipe`` under the given names (already loaded names are skipped): LoRA-family files
    first, as peft can stack LoHa, LoKr and OFT layers on LoRA layers but not the other way round."""
    loaded = {n for names in pipe.get_list_adapters().values() for n in names}
    todo = {name: path for name, path in files.items() if name not in loaded}
    order = sorted(todo, key=lambda name: read_modules(todo[name]).method not in ("lora", "locon"))
    for name in order:
        load_adapter(pipe, todo[name], name)


def _weight_key(module_name: str) -> str | None:
    if module_name == "conv_in" or module_name.startswith("conv_in."):
        return "IN00"
    return fine_block(module_name)


def set_block_weights(pipe: Pipeline, adapters: Mapping[str, BlockWeights]) -> dict[str, dict[str, float]]:
    """Activate exactly ``adapters`` (name -> weights) and scale every LoRA layer by its block's weight.

    Weights per adapter are anything :func:`bwl.adapters.blocks.block_weights` reads in the U-Net's layout: a number,
    a paper spec such as ``"upper"``, an LBW preset or vector (17/26 values on SD 1.x, 12/20 on SDXL), or a per-block
    dict. Text-encoder layers (both of SDXL's) take ``BASE``; U-Net layers outside the fine blocks (time embedding,
    conv_out) take 1.0, or the number when the weight is a number. Adapters not named are deactivated. Returns the
    resolved per-block weights.
    """
    names = list(adapters)
    available = {n for loaded in pipe.get_list_adapters().values() for n in loaded}
    missing = [n for n in names if n not in available]
    if missing:
        raise KeyError(f"adapters not loaded: {missing}; loaded: {sorted(available)}")
    arch = unet_architecture(pipe.unet)
    resolved = {name: block_weights(w, arch) for name, w in adapters.items()}
    if not names:
        pipe.disable_lora()
        return resolved
    pipe.enable_lora()
    scalar = {n: float(w) for n, w in adapters.items() if isinstance(w, (int, float)) and not isinstance(w, bool)}
    components = [(pipe.unet, False)] + [(encoder, True) for encoder in text_encoders(pipe).values()]
    for component, is_text_encoder in components:
        for module_name, module in component.named_modules():
            if not is_adapter_layer(module):
                continue
            key = "BASE" if is_text_encoder else _weight_key(module_name)
            weights = {n: (resolved[n][key] if key else scalar.get(n, 1.0)) for n in names if carries(module, n)}
            module.set_adapter([n for n, w in weights.items() if w != 0])
            for name, weight in weights.items():
                _set_scale(module, name, weight, f"{name!r} on {key or module_name}")
    return resolved


def _set_scale(module, name: str, weight: float, where: str) -> None:
    if weight == 0:
        return
    if hasattr(module, "scaling"):
        module.set_scale(name, weight)
    elif weight != 1:
        raise ValueError(f"adapter {where}: weight {weight:g}; an OFT adapter (a rotation) takes 0 or 1 per block")
