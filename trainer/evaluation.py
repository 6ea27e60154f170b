"""Evaluation reports: the summary of one test pass, a per-class CSV and a JSON summary on disk.

Pure functions over numpy arrays and plain values; the metrics themselves live in :mod:`trainer.metrics`.
Every written summary records the many / medium / few rule that produced it (LIFT's by default:
``"LIFT: many > 100, medium 20..100, few < 20"``, spec §4.3), since papers disagree on the boundaries.
Accuracies are fractions in [0, 1]. Files are written atomically (a temporary file, then a rename).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.metrics import (
    LIFT_THRESHOLDS,
    ShotThresholds,
    base_novel_summary,
    classification_report,
    expected_calibration_error,
    group_sizes,
    shot_groups,
    thresholds_rule,
)

_logger = logging.getLogger(__name__)

PER_CLASS_COLUMNS = ("label", "class_name", "train_count", "group", "accuracy", "zero_shot_accuracy")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def to_jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays to Python, NaN and inf to ``None``, tuples to lists."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluation_summary(
    preds: np.ndarray,
    targets: np.ndarray,
    train_counts: Sequence[int],
    probs: np.ndarray | None = None,
    thresholds: ShotThresholds = LIFT_THRESHOLDS,
) -> dict[str, Any]:
    """One test pass: :func:`~trainer.metrics.classification_report` plus ``ece`` (when ``probs`` is given,
    else ``None``), ``num_test``, ``group_sizes`` and the ``shot_rule`` used."""
    report: dict[str, Any] = dict(classification_report(preds, targets, train_counts, thresholds))
    report["ece"] = expected_calibration_error(probs, targets) if probs is not None else None
    report["num_test"] = len(np.asarray(targets))
    report["group_sizes"] = group_sizes(train_counts, thresholds)
    report["shot_rule"] = thresholds_rule(thresholds)
    return report


def base_novel_from_predictions(
    base_preds: np.ndarray, base_targets: np.ndarray, novel_preds: np.ndarray, novel_targets: np.ndarray
) -> dict[str, float]:
    """Base and novel sample accuracy (each in its own label space) and their harmonic mean."""

    def accuracy(p: np.ndarray, t: np.ndarray) -> float:
        p, t = np.asarray(p), np.asarray(t)
        return float((p == t).mean()) if len(t) else float("nan")

    return base_novel_summary(accuracy(base_preds, base_targets), accuracy(novel_preds, novel_targets))


def write_per_class_csv(
    path: str | Path,
    class_names: Sequence[str],
    train_counts: Sequence[int],
    per_class_acc: Sequence[float] | np.ndarray,
    thresholds: ShotThresholds = LIFT_THRESHOLDS,
    zero_shot_acc: Sequence[float] | np.ndarray | None = None,
) -> None:
    """Write ``label,class_name,train_count,group,accuracy,zero_shot_accuracy``, one row per class (an
    accuracy is empty when the class has no test images; ``zero_shot_accuracy`` is empty without
    ``zero_shot_acc``)."""
    n = len(class_names)
    zs = [math.nan] * n if zero_shot_acc is None else list(zero_shot_acc)
    if len(train_counts) != n or len(per_class_acc) != n or len(zs) != n:
        raise ValueError(
            f"write_per_class_csv: {n} class names, {len(train_counts)} train counts, "
            f"{len(per_class_acc)} accuracies, {len(zs)} zero-shot accuracies; they must match"
        )
    groups = shot_groups(train_counts, thresholds)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PER_CLASS_COLUMNS)
    for i, (name, count, group, acc, zs_acc) in enumerate(
        zip(class_names, train_counts, groups, per_class_acc, zs, strict=True)
    ):
        cells = [f"{float(a):.6f}" if math.isfinite(float(a)) else "" for a in (acc, zs_acc)]
        writer.writerow([i, name, int(count), group, *cells])
    _write_atomic(Path(path), buf.getvalue())
    _logger.info("wrote per-class accuracy of %d classes to %s", n, path)


def write_summary_json(
    path: str | Path,
    summary: Mapping[str, Any],
    thresholds: ShotThresholds = LIFT_THRESHOLDS,
    train_counts: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Write ``summary`` as JSON with the shot rule recorded; returns what was written.

    Adds ``shot_rule`` (e.g. ``"LIFT: many > 100, medium 20..100, few < 20"``), ``shot_thresholds``
    (``many_above``/``few_below``) and, given ``train_counts``, ``group_sizes``. NaN becomes ``null``.
    """
    data = dict(summary)
    data["shot_rule"] = thresholds_rule(thresholds)
    data["shot_thresholds"] = {"many_above": thresholds.many_above, "few_below": thresholds.few_below}
    if train_counts is not None:
        data["group_sizes"] = group_sizes(train_counts, thresholds)
    clean = to_jsonable(data)
    _write_atomic(Path(path), json.dumps(clean, indent=2, sort_keys=True, allow_nan=False) + "\n")
    _logger.info("wrote evaluation summary to %s", path)
    return clean
