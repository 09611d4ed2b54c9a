"""The combination study: block-wise LoRA against the methods people use now to combine an identity with a style,
on the replicated design (every identity-style pair x training seed of the profile), with the toy world's ground truth.

Every method renders the same prompts at the same sampling seeds in every replicate, from the same identity and style
LoRAs (trained on all blocks) where it combines two adapters:

- **plain merge** at weights 1/1, and the **tuned merge**: the profile's ``combine_weights`` grid of (identity, style)
  weights, drawn as a curve in the Pareto plot, since lowering the style's weight is what most users do;
- **block-wise inference**: the full style applied on the upper blocks only;
- **block-wise LoRA** (the paper's method, the reference every verdict is against): the style trained on the upper
  blocks, and on the block sweep's best single block (``combine_block``; "" reads ``figures/sweep.csv``);
- **joint training**: one LoRA trained on both concepts' images, each captioned with its own trigger;
- **ZipLoRA** on the LoRA pair and on the LoCon pair (:mod:`bwl.train.ziplora`, one ordinary file each);
- **K-LoRA, LoRA Switch, LoRA Composite**: inference modes over the loaded pair (:mod:`bwl.adapters.modes`; none of
  them can be one file).

``python -m bwl combine`` (profile ``combine``) trains and merges what is missing, renders and scores every cell of
every replicate (reusing both by key), and writes ``figures/combine/``: the leaderboard (``.md``/``.csv``), the Pareto
plot, the forest plot of every method against block-wise LoRA, and ``comparisons.csv``
(:mod:`bwl.study.experiments.combine_tables`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bwl.study.design.profile import Profile
from bwl.study.design.vocabulary import (
    BLOCKWISE_INFERENCE,
    FULL_ID_FULL_STYLE,
    FULL_ID_UPPER_TRAINED_STYLE,
    Grid,
    Metric,
    adapters_of,
    cell,
    identity,
    joint,
    style,
    zipped,
)
from bwl.study.experiments.combine_tables import Method, write_combine
from bwl.study.experiments.methods import best_block_label, best_single_block
from bwl.study.experiments.replicate import Replicate, prepare, replicates
from bwl.study.running.console import log, progress
from bwl.study.running.distributed import barrier, is_main
from bwl.study.running.study import train_missing
from bwl.study.running.workers import Log
from bwl.study.scoring.pooled import ReplicateCells, Row
from bwl.study.scoring.results import CellResult, write_results

GRID = "combine"
REFERENCE = FULL_ID_UPPER_TRAINED_STYLE  # block-wise LoRA: what every method is compared with
JOINT, ZIP, ZIP_LOCON = "joint training", "ZipLoRA", "ZipLoRA (LoCon)"
K_LORA, SWITCH, COMPOSITE = "K-LoRA", "LoRA Switch", "LoRA Composite"
VERSUS = "vs block-wise LoRA"


def merge_label(identity_weight: float, style_weight: float) -> str:
    return f"merge {identity_weight:g}/{style_weight:g}"


def methods(profile: Profile) -> tuple[Method, ...]:
    """The study's methods, in the leaderboard's order (block-wise LoRA first, the reference)."""
    block = profile.combine_block or best_single_block(profile.figures / "sweep.csv", "combine_block")
    zip_steps = profile.combine_zip_steps
    full_id, full_style = (identity("lora"), 1.0), (style("lora"), 1.0)
    return (
        Method(cell(REFERENCE, full_id, (style("lora", "upper"), 1.0)), 2),
        Method(cell(best_block_label(block), full_id, (style("lora", block), 1.0)), 2),
        Method(cell(FULL_ID_FULL_STYLE, full_id, full_style), 2),
        *(Method(cell(merge_label(wi, ws), (identity("lora"), wi), (style("lora"), ws)), 2, tuned_merge=True)
          for wi, ws in profile.combine_weights),
        Method(cell(BLOCKWISE_INFERENCE, full_id, (style("lora"), "upper")), 2),
        Method(cell(JOINT, (joint("lora"), 1.0)), 1),
        Method(cell(ZIP, (zipped("lora"), 1.0)), 2, zip_steps),
        Method(cell(ZIP_LOCON, (zipped("locon"), 1.0)), 2, zip_steps),
        Method(cell(K_LORA, full_id, full_style, mode="k-lora"), 2, one_file=False),
        Method(cell(SWITCH, full_id, full_style, mode="switch"), 2, one_file=False),
        Method(cell(COMPOSITE, full_id, full_style, mode="composite"), 2, one_file=False),
    )


def combine_grid(profile: Profile) -> Grid:
    """Every method as one grid (after the base model and each adapter alone)."""
    return Grid(GRID, "lora", tuple(m.cell for m in methods(profile)))


def comparison_rows(profile: Profile) -> tuple[Row, ...]:
    """Each method against block-wise LoRA, decided on identity and style (preservation reported beside)."""
    return tuple(Row(VERSUS, GRID, m.label, REFERENCE, (Metric.IDENTITY, Metric.STYLE))
                 for m in methods(profile) if m.label != REFERENCE)


def render_replicate(replicate: Replicate, grid: Grid, log: Log = log) -> tuple[ReplicateCells, dict[str, float]]:
    """Render and score one replicate's cells (reusing complete ones); its per-image scores, and the seconds each
    cell's generation took where it was generated (or recorded)."""
    study, p = replicate.study, replicate.study.profile
    renderer = study.renderer(adapters_of([grid]), resident=[])
    results, seconds = [], {}
    with progress(len(grid.columns()), f"{replicate.name} cells") as bar:
        for column in grid.columns():
            key, _ = renderer.render(column, p.prompts, p.seeds)
            results.append(CellResult(grid.name, column.label, key, renderer.store.summary(key),
                                      renderer.store.spreads(key)))
            recorded = renderer.store.description(key).get("seconds")
            if recorded is not None:
                seconds[column.label] = float(recorded)
            bar.update()
    if is_main():
        write_results(p.figures / "combine" / replicate.name, results,
                      {**p.to_dict(), "pair": replicate.pair.name, "train_seed": replicate.seed})
    barrier()
    scores = {(grid.name, r.cell): study.cells.scores(r.key) for r in results}
    return ReplicateCells(replicate.pair.name, replicate.seed, scores), seconds


def run_combine(profile: Profile, log: Log = log) -> Path:
    """Train and merge what is missing, render every replicate's cells, and write ``figures/combine/``; returns the
    leaderboard's path."""
    started = time.time()
    grid = combine_grid(profile)
    prepare(profile, log)
    runs = replicates(profile, shared_scorers=True)
    train_missing([(r.study, key) for r in runs for key in adapters_of([grid])], profile.train_workers, log)
    cells, seconds = [], {}
    for i, replicate in enumerate(runs, 1):
        log(f"combine: replicate {i}/{len(runs)}: {replicate.name}")
        found, timed = render_replicate(replicate, grid, log)
        cells.append(found)
        seconds[(replicate.pair.name, replicate.seed)] = timed
    out = profile.figures / "combine" / "leaderboard.md"
    if is_main():
        out = write_combine(profile, methods(profile), comparison_rows(profile), cells, seconds,
                            minutes=(time.time() - started) / 60)
        record = json.loads((out.parent / "config.json").read_text())
        runs_of_design = record["run_minutes"]
        earlier = f" ({record['minutes']} min over {len(runs_of_design)} runs)" if len(runs_of_design) > 1 else ""
        log(f"combine: {len(runs)} replicates in {(time.time() - started) / 60:.1f} min{earlier}; {out}")
    barrier()
    return out

