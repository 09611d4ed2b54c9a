"""The study's vocabulary, defined once: concepts, adapter keys, grid cells, the paper's grids and the metrics.

An adapter the study trains is an :class:`AdapterKey` (concept, method, blocks, training seed, concept id); a
column of a grid is a :class:`Cell` (a label and the adapters it combines, each at a scale or on some blocks);
a :class:`Grid` is one paper figure. Findings, quality gates and figures import these; nothing parses names back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

from bwl.adapters.architectures import BlockSpecError, get_architecture
from bwl.adapters.blocks import format_selection, parse_selection
from bwl.adapters.methods import get_method, method_label, parse_method_label
from bwl.adapters.modes import MODES as COMBINATION_MODES


class Concept(str, Enum):
    """What an adapter learns: the identity (a subject), the style, or both in one adapter (joint training on both
    concepts' images with both triggers, or a ZipLoRA merge of an identity and a style)."""

    IDENTITY = "identity"
    STYLE = "style"
    BOTH = "both"

    @property
    def short(self) -> str:
        return {"identity": "id", "style": "style", "both": "joint"}[self.value]


DATA_CONCEPTS = (Concept.IDENTITY, Concept.STYLE)  # the concepts that have their own images and captions


class Metric(str, Enum):
    """A per-image score; each is reported as a mean with a 95 % confidence interval (:mod:`bwl.study.scoring.metrics`).

    The probe family reads the toy world's ground truth; the reference family (:mod:`bwl.study.scoring.reference`)
    compares images with the training images, the prompt and the base model's images through public encoders, for any
    model. """

    IDENTITY = "identity"  # the identity's look is present
    STYLE = "style"  # the style is present
    STYLE_TEXTURE = "style_texture"  # the style's texture statistic: the share of the head in its pattern
    PROMPT = "prompt"  # what the prompt asks beyond the training data is present
    PRESERVATION = "preservation"  # prompts without a trigger still work as in the base model
    REF_IDENTITY = "ref_identity"  # DINOv2 (else CLIP) similarity to the identity's training images' centroid
    REF_IDENTITY_CLIP = "ref_identity_clip"  # CLIP image similarity to the same centroid (CLIP-I)
    REF_STYLE = "ref_style"  # Gram-matrix similarity to the style's training images
    REF_PROMPT = "ref_prompt"  # CLIP text-image similarity to the prompt with plain words for the triggers
    REF_PRESERVATION = "ref_preservation"  # similarity to the base model's image at the same prompt and seed
    DIVERSITY = "diversity"  # Vendi score of the cell's images for one prompt (one value per prompt)


METRICS: tuple[Metric, ...] = tuple(Metric)
PROBE_METRICS: tuple[Metric, ...] = (Metric.IDENTITY, Metric.STYLE, Metric.STYLE_TEXTURE, Metric.PROMPT,
                                     Metric.PRESERVATION)  # the toy world's instruments: the probe, the texture
REFERENCE_METRICS: tuple[Metric, ...] = (Metric.REF_IDENTITY, Metric.REF_IDENTITY_CLIP, Metric.REF_STYLE,
                                         Metric.REF_PROMPT, Metric.REF_PRESERVATION, Metric.DIVERSITY)
METRICS_BY_FAMILY: dict[str, tuple[Metric, ...]] = {"probe": PROBE_METRICS, "reference": REFERENCE_METRICS}
"""The metrics each family of scorers writes."""
FIDELITY_BY_FAMILY: dict[str, tuple[Metric, Metric]] = {
    "probe": (Metric.IDENTITY, Metric.STYLE),
    "texture": (Metric.IDENTITY, Metric.STYLE_TEXTURE),
    "reference": (Metric.REF_IDENTITY, Metric.REF_STYLE),
}
"""The identity/style pair each metric family decides the paper's claims with ("texture": the probe's identity
with the transparent texture statistic for the style, a second instrument for the style)."""
TOY_INSTRUMENTS = ("probe", "texture")  # a toy verdict is robust when it holds under each of these
FIDELITY: tuple[Metric, ...] = (Metric.IDENTITY, Metric.STYLE)  # what the paper's claims compare


@dataclass(frozen=True, order=True)
class AdapterKey:
    """One adapter of the study. ``blocks`` is a block spec on the U-Net layout ``arch`` (``sd1``, ``sdxl``), stored
    canonically: ``"IN0+OUT3"`` becomes ``upper`` on SD 1.x, ``"IN0+OUT2"`` on SDXL; kohya fine blocks
    (``"OUT00+OUT01"``) select parts of a block. A study binds its keys to its model's layout (``seeded``)."""

    concept: Concept
    method: str
    blocks: str = "all"
    seed: int = 0  # training seed
    concept_id: str = ""  # which identity or style, where a profile has several ("" = its one)
    dora: bool = False  # DoRA on a lora/locon method
    merge: str = ""  # "" trained; "zip": the ZipLoRA merge of this method's identity and style (concept both)
    arch: str = "sd1"  # the U-Net layout the block spec is read on

    def __post_init__(self) -> None:
        object.__setattr__(self, "concept", Concept(self.concept))
        get_method(self.method, self.dora)
        arch = get_architecture(self.arch)
        object.__setattr__(self, "arch", arch.name)
        object.__setattr__(self, "blocks", format_selection(parse_selection(self.blocks, arch), arch))
        if self.merge not in MERGES:
            raise ValueError(f"unknown merge {self.merge!r}; valid: {', '.join(MERGES)}")
        if self.merge and self.concept is not Concept.BOTH:
            raise ValueError(f"a {self.merge} merge holds both concepts; concept={self.concept.value!r}")

    @property
    def sources(self) -> tuple[AdapterKey, AdapterKey]:
        """A merge's inputs: the identity and the style adapter it is made from."""
        if not self.merge:
            raise ValueError(f"{self} is trained, not merged")
        return (AdapterKey(Concept.IDENTITY, self.method, self.blocks, self.seed, dora=self.dora, arch=self.arch),
                AdapterKey(Concept.STYLE, self.method, self.blocks, self.seed, dora=self.dora, arch=self.arch))

    def on(self, arch: str) -> AdapterKey:
        """This key on the U-Net layout ``arch``. Groups (``upper``: the highest resolution level), ``all``, ``none``
        and ``MID`` mean the same on every layout; other specs name one layout's blocks and are refused."""
        target = get_architecture(arch)
        if target.name == self.arch:
            return self
        if self.blocks not in target.groups and self.blocks != "MID":
            raise BlockSpecError(f"adapter {self}: blocks {self.blocks!r} name {self.arch} blocks; make the key with "
                                 f"arch={target.name!r}")
        return replace(self, arch=target.name)

    @property
    def label(self) -> str:
        """The method as tables name it: ``locon``, or ``locon-dora``."""
        return method_label(self.method, self.dora)

    def __str__(self) -> str:
        """A readable name for logs and folders, e.g. ``id_locon_all`` or ``style_lora_upper_s1``."""
        parts = [self.merge or self.concept.short, self.label, self.blocks]
        parts += [self.concept_id] if self.concept_id else []
        parts += [f"s{self.seed}"] if self.seed else []
        return "_".join(parts)


def identity(method: str, blocks: str = "all", arch: str = "sd1") -> AdapterKey:
    """The identity adapter of a method (a label: ``"locon"``, ``"locon-dora"``) trained on ``blocks``."""
    name, dora = parse_method_label(method)
    return AdapterKey(Concept.IDENTITY, name, blocks, dora=dora, arch=arch)


def style(method: str, blocks: str = "all", arch: str = "sd1") -> AdapterKey:
    """The style adapter of a method (a label) trained on ``blocks``."""
    name, dora = parse_method_label(method)
    return AdapterKey(Concept.STYLE, name, blocks, dora=dora, arch=arch)


def joint(method: str, blocks: str = "all", arch: str = "sd1") -> AdapterKey:
    """One adapter of a method trained on both concepts' images, each captioned with its own trigger."""
    name, dora = parse_method_label(method)
    return AdapterKey(Concept.BOTH, name, blocks, dora=dora, arch=arch)


def zipped(method: str, blocks: str = "all", arch: str = "sd1") -> AdapterKey:
    """The ZipLoRA merge of a method's identity and style adapters (:mod:`bwl.train.ziplora`)."""
    name, dora = parse_method_label(method)
    return AdapterKey(Concept.BOTH, name, blocks, dora=dora, merge="zip", arch=arch)


MERGES = ("", "zip")
MODES = ("", *COMBINATION_MODES)
"""A cell's inference mode: "" the plain merge at its weights; the others combine its two adapters step by step
(:mod:`bwl.adapters.modes`) and cannot be one file."""

Weight = float | str  # a scale for the whole adapter, or a block spec / LBW vector (block-wise inference)


@dataclass(frozen=True)
class Cell:
    """One column of a grid: the adapters combined, each with its weight."""

    label: str
    adapters: tuple[tuple[AdapterKey, Weight], ...] = field(default=())
    mode: str = ""  # one of MODES

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"cell {self.label!r}: unknown mode {self.mode!r}; valid: {', '.join(MODES[1:])}")
        if self.mode and len(self.adapters) != 2:
            raise ValueError(f"cell {self.label!r}: mode {self.mode} combines two adapters, got {len(self.adapters)}")

    @property
    def weights(self) -> dict[AdapterKey, Weight]:
        return dict(self.adapters)

    def named_weights(self) -> dict[str, Weight]:
        """The weights by adapter name, as the pipeline knows the loaded adapters."""
        return {str(key): weight for key, weight in self.adapters}


