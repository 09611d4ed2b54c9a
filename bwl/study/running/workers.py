"""Training the study's adapters: one after another, or several at once in worker processes on CPU.

Each adapter's step lines go to ``train.log`` beside it (with ``loss.csv``); the console gets one line per adapter.
An adapter is claimed (:func:`bwl.core.locks.claim`) while it trains, so a second run that needs it waits and then
reuses it instead of training it again.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import redirect_stdout
from pathlib import Path

import torch

from bwl.core.locks import claim
from bwl.sd.pipeline import load_pipeline
from bwl.study.running.console import log, progress
from bwl.study.running.distributed import barrier, device, launched, leave_launch, rank_and_size, share
from bwl.train.config import TrainConfig
from bwl.train.loop import train
from bwl.train.losses import read_losses

Log = Callable[[str], None]


def train_one(config: TrainConfig) -> Path:
    """Train one adapter from its ``TrainConfig`` (resuming its checkpoints if a run was cut off); its step lines go
    to ``<output_dir>/train.log``."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.resume = any((out / "checkpoints").glob("*.safetensors"))
    with open(out / "train.log", "a", encoding="utf-8") as log_file, redirect_stdout(log_file):
        return train(config, pipe=load_pipeline(config.model))


def train_or_reuse(label: str, config: TrainConfig) -> bool:
    """Train one adapter unless another run made it while this one waited for its lock; True if trained here."""
    out = Path(config.output_dir)
    with claim(out, label, log):
        if (out / "adapter.safetensors").exists():
            return False
        train_one(config)
        return True


def _start_worker(threads: int, standalone: bool = False, gpu: int | None = None) -> None:
    _end_with_parent()
    torch.set_num_threads(threads)
    if standalone:
        leave_launch(gpu)


def _end_with_parent() -> None:
    """On Linux, have the kernel end this worker when the run that started it dies (killed, or its session ended),
    instead of training adapters for nobody beside the next run (``prctl(PR_SET_PDEATHSIG)``)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before the call above
        os._exit(1)


PR_SET_PDEATHSIG = 1


def _summary(label: str, config: TrainConfig, trained: bool = True) -> str:
    if not trained:
        return f"{label}: made by another run meanwhile, reused"
    losses = read_losses(Path(config.output_dir) / "loss.csv")
    final = f", final loss {losses[-1][1]:.4f}" if losses else ""
    return f"{label}: trained {config.method} on {config.blocks} for {config.steps} steps{final}"


def train_adapters(configs: Mapping[str, TrainConfig], workers: int = 1, log: Log = log) -> None:
    """Train these adapters (by the label logs give them): one after another, or ``workers`` at a time in spawned
    processes on CPU.

    Small models use two CPU threads poorly, so two one-thread processes train about 1.6x as many steps a second
    as one two-thread process (toy profile). A worker's exception is raised here, once, after the others are
    cancelled. Under ``accelerate launch`` each process trains its share (:func:`~bwl.study.running.distributed.share`),
    one at a time in a child process outside the launch, then waits for the others.
    """
    if launched():
        mine = dict(share(sorted(configs.items())))
        log(f"process {rank_and_size()[0]} of {rank_and_size()[1]}: training {len(mine)} of {len(configs)} adapters")
        with progress(len(mine), "training adapters") as bar:
            _train_in_workers(mine, 1, log, bar, standalone=True)
        barrier()
        return
    total = len(configs)
    with progress(total, "training adapters") as bar:
        if workers <= 1 or total <= 1 or torch.cuda.is_available():
            for i, (label, config) in enumerate(configs.items(), 1):
                started = time.time()
                trained = train_or_reuse(label, config)
                log(f"[{i}/{total}] {_summary(label, config, trained)} in {time.time() - started:.0f} s")
                bar.update()
        else:
            _train_in_workers(configs, workers, log, bar)


def _train_in_workers(configs: Mapping[str, TrainConfig], workers: int, log: Log, bar, standalone: bool = False
                      ) -> None:
    total = len(configs)
    threads = max(1, torch.get_num_threads() // workers)
    log(f"training {total} adapters, {workers} at a time ({threads} thread(s) each)")
    context = multiprocessing.get_context("spawn")
    done, started = 0, time.time()
    gpu = device().index if standalone and device().type == "cuda" else None
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(threads, standalone, gpu)) as pool:
        running = {pool.submit(train_or_reuse, key, config): key for key, config in configs.items()}
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                error = future.exception()
                if error is not None:
                    for waiting in running:
                        waiting.cancel()
                    raise error
                key = running.pop(future)
                done += 1
                trained = future.result()
                since = time.time() - started
                log(f"[{done}/{total}] {_summary(key, configs[key], trained)} ({since:.0f} s since start)")
                bar.update()
