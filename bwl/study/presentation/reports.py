"""What the notebooks show at each stage, as plain text and plots: the captions, the adapters to train and where
their parameters are, the loss curves, and one cell's images with their scores."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from PIL import Image

from bwl.adapters.architectures import architecture_of
from bwl.adapters.report import inspect_adapter
from bwl.adapters.spec import unet_architecture
from bwl.core.images import labeled_grid
from bwl.data.captions import tag_frequency
from bwl.sd.pipeline import load_pipeline, unet_config
from bwl.study.design.vocabulary import DATA_CONCEPTS, METRICS
from bwl.study.running.study import Study
from bwl.train.losses import plot_loss_curve


def caption_summary(study: Study, top: int = 12) -> str:
    """Per concept: image count, one example caption and the most frequent tags (kohya's ss_tag_frequency)."""
    lines = []
    for concept in DATA_CONCEPTS:
        folder = study.concept_dir(concept)
        captions = sorted(folder.glob("*.txt"))
        example = captions[0].read_text(encoding="utf-8").strip() if captions else "(none)"
        frequency = tag_frequency([folder])[folder.name]
        tags = ", ".join(f"{t} ({n})" for t, n in list(frequency.items())[:top])
        lines += [f"{concept.value}: {len(captions)} captioned images", f"  example: {example}", f"  tags: {tags}"]
    return "\n".join(lines)


def training_plan(study: Study) -> str:
    """The adapters the grids need: concept, method, blocks, trainable parameters, run key, and whether trained."""
    unet = load_pipeline(study.model).unet
    lines = [f"{'adapter':<20} {'concept':<8} {'method':<6} {'blocks':<7} {'trainable':>9}  {'run':<28} status"]
    for key in study.needed_adapters():
        config = study.train_config(key)
        params = config.adapter_spec(unet_architecture(unet)).parameter_count(unet)
        folder = Path(config.output_dir)
        status = "trained" if (folder / "adapter.safetensors").exists() else "to train"
        lines.append(f"{key!s:<20} {key.concept.value:<8} {key.label:<6} {key.blocks:<7} {params:>9,}  "
                     f"{folder.name:<28} {status}")
    return "\n".join(lines)


def adapter_table(study: Study) -> str:
    """Every trained adapter: method, blocks, and adapter parameters per paper block (read from its file, in the
    blocks of the model's layout)."""
    blocks = architecture_of(unet_config(study.model)).paper_blocks
    header = f"{'adapter':<20} {'method':<6} {'blocks':<7} " + " ".join(f"{b:>6}" for b in blocks) + f" {'total':>8}"
    lines = [header]
    for key, path in study.adapter_files().items():
        report = inspect_adapter(path)
        counts = " ".join(f"{report.parameters.get(b, 0):>6}" for b in blocks)
        lines.append(f"{key!s:<20} {report.method:<6} {report.blocks:<7} {counts} {sum(report.parameters.values()):>8}")
    return "\n".join(lines)


def plot_losses(study: Study):
    """All adapters' loss curves on one axes."""
    _, ax = plt.subplots(figsize=(7, 3.5))
    for key, path in study.adapter_files().items():
        plot_loss_curve(path.parent / "loss.csv", ax=ax, label=str(key))
    ax.legend(fontsize=7, ncol=2)
    return ax


def cell_preview(study: Study, grid: str, cell: str, count: int = 8) -> tuple[Image.Image, str]:
    """The first ``count`` images of one grid column, each labeled with its prompt's last tag and seed, and a table of
    their scores (what the results table averages)."""
    p = study.profile
    row = next(r for r in study.results() if (r.grid, r.cell) == (grid, cell))
    images, scores = study.cells.images(row.key)[:count], study.cells.scores(row.key)[:count]
    jobs = [(prompt, seed) for prompt in p.prompts for seed in p.seeds][:count]
    labels = [f"{prompt.split(',')[-1].strip()} #{seed}" for prompt, seed in jobs]
    sheet = labeled_grid([images], [""], labels, scale=max(1, 96 // p.resolution))
    header = "| image | " + " | ".join(m.value for m in METRICS) + " |"
    lines = [header, "|" + "---|" * (1 + len(METRICS))]
    for label, score in zip(labels, scores):
        lines.append(
            f"| {label} | " + " | ".join(f"{score[m.value]:.2f}" if m.value in score else "–" for m in METRICS) + " |"
        )
    return sheet, "\n".join(lines)
