"""The effective-block analyzer: what does each block of an adapter do? Switch one block off at a time, at inference.

lora-block-weight's analyzer answers this from one image and a pixel threshold. Here every block is switched off in
turn over the same prompts and seeds as the all-on reference, and each block's effect is the paired change it causes:
in each metric of the profile's family (off minus on, mean with a 95 % CI over the images) and in mean absolute pixel
difference (0-255, what lora-block-weight reports). A block in which the adapter has no weights is reported as such:
switching it off changes nothing, bit for bit, so there is nothing to measure.

The blocks are the U-Net's own (SD 1.x's nine, SDXL's seven), plus BASE where the adapter holds text-encoder weights.
:func:`analyze_file` does this for any adapter file and model, without a profile (``python -m bwl analyze``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from bwl.adapters.compose import load_adapters, set_block_weights
from bwl.adapters.files import has_adapter
from bwl.adapters.spec import parameters_per_block, unet_architecture
from bwl.core.atomic import finish_figure, write_json, write_text
from bwl.data.datasets import IMAGE_SUFFIXES, DatasetError, open_rgb, scan_images
from bwl.sd.encoders import DEFAULT_CLIP, DEFAULT_DINO, load_clip, load_dino
from bwl.sd.generate import generate
from bwl.sd.pipeline import Pipeline, load_pipeline, text_encoders
from bwl.study.design.vocabulary import METRICS, PROBE_METRICS, Metric
from bwl.study.running.console import progress
from bwl.study.scoring.metrics import Estimate, Scores, mean_ci
from bwl.study.scoring.reference import ReferenceScorer

Scorer = Callable[[Sequence[Image.Image], Sequence[str]], list[Scores]]


@dataclass(frozen=True)
class BlockEffect:
    """What switching one paper block of the target adapter off changes (``None`` effects: no weights there)."""

    block: str
    has_weights: bool
    pixel_difference: Estimate | None = None
    metric_changes: dict[Metric, Estimate] = field(default_factory=dict)

    def row(self, metrics: Sequence[Metric] = PROBE_METRICS) -> str:
        if not self.has_weights:
            return f"| {self.block} | no weights |" + " |" * len(metrics)
        changes = " | ".join(str(self.metric_changes.get(m, Estimate(np.nan, np.nan, 0))) for m in metrics)
        return f"| {self.block} | {self.pixel_difference} | {changes} |"


def weighted_blocks(pipe: Pipeline, name: str) -> set[str]:
    """The paper blocks (and BASE, for the text encoders) in which loaded adapter ``name`` holds weights."""
    blocks = {block for block, n in parameters_per_block(pipe.unet, name).items() if n}
    return blocks | ({"BASE"} if any(has_adapter(e, name) for e in text_encoders(pipe).values()) else set())


def block_off(adapters: Sequence[str], target: str, block: str) -> dict[str, dict[str, float]]:
    """Weights with every adapter fully on, except ``target`` at 0 on ``block``."""
    return {name: {block: 0.0} if name == target else {} for name in adapters}


def paired_changes(on: Sequence[Scores], off: Sequence[Scores]) -> dict[Metric, Estimate]:
    """Per metric, the mean and CI of off minus on over the images scored in both."""
    changes = {}
    for metric in METRICS:
        deltas = [b[metric.value] - a[metric.value] for a, b in zip(on, off) if metric.value in a and metric.value in b]
        if deltas:
            changes[metric] = mean_ci(deltas)
    return changes


def pixel_differences(on: Sequence[Image.Image], off: Sequence[Image.Image]) -> Estimate:
    """Mean absolute pixel difference per image pair (0-255), summarized over the pairs."""
    return mean_ci([float(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()) for a, b in zip(on, off)])


def block_effects(pipe: Pipeline, adapters: Mapping[str, str | Path], target: str,
                  prompts: Sequence[str], seeds: Sequence[int], steps: int = 25, guidance_scale: float = 7.0,
                  size: int | None = None, score: Scorer | None = None) -> list[BlockEffect]:
    """Each paper block's effect in adapter ``target`` (combined with the others in ``adapters``, all at 1.0)."""
    if target not in adapters:
        raise KeyError(f"target adapter {target!r} is not among {sorted(adapters)}")
    load_adapters(pipe, adapters)
    has = weighted_blocks(pipe, target)
    blocks = unet_architecture(pipe.unet).paper_blocks + (("BASE",) if "BASE" in has else ())
    job_prompts = [p for p in prompts for _ in seeds]

    def render(weights: Mapping[str, float | Mapping[str, float]]) -> tuple[list[Image.Image], list[Scores]]:
        set_block_weights(pipe, weights)
        images = generate(pipe, prompts, seeds, steps, guidance_scale, size=size)
        return images, (score(images, job_prompts) if score is not None else [{} for _ in images])

    on_images, on_scores = render(dict.fromkeys(adapters, 1.0))
    effects = []
    with progress(len(has), f"{target}: one block off at a time") as bar:
        for block in blocks:
            if block not in has:
                effects.append(BlockEffect(block, has_weights=False))
                continue
            off_images, off_scores = render(block_off(list(adapters), target, block))
            effects.append(BlockEffect(block, True, pixel_differences(on_images, off_images),
                                       paired_changes(on_scores, off_scores)))
            bar.update()
    return effects


