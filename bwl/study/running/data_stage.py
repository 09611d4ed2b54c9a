"""The study's first stage and its shared state: one profile's run folder, its concept pair and base model, and the
data (the concepts' images, tagged and corrected, and any regularization images)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from bwl.core.atomic import write_json
from bwl.core.hashing import fingerprint
from bwl.core.locks import claim
from bwl.data.captions import write_captions
from bwl.data.datasets import IMAGE_SUFFIXES, Prepared, prepare_folder
from bwl.data.regularization import generate_regularization
from bwl.data.tagging import Tagger, make_tagger
from bwl.sd.pipeline import load_pipeline
from bwl.sd.tiny import build_tiny_pipeline
from bwl.study.design.profile import Profile
from bwl.study.design.vocabulary import DATA_CONCEPTS, Concept
from bwl.study.running.cells import CellStore
from bwl.study.running.console import log
from bwl.study.scoring.metrics import Scorers
from bwl.toy.assets import write_concept
from bwl.toy.concepts import DEFAULT_PAIR, ConceptPair
from bwl.toy.tagger import ToyTagger


class StudyData:
    """One profile's run (its folder, concept pair, base model and training seed) and its data stage."""

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
            with claim(Path(self.model), "the tiny model", log):  # another run may be building it
                if not (Path(self.model) / "model_index.json").exists():
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
        counts = ", ".join(f"{c.value} {len(list(self.concept_dir(c).glob('*.txt')))} captioned images"
                           for c in DATA_CONCEPTS)
        log("data: " + counts + (f", {p.reg_count} regularization images" if p.reg_count else ""))
        self._fingerprints.clear()  # the data may have changed
        self._scorer = None  # and with it the reference images
        return reports

    def concept_images(self, concept: Concept) -> list[Image.Image]:
        """The concept's prepared training images."""
        folder = self.concept_dir(concept)
        return [Image.open(f).convert("RGB") for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
