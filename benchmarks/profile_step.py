"""Which part of bwl's fast path buys what: step time of one setting with each option switched, and the GPU
kernels that take the time. A tool for working on speed, not a result table (bench_train.py makes those).

    python benchmarks/profile_step.py                  # every variant below that fits the device
    python benchmarks/profile_step.py --only b8 --trace    # variants whose name contains "b8", and a kernel table
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import Row, model_flops, prepare
from common import PeakMemory, peak_tflops, size, time_steps

BEFORE = {"norms_in_compute_dtype": False}
RUN_ATTRIBUTES = ("keep_transformer_layout",)  # set on the TrainingRun, not its TrainConfig
VARIANTS = [
    # (name, row, TrainConfig overrides)
    ("b2 eager, norms fp32", Row("", "full", 512, 2, "cuda", "bf16", steps=20), BEFORE),
    ("b2 eager, norms bf16", Row("", "full", 512, 2, "cuda", "bf16", steps=20), {}),
    ("b2 fp16 checkpointing (T4)", Row("", "full", 512, 2, "cuda", "fp16", checkpointing=True, steps=20), {}),
    ("b8 eager, norms fp32", Row("", "full", 512, 8, "cuda", "bf16"), BEFORE),
    ("b8 eager, norms bf16", Row("", "full", 512, 8, "cuda", "bf16"), {}),
    (
        "b8 eager, transformer outputs copied to NCHW",
        Row("", "full", 512, 8, "cuda", "bf16"),
        {"keep_transformer_layout": False},
    ),
    ("b8 compile", Row("", "full", 512, 8, "cuda", "bf16", compile=True, warmup=3), {"compile_mode": "default"}),
    (
        "b2 compile reduce-overhead",
        Row("", "full", 512, 2, "cuda", "bf16", compile=True, warmup=3, steps=20),
        {"compile_mode": "reduce-overhead"},
    ),
    (
        "b8 compile reduce-overhead",
        Row("", "full", 512, 8, "cuda", "bf16", compile=True, warmup=3),
        {"compile_mode": "reduce-overhead"},
    ),
    (
        "b32 compile",
        Row("", "full", 512, 32, "cuda", "bf16", compile=True, warmup=3, steps=5),
        {"compile_mode": "default"},
    ),
    ("tiny b2 eager", Row("", "tiny", 64, 2, "cpu", steps=40, rounds=5, warmup=5), {}),
]


def measure(name: str, row: Row, overrides: dict, trace: bool, flops_cache: dict) -> dict:
    torch._dynamo.reset()
    with tempfile.TemporaryDirectory() as tmp:
        run = prepare(row, Path(tmp), **{k: v for k, v in overrides.items() if k not in RUN_ATTRIBUTES})
        for attribute, value in overrides.items():
            if attribute in RUN_ATTRIBUTES:
                setattr(run, attribute, value)
        for i in range(row.warmup):
            run.step(i)
        key = (row.model, row.resolution, row.batch_size)
        if key not in flops_cache and not row.compile:
            flops_cache[key] = model_flops(run)
        times = []
        with PeakMemory(run.device) as memory:
            for r in range(row.rounds):
                times.append(time_steps(run.step, 100 + r * row.steps, row.steps, run.device))
        seconds = statistics.median(times)
        flops, peak = flops_cache.get(key), peak_tflops()
        result = {
            "variant": name,
            "ms/step": f"{seconds * 1e3:.1f}",
            "steps/s": f"{1 / seconds:.2f}",
            "peak": size(memory.peak),
            "MFU": f"{flops / seconds / (peak * 1e12):.1%}" if flops and peak else "-",
        }
        if trace and run.device.type == "cuda":
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                time_steps(run.step, 1000, 3, run.device)
            print(
                prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70), flush=True
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=[], help="run the variants whose name contains one of these")
    parser.add_argument("--trace", action="store_true", help="print the top kernels of each variant (torch.profiler)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = [v for v in VARIANTS if v[1].device == device and (not args.only or any(s in v[0] for s in args.only))]
    results, flops_cache = [], {}
    for name, row, overrides in chosen:
        try:
            results.append(measure(name, row, overrides, args.trace, flops_cache))
        except (RuntimeError, torch.OutOfMemoryError) as error:
            results.append({"variant": name, "error": str(error).splitlines()[0][:160]})
        print(" | ".join(f"{k}: {v}" for k, v in results[-1].items()), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print("\n".join(" | ".join(str(v) for v in r.values()) for r in results))


if __name__ == "__main__":
    main()
