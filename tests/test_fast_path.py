"""The fast path's correctness: backward stays inside the trained blocks (no gradient work below them)."""

import pytest
import torch

from bwl.adapters.spec import AdapterSpec, add_adapter


def activations_requiring_grad(unet, checkpointing: bool) -> dict[str, bool]:
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    seen: dict[str, bool] = {}
    hooks = []
    for name in [
        "conv_in",
        "time_embedding",
        *[f"down_blocks.{i}" for i in range(4)],
        "mid_block",
        *[f"up_blocks.{i}" for i in range(4)],
        "conv_out",
    ]:
        module = unet.get_submodule(name)

        def record(_, __, output, name=name):
            out = output[0] if isinstance(output, tuple) else output
            seen[name] = bool(out.requires_grad)

        hooks.append(module.register_forward_hook(record))
    sample = torch.randn(1, 4, 8, 8)
    out = unet(sample, torch.tensor([10]), torch.randn(1, 77, 32)).sample
    out.mean().backward()
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("checkpointing", [False, True])
def test_only_out_blocks_trained_means_no_grad_below_them(pipe, checkpointing):
    add_adapter(pipe.unet, AdapterSpec("locon", "OUT2+OUT3", rank=2))
    seen = activations_requiring_grad(pipe.unet, checkpointing)
    below = [
        "conv_in",
        "time_embedding",
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "down_blocks.3",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
    ]
    assert not any(seen[n] for n in below), {n: seen[n] for n in below}
    assert seen["up_blocks.2"] and seen["up_blocks.3"] and seen["conv_out"]
    frozen = [n for n, p in pipe.unet.named_parameters() if p.grad is not None and ".lora_" not in n]
    assert not frozen
