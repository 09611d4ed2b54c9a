"""The study of one profile, stage by stage: data -> adapters -> grid cells -> results -> findings.

Each stage reuses what exists: adapters are keyed by their resolved config and data (:mod:`bwl.study.runs`), cells
by their model, adapters, prompts and seeds (:mod:`bwl.study.cells`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from PIL import Image

from bwl.core.atomic import write_json, write_text
from bwl.core.hashing import file_hash, fingerprint
from bwl.data.captions import write_captions
from bwl.data.datasets import IMAGE_SUFFIXES, Prepared, prepare_folder
from bwl.data.regularization import generate_regularization
from bwl.data.tagging import Tagger, make_tagger
from bwl.sd.encoders import load_clip, load_dino
from bwl.sd.pipeline import load_pipeline
from bwl.sd.tiny import build_tiny_pipeline
from bwl.study import runs
from bwl.study.cells import CellRenderer, CellStore
from bwl.study.console import log, progress
from bwl.study.distributed import barrier, device, is_main
from bwl.study.findings import decidable, findings_by_family
from bwl.study.metrics import METRIC_SUITES, ProbeScorer, Scorers
from bwl.study.profile import Profile
from bwl.study.reference import ReferenceScorer
from bwl.study.results import CellResult, read_results, write_results
from bwl.study.vocabulary import FIDELITY_BY_FAMILY, GRIDS, AdapterKey, Concept, Grid, adapters_of
from bwl.study.workers import Log, train_adapters
from bwl.toy.assets import write_concept
from bwl.toy.concepts import DEFAULT_PAIR, ConceptPair
from bwl.toy.tagger import ToyTagger
from bwl.train.config import TrainConfig


class Study:
    """One profile's study: data -> adapters -> grid images -> metrics -> figures, each stage reusing what exists."""

    def __init__(self, profile: Profile, train_seed: int | None = None, steps: dict[Concept, int] | None = None,
                 scorer: Scorers | None = None, pair: ConceptPair = DEFAULT_PAIR, figures: Path | None = None):
        """``train_seed``: the adapters' training seed (default: the profile's first); ``steps``: training steps per
        concept where they differ from the profile's; ``scorer``: one to share with other studies of the profile;
        ``pair``: the toy world's identity and style (:mod:`bwl.toy.concepts`); ``figures``: where the results
        tables go (default: the profile's figures folder)."""
        self.profile = profile
        self.pair = pair
        self.figures = profile.figures if figures is None else figures
        self.train_seed = profile.train_seeds[0] if train_seed is None else train_seed
        self.steps = dict(steps or {})
        self.out = profile.out
        self.model = profile.model_location
        self.cells = CellStore(self.out / "cells")
        self._fingerprints: dict[Path, str] = {}
        self._scorer: Scorers | None = scorer

    def _fingerprint(self, folder: Path) -> str:
        if folder not in self._fingerprints:
            self._fingerprints[folder] = fingerprint(folder)
        return self._fingerprints[folder]

    @property
    def model_fingerprint(self) -> str:
        """The base model by content (a hash of its local files) or by hub id, so that adapters and cells made
        with other weights under the same name are never reused."""
        return self._fingerprint(Path(self.model)) if Path(self.model).is_dir() else str(self.model)

    # ----- data --------------------------------------------------------------------------------------------------

    def concept_dir(self, concept: Concept | str) -> Path:
        concept = Concept(concept)
        concept_id = self.pair.concept_id(concept.value)
        return self.out / "data" / (f"{concept.value}-{concept_id}" if concept_id else concept.value)

    @property
    def reg_dir(self) -> Path | None:
        return self.out / "data" / "reg" if self.profile.reg_count else None

    def tagger(self) -> Tagger:
        p = self.profile
        return ToyTagger(p.tagger_model or None) if p.tagger == "toy" else make_tagger(p.tagger, p.tagger_model or None)

    def prepare_data(self) -> dict[Concept, list[Prepared]]:
        """Images into ``runs/<profile>/data/{identity,style}``, tagged and corrected; reg images if asked."""
        p = self.profile
        if p.build_tiny and not (Path(self.model) / "model_index.json").exists():
            build_tiny_pipeline(self.model)
        reports: dict[Concept, list[Prepared]] = {}
        tagger = self.tagger()
        for concept, blacklist in ((Concept.IDENTITY, p.blacklist_identity), (Concept.STYLE, p.blacklist_style)):
            folder = self.concept_dir(concept)
            if p.concepts == "toy":
                write_concept(folder, concept.value, pair=self.pair)
                own = self.pair.identity if concept is Concept.IDENTITY else self.pair.style
                blacklist = list(dict.fromkeys([*blacklist, *own.own_tags()]))
                reports[concept] = []
            else:
                source = p.path(getattr(p, f"{concept.value}_dir"))
                reports[concept] = prepare_folder(source, folder, resolution=max(p.resolution, 512))
            class_word = p.class_word if concept is Concept.IDENTITY else ""
            write_captions(folder, tagger, p.trigger(concept.value), class_word, blacklist=blacklist)
        if self.reg_dir is not None:
            generate_regularization(load_pipeline(self.model), self.reg_dir, p.reg_prompt, p.reg_count, p.resolution)
        write_json(self.out / "data" / "profile.json", p.to_dict())
        log("data: " + ", ".join(f"{c.value} {len(list(self.concept_dir(c).glob('*.txt')))} captioned images"
                                 for c in Concept) + (f", {p.reg_count} regularization images" if p.reg_count else ""))
        self._fingerprints.clear()  # the data may have changed
        self._scorer = None  # and with it the reference images
        return reports

    # ----- adapters ----------------------------------------------------------------------------------------------

    def grids(self) -> list[Grid]:
        return [GRIDS[name] for name in self.profile.grids]

    def needed_adapters(self) -> list[AdapterKey]:
        return adapters_of(self.grids())

    def seeded(self, key: AdapterKey) -> AdapterKey:
        """The grids' adapter key (seed 0: "the run's seed"; no concept id: "the study's concept") with this study's
        training seed and concept pair."""
        key = dataclasses.replace(key, seed=self.train_seed) if key.seed == 0 else key
        concept_id = self.pair.concept_id(key.concept.value)
        return dataclasses.replace(key, concept_id=concept_id) if concept_id and not key.concept_id else key

    def train_config(self, key: AdapterKey) -> TrainConfig:
        """The resolved ``TrainConfig`` of one adapter, its ``output_dir`` keyed by everything that can change it
        (the training seed included: :meth:`seeded`)."""
        key = self.seeded(key)
        instance_dir = self.concept_dir(key.concept)
        reg_dir = self.reg_dir if key.concept is Concept.IDENTITY else None
        config = runs.train_config(self.profile, key, instance_dir, reg_dir)
        if key.concept in self.steps:
            config = dataclasses.replace(config, steps=self.steps[key.concept])
        contents = {"model": self.model_fingerprint, "instance_dir": self._fingerprint(instance_dir)}
        if config.reg_dir is not None:
            contents["reg_dir"] = self._fingerprint(Path(config.reg_dir))
        return runs.keyed(config, key, self.out / "adapters", contents)

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

    def concept_images(self, concept: Concept) -> list[Image.Image]:
        """The concept's prepared training images."""
        folder = self.concept_dir(concept)
        return [Image.open(f).convert("RGB") for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]

    def adapter_files(self, keys: list[AdapterKey] | None = None) -> dict[AdapterKey, Path]:
        keys = self.needed_adapters() if keys is None else keys
        return {k: Path(self.train_config(k).output_dir) / "adapter.safetensors" for k in keys}

    def train_all(self, keys: list[AdapterKey] | None = None, log: Log = log) -> dict[AdapterKey, Path]:
        """Train every adapter the grids need (or ``keys``); ones whose config and data are unchanged are reused."""
        keys = self.needed_adapters() if keys is None else keys
        return dict(zip(keys, train_missing([(self, key) for key in keys], self.profile.train_workers, log)))

    # ----- cells -------------------------------------------------------------------------------------------------

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
                    results.append(CellResult(grid.name, column.label, key, renderer.summary(key),
                                              renderer.spreads(key)))
                count = len(grid.columns())
                log(f"{grid.name}: {count} cells, {made} generated ({len(p.prompts) * len(p.seeds)} images each), "
                    f"{count - made} reused")
        if renderer.scorer is not None:
            log("scoring time: " + ", ".join(f"{f} {t:.1f} s" for f, t in renderer.scorer.seconds.items()))
        path = self.figures / "results.csv"
        if is_main():
            path = write_results(self.figures, results, {**p.to_dict(), "pair": self.pair.name,
                                                         "train_seed": self.train_seed})
            if any(decidable(results, fidelity=pair) for pair in FIDELITY_BY_FAMILY.values()):
                write_text(self.figures / "findings.md", findings_by_family(results))
        barrier()
        return path

    def results(self) -> list[CellResult]:
        return read_results(self.figures)

    def cell_images(self, key: str) -> list[Image.Image]:
        return self.cells.images(key)


def train_missing(needs: list[tuple[Study, AdapterKey]], workers: int, log: Log = log) -> list[Path]:
    """Train, in one batch, every adapter these studies need and lack (under ``accelerate launch`` the processes split
    it), and return each need's adapter file. Adapters are keyed by config and data, so one that several studies
    share is trained once."""
    configs = [(study, key, study.train_config(key)) for study, key in needs]
    files = [Path(config.output_dir) / "adapter.safetensors" for _, _, config in configs]
    reused = [file.exists() for file in files]
    todo: dict[str, tuple[str, TrainConfig]] = {}
    for (study, key, config), done in zip(configs, reused):
        if not done:
            name = str(study.seeded(key))
            todo.setdefault(config.output_dir, (f"{name} ({config.steps} steps)" if key.concept in study.steps
                                                 else name, config))
    log(f"adapters: {sum(reused)} of {len(needs)} reused (same config and data), {len(todo)} to train")
    train_adapters(dict(todo.values()), workers, log)
    return files
