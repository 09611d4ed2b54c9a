"""The short demo: train an identity adapter (all blocks) and a block-wise style adapter (upper) on the tiny
model, combine them, and write a labeled grid to ``figures/``. Random tiny weights draw noise, not pictures:
the demo shows the whole path runs, not what the paper found (the toy study does that)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from bwl.adapters.compose import load_adapters, set_block_weights
from bwl.core.atomic import atomic_path, write_json
from bwl.core.images import labeled_grid
from bwl.sd.pipeline import load_pipeline
from bwl.sd.tiny import build_tiny_pipeline
from bwl.train import TrainConfig, train


def shapes_dataset(
    folder: Path, caption: str, color: tuple[int, int, int], background: tuple[int, int, int], count: int = 6
) -> Path:
    """A few 64 px images of one shape with kohya captions, deterministic."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(caption))
    for i in range(count):
        img = Image.new("RGB", (64, 64), background)
        x, y, r = rng.integers(18, 46), rng.integers(18, 46), rng.integers(10, 16)
        ImageDraw.Draw(img).ellipse((x - r, y - r, x + r, y + r), fill=color)
        img.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption)
    return folder


def run_demo(out: str | Path = "figures/demo.png", steps: int = 60, work: str | Path = "runs/demo") -> Path:
    work, out = Path(work), Path(out)
    model = work / "tiny-sd"
    if not (model / "model_index.json").exists():
        build_tiny_pipeline(model)
    identity_data = shapes_dataset(work / "data" / "identity", "sks, circle, red", (220, 30, 30), (30, 30, 200))
    style_data = shapes_dataset(work / "data" / "style", "zxq style, circle", (250, 250, 250), (0, 0, 0))
    common = dict(model=str(model), resolution=64, steps=steps, batch_size=2, repeats=5, learning_rate=1e-3,
                  checkpoint_every=0, log_every=max(1, steps // 4))
    adapters = {}
    for name, data, method, blocks, trigger in (("identity", identity_data, "lora", "all", "sks"),
                                                ("style", style_data, "locon", "upper", "zxq")):
        run = work / name
        final = run / "adapter.safetensors"
        if not final.exists():
            train(
                TrainConfig(
                    output_dir=str(run), instance_dir=str(data), trigger=trigger, method=method, blocks=blocks, **common
                )
            )
        adapters[name] = final
    pipe = load_pipeline(model)
    load_adapters(pipe, adapters)
    columns = {
        "base": {},
        "identity": {"identity": 1.0},
        "style (upper)": {"style": 1.0},
        "id + style": {"identity": 1.0, "style": 1.0},
        "id + style OUT3 only": {"identity": 1.0, "style": "OUT3"},
    }
    prompt = "sks, circle, red, zxq style"
    rows = []
    for seed in range(3):
        row = []
        for weights in columns.values():
            set_block_weights(pipe, weights)
            row.append(
                pipe(
                    prompt, num_inference_steps=25, guidance_scale=7.0, generator=torch.Generator().manual_seed(seed)
                ).images[0]
            )
        rows.append(row)
    grid = labeled_grid(rows, [f"seed {s}" for s in range(3)], list(columns), scale=2)
    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    write_json(
        out.with_suffix(".json"),
        {"prompt": prompt, "columns": columns, "adapters": {k: str(v) for k, v in adapters.items()}, "steps": steps},
    )
    return out
