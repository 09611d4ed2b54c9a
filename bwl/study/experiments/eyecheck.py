"""The eye-checked validation sheet: generated images from cells where the style appears in part, each labelled by
looking at it, and each instrument's accuracy against those labels.

Instruments read the held-out style (the checker) from an image: each probe and their mean (the probability of the
checker, read as present at 0.5 or more) and the transparent texture statistic (:mod:`bwl.toy.texture`, the
checker's coefficient fitted among the textures the study's model can draw, present at :data:`TEXTURE_THRESHOLD` or
more).

``python -m bwl eye-check --sample`` draws a sheet from the toy study's cells (``figures/eye-check/images.npz``,
``sheet-<n>.png`` and ``labels.csv``, whose ``label`` column is then filled in by eye); ``python -m bwl eye-check``
scores the instruments against the labels and writes ``eye-check.md``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bwl.core.atomic import atomic_path, write_csv, write_text
from bwl.core.config import ConfigError
from bwl.study.running.cells import CellStore
from bwl.toy.assets import INSTRUMENTS
from bwl.toy.probes import load_probe
from bwl.toy.texture import texture_energy
from bwl.toy.world import DRAWN_TEXTURES, HELD_OUT_STYLE, STYLE_TRIGGER

TEXTURE_THRESHOLD = 0.25  # a quarter of the head, fixed before the sheet was labelled
PROBE_THRESHOLD = 0.5
LABELS = ("checker", "none")
RULE = ("checker: inside the head, at least two white cells about 4 px across that touch only at their corners, "
        "i.e. the alternating white-and-colour arrangement of the checker, even if the rest of the head is flat or "
        "broken. none: no such arrangement; white stripes (whole rows), white blotches, holes that show the "
        "background, pale or outlined heads and noise do not count.")


def partial_cells(store: CellStore, low: float = 0.1, high: float = 0.9) -> list[str]:
    """Keys of the stored cells whose mean probe style lies in [low, high]: the style appears in part."""
    keys = []
    for folder in sorted(p for p in store.root.iterdir() if (p / "scores.json").exists()):
        styles = [s["style"] for s in json.loads((folder / "scores.json").read_text()) if "style" in s]
        if styles and low <= float(np.mean(styles)) <= high:
            keys.append(folder.name)
    return keys


def sample_sheet(store: CellStore, per_cell: int = 2, seed: int = 0) -> list[tuple[str, int, Image.Image]]:
    """``per_cell`` images with the style trigger from every partial cell, drawn with ``seed``: (cell, index,
    image)."""
    rng = np.random.default_rng(seed)
    picked = []
    for key in partial_cells(store):
        description = json.loads((store.folder(key) / "cell.json").read_text())
        prompts = [p for p in description["prompts"] for _ in description["seeds"]]
        styled = [i for i, p in enumerate(prompts) if STYLE_TRIGGER in p]
        images = store.images(key)
        for index in sorted(rng.choice(styled, size=min(per_cell, len(styled)), replace=False).tolist()):
            picked.append((key, index, images[index]))
    return picked


def contact_sheets(images: Sequence[Image.Image], out: Path, per_sheet: int = 24, columns: int = 6,
                   scale: int = 6) -> list[Path]:
    """Numbered sheets of the images, enlarged ``scale`` times with nearest-neighbour pixels, for labelling by eye."""
    paths = []
    size = images[0].size[0] * scale
    for start in range(0, len(images), per_sheet):
        chunk = images[start:start + per_sheet]
        rows = -(-len(chunk) // columns)
        sheet = Image.new("RGB", (columns * (size + 4), rows * (size + 4)), (40, 40, 40))
        for i, image in enumerate(chunk):
            x, y = (i % columns) * (size + 4), (i // columns) * (size + 4)
            sheet.paste(image.resize((size, size), Image.Resampling.NEAREST), (x, y))
            draw = ImageDraw.Draw(sheet)
            draw.rectangle((x, y, x + 26, y + 14), fill=(0, 0, 0))
            draw.text((x + 2, y + 2), str(start + i), fill=(255, 255, 0))
        path = out / f"sheet-{start // per_sheet + 1}.png"
        with atomic_path(path) as tmp:
            sheet.save(tmp, format="png")
        paths.append(path)
    return paths


def readings(images: Sequence[Image.Image]) -> dict[str, list[float]]:
    """Each instrument's reading of the checker per image: each probe's probability, the probes' mean (what the
    metrics report) and the texture statistic."""
    found = {}
    for instrument in INSTRUMENTS:
        probe = load_probe(instrument.path)
        index = probe.attributes["style"].index(HELD_OUT_STYLE)
        found[instrument.name] = probe.probabilities(images)["style"][:, index].tolist()
    found["probes (mean)"] = np.mean([found[i.name] for i in INSTRUMENTS], axis=0).tolist()
    found["texture"] = [texture_energy(image, HELD_OUT_STYLE, DRAWN_TEXTURES) for image in images]
    return found


def threshold(instrument: str) -> float:
    return TEXTURE_THRESHOLD if instrument == "texture" else PROBE_THRESHOLD


def write_sample(store: CellStore, out: Path, per_cell: int = 2, seed: int = 0) -> Path:
    """Draw the sheet and write its images, contact sheets and a labels file with an empty ``label`` column."""
    picked = sample_sheet(store, per_cell, seed)
    images = [image for _, _, image in picked]
    buffer = out / "images.npz"
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(buffer) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, images=np.stack([np.asarray(im) for im in images]))
    contact_sheets(images, out)
    write_csv(out / "labels.csv", [{"image": i, "cell": key, "index": index, "label": ""}
                                   for i, (key, index, _) in enumerate(picked)])
    return out / "labels.csv"


def load_sheet(out: Path) -> tuple[list[Image.Image], list[dict[str, str]]]:
    """The sheet's images and its labels, checked: every image labelled with one of :data:`LABELS`."""
    with np.load(out / "images.npz") as data:
        images = [Image.fromarray(a) for a in data["images"]]
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    bad = [r["image"] for r in rows if r["label"] not in LABELS]
    if len(rows) != len(images) or bad:
        raise ConfigError(f"{out / 'labels.csv'}: {len(rows)} rows for {len(images)} images; rows without a label in "
                         f"{LABELS}: {bad[:10]}")
    return images, rows


