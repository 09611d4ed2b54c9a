"""What each U-Net block computes during sampling: record its output at every denoising step, or replace it with an
output recorded in another run (activation patching). Works on any diffusers ``UNet2DConditionModel`` (SD 1.x/2.x,
SDXL); the blocks are named by the caller (``{"IN0": "down_blocks.0", …}``, an architecture's ``prefixes``).

A block's output is what the U-Net receives from it: a down block's hidden states *and* its skip connections (the
up blocks read them), the mid and up blocks' hidden states. Steps are counted by U-Net calls: the pipelines batch
classifier-free guidance into one call per denoising step, so call ``i`` of a ``steps``-step generation is step
``i % steps``. Recorded batches keep the pipeline's order (unconditional half first under guidance).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

BlockOutput = torch.Tensor | tuple


def _detached(output: BlockOutput) -> BlockOutput:
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    return tuple(_detached(o) for o in output)


def hidden_states(output: BlockOutput) -> torch.Tensor:
    """A block's hidden states (a down block's first output; its skip connections aside)."""
    return output if isinstance(output, torch.Tensor) else output[0]


@dataclass
class Recording:
    """Block outputs by (block, step), one entry per U-Net call at that step (several pipeline calls append)."""

    outputs: dict[tuple[str, int], list[BlockOutput]] = field(default_factory=dict)

    def pooled(self, block: str, step: int, half: str = "cond") -> torch.Tensor:
        """Spatially averaged hidden states, (images, channels), over every recorded call; ``half`` keeps the
        conditional (``"cond"``) or unconditional (``"uncond"``) half of guided batches, or ``"all"``."""
        rows = []
        for output in self.outputs[(block, step)]:
            states = hidden_states(output).float().mean(dim=(-2, -1))
            if half != "all":
                n = states.shape[0] // 2
                states = states[n:] if half == "cond" else states[:n]
            rows.append(states)
        return torch.cat(rows)

    def last(self, block: str, step: int) -> BlockOutput:
        return self.outputs[(block, step)][-1]


class _Counter:
    def __init__(self, steps: int):
        self.steps, self.calls = steps, -1

    def __call__(self, module, args, kwargs) -> None:
        self.calls += 1

    @property
    def step(self) -> int:
        return self.calls % self.steps


def _modules(unet: torch.nn.Module, blocks: Mapping[str, str]) -> dict[str, torch.nn.Module]:
    named = dict(unet.named_modules())
    missing = [f"{b} ({p})" for b, p in blocks.items() if p not in named]
    if missing:
        raise KeyError(f"the U-Net has no module for {', '.join(missing)}")
    return {b: named[p] for b, p in blocks.items()}


@contextmanager
def recording(unet: torch.nn.Module, blocks: Mapping[str, str], steps: int,
              at: set[int] | None = None) -> Iterator[Recording]:
    """Record ``blocks``' outputs at every step (or the steps in ``at``) of generations of ``steps`` steps."""
    counter, found = _Counter(steps), Recording()
    hooks = [unet.register_forward_pre_hook(counter, with_kwargs=True)]

    def keep(block: str):
        def hook(module, args, output):
            if at is None or counter.step in at:
                found.outputs.setdefault((block, counter.step), []).append(_detached(output))
        return hook

    hooks += [module.register_forward_hook(keep(block)) for block, module in _modules(unet, blocks).items()]
    try:
        yield found
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def patching(unet: torch.nn.Module, blocks: Mapping[str, str], steps: int,
             replacements: Mapping[tuple[str, int], BlockOutput]) -> Iterator[None]:
    """Within the block, each block's output at each step is replaced by ``replacements[(block, step)]`` where there
    is one (a recorded output of the same shape, from a run with the same batch); other outputs pass unchanged."""
    counter = _Counter(steps)
    hooks = [unet.register_forward_pre_hook(counter, with_kwargs=True)]

    def replace(block: str):
        def hook(module, args, output):
            new = replacements.get((block, counter.step))
            if new is None:
                return None
            if hidden_states(new).shape != hidden_states(output).shape:
                raise ValueError(f"patching {block} at step {counter.step}: recorded output "
                                 f"{tuple(hidden_states(new).shape)}, this run's {tuple(hidden_states(output).shape)}")
            return new
        return hook

    hooks += [module.register_forward_hook(replace(block)) for block, module in _modules(unet, blocks).items()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
