"""The methods study: does block-wise training carry over from LoRA/LoCon to LoHa, LoKr, DoRA and OFT?

For each method, the style adapter is trained on all blocks, on ``upper``, ``middle``, ``bottom`` and on the block
sweep's best single block, beside the same method's identity on all blocks (and on ``upper``, which C2 compares). One
grid per method holds the paper's cells for that method; C1-C3 are decided per method by the findings code
(:mod:`bwl.study.scoring.findings`), with the full-ID + upper-trained style cell standing for fig4a/fig4b's "full ID +
upper style" (the same two adapters). ``python -m bwl methods`` (profile ``methods``) writes ``figures/methods/``. """

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from bwl.adapters.blocks import PAPER_BLOCKS
from bwl.core.atomic import finish_figure, write_csv, write_text
from bwl.sd.pipeline import load_pipeline
from bwl.study.design.vocabulary import (
    BLOCKWISE_INFERENCE,
    FULL_ID_BOTTOM_STYLE,
    FULL_ID_FULL_STYLE,
    FULL_ID_MIDDLE_STYLE,
    FULL_ID_UPPER_TRAINED_STYLE,
    UPPER_ID_FULL_STYLE,
    UPPER_ID_UPPER_STYLE,
    Grid,
    Metric,
    adapters_of,
    cell,
    identity,
    style,
)
from bwl.study.experiments.sweep import read_sweep
from bwl.study.running.console import log, progress
from bwl.study.running.study import Study
from bwl.study.running.workers import Log
from bwl.study.scoring.findings import Claim, claim_verdict, compare, decidable, findings_markdown
from bwl.study.scoring.metrics import Estimate
from bwl.study.scoring.results import CellResult, write_results
from bwl.train.config import TrainConfig
from bwl.train.run import TrainingRun

SELECTIONS = ("all", "upper", "middle", "bottom")  # the style's blocks, before the sweep's best single block


def best_single_block(sweep_csv: Path, key: str = "methods_block") -> str:
    """The single paper block whose style scores the highest identity + style fidelity in the block sweep (``key``:
    the profile key that names a block instead, for the error)."""
    if not sweep_csv.exists():
        raise FileNotFoundError(f"{sweep_csv}: no block sweep; run `python -m bwl sweep` first, or set {key}")
    singles = [r for r in read_sweep(sweep_csv) if r.spec in PAPER_BLOCKS]  # any layout's single blocks
    return max(singles, key=lambda r: r.identity.mean + r.style.mean).spec


def best_block_label(block: str) -> str:
    return f"full ID + {block} style"


def method_grid(method: str, block: str) -> Grid:
    """The paper's cells for one method (a label such as ``locon-dora``), plus the style on the single ``block``."""
    full_id, upper_id = (identity(method), 1.0), (identity(method, "upper"), 1.0)
    return Grid(f"methods-{method}", method, (
        cell(FULL_ID_FULL_STYLE, full_id, (style(method), 1.0)),
        cell(BLOCKWISE_INFERENCE, full_id, (style(method), "upper")),
        cell(FULL_ID_UPPER_TRAINED_STYLE, full_id, (style(method, "upper"), 1.0)),
        cell(UPPER_ID_FULL_STYLE, upper_id, (style(method), 1.0)),
        cell(UPPER_ID_UPPER_STYLE, upper_id, (style(method, "upper"), 1.0)),
        cell(FULL_ID_MIDDLE_STYLE, full_id, (style(method, "middle"), 1.0)),
        cell(FULL_ID_BOTTOM_STYLE, full_id, (style(method, "bottom"), 1.0)),
        cell(best_block_label(block), full_id, (style(method, block), 1.0)),
    ))


def method_claims(grid: str) -> tuple[Claim, ...]:
    """C1-C3 on one method's grid: the paper's comparisons, cell for cell."""
    upper = FULL_ID_UPPER_TRAINED_STYLE
    return (
        Claim("C1", "full ID + block-wise style beats plain combination and block-wise inference",
              ((grid, upper, FULL_ID_FULL_STYLE), (grid, upper, BLOCKWISE_INFERENCE))),
        Claim("C2", "full ID + block-wise style beats block-wise-ID combinations",
              ((grid, upper, UPPER_ID_FULL_STYLE), (grid, upper, UPPER_ID_UPPER_STYLE))),
        Claim("C3", "style trained on upper > middle > bottom",
              ((grid, upper, FULL_ID_MIDDLE_STYLE), (grid, FULL_ID_MIDDLE_STYLE, FULL_ID_BOTTOM_STYLE))),
    )


@dataclass(frozen=True)
class MethodRow:
    """One method's style adapter on one block selection, beside the method's full identity."""

    method: str
    blocks: str
    identity: Estimate
    style: Estimate
    preservation: Estimate
    parameters: int  # the style adapter's trainable parameters
    step_seconds: float  # median seconds per training step of the style adapter, measured in this process

    def row(self) -> dict[str, str | float | int]:
        values: dict[str, str | float | int] = {"method": self.method, "style_blocks": self.blocks}
        for name in ("identity", "style", "preservation"):
            estimate = getattr(self, name)
            values |= {name: estimate.mean, f"{name}_ci": estimate.ci, f"{name}_n": estimate.n}
        return values | {"parameters": self.parameters, "step_seconds": self.step_seconds}


