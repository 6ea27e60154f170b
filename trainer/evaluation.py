"""Evaluation: the pass over a task's test sets, its typed reports, a per-class CSV and ``summary.json``.

:func:`evaluate_task` runs a prompted model over a task's base (and novel) test sets and returns an
:class:`EvalReport` (a :class:`PassReport` for the base classes, a :class:`NovelReport`, the harmonic means).
:class:`RunSummary` is ``summary.json``. The reports are built from numpy arrays by pure functions; the
metrics themselves live in :mod:`trainer.metrics`.
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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainer.data.base import LabelledImages, TaskData, Transformed
from trainer.engine import autocast_factory, predict
from trainer.errors import UserError
from trainer.metrics import (
    LIFT_THRESHOLDS,
    ShotThresholds,
    base_novel_summary,
    classification_report,
    expected_calibration_error,
    group_sizes,
    harmonic_mean,
    shot_groups,
    thresholds_rule,
)
from trainer.models import PreprocessSpec
from trainer.prompts import PromptedCLIP
from trainer.reweight import log_prior
from trainer.transforms import build_transform

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


Headline = dict[str, float | None]
"""The numbers people compare, by name (:meth:`EvalReport.headline`): ``base_top1``, ``base_mean_per_class``,
``many`` / ``medium`` / ``few``, ``ece``; ``posthoc_*`` with post-hoc adjustment; ``novel``, ``hm``,
``novel_mean_per_class``, ``hm_mean_per_class`` with novel classes. Written as such into ``metrics.jsonl``
(``eval``) and ``summary.json`` (``zero_shot``, ``final``)."""

HM_RULE = "base / novel / hm: sample top-1 (Dassl's evaluator, CoCoOp protocol); *_mean_per_class: per class"


def _opt_float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _floats(values: object) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]  # type: ignore[attr-defined]


@dataclass(frozen=True)
class PosthocReport:
    """The base-class report of the post-hoc logit-adjusted prediction argmax_j (z_j - tau log pi_j)."""

    tau: float
    top1: float
    mean_per_class: float
    many: float | None
    medium: float | None
    few: float | None
    per_class: list[float]

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> PosthocReport:
        return cls(
            tau=float(d["tau"]),  # type: ignore[arg-type]
            top1=float(d["top1"]),  # type: ignore[arg-type]
            mean_per_class=float(d["mean_per_class"]),  # type: ignore[arg-type]
            many=_opt_float(d.get("many")),
            medium=_opt_float(d.get("medium")),
            few=_opt_float(d.get("few")),
            per_class=_floats(d["per_class"]),
        )


@dataclass(frozen=True)
class PassReport:
    """One test pass (:func:`evaluation_summary`): sample top-1, mean per-class accuracy, per-class
    accuracies (NaN for a class without test images), many / medium / few (None when a group is empty),
    the ECE (None without probabilities), the test size, the group sizes and the shot rule used."""

    top1: float
    mean_per_class: float
    per_class: list[float]
    many: float | None
    medium: float | None
    few: float | None
    ece: float | None
    num_test: int
    group_sizes: dict[str, int]
    shot_rule: str
    posthoc: PosthocReport | None = None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "posthoc"}
        if self.posthoc is not None:
            out["posthoc"] = self.posthoc.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> PassReport:
        posthoc = d.get("posthoc")
        sizes = d.get("group_sizes") or {}
        return cls(
            top1=float(d["top1"]),  # type: ignore[arg-type]
            mean_per_class=float(d["mean_per_class"]),  # type: ignore[arg-type]
            per_class=_floats(d["per_class"]),
            many=_opt_float(d.get("many")),
            medium=_opt_float(d.get("medium")),
            few=_opt_float(d.get("few")),
            ece=_opt_float(d.get("ece")),
            num_test=int(d.get("num_test") or 0),  # type: ignore[call-overload]
            group_sizes={str(k): int(v) for k, v in sizes.items()},  # type: ignore[attr-defined]
            shot_rule=str(d.get("shot_rule") or ""),
            posthoc=PosthocReport.from_dict(posthoc) if isinstance(posthoc, Mapping) else None,
        )


@dataclass(frozen=True)
class NovelReport:
    """The novel-class test pass: only what is defined without training counts."""

    top1: float
    mean_per_class: float
    per_class: list[float]
    ece: float | None
    num_test: int

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_pass(cls, report: PassReport) -> NovelReport:
        return cls(report.top1, report.mean_per_class, report.per_class, report.ece, report.num_test)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> NovelReport:
        return cls(
            top1=float(d["top1"]),  # type: ignore[arg-type]
            mean_per_class=float(d["mean_per_class"]),  # type: ignore[arg-type]
            per_class=_floats(d["per_class"]),
            ece=_opt_float(d.get("ece")),
            num_test=int(d.get("num_test") or 0),  # type: ignore[call-overload]
        )


@dataclass(frozen=True)
class EvalReport:
    """One evaluation of a model on a task (:func:`trainer.engine.evaluate_task`): the base-class report,
    and with novel classes their report and the harmonic means (of the sample top-1, as Dassl's evaluator
    reports it, and of the mean per-class accuracies). Stored in the checkpoint and ``summary.json``
    (``eval``) as :meth:`to_dict`; :meth:`from_dict` reads those back, older files included."""

    base: PassReport
    shot_rule: str
    novel: NovelReport | None = None
    hm: float | None = None
    hm_mean_per_class: float | None = None
    hm_rule: str | None = None

    def headline(self) -> Headline:
        """The numbers people compare: overall, many / medium / few, novel and HM (sample top-1, as the
        base-to-novel papers report them), plus the per-class versions of novel and HM."""
        b = self.base
        out: Headline = {
            "base_top1": b.top1,
            "base_mean_per_class": b.mean_per_class,
            "many": b.many,
            "medium": b.medium,
            "few": b.few,
            "ece": b.ece,
        }
        if b.posthoc is not None:
            for key in ("top1", "many", "medium", "few"):
                out[f"posthoc_{key}"] = getattr(b.posthoc, key)
        if self.novel is not None:
            out["novel"] = self.novel.top1
            out["hm"] = self.hm
            out["novel_mean_per_class"] = self.novel.mean_per_class
            out["hm_mean_per_class"] = self.hm_mean_per_class
        return out

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"base": self.base.to_dict(), "shot_rule": self.shot_rule}
        if self.novel is not None:
            out.update(
                novel=self.novel.to_dict(),
                hm=self.hm,
                hm_mean_per_class=self.hm_mean_per_class,
                hm_rule=self.hm_rule,
            )
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> EvalReport:
        novel = d.get("novel")
        return cls(
            base=PassReport.from_dict(d["base"]),  # type: ignore[arg-type]
            shot_rule=str(d.get("shot_rule") or ""),
            novel=NovelReport.from_dict(novel) if isinstance(novel, Mapping) else None,
            hm=_opt_float(d.get("hm")),
            hm_mean_per_class=_opt_float(d.get("hm_mean_per_class")),
            hm_rule=None if d.get("hm_rule") is None else str(d.get("hm_rule")),
        )


@dataclass(frozen=True)
class Selection:
    """Which prompts a run ends with (``eval.select``): ``last``, or under ``best_val`` the epoch chosen on
    the validation split carved from the training data, its score and the validation size."""

    rule: str
    epoch: int | None = None
    val_mean_per_class: float | None = None
    val_images: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Selection:
        epoch, score, images = d.get("epoch"), d.get("val_mean_per_class"), d.get("val_images")
        return cls(
            rule=str(d.get("rule", "last")),
            epoch=None if epoch is None else int(epoch),  # type: ignore[call-overload]
            val_mean_per_class=_opt_float(score),
            val_images=None if images is None else int(images),  # type: ignore[call-overload]
        )


@dataclass(frozen=True)
class RunSummary:
    """``summary.json``: what a finished ``fit`` reports (see ``docs/`` and :mod:`trainer.report`).

    ``data_check`` is :meth:`trainer.data.checks.CheckedTask.summary` (files scanned and skipped).
    :meth:`write` adds the shot rule, its thresholds and the group sizes; :meth:`read` accepts files
    written before a field existed (it is then empty)."""

    zero_shot: Headline | None
    zero_shot_per_class: list[float] | None
    final: Headline
    eval: EvalReport
    selection: Selection
    class_names: list[str]
    class_counts: list[int]
    data_check: Mapping[str, object] = field(default_factory=dict)
    # added by write() from the thresholds and counts (read back by read(); None in files that predate them)
    shot_rule: str | None = None
    shot_thresholds: dict[str, int] | None = None

    def to_dict(self) -> dict[str, object]:
        """What :meth:`write` writes, before it adds the shot rule, thresholds and group sizes."""
        return {
            "zero_shot": self.zero_shot,
            "zero_shot_per_class": self.zero_shot_per_class,
            "final": self.final,
            "eval": self.eval.to_dict(),
            "selection": self.selection.to_dict(),
            "class_names": self.class_names,
            "class_counts": self.class_counts,
            "data_check": dict(self.data_check),
        }

    def write(self, path: str | Path, thresholds: ShotThresholds = LIFT_THRESHOLDS) -> dict[str, object]:
        """Write atomically (see :func:`write_summary_json`); returns the JSON written."""
        return write_summary_json(path, self.to_dict(), thresholds, self.class_counts)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> RunSummary:
        zs = d.get("zero_shot")
        zs_pc = d.get("zero_shot_per_class")
        selection = d.get("selection")
        check = d.get("data_check")
        return cls(
            zero_shot=_headline(zs) if isinstance(zs, Mapping) else None,
            zero_shot_per_class=None if zs_pc is None else _floats(zs_pc),
            final=_headline(d.get("final") or {}),  # type: ignore[arg-type]
            eval=EvalReport.from_dict(d["eval"]),  # type: ignore[arg-type]
            selection=Selection.from_dict(selection) if isinstance(selection, Mapping) else Selection("last"),
            class_names=[str(n) for n in d.get("class_names") or []],  # type: ignore[attr-defined]
            class_counts=[int(c) for c in d.get("class_counts") or []],  # type: ignore[attr-defined]
            data_check=dict(check) if isinstance(check, Mapping) else {},
            shot_rule=None if d.get("shot_rule") is None else str(d["shot_rule"]),
            shot_thresholds={str(k): int(v) for k, v in t.items()}
            if isinstance(t := d.get("shot_thresholds"), Mapping)
            else None,
        )

    @classmethod
    def read(cls, path: str | Path) -> RunSummary:
        """Read ``summary.json``; :class:`~trainer.errors.UserError` naming the file when it is not one."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{p} is not valid JSON ({e.msg}): rerun the evaluation") from e
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(
                f"{p} is not a flatprompt run summary ({type(e).__name__}: {e}): rerun `python -m trainer fit`"
            ) from e


