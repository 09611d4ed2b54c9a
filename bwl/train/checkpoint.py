"""Training state in one safetensors file: tensors (weights, optimizer moments, RNG) + JSON metadata. No pickle."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bwl import __version__
from bwl.core.atomic import atomic_path


def save_state(path: str | Path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               scheduler, step: int, extra: dict[str, str] | None = None) -> None:
    """Write model tensors, optimizer, LR schedule, RNG states and step atomically to ``path``."""
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    optim_state = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for index, state in optim_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    py_state, np_state = random.getstate(), np.random.get_state()
    metadata = {
        "step": str(step),
        "bwl_version": __version__,
        "optimizer_param_groups": json.dumps(optim_state["param_groups"]),
        "optimizer_scalars": json.dumps(scalars),
        "lr_scheduler": json.dumps(scheduler.state_dict()),
        "rng_python": json.dumps([py_state[0], list(py_state[1]), py_state[2]]),
        "rng_numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_state(
    path: str | Path, optimizer: torch.optim.Optimizer, scheduler
) -> tuple[dict[str, torch.Tensor], int, dict[str, str]]:
    """Restore optimizer, schedule and RNG states from ``path``; returns (model tensors, step, metadata)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(path))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in json.loads(metadata["optimizer_scalars"]).items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["optimizer_param_groups"])})
    scheduler.load_state_dict(json.loads(metadata["lr_scheduler"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, keys, gauss = json.loads(metadata["rng_python"])
    random.setstate((version, tuple(keys), gauss))
    np_state = json.loads(metadata["rng_numpy"])
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return model, int(metadata["step"]), metadata


def latest(folder: str | Path, pattern: str = "checkpoint-*.safetensors") -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first (atomic writes mean every listed file is whole)."""
    return sorted(Path(folder).glob(pattern))
