"""The results table: one row per grid column with every metric's mean, 95 % CI and count, written as
``results.csv`` (for tools), ``results.md`` (for people) and ``results.json`` (with the profile that made it)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from bwl import __version__
from bwl.core.atomic import write_csv, write_json, write_text
from bwl.study.metrics import Estimate
from bwl.study.vocabulary import METRICS, PROBE_METRICS, Metric


@dataclass(frozen=True)
class CellResult:
    """One grid column's metrics."""

    grid: str
    cell: str
    key: str  # the cell's folder under cells/
    estimates: dict[Metric, Estimate]

    def __getitem__(self, metric: Metric) -> Estimate:
        return self.estimates[metric]

    def row(self) -> dict[str, str | float | int]:
        values: dict[str, str | float | int] = {"grid": self.grid, "cell": self.cell, "key": self.key}
        values |= {m.value: self[m].mean for m in METRICS}
        values |= {f"{m.value}_ci": self[m].ci for m in METRICS}
        values |= {f"{m.value}_n": self[m].n for m in METRICS}
        return values

    @classmethod
    def from_row(cls, row: dict[str, str]) -> CellResult:
        estimates = {m: Estimate(float(row[m.value]), float(row[f"{m.value}_ci"]), int(row[f"{m.value}_n"]))
                     if m.value in row else Estimate(float("nan"), float("nan"), 0) for m in METRICS}
        return cls(row["grid"], row["cell"], row["key"], estimates)


def scored_metrics(results: list[CellResult]) -> list[Metric]:
    """The metrics any of ``results`` holds values for (the probe's, shown as empty, when none has any)."""
    return [m for m in METRICS if any(r[m].n for r in results)] or list(PROBE_METRICS)


def results_markdown(results: list[CellResult]) -> str:
    """The results as a markdown table: mean ± 95 % CI per metric the run scored."""
    shown = scored_metrics(results)
    lines = ["| grid | cell | " + " | ".join(m.value for m in shown) + " |", "|" + "---|" * (2 + len(shown))]
    lines += [f"| {r.grid} | {r.cell} | " + " | ".join(str(r[m]) for m in shown) + " |" for r in results]
    return "\n".join(lines) + "\n"


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
