"""Grid generation: images/s batched across prompts and seeds vs one image at a time (the same images, since every
image has its own seeded generator; the table shows the largest pixel difference), and the cost of switching the
adapter set without reloading the model.

    python benchmarks/bench_generate.py

Writes benchmarks/results/generate-<cpu|cuda>.csv and .md.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_model, synchronize, write_table

from bwl.adapters.compose import load_adapters, set_block_weights
from bwl.adapters.files import save_adapter
from bwl.adapters.spec import AdapterSpec, add_adapter
from bwl.sd.generate import generate

PROMPTS = ["sks, dog, red background", "sks, dog, blue background", "a photo of a cat", "qrv, painting, dog"]
SETTINGS = {  # device -> (model, size, dtype, seeds, steps, batch)
    "cpu": ("tiny", 64, torch.float32, 8, 25, 32),
    "cuda": ("full", 512, torch.float16, 4, 25, 16),
}


def adapter_files(model: str, folder: Path) -> dict[str, Path]:
    """Two random adapters (identity on all blocks, LoCon style on upper) saved as bwl files."""
    files = {}
    for name, spec in {"identity": AdapterSpec("lora", "all"), "style": AdapterSpec("locon", "upper")}.items():
        unet = load_model(model, torch.device("cpu"), torch.float32).unet
        add_adapter(unet, spec, name)
        for param_name, param in unet.named_parameters():
            if "lora_B" in param_name:
                param.data = torch.randn_like(param) * 0.05
        files[name] = save_adapter(unet, folder / f"{name}.safetensors", spec, name)
        del unet
    return files


def images_per_second(pipe, seeds: list[int], steps: int, batch: int, size: int) -> tuple[float, list]:
    synchronize(pipe.device)
    start = time.perf_counter()
    images = generate(pipe, PROMPTS, seeds, steps, batch_size=batch, size=size)
    synchronize(pipe.device)
    return len(images) / (time.perf_counter() - start), images


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, size, dtype, seed_count, steps, batch = SETTINGS[device.type]
    seeds = list(range(seed_count))
    pipe = load_model(model, device, dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        load_adapters(pipe, adapter_files(model, Path(tmp)))
        pipe.to(device, dtype)
        for label, adapters in {"base": {}, "identity + style on upper": {"identity": 1.0, "style": "upper"}}.items():
            start = time.perf_counter()
            set_block_weights(pipe, adapters)
            switch_ms = (time.perf_counter() - start) * 1000
            images_per_second(pipe, seeds[:1], 2, 1, size)  # warm-up
            batched, batched_images = images_per_second(pipe, seeds, steps, batch, size)
            single, single_images = images_per_second(pipe, seeds, steps, 1, size)
            difference = max(int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())
                             for a, b in zip(batched_images, single_images))
            rows.append({
                "adapters": label, "images": len(batched_images), f"batched ({batch}) img/s": f"{batched:.2f}",
                "one at a time img/s": f"{single:.2f}", "speedup": f"{batched / single:.2f}x",
                "max pixel difference": difference, "adapter switch ms": f"{switch_ms:.0f}",
            })
            print(" | ".join(f"{k}: {v}" for k, v in rows[-1].items()), flush=True)
    setting = f"{model} model, {size} px, {steps} DPM++ 2M Karras steps, CFG 7, {str(dtype).replace('torch.', '')}"
    csv_path, md_path = write_table(f"generate-{device.type}", rows, f"python benchmarks/bench_generate.py ({setting})")
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
