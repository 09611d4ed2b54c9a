"""The metrics of a cell (:class:`~bwl.study.design.vocabulary.Metric`): per-image scores, summarized as means with 95 %
confidence intervals. ``metrics: probe`` reads them off the toy world's images with its probes (``reference``: the
reference family, :mod:`bwl.study.scoring.reference`; ``both``: the two side by side). Each probe metric is the mean of
the independently trained probes' readings (:data:`~bwl.toy.assets.INSTRUMENTS`); each probe's own reading is kept
beside it as ``<metric>@<probe>`` and the cell reports their spread (largest minus smallest probe mean):

- identity fidelity: the fraction of the identity's attributes (shape, color, hat, eyes) present;
- style fidelity: the probe's probability of the held-out style;
- style texture: the held-out style's texture statistic (:mod:`bwl.toy.texture`), a second, transparent instrument
  for the style;
- prompt fidelity: the fraction of prompt-asked attributes that differ from the training data (e.g. a background)
  present;
- base preservation: for prompts without a trigger, the fraction of asked attributes present.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from bwl.core.hashing import config_hash, file_hash
from bwl.data.datasets import split_tags
from bwl.study.design.vocabulary import METRICS, METRICS_BY_FAMILY, Metric
from bwl.toy.assets import INSTRUMENTS, Instrument
from bwl.toy.concepts import DEFAULT_PAIR, ConceptPair
from bwl.toy.probes import Probe, load_probe
from bwl.toy.texture import VERSION as TEXTURE_VERSION
from bwl.toy.texture import texture_energy
from bwl.toy.world import IDENTITY_BACKGROUNDS, IDENTITY_TRIGGER, STYLE_TRIGGER, tag_attribute

INSTRUMENT_METRICS: tuple[Metric, ...] = (Metric.IDENTITY, Metric.STYLE, Metric.PROMPT, Metric.PRESERVATION)
"""The metrics each probe reads (their mean is the metric; ``<metric>@<probe>`` each probe's own)."""



@dataclass(frozen=True)
class Estimate:
    """A mean, the half-width of its 95 % confidence interval, and the number of values behind it."""

    mean: float
    ci: float
    n: int

    def __str__(self) -> str:
        if self.n == 1:  # one value has no interval
            return f"{self.mean:.2f} (n = 1)"
        return f"{self.mean:.2f} ± {self.ci:.2f}" if self.n else "–"


def mean_ci(values: Sequence[float]) -> Estimate:
    """Mean and the half-width of its normal-approximation 95 % confidence interval."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return Estimate(math.nan, math.nan, 0)
    ci = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return Estimate(float(values.mean()), float(ci), len(values))


def asked_attributes(prompt: str) -> dict[str, str]:
    """World attributes a prompt asks for, by its tags."""
    return dict(a for a in (tag_attribute(t) for t in split_tags(prompt)) if a is not None)


def has_trigger(prompt: str) -> bool:
    return any(t.split()[0] in (IDENTITY_TRIGGER, STYLE_TRIGGER) for t in split_tags(prompt))


Scores = dict[str, float]  # one image's scores by metric name; metrics that do not apply to its prompt are absent


def instrument_key(metric: Metric, instrument: str) -> str:
    """Where one probe's own reading of a metric is kept in an image's scores."""
    return f"{metric.value}@{instrument}"


def drawn_textures(texture: str) -> tuple[str, ...]:
    """The textures a study's model can draw: the seen one (stripes) and the style's own."""
    return tuple(dict.fromkeys(("stripes", texture)))


def probe_scores(probe: Probe, images: Sequence[Image.Image], prompts: Sequence[str],
                 pair: ConceptPair = DEFAULT_PAIR) -> list[Scores]:
    """Per image, the metrics that apply to its prompt (others absent), for ``pair``'s identity and style."""
    texture = pair.style.texture
    if texture not in probe.attributes["style"] or pair.identity.shape not in probe.attributes["shape"]:
        raise ValueError(f"this probe does not read {pair}'s concepts (it reads styles {probe.attributes['style']} "
                         f"and shapes {probe.attributes['shape']}); train the probes again: python -m bwl probes")
    probabilities = probe.probabilities(images)
    readings = probe.most_likely(probabilities)
    style_probability = probabilities["style"][:, probe.attributes["style"].index(texture)]
    scores = []
    for i, (reading, prompt) in enumerate(zip(readings, prompts)):
        asked = asked_attributes(prompt)
        score: Scores = {}
        tags = [t.split()[0] for t in split_tags(prompt)]
        if IDENTITY_TRIGGER in tags:
            score[Metric.IDENTITY.value] = float(np.mean([reading[k] == v for k, v in pair.identity.look.items()]))
        if STYLE_TRIGGER in tags:
            score[Metric.STYLE.value] = float(style_probability[i])
        if has_trigger(prompt):
            novel = {k: v for k, v in asked.items() if not (k == "background" and v in IDENTITY_BACKGROUNDS)}
            if novel:
                score[Metric.PROMPT.value] = float(np.mean([reading[k] == v for k, v in novel.items()]))
        elif asked:
            score[Metric.PRESERVATION.value] = float(np.mean([reading[k] == v for k, v in asked.items()]))
        scores.append(score)
    return scores


def summarize(scores: Sequence[Scores]) -> dict[Metric, Estimate]:
    """Each metric's mean and CI over the images it applies to."""
    return {m: mean_ci([s[m.value] for s in scores if m.value in s]) for m in METRICS}


class Scorer(Protocol):
    """Scores images (and the prompts they were made with); ``base_images``, where given, are the base model's images
    for the same prompts and seeds. ``families`` names the metric families it writes; ``version`` identifies what it
    reads with (instrument weights, encoders, measures), so that a cell scored by another version is scored again."""

    families: tuple[str, ...]
    version: str

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str],
                 base_images: Sequence[Image.Image] | None = None) -> list[Scores]: ...


