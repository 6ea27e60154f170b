"""Classification metrics for long-tailed and base-to-novel evaluation.

Many / medium / few groups come from the *training* counts (LIFT's rule by default: many > 100,
medium 20..100, few < 20); each group's score is the mean per-class accuracy inside it.
"""

from __future__ import annotations

import itertools
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
) -> dict[str, float | list[float] | None]:
    """top1 (sample accuracy), mean per-class accuracy, many / medium / few (None when a group is empty)."""
    preds = np.asarray(preds, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    num_classes = len(train_counts)
    pca = per_class_accuracy(preds, targets, num_classes)
    report: dict[str, float | list[float] | None] = {
        "top1": float((preds == targets).mean()) if len(targets) else float("nan"),
        "mean_per_class": float(np.nanmean(pca)) if np.isfinite(pca).any() else float("nan"),
        "per_class": [float(x) for x in pca],
    }
    groups = np.array([thresholds.group(int(c)) for c in train_counts])
    for name in ("many", "medium", "few"):
        vals = pca[(groups == name) & np.isfinite(pca)]
        report[name] = float(vals.mean()) if len(vals) else None
    return report


LIFT_THRESHOLDS = ShotThresholds()
"""LIFT's rule (spec §4.3, the default): many > 100, medium 20..100, few < 20 training images."""


def thresholds_rule(thresholds: ShotThresholds = LIFT_THRESHOLDS) -> str:
    """The human-readable rule, recorded in run metadata: ``"LIFT: many > 100, medium 20..100, few < 20"``."""
    rule = (
        f"many > {thresholds.many_above}, medium {thresholds.few_below}..{thresholds.many_above}, "
        f"few < {thresholds.few_below}"
    )
    return f"LIFT: {rule}" if thresholds == LIFT_THRESHOLDS else f"custom: {rule}"


def shot_groups(train_counts: Sequence[int], thresholds: ShotThresholds = LIFT_THRESHOLDS) -> list[str]:
    """The group (``"many"``/``"medium"``/``"few"``) of every class, from its training count."""
    return [thresholds.group(int(c)) for c in train_counts]


def group_sizes(train_counts: Sequence[int], thresholds: ShotThresholds = LIFT_THRESHOLDS) -> dict[str, int]:
    """How many classes fall in each group (CIFAR-100-LT IR100 under LIFT's rule: 35 / 35 / 30)."""
    groups = shot_groups(train_counts, thresholds)
    return {name: groups.count(name) for name in ("many", "medium", "few")}


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction, with ``n_bins`` equal-width confidence bins.

    Confidence = max probability, prediction = its argmax. Bin ``b`` holds confidences in
    ``(b/n_bins, (b+1)/n_bins]`` (Guo et al. 2017); ECE = sum over bins of ``|accuracy - mean confidence|``
    weighted by the bin's share of the samples. ``probs`` is ``(N, C)`` (rows summing to 1), ``targets`` ``(N,)``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(targets):
        raise ValueError(f"probs must be (N, C) with N = len(targets), got {probs.shape} and {targets.shape}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if len(targets) == 0:
        return float("nan")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == targets).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += abs(correct[in_bin].mean() - confidence[in_bin].mean()) * in_bin.mean()
    return float(ece)


def base_novel_summary(base_acc: float, novel_acc: float) -> dict[str, float]:
    """``{"base", "novel", "hm"}`` with HM = 2BN / (B + N) (CoCoOp protocol; HM(80.47, 71.69) = 75.83)."""
    return {"base": float(base_acc), "novel": float(novel_acc), "hm": harmonic_mean(base_acc, novel_acc)}


def average_base_novel(results: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Average over datasets (or seeds) of ``(base, novel)`` pairs; HM is taken of the *averages* (spec §4.4)."""
    if not results:
        raise ValueError("average_base_novel needs at least one (base, novel) pair")
    base = float(np.mean([b for b, _ in results]))
    novel = float(np.mean([n for _, n in results]))
    return base_novel_summary(base, novel)
