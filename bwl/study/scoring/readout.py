"""A linear read-out: how well a label can be decoded from a set of features (a block's pooled activations).

Multinomial logistic regression on standardized features, L2-regularized, fitted by L-BFGS in float64, scored by
stratified k-fold cross-validation: every example is predicted by a model that never saw it. The accuracy's 95 %
interval is Wilson's over the pooled predictions, and chance is what always guessing the training folds' most common
label scores on the same folds (1/k for balanced labels), so an accuracy is read against it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Readout:
    """Cross-validated accuracy with its 95 % Wilson interval, chance level and number of examples."""

    accuracy: float
    low: float
    high: float
    chance: float
    n: int

    def __str__(self) -> str:
        return f"{self.accuracy:.2f} [{self.low:.2f}, {self.high:.2f}] (chance {self.chance:.2f}, n = {self.n})"


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's 95 % interval for a proportion."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def stratified_folds(labels: Sequence[int], folds: int, seed: int) -> list[list[int]]:
    """Example indices split into ``folds`` folds, each label spread evenly (shuffled by ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    split: list[list[int]] = [[] for _ in range(folds)]
    position = 0
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        for i in torch.randperm(len(members), generator=generator).tolist():
            split[position % folds].append(members[i])
            position += 1
    return split


def fit_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, classes: int,
                l2: float = 1e-3, iterations: int = 100) -> torch.Tensor:
    """Predicted classes of ``test_x`` from a multinomial logistic regression fitted to the training fold."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-8)
    x, test = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(x @ weight + bias, train_y) + l2 * (weight ** 2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        return (test @ weight + bias).argmax(1)


def readout(features: torch.Tensor, labels: Sequence[Hashable], folds: int = 5, seed: int = 0,
            l2: float = 1e-3) -> Readout:
    """How well ``labels`` are decoded from ``features`` (examples x features), cross-validated."""
    if len(labels) != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {len(labels)} labels")
    names = sorted(set(labels), key=str)
    if len(names) < 2:
        raise ValueError("a read-out needs at least two labels")
    y = torch.tensor([names.index(label) for label in labels])
    x = features.detach().to(torch.float64).reshape(len(labels), -1)
    folds = max(2, min(folds, min(int((y == k).sum()) for k in range(len(names)))))
    correct = guessed = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: threads only add synchronization (and stall on a busy CPU)
    try:
        for test in stratified_folds(y.tolist(), folds, seed):
            train = sorted(set(range(len(y))) - set(test))
            predicted = fit_predict(x[train], y[train], x[test], len(names), l2)
            correct += int((predicted == y[test]).sum())
            guessed += int((y[test] == torch.bincount(y[train], minlength=len(names)).argmax()).sum())
    finally:
        torch.set_num_threads(threads)
    low, high = wilson(correct, len(y))
    return Readout(correct / len(y), low, high, guessed / len(y), len(y))