def cell(label: str, *adapters: tuple[AdapterKey, Weight], mode: str = "") -> Cell:
    return Cell(label, tuple(adapters), mode)


# The cells' labels, as figures and tables show them.
BASE, ID_ALONE, STYLE_ALONE = "base", "ID alone", "style alone"
FULL_ID_FULL_STYLE = "full ID + full style"
BLOCKWISE_INFERENCE = "full ID + full style, inference on upper"
FULL_ID_UPPER_TRAINED_STYLE = "full ID + upper-trained style"
UPPER_ID_FULL_STYLE = "upper ID + full style"
UPPER_ID_UPPER_STYLE = "upper ID + upper style"
FULL_ID_UPPER_STYLE = "full ID + upper style"
FULL_ID_MIDDLE_STYLE = "full ID + middle style"
FULL_ID_BOTTOM_STYLE = "full ID + bottom style"
B_LORA = "B-LoRA: ID on OUT00 + style on OUT01"
INSTANTSTYLE_TRAINED = "full ID + style trained on OUT01"
INSTANTSTYLE_INFERENCE = "full ID + full style, inference on OUT01"


@dataclass(frozen=True)
class Grid:
    """One paper figure: its adapter method (a label such as ``locon-dora``) and its cells, after the references."""

    name: str
    method: str
    cells: tuple[Cell, ...]

    def references(self) -> tuple[Cell, ...]:
        """The base model and each full adapter alone."""
        m = self.method
        return cell(BASE), cell(ID_ALONE, (identity(m), 1.0)), cell(STYLE_ALONE, (style(m), 1.0))

    def columns(self) -> tuple[Cell, ...]:
        """References first, then the paper's cells."""
        return self.references() + self.cells

    def column(self, label: str) -> Cell:
        found = [c for c in self.columns() if c.label == label]
        if not found:
            raise KeyError(f"{self.name}: no cell {label!r}; cells: {[c.label for c in self.columns()]}")
        return found[0]


