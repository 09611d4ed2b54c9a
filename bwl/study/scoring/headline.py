"""The headline: the replicated study's verdicts on the paper's claims C1-C3 in one short table, read from the table
the pooled analysis writes (``figures/replicate.csv``) and written to ``figures/replicate/headline.md``, which the
README and the book's findings show (a test checks the README's copy row for row)."""

from __future__ import annotations

import csv
from pathlib import Path

from bwl.core.atomic import write_text

CLAIMS = ("C1", "C2", "C3")
TOY_READINGS = ("probes", "probe", "probe-resnet", "probe-patch", "texture")  # the toy world's instruments


def _effect(row: dict) -> str:
    return f"{float(row['effect']):+.2f} [{float(row['low']):+.2f}, {float(row['high']):+.2f}]"


def headline(rows: list[dict]) -> str:
    """One line per comparison behind C1-C3: Δ identity and Δ style (the probes' mean, pooled, 95 % CI), the verdict,
    the replicates that give it, the verdict after Holm, and whether every toy instrument agrees."""
    pooled = {(r["group"], r["grid"], r["cell"], r["vs"], r["reading"], r["metric"]): r for r in rows
              if r["pair"] == "pooled"}
    comparisons = list(dict.fromkeys(k[:4] for k in pooled if k[0] in CLAIMS))
    lines = ["| claim | grid | comparison | Δ identity | Δ style | verdict | replicates | after Holm | instruments |",
             "|---|---|---|---|---|---|---|---|---|"]
    for group, grid, cell, vs in comparisons:
        identity, style = pooled[(group, grid, cell, vs, "probes", "identity")], pooled[
            (group, grid, cell, vs, "probes", "style")]
        verdicts = {pooled[(group, grid, cell, vs, r, "style")]["row_verdict"] for r in TOY_READINGS
                    if (group, grid, cell, vs, r, "style") in pooled}
        agreement = "robust" if len(verdicts) == 1 else "instrument-dependent"
        lines.append(f"| {group} | {grid} | {cell} vs {vs} | {_effect(identity)} | {_effect(style)} | "
                     f"{style['row_verdict']} | {style['replicates_same_verdict']}/{style['replicates']} | "
                     f"{style['row_verdict_holm']} | {agreement} |")
    return "\n".join(lines) + "\n"


def write_headline(replicate_csv: Path, out: Path) -> Path:
    """``headline.md`` from ``replicate.csv``."""
    with open(replicate_csv, newline="") as f:
        return write_text(out, headline(list(csv.DictReader(f))))
