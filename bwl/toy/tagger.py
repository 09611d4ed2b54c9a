"""The toy world's probe as an auto-tagger for the data-prep step (the toy stand-in for WD14)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from bwl.toy.assets import PROBE_PATH
from bwl.toy.probes import load_probe
from bwl.toy.world import Character


class ToyTagger:
    """Every attribute's most likely value, as world tags, with the probe's confidence."""

    def __init__(self, probe_path: str | Path | None = None):
        self.probe = load_probe(probe_path or PROBE_PATH)

    def __call__(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
        probs = self.probe.probabilities(images)
        out = []
        for i, reading in enumerate(self.probe.most_likely(probs)):
            character = Character(**reading)
            confidences = [float(probs[k][i].max()) for k in self.probe.attributes]
            out.append(dict(zip(character.tags(), confidences)))
        return out
