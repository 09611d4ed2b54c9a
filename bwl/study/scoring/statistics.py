"""Statistics that match the replicated design: effects pooled over identity-style pairs, training seeds and images.

A replicated comparison (cell A against cell B, on one metric) has one paired difference per image, for every pair
and training seed: ``{pair: {seed: [Δ per image]}}``. Its pooled effect is the mean over pairs of the mean over seeds
of the mean over images, so that each pair and each seed weighs the same however many images it has.

- :func:`hierarchical_bootstrap`: the pooled effect's 95 % CI from resampling pairs, then seeds within each drawn
  pair, then images within each drawn seed, all with replacement (the nested bootstrap of Davison & Hinkley 1997,
  §3.8). Its two-sided p-value is twice the smaller bootstrap tail beyond zero, counted as (k + 1) / (R + 1) so that
  it is never 0 (the smallest it can be is 2 / (R + 1); Holm multiplies it, so families of many tests need many
  resamples).
- :func:`holm`: Holm's step-down adjustment of a family of p-values (Holm 1979), which controls the family-wise
  error rate without assuming independence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05
"""The significance level: 95 % CIs, and Holm-adjusted p below it."""

Nested = Mapping[str, Mapping[int, Sequence[float]]]
"""Paired differences by pair, then training seed: ``{pair: {seed: [Δ per image]}}``."""


@dataclass(frozen=True)
class PooledEffect:
    """A pooled effect, its 95 % hierarchical-bootstrap CI, its two-sided bootstrap p-value and the design's size."""

    mean: float
    low: float
    high: float
    p: float
    pairs: int
    seeds: int  # replicates: (pair, seed) combinations
    images: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def pooled_mean(table: Nested) -> float:
    """The mean over pairs of the mean over seeds of the mean over images."""
    return float(np.mean([np.mean([np.mean(images) for images in seeds.values()]) for seeds in table.values()]))


def _as_arrays(table: Nested) -> list[list[np.ndarray]]:
    arrays = [[np.asarray(images, dtype=float) for images in seeds.values()] for seeds in table.values()]
    empty = [pair for pair, seeds in zip(table, arrays) if not seeds or any(len(a) == 0 for a in seeds)]
    if not table or empty:
        raise ValueError(f"hierarchical_bootstrap: every pair needs seeds with images; empty: {empty or 'the table'}")
    return arrays


def bootstrap_means(table: Nested, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """The pooled mean of ``resamples`` nested resamples: pairs, then seeds within a pair, then images (each drawn
    seed with its own image resample), vectorized over resamples."""
    rng = np.random.default_rng(seed)
    pairs = _as_arrays(table)
    count, every = len(pairs), np.arange(resamples)
    slot_means = np.empty((count, resamples, count))  # pair p's resampled mean if drawn into slot j of resample r
    for p, seeds in enumerate(pairs):
        draws = rng.integers(0, len(seeds), (resamples, count, len(seeds)))
        means = np.zeros(draws.shape)
        for s, images in enumerate(seeds):
            resampled = images[rng.integers(0, len(images), (*draws.shape, len(images)))].mean(-1)
            means = np.where(draws == s, resampled, means)
        slot_means[p] = means.mean(-1)
    chosen = rng.integers(0, count, (resamples, count))
    return slot_means[chosen, every[:, None], np.arange(count)[None, :]].mean(1)


def hierarchical_bootstrap(table: Nested, resamples: int = 2000, seed: int = 0) -> PooledEffect:
    """The pooled effect of ``table`` with its percentile 95 % CI and two-sided p-value (see the module)."""
    draws = bootstrap_means(table, resamples, seed)
    low, high = np.percentile(draws, [2.5, 97.5])
    tail = min(np.sum(draws <= 0), np.sum(draws >= 0))
    p = min(1.0, 2 * (tail + 1) / (resamples + 1))
    return PooledEffect(pooled_mean(table), float(low), float(high), float(p), len(table),
                        sum(len(seeds) for seeds in table.values()),
                        sum(len(images) for seeds in table.values() for images in seeds.values()))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input's order: the k-th smallest of m is multiplied by (m - k + 1), then made
    non-decreasing in that order and capped at 1. A hypothesis is rejected at level α when its adjusted p ≤ α."""
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()
