"""The headline: the replicated study's verdicts on the paper's claims C1-C3 in one short table, read from the table
the pooled analysis writes (``figures/replicate.csv``) and written to ``figures/replicate/headline.md``, which the
README and the book's findings show (a test checks the README's copy row for row)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from bwl.core.atomic import write_text
from bwl.study.scoring.pooled import ROWS

CLAIMS = ("C1", "C2", "C3")
TOY_READINGS = ("probes", "probe", "probe-resnet", "probe-patch", "texture")  # the toy world's instruments


DECIDING = {(r.group, r.grid, r.cell, r.other): tuple(m.value for m in r.roles) for r in ROWS}


@dataclass(frozen=True)
class Verdict:
    """One comparison on one architecture, from the probes' pooled reading: the effect and 95 % CI on each deciding
    metric."""

    effects: dict[str, tuple[float, float, float]]
    verdict: str
    holm: str
    replicates_same: int
    replicates: int
    robust: bool  # every toy instrument gives the same verdict

    def intervals(self) -> str:
        return "; ".join(f"{m} {e:+.2f} [{lo:+.2f}, {hi:+.2f}]" for m, (e, lo, hi) in self.effects.items())

    def summary(self) -> str:
        agreement = "robust" if self.robust else "instrument-dependent"
        return f"{self.verdict} {self.replicates_same}/{self.replicates}, Holm {self.holm}, {agreement}"


Comparison = tuple[str, str, str, str]  # group, grid, cell, vs


def verdicts(rows: list[dict]) -> dict[Comparison, Verdict]:
    """Each comparison of a ``replicate.csv`` (its rows as dicts), on the metrics that decide it (its row's roles:
    identity and style for the claims, preservation for interference)."""
    pooled = {(r["group"], r["grid"], r["cell"], r["vs"], r["reading"], r["metric"]): r for r in rows
              if r["pair"] == "pooled"}
    found = {}
    for key in dict.fromkeys(k[:4] for k in pooled if k[:4] in DECIDING):
        metrics = DECIDING[key]
        if any((*key, "probes", m) not in pooled for m in metrics):
            continue
        effects = {m: tuple(float(pooled[(*key, "probes", m)][f]) for f in ("effect", "low", "high")) for m in metrics}
        probes = pooled[(*key, "probes", metrics[-1])]
        readings = {pooled[(*key, r, metrics[-1])]["row_verdict"] for r in TOY_READINGS
                    if (*key, r, metrics[-1]) in pooled}
        found[key] = Verdict(effects, probes["row_verdict"], probes["row_verdict_holm"],
                             int(probes["replicates_same_verdict"] or 0), int(probes["replicates"]), len(readings) == 1)
    return found


def read_verdicts(replicate_csv: Path) -> dict[Comparison, Verdict]:
    if not replicate_csv.exists():
        raise FileNotFoundError(f"{replicate_csv}: no replicated study; run `python -m bwl replicate` for its profile")
    with open(replicate_csv, newline="") as f:
        return verdicts(list(csv.DictReader(f)))


def _effect(effect: tuple[float, float, float]) -> str:
    return f"{effect[0]:+.2f} [{effect[1]:+.2f}, {effect[2]:+.2f}]"


def headline(rows: list[dict]) -> str:
    """One line per comparison behind C1-C3: Δ identity and Δ style (the probes' mean, pooled, 95 % CI), the verdict,
    the replicates that give it, the verdict after Holm, and whether every toy instrument agrees."""
    lines = ["| claim | grid | comparison | Δ identity | Δ style | verdict | replicates | after Holm | instruments |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (group, grid, cell, vs), v in verdicts(rows).items():
        if group in CLAIMS:
            lines.append(f"| {group} | {grid} | {cell} vs {vs} | {_effect(v.effects['identity'])} | "
                         f"{_effect(v.effects['style'])} | {v.verdict} | {v.replicates_same}/{v.replicates} | "
                         f"{v.holm} | {'robust' if v.robust else 'instrument-dependent'} |")
    return "\n".join(lines) + "\n"


def write_headline(replicate_csv: Path, out: Path) -> Path:
    """``headline.md`` from ``replicate.csv``."""
    with open(replicate_csv, newline="") as f:
        return write_text(out, headline(list(csv.DictReader(f))))
