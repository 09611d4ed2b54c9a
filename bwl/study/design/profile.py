"""Profiles: one study setting each, as a small YAML file in ``bwl/study/design/profiles/`` ("the defaults, except…"; a
profile may ``extends: <another>`` and change only what differs).

A run is ``defaults + one profile + overrides`` and nothing else; unknown keys are refused with their names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from bwl.adapters.blocks import PAPER_BLOCKS, BlockSpecError
from bwl.adapters.methods import parse_method_label
from bwl.core.config import ConfigError, build, coerce_fields, read_file, require
from bwl.sd.encoders import DEFAULT_CLIP, DEFAULT_DINO
from bwl.study.design.vocabulary import GRIDS, PAPER_GRIDS
from bwl.toy.concepts import parse_pair
from bwl.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[3]
PROFILES = Path(__file__).resolve().parent / "profiles"
TAGGERS = ("wd14", "toy", "none")
METRIC_SUITES = ("probe", "reference", "both", "none")  # families: bwl.study.scoring.metrics.METRIC_SUITES
# TrainConfig keys that each grid adapter sets itself (its method, blocks, concept data and trigger) or that the
# study owns (where runs go, resuming): a profile's ``train:`` entry may not set them.
GRID_OWNED_TRAIN_KEYS = ("method", "blocks", "trigger", "class_word", "instance_dir", "reg_dir", "model",
                         "resolution", "seed", "output_dir", "resume", "stop_after")


@dataclass
class Profile:
    """One study setting. Keys not listed here are refused with their names."""

    name: str = "toy"
    model: str = "data/toy-sd"
    build_tiny: bool = False
    resolution: int = 32
    concepts: str = "toy"
    pairs: list[str] = field(default_factory=list)  # toy identity+style pairs (bwl.toy.concepts) the replicated
    # study repeats every grid for, e.g. [zkc+qrv, star+dots]; empty: the toy study's one pair
    identity_dir: str = ""
    style_dir: str = ""
    identity_trigger: str = "zkc"
    style_trigger: str = "qrv"
    class_word: str = ""
    tagger: str = "toy"
    tagger_model: str = ""
    blacklist_identity: list[str] = field(default_factory=list)
    blacklist_style: list[str] = field(default_factory=list)
    reg_count: int = 0
    reg_prompt: str = ""
    train: dict = field(default_factory=dict)
    train_seeds: list[int] = field(default_factory=lambda: [0])  # a study's adapters train with the first; the
    # training-length and replicate studies repeat theirs with each (the seed is part of every adapter's key)
    train_lengths: list[int] = field(default_factory=list)  # the training-length study's step counts
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: list(range(8)))
    sample_steps: int = 25
    guidance_scale: float = 7.0
    batch_size: int = 40
    grids: list[str] = field(default_factory=lambda: list(PAPER_GRIDS))
    figure_rows: int = 4
    figures_dir: str = "figures"
    runs_dir: str = ""
    metrics: str = "probe"
    clip_model: str = DEFAULT_CLIP  # reference metrics' encoders: hub ids, or directories written by save_pretrained
    dino_model: str = DEFAULT_DINO  # "" : identity, preservation and diversity read CLIP instead
    identity_words: str = ""  # replaces the identity trigger in the prompt metric; "": the class word, or "a person"
    style_words: str = "a style"  # what replaces the style trigger
    sweep_pairs: bool = True
    sweep_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    train_workers: int = 1  # adapters trained at once, in separate processes sharing the CPU threads (CPU only)
    methods: list[str] = field(default_factory=list)  # the methods study's methods (labels: locon, locon-dora, ...)
    methods_block: str = ""  # its single style block; "" takes the block sweep's best (figures/sweep.csv)
    combine_block: str = ""  # the combination study's best-block style; "" takes the block sweep's best
    combine_weights: list[list[float]] = field(default_factory=lambda: [
        [1.0, 0.25], [1.0, 0.5], [1.0, 0.75], [0.75, 1.0], [0.5, 1.0]])  # its tuned merge: (identity, style) weights
    combine_zip_steps: int = 100  # ZipLoRA's merger steps (its paper's 100)
    mechanism_examples: int = 240  # the mechanism maps' random characters for the decoding read-out
    mechanism_pairs: int = 16  # their prompt pairs per attribute for activation patching
    mechanism_attributes: list[str] = field(default_factory=list)  # toy attributes mapped; empty: all six
    mechanism_adapters: str = ""  # the replicated profile whose adapters are measured; "": this profile
    mechanism_seeds: list[int] = field(default_factory=lambda: [0, 1])  # sampling seeds for adapter patching

    def __post_init__(self) -> None:
        coerce_fields(self)
        require(self, [
            ("resolution", self.resolution >= 8 and self.resolution % 8 == 0, "a positive multiple of 8"),
            ("seeds", len(self.seeds) >= 1, "a non-empty list of integers"),
            ("sweep_seeds", len(self.sweep_seeds) >= 1, "a non-empty list of integers"),
            ("train_seeds", len(self.train_seeds) >= 1 and len(set(self.train_seeds)) == len(self.train_seeds),
             "a non-empty list of distinct integers"),
            ("train_lengths", all(n >= 1 for n in self.train_lengths), "a list of step counts >= 1"),
            ("sample_steps", self.sample_steps >= 1, "an integer >= 1"),
            ("guidance_scale", self.guidance_scale >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("figure_rows", self.figure_rows >= 1, "an integer >= 1"),
            ("reg_count", self.reg_count >= 0, ">= 0"),
            ("train_workers", self.train_workers >= 1, "an integer >= 1"),
            ("combine_weights", all(len(w) == 2 and min(w) >= 0 for w in self.combine_weights),
             "a list of [identity, style] weight pairs >= 0"),
            ("combine_zip_steps", self.combine_zip_steps >= 1, "an integer >= 1"),
            ("mechanism_examples", self.mechanism_examples >= 10, "an integer >= 10 (the read-out's folds)"),
            ("mechanism_pairs", self.mechanism_pairs >= 1, "an integer >= 1"),
            ("mechanism_seeds", len(self.mechanism_seeds) >= 1, "a non-empty list of integers"),
        ])

    def path(self, value: str) -> Path:
        """A profile path, relative to the repository root unless absolute."""
        p = Path(value)
        return p if p.is_absolute() else ROOT / p

    @property
    def out(self) -> Path:
        """Where this profile's data, adapters, cells and executed notebooks go."""
        return self.path(self.runs_dir or f"runs/{self.name}")

    @property
    def figures(self) -> Path:
        return self.path(self.figures_dir)

    def location(self, value: str) -> str | Path:
        """A model the profile names: a local directory (relative to the repository unless absolute), else a hub id."""
        return self.path(value) if self.path(value).exists() else value

    @property
    def model_location(self) -> str | Path:
        """The base model: a local directory (relative to the repository) or a hub id."""
        return self.path(self.model) if self.build_tiny else self.location(self.model)

    def trigger(self, concept: str) -> str:
        return self.identity_trigger if concept == "identity" else self.style_trigger

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(profile: Profile, source: str) -> None:
    owned = [k for k in profile.train if k in GRID_OWNED_TRAIN_KEYS]
    if owned:
        raise ConfigError(
            f"{source}: train: {', '.join(map(repr, owned))} is set by each grid adapter, not the profile "
            f"(keys the grid owns: {', '.join(GRID_OWNED_TRAIN_KEYS)})"
        )
    build(TrainConfig, dict(profile.train), source=f"{source}: train")
    for method in profile.methods:
        try:
            parse_method_label(method)
        except BlockSpecError as err:
            raise ConfigError(f"{source}: methods: {err}") from None
    for text in profile.pairs:
        try:
            parse_pair(text)
        except ValueError as err:
            raise ConfigError(f"{source}: pairs: {err}") from None
    if profile.pairs and profile.concepts != "toy":
        raise ConfigError(f"{source}: pairs are toy-world concepts; concepts={profile.concepts!r}")
    for key in ("methods_block", "combine_block"):
        if getattr(profile, key) and getattr(profile, key) not in PAPER_BLOCKS:
            raise ConfigError(f"{source}: {key}={getattr(profile, key)!r} is not one of {', '.join(PAPER_BLOCKS)}")
    unknown = [g for g in profile.grids if g not in GRIDS]
    if unknown:
        raise ConfigError(f"{source}: unknown grid(s) {unknown}; valid: {', '.join(GRIDS)}")
    for key, valid in (("tagger", TAGGERS), ("metrics", METRIC_SUITES)):
        if getattr(profile, key) not in valid:
            raise ConfigError(f"{source}: {key}={getattr(profile, key)!r} is not one of {', '.join(valid)}")


def _with_base(path: Path) -> dict:
    """A profile file's values over those of the profile it ``extends`` (top-level keys replace the base's)."""
    values = read_file(path)
    base = values.pop("extends", None)
    if base is None:
        return values
    base_path = PROFILES / f"{base}.yaml"
    if not base_path.is_file():
        raise ConfigError(f"profile {path.name}: extends unknown profile {base!r}")
    return {**_with_base(base_path), **values}


def load_profile(name: str = "toy", overrides: dict | None = None) -> Profile:
    """``bwl/study/design/profiles/<name>.yaml`` (or a YAML path) plus overrides; unknown keys raise naming them."""
    path = Path(name) if name.endswith((".yaml", ".yml", ".json")) else PROFILES / f"{name}.yaml"
    if not path.is_file():
        valid = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise ConfigError(f"unknown profile {name!r}; valid: {valid} (or a path to a YAML file)")
    values = {"name": path.stem, **_with_base(path), **(overrides or {})}
    profile = build(Profile, values, source=f"profile {path.name}")
    _check(profile, f"profile {path.name}")
    return profile
