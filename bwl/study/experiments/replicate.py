"""The replicated study: all four grids for every identity-style pair x training seed of a profile, then the paper's
comparisons pooled over them (:mod:`bwl.study.scoring.pooled`).

``python -m bwl replicate`` (profile ``replicate``) prepares each pair's data, trains every adapter that is missing
(in one batch: under ``accelerate launch`` the processes split it), renders and scores each replicate's grids
(split too), and writes ``figures/replicate.csv`` and ``figures/replicate/``: one results table per replicate, the
pooled findings and a forest plot per claim. Everything is keyed, so a rerun reuses what exists and an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from bwl.core.atomic import finish_figure
from bwl.core.config import ConfigError
from bwl.study.design.profile import Profile
from bwl.study.running.console import log
from bwl.study.running.distributed import barrier, is_main
from bwl.study.running.study import Study, train_missing
from bwl.study.running.workers import Log
from bwl.study.scoring.headline import write_headline
from bwl.study.scoring.metrics import Scores
from bwl.study.scoring.pooled import ReplicateCells, write_pooled
from bwl.toy.concepts import DEFAULT_PAIR, ConceptPair, parse_pair
from bwl.toy.world import render


@dataclass(frozen=True)
class Replicate:
    """One pair x training seed: its study, whose results go to ``figures/replicate/<identity>-<style>-s<seed>``."""

    pair: ConceptPair
    seed: int
    study: Study

    @property
    def name(self) -> str:
        return self.study.figures.name


def profile_pairs(profile: Profile) -> list[ConceptPair]:
    """The profile's identity-style pairs (its one toy pair when ``pairs`` is empty)."""
    return [parse_pair(text) for text in profile.pairs] or [DEFAULT_PAIR]


def prepare(profile: Profile, log: Log = log) -> None:
    """Each pair's data (idempotent), by the main process."""
    if is_main():
        for pair in profile_pairs(profile):
            log(f"data: {pair}")
            Study(profile, pair=pair).prepare_data()
    barrier()


def replicates(profile: Profile, shared_scorers: bool = False) -> list[Replicate]:
    """Every pair x training seed, pair by pair. With ``shared_scorers`` a pair's replicates share one scorer (built
    from the pair's data, which must exist; training needs none)."""
    found = []
    for pair in profile_pairs(profile):
        scorer = None
        for seed in profile.train_seeds:
            name = f"{pair.identity.name}-{pair.style.name}-s{seed}"
            study = Study(profile, seed, scorer=scorer, pair=pair, figures=profile.figures / "replicate" / name)
            found.append(Replicate(pair, seed, study))
            scorer = study.scorer() if shared_scorers else None
    return found


def cells_of(replicate: Replicate) -> ReplicateCells:
    """The replicate's per-image scores, by (grid, cell label), from its results table."""
    study = replicate.study
    scores: dict[tuple[str, str], list[Scores]] = {
        (row.grid, row.cell): study.cells.scores(row.key) for row in study.results()}
    return ReplicateCells(replicate.pair.name, replicate.seed, scores)


def concepts_figure(pairs: list[ConceptPair], shown: int = 4, out: Path | None = None) -> Figure:
    """Each pair's first training images: the identity's, then the style's."""
    fig = Figure(figsize=(2 * shown * 0.9, 1.0 * len(pairs) + 0.3))
    axes = fig.subplots(len(pairs), 2 * shown, squeeze=False)
    for row, pair in zip(axes, pairs):
        images = pair.identity.images(shown) + pair.style.images(shown)
        for a, (character, seed) in zip(row, images):
            a.imshow(render(character, seed))
            a.set_xticks([])
            a.set_yticks([])
        row[0].set_ylabel(pair.name, fontsize=8)
    fig.suptitle("training images per pair: identity (left), style (right)", fontsize=9)
    return finish_figure(fig, out)


def run_replicate(profile: Profile, log: Log = log) -> Path:
    """Data, adapters and grids for every replicate (reusing what exists), then the pooled findings."""
    if len(profile_pairs(profile)) * len(profile.train_seeds) < 2:
        raise ConfigError(f"profile {profile.name}: a replicated study needs several pairs or train_seeds; it has "
                          f"pairs={profile.pairs} and train_seeds={profile.train_seeds}")
    started = time.time()
    prepare(profile, log)
    runs = replicates(profile, shared_scorers=True)
    train_missing([(r.study, key) for r in runs for key in r.study.needed_adapters()], profile.train_workers, log)
    for i, replicate in enumerate(runs, 1):
        log(f"replicate {i}/{len(runs)}: {replicate.name}")
        replicate.study.run_grids(log)
    out = profile.figures / "replicate.csv"
    if is_main():
        concepts_figure(profile_pairs(profile), out=profile.figures / "replicate" / "concepts.png")
        out = write_pooled([cells_of(r) for r in runs], profile.figures, profile.name)
        if out.suffix == ".csv":
            write_headline(out, profile.figures / "replicate" / "headline.md")
        log(f"replicate: {len(runs)} replicates in {(time.time() - started) / 60:.1f} min; {out}")
    barrier()
    return out
