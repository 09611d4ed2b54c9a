"""The results table: one row per grid column with every metric's mean, 95 % CI and count, and the spread of the
probes' readings (:mod:`bwl.study.scoring.metrics`), written as ``results.csv`` (for tools), ``results.md`` (for people)
and ``results.json`` (with the profile that made it)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from bwl import __version__
from bwl.core.atomic import write_csv, write_json, write_text
from bwl.study.design.vocabulary import METRICS, PROBE_METRICS, Metric
from bwl.study.scoring.metrics import INSTRUMENT_METRICS, Estimate


@dataclass(frozen=True)
class CellResult:
    """One grid column's metrics."""

    grid: str
    cell: str
    key: str  # the cell's folder under cells/
    estimates: dict[Metric, Estimate]
    spreads: dict[Metric, float] = field(default_factory=dict)  # the probes' largest minus smallest mean

    def __getitem__(self, metric: Metric) -> Estimate:
        return self.estimates[metric]

    def row(self) -> dict[str, str | float | int]:
        values: dict[str, str | float | int] = {"grid": self.grid, "cell": self.cell, "key": self.key}
        values |= {m.value: self[m].mean for m in METRICS}
        values |= {f"{m.value}_ci": self[m].ci for m in METRICS}
        values |= {f"{m.value}_n": self[m].n for m in METRICS}
        values |= {f"{m.value}_spread": self.spreads.get(m, math.nan) for m in INSTRUMENT_METRICS}
        return values

    def shown(self, metric: Metric) -> str:
        """``mean ± CI``, with the probes' spread where they disagree by 0.01 or more."""
        spread = self.spreads.get(metric, math.nan)
        return f"{self[metric]} (spread {spread:.2f})" if spread >= 0.01 else str(self[metric])

    @classmethod
    def from_row(cls, row: dict[str, str]) -> CellResult:
        estimates = {m: Estimate(float(row[m.value]), float(row[f"{m.value}_ci"]), int(row[f"{m.value}_n"]))
                     if m.value in row else Estimate(float("nan"), float("nan"), 0) for m in METRICS}
        spreads = {m: float(row[f"{m.value}_spread"]) for m in INSTRUMENT_METRICS
                   if row.get(f"{m.value}_spread") not in (None, "", "nan")}
        return cls(row["grid"], row["cell"], row["key"], estimates, spreads)


def scored_metrics(results: list[CellResult]) -> list[Metric]:
    """The metrics any of ``results`` holds values for (the probe's, shown as empty, when none has any)."""
    return [m for m in METRICS if any(r[m].n for r in results)] or list(PROBE_METRICS)


def results_markdown(results: list[CellResult]) -> str:
    """The results as a markdown table: mean ± 95 % CI per metric the run scored."""
    shown = scored_metrics(results)
    lines = ["| grid | cell | " + " | ".join(m.value for m in shown) + " |", "|" + "---|" * (2 + len(shown))]
    lines += [f"| {r.grid} | {r.cell} | " + " | ".join(r.shown(m) for m in shown) + " |" for r in results]
    note = ("\nEach probe metric is the mean of the independently trained probes' readings; where they disagree, their "
            "spread (largest minus smallest probe mean) follows it.\n") if any(r.spreads for r in results) else ""
    return "\n".join(lines) + "\n" + note


def write_results(folder: Path, results: list[CellResult], profile: dict) -> Path:
    """``results.csv``, ``results.md`` and ``results.json`` in ``folder``; returns the CSV's path."""
    rows = [r.row() for r in results]
    write_csv(folder / "results.csv", rows)
    write_text(folder / "results.md", results_markdown(results))
    write_json(folder / "results.json", {"profile": profile, "rows": rows, "bwl_version": __version__})
    return folder / "results.csv"


def read_results(folder: Path) -> list[CellResult]:
    """The rows of ``results.csv`` in ``folder``."""
    path = folder / "results.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no results yet; run the grids first (notebook 03 or python -m bwl run)")
    with open(path, newline="") as f:
        return [CellResult.from_row(row) for row in csv.DictReader(f)]
