"""Metrics and evaluation reports on hand-computed cases."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from trainer.data.sampling import long_tail_counts
from trainer.evaluation import (
    base_novel_from_predictions,
    evaluation_summary,
    to_jsonable,
    write_per_class_csv,
    write_summary_json,
)
from trainer.metrics import (
    ShotThresholds,
    average_base_novel,
    base_novel_summary,
    classification_report,
    expected_calibration_error,
    group_sizes,
    harmonic_mean,
    per_class_accuracy,
    shot_groups,
    thresholds_rule,
)

# class 0: 4 samples, 3 right; class 1: 2 samples, 1 right; class 2: 1 sample, wrong; class 3: no test samples.
PREDS = np.array([0, 0, 0, 1, 1, 0, 0])
TARGETS = np.array([0, 0, 0, 0, 1, 1, 2])
TRAIN_COUNTS = [200, 50, 5, 101]


def test_per_class_accuracy_hand_case() -> None:
    pca = per_class_accuracy(PREDS, TARGETS, 4)
    assert pca[:3].tolist() == [0.75, 0.5, 0.0]
    assert math.isnan(pca[3])


def test_classification_report_groups() -> None:
    r = classification_report(PREDS, TARGETS, TRAIN_COUNTS)
    assert r["top1"] == pytest.approx(4 / 7)
    assert r["mean_per_class"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert r["many"] == pytest.approx(0.75)  # classes 0 and 3; 3 has no test samples
    assert r["medium"] == pytest.approx(0.5)
    assert r["few"] == pytest.approx(0.0)
    r = classification_report(PREDS, TARGETS, [200, 150, 120, 101])
    assert r["medium"] is None and r["few"] is None


def test_shot_groups_lift_and_oltr_on_cifar100_lt() -> None:
    counts = long_tail_counts(500, 100, 100)
    assert group_sizes(counts) == {"many": 35, "medium": 35, "few": 30}
    # OLTR's rule (many >= 100, few <= 20) expressed with the same thresholds: 35 / 34 / 31.
    assert group_sizes(counts, ShotThresholds(many_above=99, few_below=21)) == {
        "many": 35,
        "medium": 34,
        "few": 31,
    }
    assert shot_groups([101, 100, 20, 19]) == ["many", "medium", "medium", "few"]


def test_thresholds_rule() -> None:
    assert thresholds_rule() == "LIFT: many > 100, medium 20..100, few < 20"
    assert thresholds_rule(ShotThresholds(99, 21)) == "custom: many > 99, medium 21..99, few < 21"


def test_harmonic_mean_and_base_novel() -> None:
    assert harmonic_mean(80.47, 71.69) == pytest.approx(75.83, abs=5e-3)  # CoCoOp, spec §4.4
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert base_novel_summary(0.8, 0.6) == {"base": 0.8, "novel": 0.6, "hm": pytest.approx(0.96 / 1.4)}
    avg = average_base_novel([(0.9, 0.5), (0.7, 0.7)])  # HM of the averages, not the average of HMs
    assert avg == {"base": pytest.approx(0.8), "novel": pytest.approx(0.6), "hm": pytest.approx(0.96 / 1.4)}
    got = base_novel_from_predictions(
        np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), np.array([1]), np.array([1])
    )
    assert got == {"base": 0.75, "novel": 1.0, "hm": pytest.approx(1.5 / 1.75)}
    with pytest.raises(ValueError):
        average_base_novel([])


def test_expected_calibration_error_hand_case() -> None:
    probs = np.array([[0.9, 0.1], [0.22, 0.78], [0.3, 0.7], [0.55, 0.45], [0.91, 0.09]])
    targets = np.array([0, 0, 1, 0, 1])
    # Confidences 0.9 / 0.78 / 0.7 / 0.55 / 0.91 (width 1/15): 0.9 and 0.91 share (13/15, 14/15], the rest
    # sit alone. Bin {0.9 right, 0.91 wrong}: |0.5 - 0.905|; 0.78 wrong: 0.78; 0.7 right: 0.3; 0.55 right: 0.45.
    expected = (2 * 0.405 + 0.78 + 0.3 + 0.45) / 5
    assert expected_calibration_error(probs, targets) == pytest.approx(expected)
    perfect = np.eye(3)
    assert expected_calibration_error(perfect, np.arange(3)) == 0.0
    assert expected_calibration_error(probs, targets, n_bins=1) == pytest.approx(
        abs(3 / 5 - probs.max(1).mean())
    )
    assert math.isnan(expected_calibration_error(np.zeros((0, 2)), np.zeros(0, dtype=int)))
    with pytest.raises(ValueError):
        expected_calibration_error(probs, targets[:2])


def test_evaluation_summary() -> None:
    probs = np.eye(4)[PREDS] * 0.6 + 0.1
    s = evaluation_summary(PREDS, TARGETS, TRAIN_COUNTS, probs=probs)
    assert s.top1 == pytest.approx(4 / 7)
    assert s.ece == pytest.approx(abs(4 / 7 - 0.7))
    assert s.num_test == 7
    assert s.group_sizes == {"many": 2, "medium": 1, "few": 1}
    assert s.shot_rule.startswith("LIFT:")
    assert evaluation_summary(PREDS, TARGETS, TRAIN_COUNTS).ece is None


def test_write_per_class_csv(tmp_path: Path) -> None:
    path = tmp_path / "out" / "per_class.csv"
    pca = per_class_accuracy(PREDS, TARGETS, 4)
    write_per_class_csv(path, ["apple", "aquarium fish", "baby", "bear"], TRAIN_COUNTS, pca, ShotThresholds())
    rows = list(csv.DictReader(path.open()))
    assert [r["class_name"] for r in rows] == ["apple", "aquarium fish", "baby", "bear"]
    assert [r["group"] for r in rows] == ["many", "medium", "few", "many"]
    assert [r["train_count"] for r in rows] == ["200", "50", "5", "101"]
    assert [r["accuracy"] for r in rows] == ["0.750000", "0.500000", "0.000000", ""]
    assert [r["zero_shot_accuracy"] for r in rows] == ["", "", "", ""]  # no zero-shot given
    assert rows[3]["label"] == "3"
    write_per_class_csv(
        path,
        ["a", "b", "c", "d"],
        TRAIN_COUNTS,
        pca,
        ShotThresholds(),
        zero_shot_acc=[0.25, 1.0, 0.5, math.nan],
    )
    rows = list(csv.DictReader(path.open()))
    assert [r["zero_shot_accuracy"] for r in rows] == ["0.250000", "1.000000", "0.500000", ""]
    assert [r["accuracy"] for r in rows] == ["0.750000", "0.500000", "0.000000", ""]
    with pytest.raises(ValueError, match="must match"):
        write_per_class_csv(path, ["a"], TRAIN_COUNTS, pca, ShotThresholds())
    with pytest.raises(ValueError, match="must match"):
        write_per_class_csv(path, ["a", "b", "c", "d"], TRAIN_COUNTS, pca, zero_shot_acc=[0.5])


def test_write_summary_json(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    report = classification_report(PREDS, TARGETS, TRAIN_COUNTS)
    written = write_summary_json(path, {**report, "epoch": np.int64(3)}, ShotThresholds(), TRAIN_COUNTS)
    data = json.loads(path.read_text())
    assert data == written
    assert data["shot_rule"] == "LIFT: many > 100, medium 20..100, few < 20"
    assert data["shot_thresholds"] == {"many_above": 100, "few_below": 20}
    assert data["group_sizes"] == {"many": 2, "medium": 1, "few": 1}
    assert data["per_class"][3] is None and data["epoch"] == 3
    assert not list(tmp_path.glob(".*tmp*"))
    assert to_jsonable({"a": (np.float32(0.5), float("inf"))}) == {"a": [0.5, None]}
