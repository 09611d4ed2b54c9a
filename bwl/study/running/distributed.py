"""Devices, and a run's work split across processes under ``accelerate launch`` (several GPUs, or several CPU
processes with the gloo backend: ``accelerate launch --multi_gpu --num_processes 2 -m bwl ...`` starts them on a
machine without a GPU too).

Each process takes every n-th item of a sorted work list (adapters to train, cells to render), so nothing is done
twice, and waits for the others before a stage that reads their results. Outside a launch, or with one process, all
of this is a no-op. An adapter trains in a child process that does not see the launch (a process-local
``Accelerator``), so no gradient is all-reduced between processes training different adapters.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

import torch
from accelerate import PartialState

Item = TypeVar("Item")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                    "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def launched() -> bool:
    """Whether this process is one of several started by ``accelerate launch`` (or torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _state() -> PartialState:
    """accelerate's process state; on a machine without a GPU, several CPU processes (gloo)."""
    return PartialState(cpu=not torch.cuda.is_available())


def rank_and_size() -> tuple[int, int]:
    """This process's index and the number of processes (0 and 1 outside a launch)."""
    if not launched():
        return 0, 1
    state = _state()
    return state.process_index, state.num_processes


def share(items: Sequence[Item]) -> list[Item]:
    """This process's share of ``items``: every n-th, starting at its index (all of them outside a launch)."""
    rank, size = rank_and_size()
    return list(items)[rank::size]


def barrier() -> None:
    """Wait until every process gets here (nothing outside a launch)."""
    if launched():
        _state().wait_for_everyone()


def is_main() -> bool:
    return rank_and_size()[0] == 0


def device() -> torch.device:
    """Where this process generates: its own GPU under a launch, the GPU where there is one, else the CPU."""
    if launched():
        return _state().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def leave_launch(gpu: int | None = None) -> None:
    """Make this (child) process a standalone one: forget the launch, and see only the parent's GPU, if any."""
    for name in LAUNCH_VARIABLES:
        os.environ.pop(name, None)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