def _headline(d: Mapping[str, object]) -> Headline:
    return {str(k): _opt_float(v) for k, v in d.items()}


def evaluation_summary(
    preds: np.ndarray,
    targets: np.ndarray,
    train_counts: Sequence[int],
    probs: np.ndarray | None = None,
    thresholds: ShotThresholds = LIFT_THRESHOLDS,
) -> PassReport:
    """One test pass: :func:`~trainer.metrics.classification_report` plus ``ece`` (when ``probs`` is given,
    else ``None``), ``num_test``, ``group_sizes`` and the ``shot_rule`` used."""
    report = classification_report(preds, targets, train_counts, thresholds)
    return PassReport(
        top1=float(report["top1"]),  # type: ignore[arg-type]
        mean_per_class=float(report["mean_per_class"]),  # type: ignore[arg-type]
        per_class=_floats(report["per_class"]),
        many=_opt_float(report["many"]),
        medium=_opt_float(report["medium"]),
        few=_opt_float(report["few"]),
        ece=expected_calibration_error(probs, targets) if probs is not None else None,
        num_test=len(np.asarray(targets)),
        group_sizes=group_sizes(train_counts, thresholds),
        shot_rule=thresholds_rule(thresholds),
    )


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
    summary: Mapping[str, object],
    thresholds: ShotThresholds = LIFT_THRESHOLDS,
    train_counts: Sequence[int] | None = None,
) -> dict[str, object]:
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


