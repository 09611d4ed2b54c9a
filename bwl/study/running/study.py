"""The study of one profile, stage by stage: data (:mod:`~bwl.study.running.data_stage`) -> adapters
(:mod:`~bwl.study.running.adapter_stage`) -> grid cells -> results -> findings.

Each stage reuses what exists: adapters are keyed by their resolved config and data (:mod:`bwl.study.design.runs`),
cells by their model, adapters, prompts and seeds (:mod:`bwl.study.running.cells`).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from bwl.core.atomic import write_text
from bwl.core.hashing import file_hash
from bwl.sd.encoders import load_clip, load_dino
from bwl.sd.pipeline import load_pipeline
from bwl.study.design.vocabulary import FIDELITY_BY_FAMILY, AdapterKey, Concept
from bwl.study.running.adapter_stage import StudyAdapters, train_missing
from bwl.study.running.cells import CellRenderer
from bwl.study.running.console import log, progress
from bwl.study.running.distributed import barrier, device, is_main
from bwl.study.running.workers import Log
from bwl.study.scoring.findings import decidable_claims, findings_by_family
from bwl.study.scoring.metrics import METRIC_SUITES, ProbeScorer, Scorers
from bwl.study.scoring.reference import ReferenceScorer
from bwl.study.scoring.results import CellResult, read_results, write_results

__all__ = ["Study", "train_missing"]


class Study(StudyAdapters):
    """One profile's study: data -> adapters -> grid images -> metrics -> figures, each stage reusing what exists.
    This class holds the last stages (cells, scores, results); the first two are its bases."""

    def scorer(self) -> Scorers | None:
        """The profile's metric families as one scorer (built once per study: the reference family embeds the
        training images once), or None for ``metrics: none``."""
        if self._scorer is None and METRIC_SUITES[self.profile.metrics]:
            p, parts = self.profile, []
            families = METRIC_SUITES[p.metrics]
            if "probe" in families:
                parts.append(ProbeScorer(pair=self.pair))
            if "reference" in families:
                words = {p.identity_trigger: p.identity_words or p.class_word or "a person",
                         p.style_trigger: p.style_words}
                parts.append(ReferenceScorer(load_clip(p.location(p.clip_model)),
                                             load_dino(p.location(p.dino_model)) if p.dino_model else None,
                                             self.concept_images(Concept.IDENTITY), self.concept_images(Concept.STYLE),
                                             words))
            self._scorer = Scorers(parts)
        return self._scorer

    def renderer(self, keys: list[AdapterKey], resident: list[AdapterKey] | None = None) -> CellRenderer:
        """A :class:`CellRenderer` on a freshly loaded pipeline for cells made of these adapters (all trained)."""
        files = self.adapter_files(keys)
        missing = [str(k) for k, f in files.items() if not f.exists()]
        if missing:
            raise FileNotFoundError(f"adapters not trained yet: {missing}; run the training step first")
        hashes = {k: file_hash(f) for k, f in files.items()}
        resident = keys if resident is None else resident
        return CellRenderer(load_pipeline(self.model, device=device()), self.profile, self.cells,
                            self.model_fingerprint, files, hashes, self.scorer(), resident,
                            scope="" if self.pair.is_default else self.pair.name)

    def run_grids(self, log: Log = log) -> Path:
        """Generate every column of every grid (same prompts and seeds everywhere, batched), score it, and write the
        results table (and the findings, where the run decides them). Under ``accelerate launch`` the processes
        share the cells and the main process writes the tables."""
        p = self.profile
        renderer = self.renderer(self.needed_adapters())
        jobs = [(column, p.prompts, p.seeds) for grid in self.grids() for column in grid.columns()]
        with progress(len(jobs), "grid cells") as bar:
            rendered = iter(renderer.render_many(jobs, bar.update))
            results = []
            for grid in self.grids():
                made = 0
                for column in grid.columns():
                    key, generated = next(rendered)
                    made += generated
                    results.append(CellResult(grid.name, column.label, key, self.cells.summary(key),
                                              self.cells.spreads(key)))
                count = len(grid.columns())
                log(f"{grid.name}: {count} cells, {made} generated ({len(p.prompts) * len(p.seeds)} images each), "
                    f"{count - made} reused")
        if renderer.scorer is not None:
            log("scoring time: " + ", ".join(f"{f} {t:.1f} s" for f, t in renderer.scorer.seconds.items()))
        path = self.figures / "results.csv"
        if is_main():
            path = write_results(self.figures, results, {**p.to_dict(), "pair": self.pair.name,
                                                         "train_seed": self.train_seed})
            if any(decidable_claims(results, pair) for pair in FIDELITY_BY_FAMILY.values()):
                write_text(self.figures / "findings.md", findings_by_family(results))
        barrier()
        return path

    def results(self) -> list[CellResult]:
        return read_results(self.figures)

    def cell_images(self, key: str) -> list[Image.Image]:
        return self.cells.images(key)
