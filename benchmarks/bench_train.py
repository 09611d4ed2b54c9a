"""bwl's training step vs the DreamBooth-LoRA reference step, alternating in one process on the same model, data,
batch and resolution. Prints steps/s, peak memory, their ratio and (on GPU) model-FLOPs utilization.

    python benchmarks/bench_train.py            # CPU rows always; GPU rows too where CUDA is available
    python benchmarks/bench_train.py --only tiny    # or --device cuda: the GPU rows alone
    python benchmarks/bench_train.py --setting b16  # the rows whose setting names "b16"

Writes benchmarks/results/train-<cpu|cuda>.csv and .md after every row, so a run cut short keeps what it measured
(train-<cpu|cuda>-selected.* when --only or --setting picked a subset).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, PeakMemory, load_model, peak_tflops, size, time_steps, write_dataset, write_table
from reference import ReferenceStep

from bwl.train import TrainConfig, TrainingRun
from bwl.train.fast import cpu_convolutions


@dataclass
class Row:
    name: str
    model: str
    resolution: int
    batch_size: int
    device: str
    precision: str = "no"
    checkpointing: bool = False
    compile: bool = False  # TorchInductor; with CUDA graphs (mode reduce-overhead) on GPU
    reference_convolutions: str | None = (
        None  # CPU: run the reference with these kernels too (bwl.train.fast.cpu_convolutions)
    )
    steps: int = 10
    rounds: int = 3
    warmup: int = 2


CPU_ROWS = [
    Row("tiny 64px b2", "tiny", 64, 2, "cpu", steps=40, rounds=5, warmup=5),
    Row("tiny 64px b2 + compile", "tiny", 64, 2, "cpu", compile=True, steps=40, rounds=5, warmup=5),
    Row("tiny 64px b2, reference on native convolutions too", "tiny", 64, 2, "cpu", steps=40, rounds=5, warmup=5,
        reference_convolutions="native"),
    Row("full-size 256px (32x32 latent) b1", "full", 256, 1, "cpu", steps=2, rounds=2, warmup=1),
]
GPU_ROWS = [
    Row("full-size 512px b2 bf16", "full", 512, 2, "cuda", "bf16", steps=20),
    Row(
        "full-size 512px b2 fp16 + checkpointing (T4 settings)",
        "full",
        512,
        2,
        "cuda",
        "fp16",
        checkpointing=True,
        steps=20,
    ),
    Row(
        "full-size 512px b2 bf16 + compile (CUDA graphs)",
        "full",
        512,
        2,
        "cuda",
        "bf16",
        compile=True,
        steps=20,
        warmup=3,
    ),
    Row("full-size 512px b8 bf16", "full", 512, 8, "cuda", "bf16", steps=10),
    Row(
        "full-size 512px b16 bf16 + compile (CUDA graphs)",
        "full",
        512,
        16,
        "cuda",
        "bf16",
        compile=True,
        steps=10,
        warmup=3,
    ),
]


def prepare(row: Row, workdir: Path, **overrides) -> TrainingRun:
    device = torch.device(row.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(row.precision, torch.float32)
    values = dict(
        output_dir=str(workdir / "run"),
        model=row.model,
        instance_dir=str(write_dataset(workdir / f"data-{row.resolution}", row.resolution)),
        trigger="sks",
        repeats=1,
        method="lora",
        blocks="all",
        rank=4,
        resolution=row.resolution,
        batch_size=row.batch_size,
        steps=10_000,
        mixed_precision=row.precision,
        gradient_checkpointing=row.checkpointing,
        compile_unet=row.compile,
        compile_mode="reduce-overhead" if row.compile and row.device == "cuda" else "default",
    )
    return TrainingRun(TrainConfig(**{**values, **overrides}), load_model(row.model, device, dtype))


def with_kernels(step: Callable[[int], object], choice: str) -> Callable[[int], object]:
    def step_with_kernels(i: int) -> object:
        with cpu_convolutions.kernels(choice):
            return step(i)
    return step_with_kernels


def model_flops(run: TrainingRun) -> float:
    """FLOPs of one bwl step (forward and backward, no recomputation) through the uncompiled U-Net, counted by
    torch's flop counter."""
    compiled, run.forward_unet = run.forward_unet, run.unet
    try:
        with FlopCounterMode(display=False) as counter:
            run.step(0)
    finally:
        run.forward_unet = compiled
    return float(counter.get_total_flops())


