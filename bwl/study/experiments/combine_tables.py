"""The combination study's answer as people read it: the leaderboard, the Pareto plot of identity against style with
the tuned merge's weight grid as a curve, the forest plot of every method against block-wise LoRA, and the
comparisons under every instrument (``figures/combine/``).

Absolute fidelities are pooled like the replicated study's effects: the mean over pairs of the mean over seeds of
the mean over images, with a hierarchical-bootstrap 95 % CI (:mod:`bwl.study.scoring.statistics`). The comparisons
with block-wise LoRA are the replicated study's paired tests (:mod:`bwl.study.scoring.pooled`), Holm-adjusted over
every method and metric of one instrument.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bwl.core.atomic import finish_figure, write_csv, write_json, write_text
from bwl.study.design.profile import Profile
from bwl.study.design.vocabulary import BASE, FULL_ID_FULL_STYLE, ID_ALONE, STYLE_ALONE, Cell, Metric
from bwl.study.scoring.pooled import Decided, ReplicateCells, Row, csv_rows, decide, forest_figure, replicate_verdicts
from bwl.study.scoring.statistics import ALPHA, PooledEffect, hierarchical_bootstrap

SHOWN: tuple[Metric, ...] = (Metric.IDENTITY, Metric.STYLE, Metric.PRESERVATION, Metric.PROMPT)
"""The leaderboard's fidelities (the probes' mean of each)."""


@dataclass(frozen=True)
class Method:
    """One combination method as the leaderboard costs it: its cell, the adapters it trains, the extra optimization
    steps it runs, and whether its result is one ordinary adapter file."""

    cell: Cell
    trained: int  # adapters trained for it (their training steps are the profile's each)
    optimization_steps: int = 0  # beyond training (ZipLoRA's merger steps)
    one_file: bool = True
    tuned_merge: bool = False  # a point of the merge's weight grid (the plain merge is 1/1)

    @property
    def label(self) -> str:
        return self.cell.label


def absolute(cells: Sequence[ReplicateCells], grid: str, label: str, metric: Metric) -> PooledEffect | None:
    """One cell's pooled mean of ``metric`` over pairs, seeds and images, with its 95 % CI (None if never scored)."""
    table: dict[str, dict[int, list[float]]] = {}
    for rep in cells:
        values = [s[metric.value] for s in rep.scores.get((grid, label), []) if metric.value in s]
        if values:
            table.setdefault(rep.pair, {})[rep.seed] = values
    return hierarchical_bootstrap(table) if table else None


def time_ratio(seconds: dict[tuple[str, int], dict[str, float]], label: str) -> float:
    """The mean over replicates of the cell's generation time over the plain merge's (nan where none recorded)."""
    ratios = [t[label] / t[FULL_ID_FULL_STYLE] for t in seconds.values() if label in t and t.get(FULL_ID_FULL_STYLE)]
    return float(np.mean(ratios)) if ratios else math.nan


def _ci(effect: PooledEffect | None) -> str:
    return f"{effect.mean:.2f} [{effect.low:.2f}, {effect.high:.2f}]" if effect is not None else "–"


def leaderboard(profile: Profile, methods: Sequence[Method], rows: Sequence[Row], cells: Sequence[ReplicateCells],
                decided: Decided, seconds: dict[tuple[str, int], dict[str, float]], grid: str) -> list[dict]:
    """One row per method: pooled fidelities, the verdict against block-wise LoRA, and the cost."""
    steps = int(profile.train.get("steps", 0))
    by_label = {r.cell: r for r in rows}
    found = []
    for m in methods:
        values: dict = {"method": m.label}
        for metric in SHOWN:
            effect = absolute(cells, grid, m.label, metric)
            values |= {metric.value: effect.mean if effect else math.nan, f"{metric.value}_low": effect.low if effect
                       else math.nan, f"{metric.value}_high": effect.high if effect else math.nan}
        row = by_label.get(m.label)
        if row is not None and decided.of(row, "probes"):
            verdicts = {name: decided.verdict(row, name) for name in decided.names}
            agree = replicate_verdicts(decided.of(row, "probes"), row)
            values |= {"verdict": verdicts["probes"], "verdict_holm": decided.verdict(row, "probes", ALPHA),
                       "instruments": decided.robustness(verdicts),
                       "replicates_agreeing": f"{agree.count(verdicts['probes'])}/{len(agree)}"}
        else:
            values |= {"verdict": "reference" if row is None else "–", "verdict_holm": "", "instruments": "",
                       "replicates_agreeing": ""}
        values |= {"adapters_trained": m.trained, "training_steps": m.trained * steps,
                   "optimization_steps": m.optimization_steps, "time_vs_plain_merge": time_ratio(seconds, m.label),
                   "one_file": "yes" if m.one_file else "no"}
        found.append(values)
    on_curve = [m.tuned_merge or m.label == FULL_ID_FULL_STYLE for m in methods]
    curve = [values for values, on in zip(found, on_curve) if on]
    for values, on in zip(found, on_curve):
        values["behind_merge"] = "–" if on else behind_merge(values, curve)
    return found


def behind_merge(values: dict, curve: Sequence[dict]) -> str:
    """The merge weights whose pooled identity and style are both at least this method's (point estimates): the
    point of the merge's curve that gives as much of both by re-weighting alone (the one with the largest smaller
    margin), or "no" when none does."""
    identity, style = Metric.IDENTITY.value, Metric.STYLE.value
    margins = {point["method"]: min(point[identity] - values[identity], point[style] - values[style])
               for point in curve}
    ahead = {label: margin for label, margin in margins.items() if margin >= 0}
    return max(ahead, key=ahead.get) if ahead else "no"