def effects_markdown(effects: Sequence[BlockEffect], unscored: Sequence[Metric] = PROBE_METRICS) -> str:
    """The effects as a markdown table: pixel difference and each scored metric's change when the block is off
    (``unscored``: the columns shown when nothing was scored)."""
    shown = [m for m in METRICS if any(m in e.metric_changes for e in effects)] or list(unscored)
    header = "| block off | pixel difference (0-255) | " + " | ".join(f"Δ {m.value}" for m in shown) + " |"
    return "\n".join([header, "|---" * (2 + len(shown)) + "|", *(e.row(shown) for e in effects)]) + "\n"


def effects_figure(effects: Sequence[BlockEffect], title: str = "", out: Path | None = None) -> Figure:
    """Bar charts, one per measure, of each block's effect with its 95 % CI; blocks without weights say so. Saved
    to ``out`` (PNG) when given."""
    measures = ["pixel difference"] + [m.value for m in METRICS
                                       if any(m in e.metric_changes for e in effects)]
    fig = Figure(figsize=(4 * len(measures), 3.2))
    axes = np.atleast_1d(fig.subplots(1, len(measures)))
    x = np.arange(len(effects))
    for ax, measure in zip(axes, measures):
        values, errors = [], []
        for e in effects:
            estimate = e.pixel_difference if measure == "pixel difference" else e.metric_changes.get(Metric(measure))
            values.append(estimate.mean if estimate is not None else 0.0)
            errors.append(estimate.ci if estimate is not None and np.isfinite(estimate.ci) else 0.0)
        ax.bar(x, values, yerr=errors, color="steelblue", capsize=2)
        for i, e in enumerate(effects):
            if not e.has_weights:
                ax.text(i, 0, "no weights", rotation=90, ha="center", va="bottom", fontsize=7, color="gray")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xticks(x, [e.block for e in effects], rotation=45)
        ax.set_title(measure if measure == "pixel difference" else f"Δ {measure} (off − on)", fontsize=9)
    if title:
        fig.suptitle(title)
    return finish_figure(fig, out)


def effects_csv(effects: Sequence[BlockEffect]) -> str:
    """One row per block and measure: mean, 95 % CI half-width and image count (empty where no weights)."""
    rows = ["block,measure,mean,ci,n"]
    for e in effects:
        measures = {"pixel difference": e.pixel_difference, **{m.value: v for m, v in e.metric_changes.items()}}
        for measure, estimate in measures.items():
            if estimate is None:
                rows.append(f"{e.block},{measure},,,0")
            else:
                rows.append(f"{e.block},{measure},{estimate.mean:.6g},{estimate.ci:.6g},{estimate.n}")
    return "\n".join(rows) + "\n"


def analyze_file(path: str | Path, model: str | Path, prompts: Sequence[str], seeds: Sequence[int], out: str | Path,
                 steps: int = 25, guidance_scale: float = 7.0, score: Scorer | None = None,
                 record: Mapping | None = None) -> Path:
    """The block analyzer for any adapter file on any SD 1.x/2.x or SDXL model: each block switched off in turn over
    ``prompts`` x ``seeds``, written to ``out`` as ``block_effects.png``, ``.md`` and ``.csv``, with the settings in
    ``config.json`` (``record`` adds to them). Returns the markdown table's path."""
    out = Path(out)
    pipe = load_pipeline(model)
    effects = block_effects(pipe, {"target": Path(path)}, "target", prompts, seeds, steps, guidance_scale, score=score)
    arch = unet_architecture(pipe.unet)
    effects_figure(effects, f"{Path(path).name} on {arch.label}: one block off at a time", out / "block_effects.png")
    write_text(out / "block_effects.csv", effects_csv(effects))
    write_json(out / "config.json", {"file": str(path), "model": str(model), "architecture": arch.name,
                                     "prompts": list(prompts), "seeds": list(seeds), "steps": steps,
                                     "guidance_scale": guidance_scale, **(record or {})})
    return write_text(out / "block_effects.md", effects_markdown(effects, unscored=()))


def reference_scorer(references: str | Path, trigger: str, plain: str, clip_model: str | Path = DEFAULT_CLIP,
                     dino_model: str | Path = DEFAULT_DINO) -> Scorer:
    """The reference metrics against a folder of the adapter's training images, for prompts holding ``trigger``
    (``plain``: the words that replace it in the prompt-fidelity measure). Identity and style are both read against
    the same images: whichever the adapter learned, the block that carries it shows."""
    images, _ = scan_images(Path(references))
    if not images:
        raise DatasetError(f"{references}: no images to compare with (expected {', '.join(IMAGE_SUFFIXES)})")
    pictures = [open_rgb(p) for p in images]
    scorer = ReferenceScorer(load_clip(clip_model), load_dino(dino_model), pictures, pictures, {trigger: plain})
    return lambda generated, prompts: scorer(generated, prompts, [])
