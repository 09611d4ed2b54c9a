"""The study's second stage: the adapters its grids need, each keyed by its resolved config and data
(:mod:`bwl.study.design.runs`), trained once and reused, locked while one run trains it so that another waits."""

from __future__ import annotations

import dataclasses
from functools import cached_property
from pathlib import Path

from bwl.adapters.architectures import Architecture, architecture_of
from bwl.core.hashing import config_hash
from bwl.core.locks import claim
from bwl.sd.pipeline import load_pipeline, unet_config
from bwl.study.design import runs
from bwl.study.design.vocabulary import GRIDS, AdapterKey, Concept, Grid, adapters_of
from bwl.study.running.console import log
from bwl.study.running.data_stage import StudyData
from bwl.study.running.distributed import barrier, is_main
from bwl.study.running.workers import Log, train_adapters
from bwl.train.config import TrainConfig
from bwl.train.ziplora import ZipConfig, zip_loras

ZIP_PATH_FIELDS = ("identity", "style", "out", "identity_images", "style_images")  # keyed by content


class StudyAdapters(StudyData):
    """The adapter stage: which adapters the profile's grids need, their train configs and files, and training."""

    @cached_property
    def architecture(self) -> Architecture:
        """The base model's U-Net layout (SD 1.x, SD 2.x, SDXL), read from its config."""
        return architecture_of(unet_config(self.model))

    def grids(self) -> list[Grid]:
        return [GRIDS[name] for name in self.profile.grids]

    def needed_adapters(self) -> list[AdapterKey]:
        return adapters_of(self.grids())

    def seeded(self, key: AdapterKey) -> AdapterKey:
        """The grids' adapter key (seed 0: "the run's seed"; no concept id: "the study's concept") with this study's
        training seed and concept pair (a joint or merged adapter's concept id is the pair's name), on this study's
        U-Net layout."""
        key = key.on(self.architecture.name)
        key = dataclasses.replace(key, seed=self.train_seed) if key.seed == 0 else key
        concept_id = self.pair.name if key.concept is Concept.BOTH and not self.pair.is_default else \
            self.pair.concept_id(key.concept.value)
        return dataclasses.replace(key, concept_id=concept_id) if concept_id and not key.concept_id else key

    def train_config(self, key: AdapterKey) -> TrainConfig:
        """The resolved ``TrainConfig`` of one adapter, its ``output_dir`` keyed by everything that can change it
        (the training seed included: :meth:`seeded`)."""
        key = self.seeded(key)
        both = key.concept is Concept.BOTH
        instance_dir = self.concept_dir(Concept.IDENTITY if both else key.concept)
        joint_dir = self.concept_dir(Concept.STYLE) if both else None
        reg_dir = self.reg_dir if key.concept is not Concept.STYLE else None
        config = runs.train_config(self.profile, key, instance_dir, reg_dir, joint_dir)
        if key.concept in self.steps:
            config = dataclasses.replace(config, steps=self.steps[key.concept])
        contents = {"model": self.model_fingerprint, "instance_dir": self._fingerprint(instance_dir)}
        for field in ("reg_dir", "joint_dir"):
            if getattr(config, field) is not None:
                contents[field] = self._fingerprint(Path(getattr(config, field)))
        return runs.keyed(config, key, self.out / "adapters", contents)

    def zip_config(self, key: AdapterKey) -> ZipConfig:
        """The ZipLoRA merge of a merged key's two sources (trained by this study), on the concepts' images, keyed by
        the sources' run keys, the images and the merge's settings."""
        key = self.seeded(key)
        sources = [self.adapter_files([source])[source] for source in key.sources]
        config = ZipConfig(str(sources[0]), str(sources[1]), "", identity_images=str(self.concept_dir("identity")),
                           style_images=str(self.concept_dir("style")), steps=self.profile.combine_zip_steps,
                           sample_steps=self.profile.sample_steps, seed=key.seed)
        values = {k: v for k, v in dataclasses.asdict(config).items() if k not in ZIP_PATH_FIELDS}
        contents = {"model": self.model_fingerprint, "sources": [f.parent.name for f in sources],  # their run keys
                    "images": [self._fingerprint(Path(config.identity_images)),
                               self._fingerprint(Path(config.style_images))]}
        folder = self.out / "adapters" / f"{key}-{config_hash({'zip': values, 'contents': contents})}"
        return dataclasses.replace(config, out=str(folder / "adapter.safetensors"))

    def adapter_files(self, keys: list[AdapterKey] | None = None) -> dict[AdapterKey, Path]:
        keys = self.needed_adapters() if keys is None else keys
        return {k: Path(self.zip_config(k).out) if k.merge else Path(self.train_config(k).output_dir)
                / "adapter.safetensors" for k in keys}

    def train_all(self, keys: list[AdapterKey] | None = None, log: Log = log) -> dict[AdapterKey, Path]:
        """Train every adapter the grids need (or ``keys``); ones whose config and data are unchanged are reused."""
        keys = self.needed_adapters() if keys is None else keys
        return dict(zip(keys, train_missing([(self, key) for key in keys], self.profile.train_workers, log)))


def merge_missing(needs: list[tuple[StudyAdapters, AdapterKey]], log: Log = log) -> None:
    """Make every merged adapter these studies need and lack (their sources trained), one after another."""
    todo = {}
    for study, key in needs:
        config = study.zip_config(key)
        if not Path(config.out).exists():
            todo.setdefault(config.out, (study, key, config))
    for i, (study, key, config) in enumerate(todo.values(), 1):
        with claim(Path(config.out).parent, f"merge {study.seeded(key)}", log):
            if not Path(config.out).exists():
                _, losses = zip_loras(load_pipeline(study.model), config)
                log(f"[{i}/{len(todo)}] {study.seeded(key)}: ZipLoRA {config.steps} steps, loss {losses[0]:.4f} -> "
                    f"{losses[-1]:.4f}")


def train_missing(needs: list[tuple[StudyAdapters, AdapterKey]], workers: int, log: Log = log) -> list[Path]:
    """Train, in one batch, every adapter these studies need and lack (under ``accelerate launch`` the processes split
    it), then make the merged ones from them, and return each need's adapter file. Adapters are keyed by config and
    data, so one that several studies share is trained once."""
    merged = [(study, key) for study, key in needs if key.merge]
    sources = [(study, source) for study, key in merged for source in key.sources]
    trained = [(study, key) for study, key in needs if not key.merge]
    if merged:
        files = train_missing(trained + sources, workers, log)[:len(trained)]
        if is_main():
            merge_missing(merged, log)
        barrier()
        found = iter(files)
        return [study.adapter_files([key])[key] if key.merge else next(found) for study, key in needs]
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
