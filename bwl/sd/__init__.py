"""The base model: SD 1.x pipelines loaded by id or path with the paper's sampler, batched generation, and tiny
SD1.x-shaped pipelines built from configs for tests. Above :mod:`bwl.core` only."""

from bwl.sd.generate import generate
from bwl.sd.pipeline import PAPER_CFG, PAPER_MODEL, PAPER_STEPS, load_pipeline

__all__ = ["PAPER_CFG", "PAPER_MODEL", "PAPER_STEPS", "generate", "load_pipeline"]
