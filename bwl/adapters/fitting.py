"""Whether an adapter file's modules fit a model: every name resolved to the model's own module, every tensor shape
the one peft builds for that layer, before anything is loaded or written.

kohya names are matched with dots as underscores, against both the model's diffusers names and the original (SGM)
model's, so an SDXL file's ``input_blocks_4_1_…`` finds ``down_blocks.1.attentions.0…`` and an SDXL file on an SD 1.x
pipeline (or the reverse) is refused naming a module and both shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bwl.adapters.architectures import sgm_name
from bwl.adapters.files import TextEncoders, encoders_by_name
from bwl.adapters.metadata import AdapterFileError
from bwl.adapters.methods import METHODS, base_layer, expected_shapes
from bwl.adapters.modules import AdapterContents, ModuleAdapter, read_modules
from bwl.adapters.spec import unet_architecture
from bwl.adapters.text_encoder import kohya_prefix, modules_by_kohya_name


def kohya_unet_index(unet: torch.nn.Module) -> dict[str, str]:
    """The U-Net's module names keyed by kohya's underscored names, diffusers' and the original model's."""
    arch = unet_architecture(unet)
    index = {}
    for name, _ in unet.named_modules():
        original = sgm_name(name, arch)
        if original is not None:
            index[original.replace(".", "_")] = name
        index[name.replace(".", "_")] = name
    return index


def _mismatch(contents: AdapterContents, unet: torch.nn.Module) -> str:
    """`` (an SDXL file on an SD 1.x U-Net)`` where the file's layout is known and not the model's, else ``""``."""
    model = unet_architecture(unet)
    file = contents.architecture
    if file is None or file.attention == model.attention:
        return ""
    return f" (an {file.label} file on an {model.label} U-Net)"


def resolve_names(
    contents: AdapterContents, unet: torch.nn.Module, text_encoder: TextEncoders = None
) -> tuple[dict[str, dict[str, ModuleAdapter]], list[str]]:
    """Each U-Net and text-encoder module under the model's own module name (``{"unet": {...}, "text_encoder": ...,
    "text_encoder_2": ...}``), and the names (as the file spells them) of U-Net modules the model does not have.

    A text-encoder module the model does not have is an error naming it (and one without a text encoder to hold it).
    """
    encoders = encoders_by_name(text_encoder)
    resolved: dict[str, dict[str, ModuleAdapter]] = {"unet": {}, **{c: {} for c in encoders}}
    kohya = contents.format == "kohya"
    unet_index = kohya_unet_index(unet) if kohya else {n: n for n, _ in unet.named_modules()}
    missing = []
    for module in contents.unet + contents.unplaced:
        name = unet_index.get(module.name)
        if name is None:
            missing.append(f"lora_unet_{module.name}" if kohya else module.name)
        else:
            resolved["unet"][name] = module
    for component, modules in contents.text_encoders.items():
        encoder = encoders.get(component)
        if encoder is None:
            raise AdapterFileError(f"{contents.path}: has LoRA for {component} but the model has no {component}"
                                   f"{_mismatch(contents, unet)}")
        te_index = modules_by_kohya_name(encoder) if kohya else {}
        te_names = {n for n, _ in encoder.named_modules()}
        for module in modules:
            name = te_index.get(module.name) if kohya else module.name
            if name is None or name not in te_names:
                shown = f"{kohya_prefix(component, unet_architecture(unet))}{module.name}" if kohya else module.name
                raise AdapterFileError(f"{contents.path}: module {shown} does not exist in this {component} "
                                       f"(different base architecture?){_mismatch(contents, unet)}")
            resolved[component][name] = module
    return resolved, missing


def _method(module: ModuleAdapter) -> str:
    return next(m.name for m in METHODS.values() if m.peft_type == module.peft_type)


def check_shapes(path: str | Path, modules: dict[str, ModuleAdapter], model: torch.nn.Module, what: str,
                 note: str = "") -> None:
    """Raise unless each module's tensors have the shapes peft builds for ``model``'s layer, naming the first misfit,
    its tensors' shapes and the layer's weight shape."""
    named = dict(model.named_modules())
    for name, adapter in modules.items():
        base = base_layer(named[name])  # under every peft wrapper (a model may hold several methods' layers)
        weight = getattr(base, "weight", None)
        if weight is None or not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            raise AdapterFileError(f"{path}: {what} module {name!r} has no Linear or Conv2d weight to adapt")
        shapes = {k: tuple(t.shape) for k, t in adapter.tensors.items()}
        options = {k: v for k, v in adapter.options.items() if k != "factors"}
        try:
            expected = expected_shapes(_method(adapter), base, adapter.rank, adapter.alpha, adapter.dora, **options)
            if "factors" in adapter.options:  # a LyCORIS LoKr file: the factors its shapes fit in this layer
                method, rank, alpha = _method(adapter), adapter.rank, adapter.alpha
                fits = [f for f in adapter.options["factors"]
                        if expected_shapes(method, base, rank, alpha, **{**options, "decompose_factor": f}) == shapes]
                expected = shapes if fits else expected
                adapter.options["factors"] = fits
        except ValueError as err:
            raise AdapterFileError(f"{path}: {what} module {name}: {err}") from None
        if shapes != expected:
            shown = (f"LoRA down {shapes.get('lora_A.weight')} and up {shapes.get('lora_B.weight')}"
                     if adapter.peft_type == "LORA" and not adapter.dora else
                     f"{adapter.peft_type} tensors {shapes}")
            raise AdapterFileError(
                f"{path}: {what} module {name}: {shown} do not fit its weight {tuple(weight.shape)} "
                f"({note.strip(' ()') or 'an adapter for a different base architecture?'})"
            )


def lokr_options(path: str | Path, modules: list[ModuleAdapter]) -> dict:
    """The LoKr config fields a file's modules imply together: ``decompose_both`` where any factors ``w1``, and the
    one ``decompose_factor`` (peft has one per adapter; modules that disagree are an error naming the file)."""
    fitting = [set(m.options.get("factors", [m.options.get("decompose_factor", -1)])) for m in modules]
    common = set.intersection(*fitting) if fitting else {-1}
    if not common:
        raise AdapterFileError(f"{path}: LoKr modules whose shapes need different factors; peft takes one per file")
    return {"decompose_both": any(m.options.get("decompose_both") for m in modules),
            "decompose_factor": -1 if -1 in common else min(common)}


def check_fits(
    contents: AdapterContents, unet: torch.nn.Module, text_encoder: TextEncoders = None
) -> dict[str, dict[str, ModuleAdapter]]:
    """Check that every module ``contents`` adapts exists in the model, with fitting shapes; returns them resolved.
    Shapes are checked first, so a file for another layout is named by a module both have and both its shapes."""
    resolved, missing = resolve_names(contents, unet, text_encoder)
    note = _mismatch(contents, unet)
    check_shapes(contents.path, resolved["unet"], unet, "U-Net", note)
    for component, encoder in encoders_by_name(text_encoder).items():
        check_shapes(contents.path, resolved.get(component, {}), encoder, component.replace("_", "-"), note)
    if missing:
        raise AdapterFileError(f"{contents.path}: module {missing[0]} does not exist in this U-Net"
                               f"{note or ' (different base architecture?)'}")
    return resolved


def fitted_modules(
    path: str | Path, unet: torch.nn.Module, text_encoder: TextEncoders = None
) -> tuple[AdapterContents, dict[str, dict[str, ModuleAdapter]]]:
    """Read ``path`` and :func:`check_fits` it against the model."""
    contents = read_modules(path)
    return contents, check_fits(contents, unet, text_encoder)