def _method_grid(name: str, m: str) -> Grid:
    """fig2 (LoRA) and fig3 (LoCon): plain combination, block-wise inference, block-wise-trained style."""
    return Grid(name, m, (
        cell(FULL_ID_FULL_STYLE, (identity(m), 1.0), (style(m), 1.0)),
        cell(BLOCKWISE_INFERENCE, (identity(m), 1.0), (style(m), "upper")),
        cell(FULL_ID_UPPER_TRAINED_STYLE, (identity(m), 1.0), (style(m, "upper"), 1.0)),
    ))


GRIDS: dict[str, Grid] = {g.name: g for g in (
    _method_grid("fig2", "lora"),
    _method_grid("fig3", "locon"),
    Grid("fig4a", "locon", (
        cell(UPPER_ID_FULL_STYLE, (identity("locon", "upper"), 1.0), (style("locon"), 1.0)),
        cell(UPPER_ID_UPPER_STYLE, (identity("locon", "upper"), 1.0), (style("locon", "upper"), 1.0)),
        cell(FULL_ID_UPPER_STYLE, (identity("locon"), 1.0), (style("locon", "upper"), 1.0)),
    )),
    Grid("fig4b", "locon", (
        cell(FULL_ID_UPPER_STYLE, (identity("locon"), 1.0), (style("locon", "upper"), 1.0)),
        cell(FULL_ID_MIDDLE_STYLE, (identity("locon"), 1.0), (style("locon", "middle"), 1.0)),
        cell(FULL_ID_BOTTOM_STYLE, (identity("locon"), 1.0), (style("locon", "bottom"), 1.0)),
    )),
    # SDXL only: B-LoRA (Frenkel et al. 2024) trains one LoRA per image on up_blocks.0's two attentions and takes the
    # content from the first (OUT00) and the style from the second (OUT01); InstantStyle (Wang et al. 2024) injects
    # the style into up_blocks.0.attentions.1 (OUT01) only, here as a style LoRA trained, or applied, there.
    Grid("xl", "lora", (
        cell(B_LORA, (identity("lora", "OUT00+OUT01", "sdxl"), "OUT00"),
             (style("lora", "OUT00+OUT01", "sdxl"), "OUT01")),
        cell(INSTANTSTYLE_TRAINED, (identity("lora"), 1.0), (style("lora", "OUT01", "sdxl"), 1.0)),
        cell(INSTANTSTYLE_INFERENCE, (identity("lora"), 1.0), (style("lora"), "OUT01")),
    )),
)}
PAPER_GRIDS = ("fig2", "fig3", "fig4a", "fig4b")  # the paper's figures; "xl" holds SDXL's own block choices


def adapters_of(grids: list[Grid] | tuple[Grid, ...]) -> list[AdapterKey]:
    """Every adapter these grids' columns use, in first-use order."""
    keys: list[AdapterKey] = []
    for grid in grids:
        for column in grid.columns():
            keys += [k for k, _ in column.adapters if k not in keys]
    return keys
