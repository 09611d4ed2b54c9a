"""The block sweep (the paper's open question 1): a style LoCon trained on each paper block and each pair of blocks
of the model's layout, each combined with the full-block LoCon identity, generated and scored through the grids' cell
path.

Each spec is also compared with the paper's upper group (IN0+OUT3 on SD 1.x, IN0+OUT2 on SDXL) on identity and
style, per image (the cells share prompts and seeds), with a bootstrap 95 % CI and p-value; the p-values of all the
sweep's comparisons are Holm-adjusted together (``sweep-tests.csv``). One training run per spec: the tests see
sampling noise only."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from bwl.adapters.architectures import ArchitectureLike, get_architecture
from bwl.adapters.blocks import parse_blocks
from bwl.core.atomic import write_csv
from bwl.study.design.vocabulary import Cell, Metric, cell, identity, style
from bwl.study.running.console import log, progress
from bwl.study.running.study import Study
from bwl.study.running.workers import Log
from bwl.study.scoring.metrics import Estimate, Scores
from bwl.study.scoring.statistics import hierarchical_bootstrap, holm


@dataclass(frozen=True)
class SweepResult:
    """Identity and style fidelity of full ID + a style trained on ``spec``."""

    spec: str
    identity: Estimate
    style: Estimate

    @property
    def blocks(self) -> tuple[str, ...]:
        return parse_blocks(self.spec)

    def row(self) -> dict[str, str | float | int]:
        return {"blocks": self.spec, "identity": self.identity.mean, "style": self.style.mean,
                "identity_ci": self.identity.ci, "style_ci": self.style.ci,
                "identity_n": self.identity.n, "style_n": self.style.n}


def sweep_specs(pairs: bool = True, arch: ArchitectureLike | None = None) -> list[str]:
    """Every single paper block of ``arch`` (SD 1.x by default), then every pair of them."""
    blocks = get_architecture(arch).paper_blocks
    return list(blocks) + ([f"{a}+{b}" for a, b in combinations(blocks, 2)] if pairs else [])


def sweep_cells(pairs: bool = True, arch: ArchitectureLike | None = None) -> list[Cell]:
    name = get_architecture(arch).name
    return [cell(f"full ID + style on {spec}", (identity("locon"), 1.0), (style("locon", spec, name), 1.0))
            for spec in sweep_specs(pairs, name)]


def upper_spec(arch: ArchitectureLike | None = None) -> str:
    """The paper's upper group spelled as the sweep spells it: ``IN0+OUT3`` on SD 1.x, ``IN0+OUT2`` on SDXL."""
    return "+".join(get_architecture(arch).groups["upper"])


def run_sweep(study: Study, log: Log = log) -> Path:
    """Train what is missing, render every sweep cell (prompts with the style trigger, ``sweep_seeds``) and write
    ``sweep.csv`` to the figures folder."""
    p, arch = study.profile, study.architecture
    cells = sweep_cells(p.sweep_pairs, arch)
    keys = [identity("locon")] + [k for c in cells for k in c.weights if k != identity("locon")]
    study.train_all(keys, log)
    renderer = study.renderer(keys, resident=[identity("locon")])
    prompts = [q for q in p.prompts if p.style_trigger in q]
    results, scores = [], {}
    with progress(len(cells), "sweep cells") as bar:
        for column, spec in zip(cells, sweep_specs(p.sweep_pairs, arch)):
            key, _ = renderer.render(column, prompts, p.sweep_seeds)
            summary = renderer.store.summary(key)
            scores[spec] = study.cells.scores(key)
            results.append(SweepResult(spec, summary[Metric.IDENTITY], summary[Metric.STYLE]))
            log(f"sweep {spec}: identity {results[-1].identity}, style {results[-1].style}")
            bar.update()
    if upper_spec(arch) in scores:
        write_csv(p.figures / "sweep-tests.csv", sweep_tests(scores, upper_spec(arch)))
    return write_sweep(p.figures / "sweep.csv", results)


def sweep_tests(scores: dict[str, list[Scores]], reference: str = "IN0+OUT3", resamples: int = 20000) -> list[dict]:
    """Every spec against ``reference`` on identity and style: the mean per-image difference, its bootstrap 95 % CI,
    its p-value, and the p-value Holm-adjusted over all of the sweep's comparisons."""
    rows = []
    for spec, found in scores.items():
        if spec == reference:
            continue
        for metric in (Metric.IDENTITY, Metric.STYLE):
            deltas = [a[metric.value] - b[metric.value] for a, b in zip(found, scores[reference], strict=True)
                      if metric.value in a and metric.value in b]
            effect = hierarchical_bootstrap({"sweep": {0: deltas}}, resamples)
            rows.append({"blocks": spec, "vs": reference, "metric": metric.value, "effect": effect.mean,
                         "low": effect.low, "high": effect.high, "p": effect.p, "images": effect.images})
    for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adjusted
    return rows


def write_sweep(path: Path, results: list[SweepResult]) -> Path:
    return write_csv(path, [r.row() for r in results])


def read_sweep(path: Path) -> list[SweepResult]:
    """A ``sweep.csv`` (counts default to 0 in files written before they were recorded)."""
    with open(path, newline="") as f:
        return [SweepResult(r["blocks"], *(Estimate(float(r[m]), float(r[f"{m}_ci"]), int(r.get(f"{m}_n") or 0))
                                           for m in ("identity", "style"))) for r in csv.DictReader(f)]


def pareto_front(results: list[SweepResult]) -> list[SweepResult]:
    """Specs no other spec matches or beats on both identity and style (by mean)."""
    def dominated(r: SweepResult) -> bool:
        return any(o.identity.mean >= r.identity.mean and o.style.mean >= r.style.mean
                   and (o.identity.mean, o.style.mean) != (r.identity.mean, r.style.mean) for o in results)
    return [r for r in results if not dominated(r)]



def top_specs_markdown(results: list[SweepResult], top: int = 10) -> str:
    """The ``top`` specs by identity + style fidelity (means), with their 95 % CIs and Pareto membership."""
    front = {r.spec for r in pareto_front(results)}
    ranked = sorted(results, key=lambda r: -(r.identity.mean + r.style.mean))[:top]
    lines = ["| rank | style trained on | identity | style | Pareto front |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {r.spec} | {r.identity} | {r.style} | {'yes' if r.spec in front else ''} |"
              for i, r in enumerate(ranked, 1)]
    return "\n".join(lines) + "\n"
