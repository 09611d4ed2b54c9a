"""The paper's claims C1–C3 decided from the results table, so the README's verdicts are recomputed, not typed.

A cell *beats* another when it is not worse on identity or style fidelity and better on at least one, where better
means the 95 % confidence intervals do not overlap (a conservative test); otherwise the comparison is a trade-off
or a tie. ``python -m bwl findings`` prints the markdown.
"""

from __future__ import annotations

from dataclasses import dataclass

from bwl.study.design.vocabulary import (
    BLOCKWISE_INFERENCE,
    FIDELITY,
    FIDELITY_BY_FAMILY,
    FULL_ID_BOTTOM_STYLE,
    FULL_ID_FULL_STYLE,
    FULL_ID_MIDDLE_STYLE,
    FULL_ID_UPPER_STYLE,
    FULL_ID_UPPER_TRAINED_STYLE,
    TOY_INSTRUMENTS,
    UPPER_ID_FULL_STYLE,
    UPPER_ID_UPPER_STYLE,
    Metric,
)
from bwl.study.scoring.results import CellResult

Pair = tuple[str, str, str]  # (grid, cell, the cell it is compared with)


@dataclass(frozen=True)
class Claim:
    name: str
    text: str
    pairs: tuple[Pair, ...]


CLAIMS: tuple[Claim, ...] = (
    Claim("C1", "full ID + block-wise style beats plain LoRA/LoCon and block-wise inference", tuple(
        (grid, FULL_ID_UPPER_TRAINED_STYLE, other)
        for grid in ("fig2", "fig3") for other in (FULL_ID_FULL_STYLE, BLOCKWISE_INFERENCE)
    )),
    Claim("C2", "full ID + block-wise style beats block-wise-ID combinations", (
        ("fig4a", FULL_ID_UPPER_STYLE, UPPER_ID_FULL_STYLE),
        ("fig4a", FULL_ID_UPPER_STYLE, UPPER_ID_UPPER_STYLE),
    )),
    Claim("C3", "style trained on upper > middle > bottom", (
        ("fig4b", FULL_ID_UPPER_STYLE, FULL_ID_MIDDLE_STYLE),
        ("fig4b", FULL_ID_MIDDLE_STYLE, FULL_ID_BOTTOM_STYLE),
    )),
)
@dataclass
class Comparison:
    grid: str
    cell: str
    other: str
    deltas: dict[Metric, float]
    better: list[Metric]
    worse: list[Metric]

    @property
    def verdict(self) -> str:
        return verdict_of(bool(self.better), bool(self.worse))


def verdict_of(better: bool, worse: bool) -> str:
    """A comparison's verdict from whether it is better on some metric and worse on some."""
    if better and not worse:
        return "beats"
    if worse and not better:
        return "loses"
    return "trade-off" if better else "tie"


def _find(results: list[CellResult], grid: str, cell: str) -> CellResult:
    found = [r for r in results if (r.grid, r.cell) == (grid, cell)]
    if not found:
        cells = sorted(r.cell for r in results if r.grid == grid)
        raise KeyError(f"{grid}: no cell {cell!r} in the results; cells: {cells}")
    return found[0]


def compare(results: list[CellResult], grid: str, cell: str, other: str,
            fidelity: tuple[Metric, Metric] = FIDELITY) -> Comparison:
    """``cell`` against ``other`` in ``grid`` on identity and style fidelity (``fidelity``: a family's pair)."""
    a, b = _find(results, grid, cell), _find(results, grid, other)
    better, worse, deltas = [], [], {}
    for metric in fidelity:
        x, y = a[metric], b[metric]
        deltas[metric] = x.mean - y.mean
        if x.mean - x.ci > y.mean + y.ci:
            better.append(metric)
        elif y.mean - y.ci > x.mean + x.ci:
            worse.append(metric)
    return Comparison(grid, cell, other, deltas, better, worse)


def claim_verdict(comparisons: list[Comparison]) -> str:
    return claim_verdict_of([c.verdict for c in comparisons])


def claim_verdict_of(comparison_verdicts: list[str]) -> str:
    """A claim's verdict from its comparisons' (all beat: holds; some beat or trade off: partly)."""
    verdicts = set(comparison_verdicts)
    if verdicts == {"beats"}:
        return "holds"
    if "beats" in verdicts or "trade-off" in verdicts:
        return "partly"
    return "does not hold"


def findings_markdown(results: list[CellResult], claims: tuple[Claim, ...] = CLAIMS,
                      fidelity: tuple[Metric, Metric] = FIDELITY) -> str:
    """One table per claim: each comparison's identity and style differences and its verdict."""
    lines = []
    for claim in claims:
        comparisons = [compare(results, *pair, fidelity=fidelity) for pair in claim.pairs]
        lines += [f"**{claim.name}: {claim.text}: {claim_verdict(comparisons)}.**", "",
                  "| grid | cell | vs | Δ identity | Δ style | verdict |", "|---|---|---|---|---|---|"]
        for c in comparisons:
            a, b = _find(results, c.grid, c.cell), _find(results, c.grid, c.other)
            cells = [f"{a.shown(m)} vs {b.shown(m)} ({c.deltas[m]:+.2f})" for m in fidelity]
            lines.append(f"| {c.grid} | {c.cell} | {c.other} | {cells[0]} | {cells[1]} | {c.verdict} |")
        lines.append("")
    return "\n".join(lines)


