"""Model outputs on a dataset, from either engine, with the accuracy measures computed from them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Predictions:
    logits: np.ndarray  # (N, classes) float32
    seconds: float  # time spent computing them, for images/s

    @property
    def labels(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    def images_per_second(self) -> float:
        return len(self.logits) / self.seconds if self.seconds > 0 else float("inf")


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of equal entries: accuracy against labels, or top-1 agreement between two runs."""
    return float(np.mean(predicted == labels))


def drop_points(reference, accuracy):
    """The drop from `reference` to `accuracy` (fractions), in percentage points; works elementwise on arrays."""
    return 100 * (reference - accuracy)


def comparable_points(points: float) -> float:
    """`points` as a threshold should judge it. Accuracies are fractions of examples, so a figure exactly at a
    threshold can come out a few ulps past it (100 * (0.8124 - 0.8074) = 0.5000000000000004); rounded to 1e-9 of a
    point, far finer than one example of any data set, ties stay ties."""
    return round(points, 9)
