"""The toy world with ground truth: 32 px characters with exact labels (``world``), the micro SD pretrained on them
(``pretrain``), the probe that reads every attribute (``probes``, also the toy tagger in ``tagger``), and the shipped
assets and held-out concept folders (``assets``). Above training; imports nothing of the study."""

from bwl.toy.assets import PROBE_PATH, TOY_MODEL, write_concept
from bwl.toy.probes import Probe, load_probe
from bwl.toy.tagger import ToyTagger

__all__ = ["PROBE_PATH", "TOY_MODEL", "Probe", "ToyTagger", "load_probe", "write_concept"]
