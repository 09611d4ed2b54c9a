"""Toy-world metrics, read off generated images by the probe. Each is a mean with a 95 % confidence interval.

- identity fidelity: the fraction of the identity's attributes (shape, color, hat, eyes) present;
- style fidelity: the probe's probability of the held-out style;
- prompt fidelity: the fraction of prompt-asked attributes that differ from the training data (e.g. a background) present;
- base preservation: for prompts without a trigger, the fraction of asked attributes present.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .data import split_tags
from .probes import Probe
from .world import HELD_OUT_STYLE, IDENTITY, IDENTITY_BACKGROUNDS, IDENTITY_TRIGGER, STYLE_TRIGGER, tag_attribute

METRICS = ("identity", "style", "prompt", "preservation")


@dataclass(frozen=True)
class Estimate:
    mean: float
    ci: float
    n: int

    def __str__(self) -> str:
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


def image_scores(probe: Probe, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[dict[str, float]]:
    """Per image, the metrics that apply to its prompt (others absent)."""
    readings = probe.read(images)
    style_index = probe.attributes["style"].index(HELD_OUT_STYLE)
    style_probability = probe.probabilities(images)["style"][:, style_index]
    scores = []
    for i, (reading, prompt) in enumerate(zip(readings, prompts)):
        asked = asked_attributes(prompt)
        score: dict[str, float] = {}
        tags = [t.split()[0] for t in split_tags(prompt)]
        if IDENTITY_TRIGGER in tags:
            score["identity"] = float(np.mean([reading[k] == v for k, v in IDENTITY.items()]))
        if STYLE_TRIGGER in tags:
            score["style"] = float(style_probability[i])
        if has_trigger(prompt):
            novel = {k: v for k, v in asked.items() if not (k == "background" and v in IDENTITY_BACKGROUNDS)}
            if novel:
                score["prompt"] = float(np.mean([reading[k] == v for k, v in novel.items()]))
        elif asked:
            score["preservation"] = float(np.mean([reading[k] == v for k, v in asked.items()]))
        scores.append(score)
    return scores


def summarize(scores: Sequence[dict[str, float]]) -> dict[str, Estimate]:
    """Each metric's mean and CI over the images it applies to."""
    return {m: mean_ci([s[m] for s in scores if m in s]) for m in METRICS}
