"""The paper's claims C1–C3 decided from the results table, so the README's verdicts are recomputed, not typed.

A cell *beats* another when it is not worse on identity or style fidelity and better on at least one, where better
means the 95 % confidence intervals do not overlap (a conservative test); otherwise the comparison is a trade-off
or a tie. ``python -m bwl findings`` prints the markdown.
"""

from __future__ import annotations

from dataclasses import dataclass

from .metrics import Estimate

METRICS = ("identity", "style")

CLAIMS: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "C1": ("full ID + block-wise style beats plain LoRA/LoCon and block-wise inference", [
        (grid, "full ID + upper-trained style", other)
        for grid in ("fig2", "fig3")
        for other in ("full ID + full style", "full ID + full style, inference on upper")
    ]),
    "C2": ("full ID + block-wise style beats block-wise-ID combinations", [
        ("fig4a", "full ID + upper style", "upper ID + full style"),
        ("fig4a", "full ID + upper style", "upper ID + upper style"),
    ]),
    "C3": ("style trained on upper > middle > bottom", [
        ("fig4b", "full ID + upper style", "full ID + middle style"),
        ("fig4b", "full ID + middle style", "full ID + bottom style"),
    ]),
}


@dataclass
class Comparison:
    grid: str
    cell: str
    other: str
    deltas: dict[str, float]
    better: list[str]
    worse: list[str]

    @property
    def verdict(self) -> str:
        if self.better and not self.worse:
            return "beats"
        if self.worse and not self.better:
            return "loses"
        return "trade-off" if self.better else "tie"


def _estimate(row: dict, metric: str) -> Estimate:
    return Estimate(float(row[metric]), float(row[f"{metric}_ci"]), int(row[f"{metric}_n"]))


def compare(rows: list[dict], grid: str, cell: str, other: str) -> Comparison:
    """``cell`` against ``other`` in ``grid`` on identity and style fidelity."""
    by_cell = {(r["grid"], r["cell"]): r for r in rows}
    missing = [c for c in (cell, other) if (grid, c) not in by_cell]
    if missing:
        raise KeyError(f"{grid}: no cell {missing[0]!r} in the results; cells: {sorted(c for g, c in by_cell if g == grid)}")
    a, b = by_cell[grid, cell], by_cell[grid, other]
    better, worse, deltas = [], [], {}
    for metric in METRICS:
        x, y = _estimate(a, metric), _estimate(b, metric)
        deltas[metric] = x.mean - y.mean
        if x.mean - x.ci > y.mean + y.ci:
            better.append(metric)
        elif y.mean - y.ci > x.mean + x.ci:
            worse.append(metric)
    return Comparison(grid, cell, other, deltas, better, worse)


def claim_verdict(comparisons: list[Comparison]) -> str:
    verdicts = {c.verdict for c in comparisons}
    if verdicts == {"beats"}:
        return "holds"
    if "beats" in verdicts or "trade-off" in verdicts:
        return "partly"
    return "does not hold"


def findings_markdown(rows: list[dict]) -> str:
    """One table per claim: each comparison's identity and style differences and its verdict."""
    lines = []
    for name, (text, pairs) in CLAIMS.items():
        comparisons = [compare(rows, *pair) for pair in pairs]
        lines += [f"**{name}: {text}: {claim_verdict(comparisons)}.**", "",
                  "| grid | cell | vs | Δ identity | Δ style | verdict |", "|---|---|---|---|---|---|"]
        by_cell = {(r["grid"], r["cell"]): r for r in rows}
        for c in comparisons:
            a, b = by_cell[c.grid, c.cell], by_cell[c.grid, c.other]
            cells = [f"{_estimate(a, m)} vs {_estimate(b, m)} ({c.deltas[m]:+.2f})" for m in METRICS]
            lines.append(f"| {c.grid} | {c.cell} | {c.other} | {cells[0]} | {cells[1]} | {c.verdict} |")
        lines.append("")
    return "\n".join(lines)
