"""Classification metrics for long-tailed and base-to-novel evaluation.

Many / medium / few groups come from the *training* counts (LIFT's rule by default: many > 100,
medium 20..100, few < 20); each group's score is the mean per-class accuracy inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShotThresholds:
    """many: n > many_above; few: n < few_below; medium: the rest (LIFT: 100 and 20)."""

    many_above: int = 100
    few_below: int = 20

    def group(self, count: int) -> str:
        if count > self.many_above:
            return "many"
        if count < self.few_below:
            return "few"
        return "medium"


def per_class_accuracy(preds: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy of each class; NaN for a class with no test samples."""
    correct = np.bincount(targets, weights=(preds == targets).astype(np.float64), minlength=num_classes)
    total = np.bincount(targets, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def classification_report(
    preds: np.ndarray,
    targets: np.ndarray,
    train_counts: Sequence[int],
    thresholds: ShotThresholds = ShotThresholds(),
) -> dict[str, float | None | list[float]]:
    """top1 (sample accuracy), mean per-class accuracy, many / medium / few (None when a group is empty)."""
    preds = np.asarray(preds, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    num_classes = len(train_counts)
    pca = per_class_accuracy(preds, targets, num_classes)
    report: dict[str, float | None | list[float]] = {
        "top1": float((preds == targets).mean()) if len(targets) else float("nan"),
        "mean_per_class": float(np.nanmean(pca)) if np.isfinite(pca).any() else float("nan"),
        "per_class": [float(x) for x in pca],
    }
    groups = np.array([thresholds.group(int(c)) for c in train_counts])
    for name in ("many", "medium", "few"):
        vals = pca[(groups == name) & np.isfinite(pca)]
        report[name] = float(vals.mean()) if len(vals) else None
    return report
