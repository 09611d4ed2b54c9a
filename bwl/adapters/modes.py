"""Combining two or more loaded adapters at inference, step by step: K-LoRA, LoRA Switch and LoRA Composite.

None of them can be one file: each decides, at every denoising step, which adapter acts where (K-LoRA, Switch) or
runs the U-Net once per adapter (Composite). Each is a controller used around a pipeline call::

    with KLoRA(pipe, "identity", "style").applied(steps) as extra:
        images = generate(pipe, prompts, seeds, steps, extra=extra)

``extra`` holds the keyword arguments the pipeline call needs (a ``callback_on_step_end`` that sets the next step's
adapters); leaving the block restores every adapter at weight 1.

- **K-LoRA** (Ouyang et al., CVPR 2025; HVision-NKU/K-LoRA ``klora.py``): in each layer both adapters hold, compare
  the sums of the ``k`` largest absolute entries of the two weight updates. The identity's sum is divided by
  ``gamma``, the mean over those layers of the ratio of the updates' absolute sums (identity over style); the
  style's is multiplied by ``alpha * t + beta``, which grows from ``beta`` to ``alpha + beta`` over the denoising
  steps. The larger wins the layer for that step. Defaults are the reference's: k 64, alpha 1.5, beta 0.5. The
  reference measures ``t`` by counting layer calls up to 28,000; bwl uses the sampler's own progress, step over
  steps, which is what that counter stands for.
- **LoRA Switch** (Zhong et al. 2024, "Multi-LoRA Composition"): one adapter at a time, the next every ``every``
  steps (the reference's default: 5), starting with the first.
- **LoRA Composite** (same paper): at every step the U-Net runs once per adapter, each alone, and the noise
  predictions are averaged. Classifier-free guidance is linear, so averaging the guided predictions (the paper's
  definition) equals guiding the averaged ones, which is what the pipeline then does.

All three act on U-Net layers; the text encoders keep every named adapter at weight 1, as in the plain merge.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer

from bwl.adapters.compose import set_block_weights
from bwl.adapters.methods import carries, is_adapter_layer
from bwl.sd.pipeline import Pipeline

KLORA_DEFAULTS = {"k": 64, "alpha": 1.5, "beta": 0.5}
SWITCH_EVERY = 5


def weight_update(layer: LoraLayer, name: str) -> torch.Tensor:
    """Adapter ``name``'s weight update in one LoRA layer, scaled, as a (out, in·kh·kw) matrix."""
    down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * layer.scaling[name]


def activate_in_unet(pipe: Pipeline, names: Sequence[str]) -> None:
    """Only adapters ``names`` act in the U-Net (each at the scale it was set to); the text encoders are untouched."""
    for module in pipe.unet.modules():
        if is_adapter_layer(module):
            module.set_adapter([n for n in names if carries(module, n)])


def _top_sum(update: torch.Tensor, k: int | None) -> float:
    values = update.abs().flatten()
    return float(values.sum() if k is None or k >= values.numel() else torch.topk(values, k).values.sum())


