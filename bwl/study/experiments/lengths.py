"""The training-length study: is C1's "the upper-trained style loses style" a property of the blocks, or of an adapter
that has not trained long enough?

For each method (LoRA and LoCon), training seed and length, the style is trained on all blocks and on ``upper`` for
that many steps, and each is combined with the same method's full identity (trained as in the grids, with the same
seed). Both cells use the grids' prompts and seeds. The style gap at a length is upper minus all, per image (the two
cells share prompts and seeds), pooled over seeds and images by the hierarchical bootstrap
(:mod:`bwl.study.scoring.statistics`). ``python -m bwl lengths`` (profile ``lengths``) writes ``figures/lengths/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bwl.core.atomic import finish_figure, write_csv, write_text
from bwl.core.config import ConfigError
from bwl.study.design.profile import Profile
from bwl.study.design.vocabulary import (
    FULL_ID_FULL_STYLE,
    FULL_ID_UPPER_TRAINED_STYLE,
    Concept,
    Grid,
    Metric,
    adapters_of,
    cell,
    identity,
    style,
)
from bwl.study.running.console import log, progress
from bwl.study.running.distributed import barrier, is_main
from bwl.study.running.study import Study, train_missing
from bwl.study.running.workers import Log
from bwl.study.scoring.metrics import Estimate, mean_ci
from bwl.study.scoring.statistics import PooledEffect, hierarchical_bootstrap

CELLS = (FULL_ID_FULL_STYLE, FULL_ID_UPPER_TRAINED_STYLE)
SHOWN = (Metric.IDENTITY, Metric.STYLE)


def length_grid(method: str) -> Grid:
    """Full ID + the style trained on all blocks, and on ``upper``."""
    full_id = (identity(method), 1.0)
    return Grid(f"lengths-{method}", method, (
        cell(FULL_ID_FULL_STYLE, full_id, (style(method), 1.0)),
        cell(FULL_ID_UPPER_TRAINED_STYLE, full_id, (style(method, "upper"), 1.0)),
    ))


@dataclass(frozen=True)
class LengthCell:
    """One cell at one training length and seed: its per-image scores."""

    method: str
    steps: int
    seed: int
    cell: str
    scores: list[dict[str, float]]

    def values(self, metric: Metric) -> list[float]:
        return [s[metric.value] for s in self.scores if metric.value in s]

    def row(self) -> dict[str, str | int | float]:
        values: dict[str, str | int | float] = {"method": self.method, "steps": self.steps, "seed": self.seed,
                                                "cell": self.cell}
        for metric in SHOWN:
            estimate = mean_ci(self.values(metric))
            values |= {metric.value: estimate.mean, f"{metric.value}_ci": estimate.ci, f"{metric.value}_n": estimate.n}
        return values


def studies(profile: Profile) -> list[tuple[int, int, Study]]:
    """(steps, seed, study) for every length and seed; the studies share one scorer."""
    found, scorer = [], None
    for seed in profile.train_seeds:
        for steps in profile.train_lengths:
            study = Study(profile, seed, {Concept.STYLE: steps}, scorer)
            scorer = study.scorer()
            found.append((steps, seed, study))
    return found


def run_lengths(profile: Profile, log: Log = log) -> Path:
    """Train what is missing, render both cells per method, length and seed, and write ``<figures>/lengths/``."""
    if len(profile.train_lengths) < 2:
        raise ConfigError(f"profile {profile.name}: train_lengths={profile.train_lengths} needs two step counts or "
                          "more")
    if not profile.methods:
        raise ConfigError(f"profile {profile.name}: methods is empty; list the methods to train (e.g. [lora, locon])")
    grids = [length_grid(method) for method in profile.methods]
    if is_main() and not Study(profile).concept_dir(Concept.STYLE).is_dir():
        Study(profile).prepare_data()
    barrier()
    runs = studies(profile)
    train_missing([(study, key) for _, _, study in runs for key in adapters_of(grids)], profile.train_workers, log)
    cells: list[LengthCell] = []
    with progress(len(runs) * sum(len(g.cells) for g in grids), "length cells") as bar:
        for steps, seed, study in runs:
            renderer = study.renderer(adapters_of(grids))
            jobs = [(column, profile.prompts, profile.seeds) for grid in grids for column in grid.cells]
            rendered = renderer.render_many(jobs, bar.update)  # no reference columns: two cells answer the question
            for (column, _, _), grid, (key, _) in zip(jobs, [g for g in grids for _ in g.cells], rendered):
                cells.append(LengthCell(grid.method, steps, seed, column.label, study.cells.scores(key)))
    out = profile.figures / "lengths"
    if not is_main():
        return out / "lengths.csv"
    write_csv(out / "lengths.csv", [c.row() for c in cells])
    gaps = style_gaps(cells)
    identity_steps = runs[0][2].train_config(identity(profile.methods[0])).steps
    write_text(out / "lengths.md", lengths_markdown(cells, gaps, profile.train_seeds, identity_steps))
    lengths_figure(cells, gaps, out / "lengths.png")
    log(f"lengths: {len(cells)} cells; figures in {out}")
    return out / "lengths.csv"


def paired_gap(full: LengthCell, upper: LengthCell, metric: Metric) -> list[float]:
    """Per image scored in both: upper minus full (the cells share prompts and seeds, image for image)."""
    return [u[metric.value] - f[metric.value] for f, u in zip(full.scores, upper.scores, strict=True)
            if metric.value in f and metric.value in u]


def style_gaps(cells: list[LengthCell], metric: Metric = Metric.STYLE) -> dict[tuple[str, int], PooledEffect]:
    """Per method and length: upper minus all on ``metric``, pooled over seeds then images."""
    found = {}
    for method, steps in dict.fromkeys((c.method, c.steps) for c in cells):
        by_seed = {}
        for seed in dict.fromkeys(c.seed for c in cells if (c.method, c.steps) == (method, steps)):
            pair = {c.cell: c for c in cells if (c.method, c.steps, c.seed) == (method, steps, seed)}
            by_seed[seed] = paired_gap(pair[FULL_ID_FULL_STYLE], pair[FULL_ID_UPPER_TRAINED_STYLE], metric)
        found[(method, steps)] = hierarchical_bootstrap({method: by_seed})
    return found


def pooled(cells: list[LengthCell], method: str, steps: int, label: str, metric: Metric) -> Estimate:
    """Mean over seeds of the seeds' means, with a normal 95 % CI over seeds."""
    return mean_ci([float(np.mean(c.values(metric))) for c in cells
                    if (c.method, c.steps, c.cell) == (method, steps, label) and c.values(metric)])


