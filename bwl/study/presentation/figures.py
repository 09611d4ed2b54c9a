"""The study's figures: one labeled grid per paper figure, and the block sweep's heatmaps and Pareto plot.

Plots are drawn on ``matplotlib.figure.Figure`` objects (no pyplot state, no backend switch), so they save the
same from papermill, a terminal or JupyterLab, where the returned figure also displays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bwl.adapters.blocks import PAPER_BLOCKS
from bwl.core.atomic import atomic_path, finish_figure
from bwl.core.images import labeled_grid
from bwl.study.design.vocabulary import Concept, Metric
from bwl.study.experiments.sweep import SweepResult, pareto_front, read_sweep, run_sweep
from bwl.study.running.console import log
from bwl.study.running.study import Study
from bwl.study.running.workers import Log
from bwl.study.scoring.results import CellResult


def column_label(result: CellResult) -> str:
    """A figure column's label: the cell, then its identity and style fidelity (mean ± 95 % CI)."""
    def short(estimate) -> str:  # fits a 96 px column
        return f"{estimate.mean:.2f}±{estimate.ci:.2f}" if estimate.n else "–"

    return f"{result.cell}\nid {short(result[Metric.IDENTITY])}\nstyle {short(result[Metric.STYLE])}"


def make_figures(study: Study) -> list[Path]:
    """One labeled grid per paper figure: columns are cells, each labeled with its identity and style fidelity (mean
    ± 95 % CI), so the figure reads without the table; rows are (prompt, seed) pairs with a trigger."""
    p = study.profile
    by_grid: dict[str, list] = {}
    for row in study.results():
        by_grid.setdefault(row.grid, []).append(row)
    trigger_prompts = [i for i, prompt in enumerate(p.prompts) if p.identity_trigger in prompt] or [0]
    picks = [(i, s) for s in range(len(p.seeds)) for i in trigger_prompts][: p.figure_rows]
    labels = [f"{p.prompts[i].split(',')[-1].strip()} #{p.seeds[s]}" for i, s in picks]
    written = []
    for grid, rows in by_grid.items():
        columns = [study.cell_images(r.key) for r in rows]
        image_rows = [[column[i * len(p.seeds) + s] for column in columns] for i, s in picks]
        figure = labeled_grid(image_rows, labels, [column_label(r) for r in rows], scale=max(1, 96 // p.resolution))
        with atomic_path(p.figures / f"{grid}.png") as tmp:
            figure.save(tmp, format="PNG")
        written.append(p.figures / f"{grid}.png")
    return written


def sweep_figure(results: list[SweepResult], out: Path | None = None) -> Figure:
    """Two heatmaps (identity and style fidelity; diagonal = single block, off-diagonal = pair), each cell with its
    value, and the Pareto plot; saved to ``out`` when given."""
    blocks = [b for b in PAPER_BLOCKS if any(b in r.blocks for r in results)]  # 9 on SD 1.x, 7 on SDXL
    index = {b: i for i, b in enumerate(blocks)}
    fig = Figure(figsize=(16, 5))
    axes = fig.subplots(1, 3)
    for ax, metric in zip(axes[:2], ("identity", "style")):
        grid = np.full((len(blocks), len(blocks)), np.nan)
        for r in results:
            i, j = index[r.blocks[0]], index[r.blocks[-1]]
            grid[i, j] = grid[j, i] = getattr(r, metric).mean
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if value < 0.6 else "black")
        ax.set_xticks(range(len(blocks)), blocks, rotation=45)
        ax.set_yticks(range(len(blocks)), blocks)
        ax.set_title(f"{metric} fidelity (full ID + style on block / pair)")
        fig.colorbar(image, ax=ax, fraction=0.046)
    ax = axes[2]
    ax.scatter([r.identity.mean for r in results], [r.style.mean for r in results], s=14, color="gray")
    front = pareto_front(results)
    for r in front:
        ax.annotate(r.spec, (r.identity.mean, r.style.mean), fontsize=7)
    ax.scatter([r.identity.mean for r in front], [r.style.mean for r in front], color="crimson", s=20,
               label="Pareto front")
    ax.set_xlabel("identity fidelity")
    ax.set_ylabel("style fidelity")
    ax.legend()
    return finish_figure(fig, out)


def block_sweep(study: Study, log: Log = log) -> tuple[list[SweepResult], Path]:
    """Run the block sweep (preparing data, training and rendering what is missing) and draw its figure: (results,
    figure path).

    Notebook 06 and ``python -m bwl sweep`` both call this.
    """
    if not study.concept_dir(Concept.STYLE).is_dir():
        study.prepare_data()
    csv_path = run_sweep(study, log)
    results = read_sweep(csv_path)
    sweep_figure(results, csv_path.with_suffix(".png"))
    return results, csv_path.with_suffix(".png")
