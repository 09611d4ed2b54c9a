"""The efficiency table the paper claims but never measured: bwl's training step time, peak memory and trainable
parameters for each method (LoRA, LoCon, LoHa, LoKr, DoRA, OFT) and block selection.

    python benchmarks/bench_blocks.py                # tiny model on CPU; full-size 512 px b2 bf16 with CUDA
    python benchmarks/bench_blocks.py --model toy    # the shipped micro SD at 32 px (the toy study's setting)
    python benchmarks/bench_blocks.py --model full   # full-size architecture (32x32 latent on CPU)
    python benchmarks/bench_blocks.py --model xl-tiny   # a tiny SDXL at 64 px (SDXL's blocks and selections)
    python benchmarks/bench_blocks.py --model xl-full   # SDXL base's architecture at 1024 px b2 bf16 (a GPU)
    python benchmarks/bench_blocks.py --methods lora locon   # only these methods (labels, as in profiles)

Writes benchmarks/results/blocks-<cpu|cuda>[-<model>].csv and .md (the README shows them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, gib, load_model, time_steps, write_dataset, write_table

from bwl.adapters.blocks import BlockSpecError
from bwl.adapters.methods import parse_method_label
from bwl.train import TrainConfig, TrainingRun

SELECTIONS = {
    "all": "all", "upper (IN0+OUT3)": "upper", "middle (IN1+OUT2)": "middle", "bottom (IN2+OUT1)": "bottom",
    "OUT only": "OUT0+OUT1+OUT2+OUT3", "IN only": "IN0+IN1+IN2+IN3",
}
XL_SELECTIONS = {  # SDXL's groups by resolution level, and the sub-blocks B-LoRA and InstantStyle train
    "all": "all", "upper (IN0+OUT2)": "upper", "middle (IN1+OUT1)": "middle", "bottom (IN2+OUT0)": "bottom",
    "OUT only": "OUT0+OUT1+OUT2", "IN only": "IN0+IN1+IN2", "B-LoRA (OUT00+OUT01)": "OUT00+OUT01",
    "InstantStyle (OUT01)": "OUT01",
}
SETTINGS = {  # device -> (model, resolution, batch, precision, steps, rounds)
    "cpu": ("tiny", 64, 2, "no", 20, 3),
    "cuda": ("full", 512, 2, "bf16", 15, 3),
}
METHOD_LABELS = ("lora", "locon", "loha", "lokr", "locon-dora", "oft")


def measure(model: str, resolution: int, batch: int, precision: str, steps: int, rounds: int, device: torch.device,
            method: str, blocks: str, workdir: Path) -> dict:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    name, dora = parse_method_label(method)
    config = TrainConfig(output_dir=str(workdir / "run"), model=model, repeats=1, method=name, dora=dora,
                         blocks=blocks, rank=4,
                         instance_dir=str(write_dataset(workdir / "data", resolution)), resolution=resolution,
                         batch_size=batch, steps=10_000, mixed_precision=precision)
    run = TrainingRun(config, load_model(model, device, dtype))
    for i in range(2):
        run.step(i)
    times, peak = [], 0
    for r in range(rounds):
        with PeakMemory(device) as memory:
            times.append(time_steps(run.step, 10 + r * steps, steps, device))
        peak = max(peak, memory.peak)
    return {"seconds": statistics.median(times), "peak": peak, "params": sum(p.numel() for p in run.trainable)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "toy", "full", "xl-tiny", "xl-full"],
                        help="override the device's default model")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_LABELS), help="method labels to measure")
    parser.add_argument("--steps", type=int, help="timed steps per round (default: the device's setting)")
    parser.add_argument("--rounds", type=int, help="timed rounds; the median is reported")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, resolution, batch, precision, steps, rounds = SETTINGS[device.type]
    if args.model == "full" and device.type == "cpu":
        model, resolution, batch, steps, rounds = "full", 256, 1, 2, 1
    elif args.model == "xl-full":
        model, resolution = "xl-full", 1024 if device.type == "cuda" else 256
        batch, steps, rounds = (2, steps, rounds) if device.type == "cuda" else (1, 2, 1)
    elif args.model == "xl-tiny":
        model, resolution = "xl-tiny", 64
    elif args.model == "toy":
        model, resolution, batch = "toy", 32, 8  # the toy study's training setting
    elif args.model:
        model = args.model
    steps, rounds = args.steps or steps, args.rounds or rounds
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            baseline = None
            for label, blocks in (XL_SELECTIONS if model.startswith("xl") else SELECTIONS).items():
                try:
                    m = measure(model, resolution, batch, precision, steps, rounds, device, method, blocks, Path(tmp))
                except BlockSpecError as refused:  # plain LoRA on blocks without attention trains nothing
                    rows.append({"method": method, "blocks": label, "trainable params": "0",
                                 "step ms": "refused: " + str(refused).split(";")[0].split(" in ", 1)[-1],
                                 "step vs all": "", "peak GiB" if device.type == "cuda" else "peak RSS growth GiB": ""})
                    print(" | ".join(f"{k}: {v}" for k, v in rows[-1].items()), flush=True)
                    continue
                baseline = baseline or m
                rows.append({
                    "method": method, "blocks": label, "trainable params": f"{m['params']:,}",
                    "step ms": f"{m['seconds'] * 1000:.1f}", "step vs all": f"{m['seconds'] / baseline['seconds']:.2f}",
                    "peak GiB" if device.type == "cuda" else "peak RSS growth GiB": gib(m["peak"]),
                })
                print(" | ".join(f"{k}: {v}" for k, v in rows[-1].items()), flush=True)
    setting = f"{model} model, {resolution} px, batch {batch}, precision {precision}"
    command = "python benchmarks/bench_blocks.py" + (f" --model {args.model}" if args.model else "") + f" ({setting})"
    if args.methods != list(METHOD_LABELS):
        command += " --methods " + " ".join(args.methods)
    if args.steps or args.rounds:
        command += f" --steps {steps} --rounds {rounds}"
    name = f"blocks-{device.type}" + (f"-{model}" if model != SETTINGS[device.type][0] else "")
    csv_path, md_path = write_table(name, rows, command)
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