def ensemble_scores(probes: dict[str, Probe], images: Sequence[Image.Image], prompts: Sequence[str],
                    pair: ConceptPair = DEFAULT_PAIR) -> list[Scores]:
    """Every probe's scores kept as ``<metric>@<probe>``, their mean as the metric, and the texture statistic."""
    merged: list[Scores] = [{} for _ in images]
    for name, probe in probes.items():
        for score, own in zip(merged, probe_scores(probe, images, prompts, pair)):
            score.update({f"{metric}@{name}": value for metric, value in own.items()})
    for score, prompt, image in zip(merged, prompts, images):
        for metric in INSTRUMENT_METRICS:
            values = [score[instrument_key(metric, name)] for name in probes if instrument_key(metric, name) in score]
            if values:
                score[metric.value] = float(np.mean(values))
        if STYLE_TRIGGER in [t.split()[0] for t in split_tags(prompt)]:
            texture = pair.style.texture
            score[Metric.STYLE_TEXTURE.value] = texture_energy(image, texture, drawn_textures(texture))
    return merged


def instrument_means(scores: Sequence[Scores], metric: Metric) -> dict[str, float]:
    """Each probe's mean reading of ``metric`` over the images it applies to."""
    names = dict.fromkeys(k.split("@", 1)[1] for s in scores for k in s if k.startswith(f"{metric.value}@"))
    return {name: float(np.mean([s[instrument_key(metric, name)] for s in scores
                                 if instrument_key(metric, name) in s])) for name in names}


def spreads(scores: Sequence[Scores]) -> dict[Metric, float]:
    """Per metric the probes read, the largest minus the smallest probe's mean (absent: fewer than two probes)."""
    out = {}
    for metric in INSTRUMENT_METRICS:
        means = instrument_means(scores, metric)
        if len(means) > 1:
            out[metric] = max(means.values()) - min(means.values())
    return out


class ProbeScorer:
    """The toy world's probes read each image for one identity-style pair (the probe family)."""

    families = ("probe",)

    def __init__(self, instruments: Sequence[Instrument] = INSTRUMENTS, pair: ConceptPair = DEFAULT_PAIR):
        missing = [str(i.path) for i in instruments if not i.path.exists()]
        if missing:
            raise FileNotFoundError(f"probe files missing: {', '.join(missing)}; train them: python -m bwl probes")
        self.probes = {i.name: load_probe(i.path) for i in instruments}
        self.pair = pair
        self.version = config_hash({"probes": {i.name: file_hash(i.path) for i in instruments},
                                    "texture": TEXTURE_VERSION, "pair": pair.name})

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str],
                 base_images: Sequence[Image.Image] | None = None) -> list[Scores]:
        return ensemble_scores(self.probes, images, prompts, self.pair)


class Scorers:
    """Several families' scorers as one: each image's scores merged."""

    def __init__(self, parts: Sequence[Scorer]):
        self.parts = list(parts)
        self.families = tuple(f for part in self.parts for f in part.families)
        self.versions = {f: part.version for part in self.parts for f in part.families}
        self.seconds = dict.fromkeys(self.families, 0.0)  # time spent scoring, per family (what each one costs)

    @property
    def needs_base(self) -> bool:
        return "reference" in self.families

    def only(self, families: Sequence[str]) -> Scorers:
        """The scorers of these families (sharing this one's time account)."""
        subset = Scorers([part for part in self.parts if set(part.families) & set(families)])
        subset.seconds = self.seconds
        return subset

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str],
                 base_images: Sequence[Image.Image] | None = None) -> list[Scores]:
        merged: list[Scores] = [{} for _ in images]
        for part in self.parts:
            started = time.perf_counter()
            for score, extra in zip(merged, part(images, prompts, base_images)):
                score.update(extra)
            for family in part.families:
                self.seconds[family] += time.perf_counter() - started
        return merged


METRIC_SUITES: dict[str, tuple[str, ...]] = {"probe": ("probe",), "reference": ("reference",),
                                             "both": ("probe", "reference"), "none": ()}
"""A profile's ``metrics``: the metric families it scores with."""


def without_families(scores: Sequence[Scores], families: Sequence[str]) -> list[Scores]:
    """``scores`` less the metrics of ``families`` (before those families score the images again)."""
    dropped = {m.value for family in families for m in METRICS_BY_FAMILY[family]}
    return [{k: v for k, v in s.items() if k.split("@", 1)[0] not in dropped} for s in scores]