def lengths_markdown(cells: list[LengthCell], gaps: dict[tuple[str, int], PooledEffect], seeds: list[int],
                     identity_steps: int) -> str:
    """Per method and length: each cell's identity and style (mean over seeds, CI over seeds), and the style gap."""
    lines = [f"Training seeds {seeds}; the identity trains {identity_steps} steps in "
             "every run. Cell values: mean over seeds of each seed's mean over its images, with a 95 % CI over seeds. "
             "Style gap: upper-trained minus all-blocks style, per image, pooled over seeds, then images, with a "
             "hierarchical bootstrap 95 % CI.", "",
             "| method | steps | all: identity | all: style | upper: identity | upper: style | "
             "style gap (upper - all) |",
             "|---|---|---|---|---|---|---|"]
    for (method, steps), gap in gaps.items():
        values = [pooled(cells, method, steps, label, metric) for label in CELLS for metric in SHOWN]
        lines.append(f"| {method} | {steps} | " + " | ".join(map(str, values)) + f" | {gap} |")
    return "\n".join(lines) + "\n"


def lengths_figure(cells: list[LengthCell], gaps: dict[tuple[str, int], PooledEffect], out: Path | None = None
                   ) -> Figure:
    """Per method: identity and style against training steps (log scale) for both cells, seeds as faint points and
    their mean with a 95 % CI over seeds; below, the style gap with its hierarchical-bootstrap CI."""
    methods = list(dict.fromkeys(c.method for c in cells))
    fig = Figure(figsize=(5 * len(methods), 7.5))
    axes = fig.subplots(2, len(methods), squeeze=False, sharex=True)
    for column, method in enumerate(methods):
        lengths = sorted({c.steps for c in cells if c.method == method})
        top, bottom = axes[0][column], axes[1][column]
        for i, label in enumerate(CELLS):
            for metric, line in zip(SHOWN, ("--", "-")):
                estimates = [pooled(cells, method, n, label, metric) for n in lengths]
                top.errorbar(lengths, [e.mean for e in estimates], yerr=[e.ci for e in estimates], fmt=line + "o",
                             color=f"C{i}", label=f"{label}: {metric.value}", capsize=3)
                seeds = [(c.steps, np.mean(c.values(metric))) for c in cells
                         if (c.method, c.cell) == (method, label) and c.values(metric)]
                top.scatter(*zip(*seeds), color=f"C{i}", alpha=0.25, s=12)
        top.set_title(method)
        top.set_ylim(-0.05, 1.05)
        top.set_ylabel("fidelity (probe)")
        top.legend(fontsize=7)
        effects = [gaps[(method, n)] for n in lengths]
        bottom.errorbar(lengths, [e.mean for e in effects], capsize=3, fmt="o-", color="C3",
                        yerr=[[e.mean - e.low for e in effects], [e.high - e.mean for e in effects]])
        bottom.axhline(0, color="gray", linewidth=0.8)
        bottom.set_xscale("log")
        bottom.set_xticks(lengths, [str(n) for n in lengths])
        bottom.set_xlabel("style adapter training steps")
        bottom.set_ylabel("style gap: upper - all")
    return finish_figure(fig, out)