def accuracy(labels: Sequence[str], values: Sequence[float], threshold: float) -> dict[str, float]:
    """Accuracy, sensitivity and specificity of ``value >= threshold`` as "checker" against the labels."""
    truth = np.array([label == "checker" for label in labels])
    said = np.asarray(values) >= threshold
    return {"accuracy": float(np.mean(truth == said)),
            "sensitivity": float(np.mean(said[truth])) if truth.any() else float("nan"),
            "specificity": float(np.mean(~said[~truth])) if (~truth).any() else float("nan")}


def evaluate(out: Path) -> str:
    """Each instrument's agreement with the labels, as markdown, written to ``eye-check.md``."""
    images, rows = load_sheet(out)
    labels = [r["label"] for r in rows]
    found = readings(images)
    lines = [f"{len(images)} images, {labels.count('checker')} labelled checker, {labels.count('none')} none. "
             f"Labelling rule: {RULE}", "",
             "| instrument | reads checker when | accuracy | sensitivity | specificity |", "|---|---|---|---|---|"]
    for name, values in found.items():
        result = accuracy(labels, values, threshold(name))
        lines.append(f"| {name} | ≥ {threshold(name)} | {result['accuracy']:.2f} | {result['sensitivity']:.2f} | "
                     f"{result['specificity']:.2f} |")
    wrong = {name: [r["image"] for r, v in zip(rows, values) if (v >= threshold(name)) != (r["label"] == "checker")]
             for name, values in found.items()}
    lines += ["", *[f"- {name} disagrees with the eye on images {', '.join(ids) or 'none'}" for name, ids in
                    wrong.items()], ""]
    text = "\n".join(lines)
    write_text(out / "eye-check.md", text)
    return text
