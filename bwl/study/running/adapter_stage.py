"""The study's second stage: the adapters its grids need, each keyed by its resolved config and data
(:mod:`bwl.study.design.runs`), trained once and reused, locked while one run trains it so that another waits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bwl.study.design import runs
from bwl.study.design.vocabulary import GRIDS, AdapterKey, Concept, Grid, adapters_of
from bwl.study.running.console import log
from bwl.study.running.data_stage import StudyData
from bwl.study.running.workers import Log, train_adapters
from bwl.train.config import TrainConfig


class StudyAdapters(StudyData):
    """The adapter stage: which adapters the profile's grids need, their train configs and files, and training."""

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

    def adapter_files(self, keys: list[AdapterKey] | None = None) -> dict[AdapterKey, Path]:
        keys = self.needed_adapters() if keys is None else keys
        return {k: Path(self.train_config(k).output_dir) / "adapter.safetensors" for k in keys}

    def train_all(self, keys: list[AdapterKey] | None = None, log: Log = log) -> dict[AdapterKey, Path]:
        """Train every adapter the grids need (or ``keys``); ones whose config and data are unchanged are reused."""
        keys = self.needed_adapters() if keys is None else keys
        return dict(zip(keys, train_missing([(self, key) for key in keys], self.profile.train_workers, log)))


def train_missing(needs: list[tuple[StudyAdapters, AdapterKey]], workers: int, log: Log = log) -> list[Path]:
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