# -- the evaluation pass ----------------------------------------------------------------------------------


def eval_loader(ds: LabelledImages, spec: PreprocessSpec, batch_size: int, workers: int) -> DataLoader:
    """``ds`` under the evaluation transform, in order."""
    return DataLoader(
        Transformed(ds, build_transform(spec, train=False)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
    )


def evaluate_task(
    model: PromptedCLIP,
    task: TaskData,
    spec: PreprocessSpec,
    device: torch.device,
    *,
    batch_size: int,
    thresholds: ShotThresholds,
    workers: int = 0,
    progress: bool = True,
    precision: str = "fp32",
    predictions_dir: Path | None = None,
    zero_shot_per_class: list[float] | None = None,
    posthoc_tau: float | None = None,
) -> EvalReport:
    """Base-class report (top1, per-class, many / medium / few, ECE), novel-class report, harmonic mean.

    With ``predictions_dir``, also writes ``per_class.csv`` (with ``zero_shot_per_class`` beside the tuned
    accuracies when given) and ``predictions_{base,novel}.npz`` (softmax probabilities and targets) there,
    for ``python -m trainer report``. With ``posthoc_tau``, ``base.posthoc`` holds the same report for the
    post-hoc logit-adjusted prediction argmax_j (z_j - tau log pi_j), pi from the training counts.
    """
    autocast = autocast_factory(device, precision)
    counts = task.train_counts
    probs, targets = predict(
        model,
        eval_loader(task.test, spec, batch_size, workers),
        task.class_names,
        device,
        autocast=autocast,
        progress=progress,
        description="eval base",
    )
    base = evaluation_summary(probs.argmax(1), targets, counts, probs, thresholds)
    if posthoc_tau is not None:
        base = replace(base, posthoc=posthoc_summary(probs, targets, counts, posthoc_tau, thresholds))
    if predictions_dir is not None:
        np.savez_compressed(predictions_dir / "predictions_base.npz", probs=probs, targets=targets)
        write_per_class_csv(
            predictions_dir / "per_class.csv",
            task.class_names,
            counts,
            base.per_class,
            thresholds,
            zero_shot_acc=zero_shot_per_class,
        )
    if task.novel_test is None:
        return EvalReport(base=base, shot_rule=thresholds_rule(thresholds))
    nprobs, ntargets = predict(
        model,
        eval_loader(task.novel_test, spec, batch_size, workers),
        task.novel_test.class_names,
        device,
        autocast=autocast,
        progress=progress,
        description="eval novel",
    )
    novel = evaluation_summary(
        nprobs.argmax(1), ntargets, [0] * task.novel_test.num_classes, nprobs, thresholds
    )
    if predictions_dir is not None:
        np.savez_compressed(predictions_dir / "predictions_novel.npz", probs=nprobs, targets=ntargets)
    return EvalReport(
        base=base,
        shot_rule=thresholds_rule(thresholds),
        novel=NovelReport.from_pass(novel),
        # HM of the sample top-1 accuracies, as Dassl's evaluator reports it (CoCoOp, KgCoOp, GCSCoOp); the
        # HM of the mean per-class accuracies is kept beside it
        hm=harmonic_mean(base.top1, novel.top1),
        hm_mean_per_class=harmonic_mean(base.mean_per_class, novel.mean_per_class),
        hm_rule=HM_RULE,
    )


def posthoc_summary(
    probs: np.ndarray,
    targets: np.ndarray,
    counts: list[int],
    tau: float,
    thresholds: ShotThresholds,
) -> PosthocReport:
    """top1 / mean per class / many / medium / few of the post-hoc logit-adjusted prediction.

    argmax_j (log p_j - tau log pi_j) = argmax_j (z_j - tau log pi_j), since log softmax shifts every logit of
    a row by the same constant; probabilities that underflowed to 0 stay -inf (their logits are > 87 below
    the row's maximum, far beyond any adjustment tau * log(n_max / n_min)).
    """
    with np.errstate(divide="ignore"):
        log_p = np.log(np.asarray(probs, dtype=np.float64))
    adjusted = log_p - tau * log_prior(counts).double().numpy()[None, :]
    report = evaluation_summary(adjusted.argmax(1), targets, counts, None, thresholds)
    return PosthocReport(
        tau=float(tau),
        top1=report.top1,
        mean_per_class=report.mean_per_class,
        many=report.many,
        medium=report.medium,
        few=report.few,
        per_class=report.per_class,
    )