def step_seconds(config: TrainConfig, steps: int = 6, warmup: int = 2) -> float:
    """The median seconds per training step of ``config``'s adapter, measured here, one adapter at a time (after
    ``warmup`` steps), so that every method is timed alike on this machine."""
    with tempfile.TemporaryDirectory() as tmp:
        run = TrainingRun(dataclasses.replace(config, output_dir=tmp))
        for step in range(warmup):
            run.step(step)
        times = []
        for step in range(warmup, warmup + steps):
            started = time.perf_counter()
            run.step(step)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_methods(study: Study, log: Log = log) -> Path:
    """Train what is missing, render every method's grid, and write results, findings, the methods table and figure
    to ``<figures>/methods/``."""
    p = study.profile
    block = p.methods_block or best_single_block(p.figures / "sweep.csv")
    grids = [method_grid(method, block) for method in p.methods]
    keys = adapters_of(grids)
    study.train_all(keys, log)
    results = []
    with progress(sum(len(g.columns()) for g in grids), "method cells") as bar:
        for grid in grids:  # a fresh pipeline per method: peft cannot stack some methods' layers on others'
            renderer = study.renderer(adapters_of([grid]), resident=[])
            for column in grid.columns():
                key, _ = renderer.render(column, p.prompts, p.seeds)
                results.append(CellResult(grid.name, column.label, key, renderer.store.summary(key),
                                          renderer.store.spreads(key)))
                bar.update()
            log(f"{grid.name}: {len(grid.columns())} cells")
    out = p.figures / "methods"
    write_results(out, results, p.to_dict())
    rows = method_rows(study, grids, results, block)
    write_csv(out / "methods.csv", [r.row() for r in rows])
    write_text(out / "methods.md", methods_markdown(rows, results, grids))
    methods_figure(rows, out / "methods.png")
    return out / "methods.csv"


def method_rows(study: Study, grids: list[Grid], results: list[CellResult], block: str) -> list[MethodRow]:
    """Per method and style selection: fidelity and preservation of full ID + that style, parameters, step time."""
    unet = load_pipeline(study.model).unet
    labels = {"all": FULL_ID_FULL_STYLE, "upper": FULL_ID_UPPER_TRAINED_STYLE, "middle": FULL_ID_MIDDLE_STYLE,
              "bottom": FULL_ID_BOTTOM_STYLE, block: best_block_label(block)}
    rows = []
    for grid in grids:
        for blocks, label in labels.items():
            found = next(r for r in results if (r.grid, r.cell) == (grid.name, label))
            key = style(grid.method, blocks)
            config = study.train_config(key)
            rows.append(MethodRow(grid.method, blocks, found[Metric.IDENTITY], found[Metric.STYLE],
                                  found[Metric.PRESERVATION], config.adapter_spec().parameter_count(unet),
                                  step_seconds(config)))
    return rows


def verdicts(results: list[CellResult], grid: Grid) -> dict[str, str]:
    """C1-C3's verdicts on one method's grid."""
    return {claim.name: claim_verdict([compare(results, *pair) for pair in claim.pairs])
            for claim in method_claims(grid.name)}


def methods_markdown(rows: list[MethodRow], results: list[CellResult], grids: list[Grid]) -> str:
    """The methods table (fidelity, preservation, parameters, step time) and each method's C1-C3 verdicts, then
    every method's findings tables."""
    lines = [f"Measured on {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads: s/step is the "
             "median of 6 training steps (after 2 warm-up steps) of each style adapter, timed one at a time.", "",
             "| method | style on | identity | style | preservation | parameters | s/step |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.method} | {r.blocks} | {r.identity} | {r.style} | {r.preservation} | {r.parameters:,} | "
              f"{r.step_seconds:.2f} |" for r in rows]
    lines += ["", "| method | C1 | C2 | C3 |", "|---|---|---|---|"]
    for grid in grids:
        if decidable(results, method_claims(grid.name)):
            v = verdicts(results, grid)
            lines.append(f"| {grid.method} | {v['C1']} | {v['C2']} | {v['C3']} |")
    for grid in grids:
        lines += ["", f"### {grid.method}", "", findings_markdown(results, method_claims(grid.name))]
    return "\n".join(lines) + "\n"


def methods_figure(rows: list[MethodRow], out: Path | None = None) -> Figure:
    """Left: identity against style fidelity (95 % CIs) of full ID + style, one colour per method, one marker per
    style selection. Right: the style adapter's parameters against its training step time, per selection."""
    methods = list(dict.fromkeys(r.method for r in rows))
    selections = list(dict.fromkeys(r.blocks for r in rows))
    markers = dict(zip(selections, "osD^v"))
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    fig = Figure(figsize=(13, 5))
    left, right = fig.subplots(1, 2)
    for r in rows:
        left.errorbar(r.identity.mean, r.style.mean, xerr=r.identity.ci, yerr=r.style.ci, fmt=markers[r.blocks],
                      color=colours[r.method], alpha=0.8, markersize=6, elinewidth=0.6)
        right.scatter(r.parameters, r.step_seconds, marker=markers[r.blocks], color=colours[r.method])
    for method in methods:
        left.plot([], [], "s", color=colours[method], label=method)
    for selection in selections:
        left.plot([], [], markers[selection], color="gray", label=f"style on {selection}")
    left.set_xlabel("identity fidelity (full ID + style)")
    left.set_ylabel("style fidelity")
    left.legend(fontsize=7, ncol=2)
    right.set_xscale("log")
    right.set_xlabel("style adapter parameters")
    right.set_ylabel("median s/step (training, measured one adapter at a time)")
    return finish_figure(fig, out)
