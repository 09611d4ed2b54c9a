"""Two architectures' replicated verdicts side by side: each comparison behind the claims (C1-C3, block-wise
inference among C1's) and the interference rows, read from each profile's ``replicate.csv``, with its pooled effect
and 95 % CI, the verdict, the replicates that give it, the verdict after Holm and whether the toy instruments agree;
and whether the verdict carries over from the first architecture to the second (:func:`carries_over`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from matplotlib.figure import Figure

from bwl.core.atomic import finish_figure, write_csv, write_text
from bwl.study.scoring.headline import Comparison, Verdict, read_verdicts
from bwl.study.scoring.pooled import ROLES


def _slug(label: str) -> str:
    """A label as a CSV column prefix: ``SD 1.x`` -> ``sd1x``."""
    return "".join(c for c in label.lower() if c.isalnum())


def carries_over(first: Verdict | None, second: Verdict | None) -> str:
    """``yes`` when both architectures give the same verdict after Holm; ``before Holm`` when their pooled verdicts
    agree but one survives Holm's correction and the other does not (the same direction, not equally certain);
    ``no`` when the pooled verdicts differ too; ``not run`` when one of them has no such comparison (a grid its
    layout cannot run)."""
    if first is None or second is None:
        return "not run"
    if first.holm == second.holm:
        return "yes"
    return "before Holm" if first.verdict == second.verdict else "no"


def side_by_side(architectures: Mapping[str, dict[Comparison, Verdict]]) -> tuple[list[dict], str]:
    """The rows (for a CSV) and the Markdown table of two architectures' verdicts, keyed by their labels."""
    (a, first), (b, second) = architectures.items()
    keys = list(dict.fromkeys([*first, *second]))
    lines = [f"| claim | grid | comparison | {a}: Δ | {a}: verdict | {b}: Δ | {b}: verdict | carries over |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for key in keys:
        group, grid, cell, vs = key
        one, two = first.get(key), second.get(key)
        row = {"group": group, "grid": grid, "cell": cell, "vs": vs, "carries_over": carries_over(one, two)}
        for label, found in ((_slug(a), one), (_slug(b), two)):
            for metric in (m.value for m in ROLES):
                for i, field in enumerate(("effect", "low", "high")):
                    row[f"{label}_{metric}_{field}"] = found.effects[metric][i] if found and metric in \
                        found.effects else ""
            for field in ("verdict", "holm", "replicates_same", "replicates", "robust"):
                row[f"{label}_{field}"] = getattr(found, field) if found else ""
        rows.append(row)
        cells = [f"{v.intervals()} | {v.summary()}" if v else "not run | not run" for v in (one, two)]
        lines.append(f"| {group} | {grid} | {cell} vs {vs} | {cells[0]} | {cells[1]} | {row['carries_over']} |")
    return rows, "\n".join(lines) + "\n"


def side_by_side_figure(architectures: Mapping[str, dict[Comparison, Verdict]], out: Path | None = None) -> Figure:
    """Per deciding metric, each comparison's pooled effect and 95 % CI on every architecture (one color each)."""
    keys = list(dict.fromkeys(k for found in architectures.values() for k in found))
    metrics = list(dict.fromkeys(m for found in architectures.values() for v in found.values() for m in v.effects))
    fig = Figure(figsize=(4.2 * len(metrics) + 4, 0.42 * len(keys) + 1.4))
    axes = fig.subplots(1, len(metrics), squeeze=False, sharey=True)[0]
    for i, (label, found) in enumerate(architectures.items()):
        offset = 0.15 * (2 * i - len(architectures) + 1)
        for ax, metric in zip(axes, metrics):
            points = [(y, found[k].effects[metric]) for y, k in enumerate(keys) if k in found
                      and metric in found[k].effects]
            if points:
                ax.errorbar([e for _, (e, _, _) in points], [y + offset for y, _ in points],
                            xerr=[[e - lo for _, (e, lo, _) in points], [hi - e for _, (e, _, hi) in points]],
                            fmt="o", color=f"C{i}", capsize=2, markersize=4, label=label)
    for ax, metric in zip(axes, metrics):
        ax.axvline(0, color="gray", linewidth=0.8)
        ax.set_xlabel(f"Δ {metric} (probes, pooled)")
    axes[0].set_yticks(range(len(keys)), [f"{g} {grid}: {cell}\nvs {vs}" for g, grid, cell, vs in keys],
                       fontsize=6)
    axes[0].invert_yaxis()
    axes[-1].legend(fontsize=7)
    fig.suptitle("The replicated verdicts on two architectures: pooled effect, 95 % CI")
    return finish_figure(fig, out)


def write_side_by_side(architectures: Mapping[str, Path], out: Path) -> Path:
    """``<out>.csv``, ``<out>.md`` and ``<out>.png`` from two profiles' ``replicate.csv`` (label -> path); returns
    the table's path."""
    found = {label: read_verdicts(path) for label, path in architectures.items()}
    rows, table = side_by_side(found)
    write_csv(out.with_suffix(".csv"), rows)
    side_by_side_figure(found, out.with_suffix(".png"))
    return write_text(out.with_suffix(".md"), table)
