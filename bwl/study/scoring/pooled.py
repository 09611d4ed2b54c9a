"""The paper's comparisons pooled over replicates (identity-style pairs x training seeds), under every instrument.

For each comparison behind C1-C3 and the interference rows, and for each of identity, style and preservation, the
per-image difference (cell minus the cell it is compared with, at the same prompt and seed) is pooled over pairs, then
seeds, then images, with a hierarchical bootstrap 95 % CI (:mod:`bwl.study.scoring.statistics`). A pooled comparison is
*better* on a metric when its CI lies above 0 and *worse* when below; its verdict (beats, loses, trade-off, tie) and the
claim's (holds, partly, does not hold) follow :mod:`bwl.study.scoring.findings`. The verdict *after Holm* counts a
metric only where its Holm-adjusted p is below :data:`~bwl.study.scoring.statistics.ALPHA` too. The same paired test
decides each replicate alone (its images' normal 95 % CI), which gives the replicate count. The p-values of every
comparison and metric of one instrument are Holm-adjusted together (the block comparisons of C3 among them); 5,000
resamples keep the smallest adjusted p (36 tests x 2 / 5,001) far below 0.05.

Each comparison is decided under every toy instrument: each probe alone, their mean and the texture statistic (for
the style). It is *robust* when all of them give the same verdict, and *instrument-dependent* otherwise; the
reference family is shown beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from bwl.core.atomic import finish_figure, write_csv, write_text
from bwl.study.design.vocabulary import (
    BASE,
    FULL_ID_FULL_STYLE,
    FULL_ID_UPPER_TRAINED_STYLE,
    Metric,
)
from bwl.study.scoring.findings import CLAIMS, claim_verdict_of, verdict_of
from bwl.study.scoring.metrics import Scores, mean_ci
from bwl.study.scoring.statistics import ALPHA, PooledEffect, hierarchical_bootstrap, holm
from bwl.toy.assets import INSTRUMENTS

ROLES: tuple[Metric, ...] = (Metric.IDENTITY, Metric.STYLE, Metric.PRESERVATION)
"""What each comparison measures (by an instrument's reading of each)."""


@dataclass(frozen=True)
class Reading:
    """An instrument: for each role, the per-image score key it reads."""

    name: str
    keys: dict[Metric, str]
    toy: bool = True  # whether it decides robustness (the reference family is shown beside, not counted)


def readings() -> tuple[Reading, ...]:
    """The probes' mean, each probe alone, the texture statistic (style; identity and preservation from the probes'
    mean) and the reference family."""
    mean = {m: m.value for m in ROLES}
    return (Reading("probes", mean),
            *(Reading(i.name, {m: f"{m.value}@{i.name}" for m in ROLES}) for i in INSTRUMENTS),
            Reading("texture", {**mean, Metric.STYLE: Metric.STYLE_TEXTURE.value}),
            Reading("reference", {Metric.IDENTITY: Metric.REF_IDENTITY.value, Metric.STYLE: Metric.REF_STYLE.value,
                                  Metric.PRESERVATION: Metric.REF_PRESERVATION.value}, toy=False))


@dataclass(frozen=True)
class Row:
    """One compared pair of cells: ``group`` is a claim (C1-C3) or ``interference``; ``roles`` what decides it."""

    group: str
    grid: str
    cell: str
    other: str
    roles: tuple[Metric, ...]


INTERFERENCE = "interference"
ROWS: tuple[Row, ...] = (
    *(Row(claim.name, *pair, (Metric.IDENTITY, Metric.STYLE)) for claim in CLAIMS for pair in claim.pairs),
    *(Row(INTERFERENCE, grid, cell, other, (Metric.PRESERVATION,)) for grid in ("fig2", "fig3")
      for cell, other in ((FULL_ID_FULL_STYLE, BASE), (FULL_ID_UPPER_TRAINED_STYLE, FULL_ID_FULL_STYLE))),
)
"""The claims' comparisons (decided on identity and style) and the interference rows (on preservation): the full
combination against the base model, and the upper-trained style against the full one."""


@dataclass(frozen=True)
class ReplicateCells:
    """One replicate's per-image scores by (grid, cell label)."""

    pair: str
    seed: int
    scores: dict[tuple[str, str], list[Scores]]


def paired(a: Sequence[Scores], b: Sequence[Scores], key: str) -> list[float]:
    """Per image scored in both (same prompt and seed): a minus b."""
    return [x[key] - y[key] for x, y in zip(a, b, strict=True) if key in x and key in y]


def differences(cells: Sequence[ReplicateCells], row: Row, key: str) -> dict[str, dict[int, list[float]]]:
    """``{pair: {seed: [Δ per image]}}`` for one row and score key (replicates without it left out)."""
    table: dict[str, dict[int, list[float]]] = {}
    for rep in cells:
        if (row.grid, row.cell) not in rep.scores or (row.grid, row.other) not in rep.scores:
            continue  # a grid this run did not render
        found = paired(rep.scores[(row.grid, row.cell)], rep.scores[(row.grid, row.other)], key)
        if found:
            table.setdefault(rep.pair, {})[rep.seed] = found
    return table


@dataclass(frozen=True)
class Effect:
    """A row's pooled effect on one role under one reading, its Holm-adjusted p, and the replicates' own verdicts."""

    row: Row
    reading: str
    role: Metric
    pooled: PooledEffect
    per_pair: dict[str, PooledEffect]
    replicate_signs: list[int]  # +1 better, -1 worse, 0 undecided, per replicate
    p_holm: float = 1.0


def sign(low: float, high: float) -> int:
    return 1 if low > 0 else -1 if high < 0 else 0


def replicate_sign(values: Sequence[float]) -> int:
    estimate = mean_ci(values)
    return sign(estimate.mean - estimate.ci, estimate.mean + estimate.ci) if estimate.n > 1 else 0


def effects(cells: Sequence[ReplicateCells], reading: Reading, resamples: int = 2000,
            rows: Sequence[Row] = ROWS) -> list[Effect]:
    """Every row's effects under one reading (roles the reading has no scores for left out), Holm-adjusted together."""
    found = []
    for row in rows:
        for role in ROLES:
            table = differences(cells, row, reading.keys[role])
            if not table:
                continue
            per_pair = {pair: hierarchical_bootstrap({pair: seeds}, resamples) for pair, seeds in table.items()}
            signs = [replicate_sign(values) for seeds in table.values() for values in seeds.values()]
            found.append(Effect(row, reading.name, role, hierarchical_bootstrap(table, resamples), per_pair, signs))
    adjusted = holm([e.pooled.p for e in found]) if found else []
    return [Effect(e.row, e.reading, e.role, e.pooled, e.per_pair, e.replicate_signs, p)
            for e, p in zip(found, adjusted)]


def verdict(found: dict[Metric, Effect], row: Row, alpha: float | None = None) -> str:
    """beats / loses / trade-off / tie on the row's deciding roles, from the pooled CIs; with ``alpha``, a role
    counts only where its Holm-adjusted p is below it too (the verdict that survives the correction)."""
    def counts(m: Metric) -> bool:
        return m in found and (alpha is None or found[m].p_holm < alpha)
    return verdict_of(any(counts(m) and found[m].pooled.low > 0 for m in row.roles),
                      any(counts(m) and found[m].pooled.high < 0 for m in row.roles))


def replicate_verdicts(found: dict[Metric, Effect], row: Row) -> list[str]:
    """Each replicate's own verdict on the row's deciding roles (its images' paired 95 % CIs)."""
    signs = [found[m].replicate_signs for m in row.roles if m in found]
    return [verdict_of(any(s > 0 for s in column), any(s < 0 for s in column)) for column in zip(*signs)]


@dataclass(frozen=True)
class Decided:
    """Every reading's effects, by (row, reading, role)."""

    effects: dict[tuple[Row, str, Metric], Effect]
    names: tuple[str, ...]
    toy: tuple[str, ...]

    def of(self, row: Row, reading: str) -> dict[Metric, Effect]:
        return {role: self.effects[(row, reading, role)] for role in ROLES if (row, reading, role) in self.effects}

    def verdict(self, row: Row, reading: str, alpha: float | None = None) -> str:
        return verdict(self.of(row, reading), row, alpha) if self.of(row, reading) else "–"

    def robustness(self, verdicts: dict[str, str]) -> str:
        toy = {verdicts[name] for name in self.toy if verdicts.get(name, "–") != "–"}
        return "robust" if len(toy) == 1 else "instrument-dependent" if toy else ""


def decide(cells: Sequence[ReplicateCells], resamples: int = 2000, rows: Sequence[Row] = ROWS) -> Decided:
    """Every row's effects under every reading (the paper's rows, or ``rows``)."""
    found, names, toy = {}, [], []
    for reading in readings():
        got = effects(cells, reading, resamples, rows)
        if got:
            names.append(reading.name)
            toy += [reading.name] if reading.toy else []
        found |= {(e.row, e.reading, e.role): e for e in got}
    return Decided(found, tuple(names), tuple(toy))


def rows_run(decided: Decided, group: str) -> list[Row]:
    """The group's rows that this study rendered under some reading (SDXL runs no LoRA grid: C1 is fig3's there)."""
    return [r for r in ROWS if r.group == group and any(decided.verdict(r, n) != "–" for n in decided.names)]


def group_verdict(decided: Decided, group: str, reading: str) -> str:
    """A claim's verdict under one reading, over the rows the study rendered ("–" if this reading lacks one)."""
    verdicts = [decided.verdict(r, reading) for r in rows_run(decided, group)]
    return "–" if not verdicts or "–" in verdicts else claim_verdict_of(verdicts)


def csv_rows(decided: Decided) -> list[dict]:
    """``figures/replicate.csv``: per row, reading, role and pair (``pooled`` for all of them)."""
    rows = []
    for (row, reading, role), e in decided.effects.items():
        verdicts = replicate_verdicts(decided.of(row, reading), row)
        base = {"group": row.group, "grid": row.grid, "cell": row.cell, "vs": row.other, "reading": reading,
                "metric": role.value}
        for pair, effect in [("pooled", e.pooled), *e.per_pair.items()]:
            rows.append({**base, "pair": pair, "effect": effect.mean, "low": effect.low, "high": effect.high,
                         "p": effect.p, "p_holm": e.p_holm if pair == "pooled" else "", "pairs": effect.pairs,
                         "replicates": effect.seeds, "images": effect.images,
                         "replicates_better": sum(s > 0 for s in e.replicate_signs) if pair == "pooled" else "",
                         "replicates_worse": sum(s < 0 for s in e.replicate_signs) if pair == "pooled" else "",
                         "row_verdict": decided.verdict(row, reading) if pair == "pooled" else "",
                         "row_verdict_holm": decided.verdict(row, reading, ALPHA) if pair == "pooled" else "",
                         "replicates_same_verdict": verdicts.count(decided.verdict(row, reading))
                         if pair == "pooled" else ""})
    return rows


def markdown(decided: Decided, replicates: int, pairs: list[str], seeds: list[int], command: str) -> str:
    """Per claim: its verdict under each reading and robustness; per row: the pooled effects (probes' mean) with CIs,
    Holm-adjusted p and the count of replicates whose own verdict agrees."""
    names = decided.names
    lines = [f"{replicates} replicates: pairs {', '.join(pairs)} x training seeds {seeds}. Effects are cell minus "
             "the compared cell, per image, pooled over pairs, then seeds, then images, with a hierarchical "
             f"bootstrap 95 % CI; p is Holm-adjusted over every row and metric of a reading. `{command}`."
             + _left_out(decided), "",
             "| claim | comparison | " + " | ".join(names) + " | toy instruments |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for group in dict.fromkeys(r.group for r in ROWS):
        if not rows_run(decided, group):
            continue
        overall = {n: group_verdict(decided, group, n) for n in names}
        lines.append(f"| **{group}** | (claim) | " + " | ".join(f"**{overall[n]}**" for n in names)
                     + f" | **{decided.robustness(overall)}** |")
        for row in rows_run(decided, group):
            verdicts = {n: decided.verdict(row, n) for n in names}
            shown = " | ".join(verdicts[n] for n in names)
            lines.append(f"| {group} | {row.grid}: {row.cell} vs {row.other} | {shown} | "
                         f"{decided.robustness(verdicts)} |")
    lines += ["", "Pooled effects under the probes' mean (texture statistic for the style in brackets); *k/n*: "
              "replicates whose own verdict is the pooled one; *after Holm*: the verdict where a metric counts only if "
              f"its Holm-adjusted p is below {ALPHA} too.", "",
              "| claim | comparison | Δ identity | Δ style [texture] | Δ preservation | verdict | k/n | after Holm |",
              "|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        found = decided.of(row, "probes")
        if not found:
            continue
        texture = decided.of(row, "texture").get(Metric.STYLE)
        cells = [_effect(found.get(Metric.IDENTITY)),
                 _effect(found.get(Metric.STYLE)) + (f" [{texture.pooled}]" if texture else ""),
                 _effect(found.get(Metric.PRESERVATION))]
        pooled_verdict = decided.verdict(row, "probes")
        agree = replicate_verdicts(found, row)
        lines.append(f"| {row.group} | {row.grid}: {row.cell} vs {row.other} | " + " | ".join(cells)
                     + f" | {pooled_verdict} | {agree.count(pooled_verdict)}/{len(agree)} | "
                     f"{decided.verdict(row, 'probes', ALPHA)} |")
    return "\n".join(lines) + "\n"


def _left_out(decided: Decided) -> str:
    """A sentence naming the grids whose rows the study did not render ("" when it rendered them all)."""
    ran = {id(r) for group in dict.fromkeys(r.group for r in ROWS) for r in rows_run(decided, group)}
    grids = list(dict.fromkeys(r.grid for r in ROWS if id(r) not in ran))
    return f" Not rendered by this study, so left out: {', '.join(grids)}'s rows." if grids else ""


def _effect(effect: Effect | None) -> str:
    return f"{effect.pooled} (p {effect.p_holm:.3f})" if effect is not None else "–"


def forest_figure(decided: Decided, group: str, reading: str = "probes", out: Path | None = None,
                  rows: Sequence[Row] = ROWS) -> Figure:
    """One group's rows: per role, each pair's effect and CI (points) and the pooled one (a diamond)."""
    rows = [r for r in rows if r.group == group]
    roles = [m for m in ROLES if any((r, reading, m) in decided.effects for r in rows)]
    pairs = list(dict.fromkeys(p for r in rows for m in roles if (r, reading, m) in decided.effects
                               for p in decided.effects[(r, reading, m)].per_pair))
    height = len(rows) * (len(pairs) + 2)
    fig = Figure(figsize=(4.2 * len(roles) + 3, 0.28 * height + 1.2))
    axes = fig.subplots(1, len(roles), squeeze=False, sharey=True)[0]
    labels, ticks = [], []
    for r_index, row in enumerate(rows):
        top = r_index * (len(pairs) + 2)
        for a, role in zip(axes, roles):
            e = decided.effects.get((row, reading, role))
            if e is None:
                continue
            for p_index, pair in enumerate(pairs):
                if pair in e.per_pair:
                    x = e.per_pair[pair]
                    a.errorbar([x.mean], [top + p_index], xerr=[[x.mean - x.low], [x.high - x.mean]], fmt="o",
                               color=f"C{p_index}", capsize=2, markersize=4)
            y = top + len(pairs)
            a.plot([e.pooled.low, e.pooled.mean, e.pooled.high, e.pooled.mean, e.pooled.low],
                   [y, y - 0.3, y, y + 0.3, y], color="black")
        labels += [f"{row.grid}: {row.cell} vs {row.other}"[:70]] + [f"  {p}" for p in pairs[1:]] + ["  pooled"]
        ticks += [top + i for i in range(len(pairs) + 1)]
        labels[-len(pairs) - 1] = f"{row.grid}: {row.cell}\nvs {row.other} | {pairs[0]}"
    for a, role in zip(axes, roles):
        a.axvline(0, color="gray", linewidth=0.8)
        a.set_xlabel(f"Δ {role.value} ({reading})")
    axes[0].invert_yaxis()
    axes[0].set_yticks(ticks, labels, fontsize=6)
    fig.suptitle(f"{group}: effect per pair (pooled over its seeds) and pooled over pairs (diamond), 95 % CI")
    return finish_figure(fig, out)


def write_pooled(cells: Sequence[ReplicateCells], figures: Path, profile: str, resamples: int = 5000) -> Path:
    """``figures/replicate.csv`` and ``figures/replicate/{replicate.md, forest-<claim>.png}``; returns the CSV's path
    (``replicate.md``'s when nothing was scored)."""
    decided = decide(cells, resamples)
    out = figures / "replicate"
    pairs = list(dict.fromkeys(c.pair for c in cells))
    seeds = sorted({c.seed for c in cells})
    command = "python -m bwl replicate" + (f" --profile {profile}" if profile != "replicate" else "")
    if not decided.effects:
        return write_text(out / "replicate.md", f"{len(cells)} replicates, no comparison scored: the profile's "
                          "metrics are `none`, or its grids hold none of the compared cells.\n")
    write_text(out / "replicate.md", markdown(decided, len(cells), pairs, seeds, command))
    for group in dict.fromkeys(r.group for r in ROWS):
        if any(r.group == group and decided.of(r, "probes") for r in ROWS):
            forest_figure(decided, group, out=out / f"forest-{group}.png")
    write_csv(figures / "replicate.csv", csv_rows(decided))
    return figures / "replicate.csv"