class _StepController:
    """Sets the adapters of each denoising step through the pipeline's ``callback_on_step_end``."""

    def __init__(self, pipe: Pipeline, names: Sequence[str]):
        self.pipe, self.names, self.steps = pipe, list(names), 1
        set_block_weights(pipe, dict.fromkeys(self.names, 1.0))  # loaded, on, at 1 (raises naming a missing one)

    def select(self, step: int) -> None:
        raise NotImplementedError

    def _callback(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        self.select((step_index + 1) % self.steps)  # the next step; after the last, step 0 of the next call
        return callback_kwargs

    @contextmanager
    def applied(self, steps: int) -> Iterator[dict]:
        """Within the block, pipeline calls of ``steps`` steps combine the adapters this way; ``yield``s the call's
        extra keyword arguments."""
        self.steps = steps
        self.select(0)
        try:
            yield {"callback_on_step_end": self._callback}
        finally:
            set_block_weights(self.pipe, dict.fromkeys(self.names, 1.0))


class KLoRA(_StepController):
    """K-LoRA between an identity and a style adapter (module docstring)."""

    def __init__(self, pipe: Pipeline, identity: str, style: str, k: int | None = KLORA_DEFAULTS["k"],
                 alpha: float = KLORA_DEFAULTS["alpha"], beta: float = KLORA_DEFAULTS["beta"]):
        super().__init__(pipe, [identity, style])
        self.identity, self.style, self.alpha, self.beta = identity, style, alpha, beta
        self.shared = {n: m for n, m in pipe.unet.named_modules()
                       if isinstance(m, LoraLayer) and carries(m, identity) and carries(m, style)
                       and identity in m.lora_A and style in m.lora_A}
        if not self.shared:
            raise ValueError(f"K-LoRA: no U-Net layer holds both {identity!r} and {style!r} as LoRA")
        with torch.no_grad():
            updates = {n: (weight_update(m, identity), weight_update(m, style)) for n, m in self.shared.items()}
            ratios = [float(a.abs().sum() / b.abs().sum()) for a, b in updates.values() if b.abs().sum() > 0]
            self.gamma = sum(ratios) / len(ratios) if ratios else float("inf")
            self.sums = {n: (_top_sum(a, k), _top_sum(b, k)) for n, (a, b) in updates.items()}

    def winner(self, layer: str, fraction: float) -> str:
        """The adapter that acts in ``layer`` at ``fraction`` of the denoising steps (0 at the first)."""
        identity_sum, style_sum = self.sums[layer]
        style_wins = identity_sum / self.gamma <= style_sum * (self.alpha * fraction + self.beta)
        return self.style if style_wins else self.identity

    def select(self, step: int) -> None:
        fraction = step / self.steps
        for name, module in self.shared.items():
            module.set_adapter([self.winner(name, fraction)])


class LoRASwitch(_StepController):
    """LoRA Switch: the adapters in turn, ``every`` steps each."""

    def __init__(self, pipe: Pipeline, names: Sequence[str], every: int = SWITCH_EVERY):
        super().__init__(pipe, names)
        if every < 1:
            raise ValueError(f"LoRA Switch: every={every}; the interval is at least one step")
        self.every = every

    def select(self, step: int) -> None:
        activate_in_unet(self.pipe, [self.names[(step // self.every) % len(self.names)]])


class LoRAComposite:
    """LoRA Composite: the U-Net's noise prediction averaged over the adapters, each alone."""

    def __init__(self, pipe: Pipeline, names: Sequence[str]):
        self.pipe, self.names = pipe, list(names)
        set_block_weights(pipe, dict.fromkeys(self.names, 1.0))

    @contextmanager
    def applied(self, steps: int | None = None) -> Iterator[dict]:
        """Within the block, every U-Net call averages over the adapters; ``yield``s no extra call arguments."""
        unet, names = self.pipe.unet, self.names
        forward = unet.forward

        def composite(*args, **kwargs):
            outputs = []
            for name in names:
                activate_in_unet(self.pipe, [name])
                outputs.append(forward(*args, **kwargs))
            mean = torch.stack([o.sample if hasattr(o, "sample") else o[0] for o in outputs]).mean(0)
            if kwargs.get("return_dict", True) and hasattr(outputs[0], "sample"):
                outputs[0].sample = mean
                return outputs[0]
            return (mean,)

        unet.forward = composite
        try:
            yield {}
        finally:
            del unet.forward
            set_block_weights(self.pipe, dict.fromkeys(names, 1.0))


MODES = ("k-lora", "switch", "composite")
"""The inference modes by name, as study cells and the command line give them."""


def combination_mode(pipe: Pipeline, mode: str, identity: str, style: str) -> KLoRA | LoRASwitch | LoRAComposite:
    """The controller of ``mode`` for an identity and a style adapter loaded in ``pipe`` (reference defaults)."""
    if mode == "k-lora":
        return KLoRA(pipe, identity, style)
    if mode == "switch":
        return LoRASwitch(pipe, [identity, style])
    if mode == "composite":
        return LoRAComposite(pipe, [identity, style])
    raise ValueError(f"unknown combination mode {mode!r}; valid: {', '.join(MODES)}")
