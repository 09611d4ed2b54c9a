"""Run keys: each adapter's resolved ``TrainConfig`` and the content-addressed folder it trains into.

The key hashes the whole resolved config, defaults included, with the bwl version, except the fields that cannot
change the adapter (``TrainConfig``'s ``RESULT_NEUTRAL_FIELDS``: where it writes, how often it logs or saves). Paths
are replaced by what they hold: the model, the concept's images and captions, and the regularization images are
hashed by content, so a retrained model or an edited caption under the same path never reuses an old adapter.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bwl import __version__
from bwl.core.hashing import config_hash
from bwl.study.design.profile import Profile
from bwl.study.design.vocabulary import AdapterKey, Concept
from bwl.train.config import TrainConfig

PATH_FIELDS = ("model", "instance_dir", "reg_dir", "joint_dir")  # keyed by their content, not their location


def train_config(profile: Profile, key: AdapterKey, instance_dir: Path, reg_dir: Path | None,
                 joint_dir: Path | None = None) -> TrainConfig:
    """The resolved ``TrainConfig`` of one adapter: ``TrainConfig`` defaults, then the profile's ``train:`` entry, then
    what the adapter key owns (method, blocks, seed, data, trigger). ``output_dir`` is set by :func:`keyed`. A joint
    adapter (concept ``both``) trains on the identity's images (``instance_dir``, with its regularization images) and
    the style's (``joint_dir``), each with its own trigger."""
    if key.merge:
        raise ValueError(f"{key} is made by merging {key.sources[0]} and {key.sources[1]}, not by training")
    has_identity = key.concept in (Concept.IDENTITY, Concept.BOTH)
    if (key.concept is Concept.BOTH) != (joint_dir is not None):
        raise ValueError(f"{key}: joint_dir is for joint adapters (concept both) and they need one")
    values = {"checkpoint_every": 0, **profile.train}
    values.update(model=str(profile.model_location), instance_dir=str(instance_dir), resolution=profile.resolution,
                  method=key.method, dora=key.dora, blocks=key.blocks, seed=key.seed,
                  trigger=profile.trigger("style" if key.concept is Concept.STYLE else "identity"),
                  class_word=profile.class_word if has_identity else "",
                  reg_dir=str(reg_dir) if reg_dir is not None and has_identity else None)
    if joint_dir is not None:
        values.update(joint_dir=str(joint_dir), joint_trigger=profile.trigger("style"))
    return TrainConfig(**values)


def run_key(config: TrainConfig, contents: dict[str, str]) -> str:
    """A hash of everything that can change the adapter ``config`` trains: its result fields (paths by ``contents``,
    a fingerprint per path field that is set) and the bwl version."""
    values = {k: v for k, v in config.result_values().items() if k not in PATH_FIELDS}
    missing = [f for f in PATH_FIELDS if getattr(config, f) is not None and f not in contents]
    if missing:
        raise ValueError(f"run_key: no content fingerprint for {', '.join(missing)}")
    return config_hash({"train": values, "contents": contents, "bwl_version": __version__})


def keyed(config: TrainConfig, key: AdapterKey, adapters_dir: Path, contents: dict[str, str]) -> TrainConfig:
    """``config`` with its ``output_dir`` set to ``adapters_dir/<key>-<run key>``."""
    return dataclasses.replace(config, output_dir=str(adapters_dir / f"{key}-{run_key(config, contents)}"))