def leaderboard_markdown(board: Sequence[dict], replicates: int, command: str) -> str:
    """The leaderboard as a table; every fidelity the probes' pooled mean [95 % CI]."""
    lines = [f"{replicates} replicates (identity-style pairs x training seeds); fidelities are the probes' pooled mean "
             "over pairs, seeds and images [95 % CI]; the verdict is each method against block-wise LoRA (full ID + "
             "upper-trained style) on identity and style, by the pooled paired CIs, after Holm over every method and "
             "metric, the count of replicates agreeing, and whether every toy instrument agrees; *behind the merge* "
             "names the merge weights (identity/style) that give at least the method's identity and style (point "
             f"estimates), if any. `{command}`.", "",
             "| method | identity | style | preservation | prompt | vs block-wise LoRA | after Holm | replicates | "
             "instruments | behind the merge | training steps | extra steps | time vs merge | one file |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in board:
        fid = [f"{r[m.value]:.2f} [{r[f'{m.value}_low']:.2f}, {r[f'{m.value}_high']:.2f}]"
               if not math.isnan(r[m.value]) else "–" for m in SHOWN]
        ratio = f"{r['time_vs_plain_merge']:.2f}x" if not math.isnan(r["time_vs_plain_merge"]) else "–"
        lines.append(f"| {r['method']} | " + " | ".join(fid) + f" | {r['verdict']} | {r['verdict_holm']} | "
                     f"{r['replicates_agreeing']} | {r['instruments']} | {r['behind_merge']} | {r['training_steps']} | "
                     f"{r['optimization_steps']} | {ratio} | {r['one_file']} |")
    return "\n".join(lines) + "\n"


def _weights(method: Method) -> tuple[float, float]:
    identity_weight, style_weight = (float(w) for _, w in method.cell.adapters)
    return identity_weight, style_weight


def pareto_figure(methods: Sequence[Method], cells: Sequence[ReplicateCells], grid: str, out: Path) -> Figure:
    """Identity against style per method (95 % CIs); the merge's weight grid as a curve through the plain merge, and
    the base model and each adapter alone in grey."""
    fig = Figure(figsize=(7.5, 6))
    ax = fig.subplots()
    points = {}
    for label in [BASE, ID_ALONE, STYLE_ALONE] + [m.label for m in methods]:
        x, y = absolute(cells, grid, label, Metric.IDENTITY), absolute(cells, grid, label, Metric.STYLE)
        if x is not None and y is not None:
            points[label] = (x, y)
    curve = sorted((m for m in methods if m.tuned_merge or m.label == FULL_ID_FULL_STYLE),
                   key=lambda m: _weights(m)[1] - _weights(m)[0])
    shown = [points[m.label] for m in curve if m.label in points]
    ax.plot([x.mean for x, _ in shown], [y.mean for _, y in shown], color="grey", linewidth=1, zorder=1,
            label="merge at other weights (identity/style)")
    for i, (label, (x, y)) in enumerate(points.items()):
        grey = label in (BASE, ID_ALONE, STYLE_ALONE) or any(m.tuned_merge and m.label == label for m in methods)
        ax.errorbar([x.mean], [y.mean], xerr=[[x.mean - x.low], [x.high - x.mean]],
                    yerr=[[y.mean - y.low], [y.high - y.mean]], fmt="o", capsize=2, markersize=4,
                    color="grey" if grey else f"C{i % 10}")
        ax.annotate(label, (x.mean, y.mean), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("identity (probes' mean)")
    ax.set_ylabel("style (probes' mean)")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("identity against style, pooled over replicates (95 % CI)", fontsize=9)
    return finish_figure(fig, out)


def earlier_runs(config: Path, design: dict) -> list[float]:
    """The wall minutes of the earlier runs recorded in ``config`` for the same design: a run that resumes or reuses
    adds its own minutes to theirs, so the record keeps the time the results took (``[]`` for another design)."""
    if not config.exists():
        return []
    recorded = json.loads(config.read_text())
    if any(recorded.get(k) != v for k, v in design.items()):
        return []
    return list(recorded.get("run_minutes", [recorded["minutes"]] if "minutes" in recorded else []))


def write_combine(profile: Profile, methods: Sequence[Method], rows: Sequence[Row], cells: Sequence[ReplicateCells],
                  seconds: dict[tuple[str, int], dict[str, float]], minutes: float, grid: str = "combine") -> Path:
    """``figures/combine/``: ``leaderboard.md``/``.csv``, ``comparisons.csv``, ``pareto.png``, ``forest.png`` and
    ``config.json``; returns the leaderboard's path."""
    out = profile.figures / "combine"
    decided = decide(cells, 5000, rows)
    command = "python -m bwl combine" + (f" --profile {profile.name}" if profile.name != "combine" else "")
    board = leaderboard(profile, methods, rows, cells, decided, seconds, grid)
    write_csv(out / "leaderboard.csv", board)
    if decided.effects:
        write_csv(out / "comparisons.csv", csv_rows(decided))
        group = rows[0].group
        forest_figure(decided, group, out=out / "forest.png", rows=rows)
    pareto_figure(methods, cells, grid, out / "pareto.png")
    design = {"profile": profile.name, "pairs": sorted({c.pair for c in cells}),
              "train_seeds": sorted({c.seed for c in cells}), "prompts": profile.prompts, "seeds": profile.seeds,
              "methods": [m.label for m in methods], "modes": {m.label: m.cell.mode for m in methods if m.cell.mode}}
    runs = [*earlier_runs(out / "config.json", design), round(minutes, 1)]
    write_json(out / "config.json", {**design, "minutes": round(sum(runs), 1), "run_minutes": runs, "command": command})
    return write_text(out / "leaderboard.md", leaderboard_markdown(board, len(cells), command))