def decidable(results: list[CellResult], claims: tuple[Claim, ...] = CLAIMS,
              fidelity: tuple[Metric, Metric] = FIDELITY) -> bool:
    """Whether the results hold every cell these claims compare, with this family's fidelity scores."""
    try:
        return all(_find(results, grid, cell)[m].n for claim in claims for grid, *cells in claim.pairs
                   for cell in cells for m in fidelity)
    except KeyError:
        return False


def decidable_claims(results: list[CellResult], fidelity: tuple[Metric, Metric] = FIDELITY,
                     claims: tuple[Claim, ...] = CLAIMS) -> tuple[Claim, ...]:
    """The claims these results can decide under this family: a run with some grids decides the claims those grids
    hold (C3 needs only fig4b)."""
    return tuple(claim for claim in claims if decidable(results, (claim,), fidelity))


def grids_of(claim: Claim) -> list[str]:
    return list(dict.fromkeys(grid for grid, *_ in claim.pairs))


def undecided_note(decided: tuple[Claim, ...], claims: tuple[Claim, ...] = CLAIMS) -> str:
    """What a run with only some grids cannot decide, and which grids each undecided claim needs ("" if none)."""
    missing = [f"{c.name} (needs {' and '.join(grids_of(c))} scored)" for c in claims if c not in decided]
    return f"\nNot decided by this run: {', '.join(missing)}.\n" if missing else ""


def robustness(verdicts: dict[str, str]) -> str:
    """"robust" when every toy instrument gives the same verdict, else "instrument-dependent" ("" with fewer than
    all the toy instruments)."""
    toy = [verdicts[name] for name in TOY_INSTRUMENTS if name in verdicts]
    if len(toy) < len(TOY_INSTRUMENTS):
        return ""
    return "robust" if len(set(toy)) == 1 else "instrument-dependent"


def robustness_markdown(results: list[CellResult], families: list[tuple[str, tuple[Metric, Metric]]],
                        claims: tuple[Claim, ...] = CLAIMS) -> str:
    """Every claim and comparison with its verdict under each family, and whether it is robust (the same under every
    toy instrument: the probes' style and the texture statistic) or instrument-dependent."""
    names = [name for name, _ in families]
    lines = ["| claim | comparison | " + " | ".join(names) + " | toy instruments |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for claim in claims:
        per_family = {name: [compare(results, *pair, fidelity=fidelity) for pair in claim.pairs]
                      for name, fidelity in families}
        overall = {name: claim_verdict(found) for name, found in per_family.items()}
        lines.append(f"| **{claim.name}** | (claim) | " + " | ".join(f"**{overall[n]}**" for n in names)
                     + f" | **{robustness(overall)}** |")
        for i, (grid, cell, other) in enumerate(claim.pairs):
            verdicts = {name: per_family[name][i].verdict for name in names}
            lines.append(f"| {claim.name} | {grid}: {cell} vs {other} | " + " | ".join(verdicts[n] for n in names)
                         + f" | {robustness(verdicts)} |")
    return "\n".join(lines) + "\n"


def findings_by_family(results: list[CellResult]) -> str:
    """The findings under every metric family the results hold: a summary of verdicts and their robustness across
    the toy instruments, then one section per family. A run with only some grids decides the claims they hold and
    names the others."""
    families = [(name, pair) for name, pair in FIDELITY_BY_FAMILY.items() if decidable_claims(results, pair)]
    claims = tuple(c for c in CLAIMS if all(decidable(results, (c,), pair) for _, pair in families))
    if len(families) == 1:
        return findings_markdown(results, claims, fidelity=families[0][1]) + undecided_note(claims)
    sections = ["### Verdicts under each instrument", "",
                "A verdict is *robust* when the probes' style (their mean) and the texture statistic give the same "
                "one, and *instrument-dependent* otherwise; the reference family is shown beside them. Each probe "
                "alone is decided in the replicated study (`python -m bwl replicate`).", "",
                robustness_markdown(results, families, claims)]
    for name, pair in families:
        title = f"### Decided by the {name} metrics ({pair[0].value}, {pair[1].value})"
        sections += [title, "", findings_markdown(results, claims, fidelity=pair)]
    return "\n".join(sections) + undecided_note(claims)


def findings_report(results: list[CellResult]) -> str:
    """The findings' markdown (per metric family the results hold), or why this run cannot decide them."""
    if any(decidable_claims(results, pair) for pair in FIDELITY_BY_FAMILY.values()):
        return findings_by_family(results)
    needs = ", ".join(f"{c.name} needs {' and '.join(grids_of(c))}" for c in CLAIMS)
    return (f"No findings for this run: {needs}, scored on identity and style fidelity (the probe or the reference "
            "metrics); this run's metrics are missing or its grids lack them.")