def bench(row: Row, flops_cache: dict) -> dict:
    torch._dynamo.reset()  # each compiled setting starts from its own static shapes
    with tempfile.TemporaryDirectory() as tmp:
        run = prepare(row, Path(tmp))
        reference = ReferenceStep(run)
        if row.reference_convolutions:
            reference = with_kernels(reference, row.reference_convolutions)
        device = run.device
        warmup_peaks = []  # on GPU the peaks include warm-up: CUDA graphs take their memory pool while being recorded
        for step in (run.step, reference):
            with PeakMemory(device) as memory:
                for i in range(row.warmup):
                    step(i)
            warmup_peaks.append(memory.peak if device.type == "cuda" else 0)
        key = (row.model, row.resolution, row.batch_size)
        if key not in flops_cache and not row.checkpointing:
            flops_cache[key] = model_flops(run)
        fast, slow, (fast_peak, slow_peak) = [], [], warmup_peaks
        for r in range(row.rounds):
            with PeakMemory(device) as memory:
                fast.append(time_steps(run.step, 100 + r * row.steps, row.steps, device))
            fast_peak = max(fast_peak, memory.peak)
            with PeakMemory(device) as memory:
                slow.append(time_steps(reference, 100 + r * row.steps, row.steps, device))
            slow_peak = max(slow_peak, memory.peak)
        fast_s, slow_s = statistics.median(fast), statistics.median(slow)
        flops, peak = flops_cache.get(key), peak_tflops()
        mfu = f"{flops / fast_s / (peak * 1e12):.1%}" if flops and peak and device.type == "cuda" else "-"
        return {
            "setting": row.name,
            "trainable params": sum(p.numel() for p in run.trainable),
            "bwl steps/s": f"{1 / fast_s:.2f}",
            "reference steps/s": f"{1 / slow_s:.2f}",
            "speedup": f"{slow_s / fast_s:.2f}x",
            "bwl peak": size(fast_peak),
            "reference peak": size(slow_peak),
            "GFLOP/step": f"{flops / 1e9:.1f}" if flops else "-",
            "bwl MFU (bf16 peak)": mfu,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["tiny", "full"], help="run only the rows of this model")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="run only the rows of this device")
    parser.add_argument("--setting", help="run only the rows whose setting contains this text")
    args = parser.parse_args()
    rows = CPU_ROWS + (GPU_ROWS if torch.cuda.is_available() else [])
    rows = [r for r in rows if args.only in (None, r.model) and args.device in (None, r.device)
            and (args.setting or "") in r.name]
    command = "python benchmarks/bench_train.py" + "".join(
        f" --{k} {v!r}" if k == "setting" else f" --{k} {v}" for k, v in vars(args).items() if v
    )
    results, flops_cache = [], {}
    for row in rows:
        try:
            results.append(bench(row, flops_cache))
        except (RuntimeError, torch.OutOfMemoryError) as error:  # one failed setting still leaves the others' rows
            traceback.print_exc()
            results.append(
                {"setting": row.name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            )
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(" | ".join(f"{k}: {v}" for k, v in results[-1].items()), flush=True)
        chosen = [res for res, done in zip(results, rows) if done.device == row.device]
        name = f"train-{row.device}" + (
            "-selected" if args.only or args.setting else ""
        )  # a subset never replaces the full table
        write_table(name, chosen, command)  # after every row: a cut-off run keeps its rows
    print(f"wrote {RESULTS}/train-*.csv and .md")
    if not torch.cuda.is_available():
        print("GPU rows: not measured (no CUDA device)")


if __name__ == "__main__":
    main()
