"""Which CPU kernels run the U-Net's convolutions: oneDNN, or PyTorch's native ones for tiny convolutions.

oneDNN is PyTorch's default CPU convolution and the faster one for real work, but each call has a fixed cost of
tens of microseconds. A U-Net whose convolutions are tiny spends most of its step in that cost: the test model
(8x8 latents, 32-64 channels, 0.2 M multiply-accumulates a call on average with its LoRA) takes 91 ms a training
step with oneDNN and 62 ms with the native kernels on 2 cores. For a single 3x3 convolution's forward and backward
oneDNN wins from about 20 M multiply-accumulates a call (2 threads). The toy model (16x16 latents, 48-96 channels,
5-8 M a call with its adapters) is a toss-up: oneDNN is 4-13 % faster with one thread, as its training workers
run, and native 4-7 % faster with two; ``auto`` keeps oneDNN there.

``auto`` measures the U-Net's mean work per convolution call at the training shape once, with one forward pass,
and picks the native kernels below :data:`NATIVE_BELOW_MACS`. The choice depends only on the model and the shape,
so a run and its resumption make the same one; ``train`` records it in the run's ``config.json``. :func:`kernels`
applies it to a block of work (a training step's forward and backward), so a model shared with another loop is
unchanged outside it. GPUs are not affected.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

NATIVE_BELOW_MACS = 2e6  # mean multiply-accumulates per convolution call
CHOICES = ("auto", "onednn", "native")


def mean_conv_work(unet: torch.nn.Module, latents: torch.Tensor, text: torch.Tensor, **conditioning) -> float:
    """Mean multiply-accumulates per ``Conv2d`` call in one forward pass of ``unet`` on these inputs
    (adapter convolutions included: each is a call too). Draws no random numbers."""
    work: list[int] = []

    def count(module: torch.nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        kernel = module.kernel_size[0] * module.kernel_size[1]
        work.append(output.numel() * module.in_channels // module.groups * kernel)

    hooks = [m.register_forward_hook(count) for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    timesteps = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            unet(latents, timesteps, text, **conditioning)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(work) / len(work) if work else float("inf")


def choose(setting: str, unet: torch.nn.Module, latents: torch.Tensor, text: torch.Tensor, **conditioning) -> str:
    """``onednn`` or ``native`` for ``setting`` (one of :data:`CHOICES`) on CPU inputs of the training shape
    (``conditioning``: SDXL's ``added_cond_kwargs``)."""
    if setting not in CHOICES:
        raise ValueError(f"cpu_convolutions={setting!r} is not one of {', '.join(CHOICES)}")
    if setting != "auto":
        return setting
    if not torch.backends.mkldnn.is_available():
        return "native"
    return "native" if mean_conv_work(unet, latents, text, **conditioning) < NATIVE_BELOW_MACS else "onednn"


@contextmanager
def kernels(choice: str) -> Iterator[None]:
    """Within this block, CPU convolutions use ``choice`` (``onednn`` or ``native``)."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = choice == "onednn"
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous
