"""Do the reference metrics track what they claim to measure? In the toy world the probe reads the truth, so each
reference metric is compared with its probe counterpart across every cell scored by both: grid, sweep and methods
cells alike. The measure is Spearman's rank correlation of the cells' means, with a percentile bootstrap 95 % CI over
cells, and the cells on which the two rank most differently are listed.

``python -m bwl validate-reference`` writes ``figures/reference-validation.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bwl.core.atomic import write_text
from bwl.study.design.vocabulary import Metric
from bwl.study.running.cells import CellStore

PAIRS: tuple[tuple[Metric, Metric], ...] = (
    (Metric.REF_IDENTITY, Metric.IDENTITY),
    (Metric.REF_IDENTITY_CLIP, Metric.IDENTITY),
    (Metric.REF_STYLE, Metric.STYLE),
    (Metric.REF_PROMPT, Metric.PROMPT),
    (Metric.REF_PRESERVATION, Metric.PRESERVATION),
)
"""(reference metric, the probe metric it claims to measure)."""


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranked[tied] = ranked[tied].mean()
    return ranked


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); NaN when either side is constant."""
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def bootstrap_spearman(x: np.ndarray, y: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap 95 % CI of Spearman's rho, resampling cells."""
    rng = np.random.default_rng(seed)
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    draws = [spearman(x[rows], y[rows]) for rows in rng.integers(0, len(x), (resamples, len(x)))]
    draws = [d for d in draws if np.isfinite(d)]
    return (float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))) if draws else (np.nan, np.nan)


@dataclass
class Agreement:
    """How one reference metric ranks the cells against its probe counterpart."""

    reference: Metric
    probe: Metric
    rho: float
    low: float
    high: float
    cells: int
    disagreements: list[tuple[str, float, float]] = field(default_factory=list)  # (cell, reference, probe)


def cell_means(store: CellStore) -> list[dict]:
    """Per stored cell scored by both families: its label and each metric's mean over the images it applies to."""
    rows = []
    folders = sorted(p for p in store.root.iterdir() if (p / "scores.json").exists()) if store.root.is_dir() else []
    for folder in folders:
        scores = json.loads((folder / "scores.json").read_text())
        description = json.loads((folder / "cell.json").read_text())
        adapters = " + ".join(description.get("adapters", {})) or "no adapter"
        row: dict = {"cell": f"{description.get('cell', folder.name)} [{adapters}]", "key": folder.name}
        for metric in Metric:
            values = [s[metric.value] for s in scores if metric.value in s]
            if values:
                row[metric] = float(np.mean(values))
        if any(m in row for m, _ in PAIRS) and any(p in row for _, p in PAIRS):
            rows.append(row)
    return rows


def same_values(rows: list[dict], a: Metric, b: Metric) -> bool:
    """Whether two metrics hold the same value in every row that has either (one encoder read both)."""
    return all(r.get(a) == r.get(b) for r in rows if a in r or b in r)


def agreements(rows: list[dict], worst: int = 5) -> list[Agreement]:
    """Spearman's rho (with its bootstrap CI) of each reference metric against its probe counterpart; CLIP-I is left
    out where it equals ``ref_identity`` in every cell (no DINOv2: both read CLIP)."""
    found = []
    for reference, probe in PAIRS:
        if reference is Metric.REF_IDENTITY_CLIP and same_values(rows, reference, Metric.REF_IDENTITY):
            continue
        both = [r for r in rows if reference in r and probe in r]
        if len(both) < 3:
            continue
        x, y = np.array([r[reference] for r in both]), np.array([r[probe] for r in both])
        low, high = bootstrap_spearman(x, y)
        gap = np.abs(ranks(x) - ranks(y))
        listed = [(both[i]["cell"], float(x[i]), float(y[i])) for i in np.argsort(-gap, kind="stable")[:worst]]
        found.append(Agreement(reference, probe, spearman(x, y), low, high, len(both), listed))
    return found


def validation_markdown(found: list[Agreement], command: str) -> str:
    """The validation table, then per pair the cells the two metrics rank most differently."""
    lines = ["| reference metric | probe metric | cells | Spearman ρ | 95 % CI (bootstrap over cells) |",
             "|---|---|---|---|---|"]
    lines += [f"| {a.reference.value} | {a.probe.value} | {a.cells} | {a.rho:.2f} | {a.low:.2f} to {a.high:.2f} |"
              for a in found]
    lines += ["", f"Command: `{command}`.", ""]
    for a in found:
        lines += [f"Cells ranked most differently by {a.reference.value} and {a.probe.value}:", ""]
        lines += [f"- {cell}: {a.reference.value} {ref:.3f}, {a.probe.value} {probe:.2f}"
                  for cell, ref, probe in a.disagreements]
        lines.append("")
    return "\n".join(lines)


def write_validation(store: CellStore, out: Path, command: str = "python -m bwl validate-reference") -> str:
    """Compute the agreements over ``store``'s cells and write the markdown to ``out``."""
    text = validation_markdown(agreements(cell_means(store)), command)
    write_text(out, text)
    return text
