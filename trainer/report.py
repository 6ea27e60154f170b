"""``python -m trainer report RUN_DIR [RUN_DIR ...]``: figures and one HTML page from finished runs.

Reads what :func:`trainer.runner.fit` writes into a run directory (``metrics.jsonl`` as
:class:`~trainer.training.EpochRecord` lines, ``summary.json`` as :class:`~trainer.evaluation.RunSummary`,
``config.yaml``, ``predictions_base.npz`` / ``predictions_novel.npz``, ``checkpoint.pt``) and writes into
``--out``:

- ``<run>_per_class.png``: per-class test accuracy against the class's training count (log x), the
  many / medium / few bands of the recorded shot rule shaded, group means of the tuned prompts (solid) and of
  the zero-shot model (dashed), and each class's zero-shot accuracy (hollow grey) where the run recorded it;
- ``<run>_curves.png``: training loss, training / evaluation accuracy, many / medium / few per epoch, the
  learning rate (and GNM's noise factor), with the epoch where re-weighting switches on marked;
- ``<run>_reliability.png``: reliability diagram with 15 equal-width confidence bins (base classes, and the
  novel classes when present), ECE in the titles;
- ``comparison.png``: grouped bars of overall / many / medium / few / novel / HM per run, zero-shot included;
- ``landscape.png`` and ``sharpness.png`` (unless ``--no-landscape``): training loss along filter-normalised
  random directions around the final prompts, and the sharpness figure of each run
  (see :mod:`trainer.landscape` for the exact definition);
- ``report.html`` (images referenced relatively, so the folder can be moved as a whole) and
  ``report.json`` (the table and the landscape numbers).

Accuracies are shown in percent; ``summary.json`` stores fractions.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from trainer.errors import UserError
from trainer.evaluation import RunSummary
from trainer.landscape import SHARPNESS_DEFINITION, Landscape, TaskBuilder, run_landscape
from trainer.metrics import ShotThresholds, expected_calibration_error
from trainer.training import EpochRecord

_logger = logging.getLogger(__name__)

DPI = 130
N_BINS = 15
GROUP_COLOURS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}
BAND_COLOURS = {"many": "#dbe9f6", "medium": "#fdebd7", "few": "#f9dcdc"}
ZERO_SHOT_COLOUR = "#7f7f7f"
TABLE_COLUMNS: list[tuple[str, str]] = [
    ("base_top1", "overall"),
    ("base_mean_per_class", "mean/class"),
    ("many", "many"),
    ("medium", "medium"),
    ("few", "few"),
    ("novel", "novel"),
    ("hm", "HM"),
    ("ece", "ECE"),
]
BAR_METRICS: list[tuple[str, str]] = [
    ("base_top1", "overall"),
    ("many", "many"),
    ("medium", "medium"),
    ("few", "few"),
    ("novel", "novel"),
    ("hm", "HM"),
]
REWEIGHT_SUFFIX = {"none": "", "drw": "+DRW", "logit_adjust": "+LA"}


# ----------------------------------------------------------------------------------------------- loading


@dataclass
class RunRecord:
    """Everything the report reads from one run directory."""

    path: Path
    label: str
    slug: str
    config: Mapping[str, Any]  # config.yaml as written (a YAML mapping; older runs may lack fields)
    metrics: list[EpochRecord]
    summary: RunSummary
    predictions: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # base / novel

    @property
    def final(self) -> dict[str, float | None]:
        return dict(self.summary.final)

    @property
    def zero_shot(self) -> dict[str, float | None] | None:
        zs = self.summary.zero_shot
        return dict(zs) if zs else None

    @property
    def thresholds(self) -> ShotThresholds:
        t = self.summary.shot_thresholds or {}
        ev = self.config.get("eval") or {}
        return ShotThresholds(
            int(t.get("many_above", ev.get("many_above", 100))),
            int(t.get("few_below", ev.get("few_below", 20))),
        )

    @property
    def shot_rule(self) -> str:
        return self.summary.shot_rule or ""

    @property
    def has_checkpoint(self) -> bool:
        return (self.path / "checkpoint.pt").is_file()


def config_label(config: Mapping[str, Any], fallback: str) -> str:
    """``optim.name`` plus the re-weighting (``gnm+DRW``, ``sgd``, ``gcsam+LA``), else ``fallback``."""
    optim = (config.get("optim") or {}).get("name")
    if not optim:
        return fallback
    reweight = (config.get("reweight") or {}).get("name", "none")
    return f"{optim}{REWEIGHT_SUFFIX.get(reweight, '+' + str(reweight))}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "run"


def _read_jsonl(path: Path) -> list[EpochRecord]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(EpochRecord.from_dict(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if not isinstance(e, json.JSONDecodeError):
                raise UserError(
                    f"{path}:{n} is not a metrics record ({type(e).__name__}: {e}): rerun the run"
                ) from e
            raise UserError(
                f"{path}:{n} is not valid JSON ({e.msg}): the run's metrics file is damaged"
            ) from e
    return rows


def load_run(run_dir: str | Path) -> RunRecord:
    """Read one run directory; a missing directory or missing ``metrics.jsonl`` / ``summary.json`` is a
    :class:`UserError`. The label and slug are provisional (see :func:`load_runs`)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(
            f"run directory {path} does not exist: pass a folder written by `python -m trainer fit`"
        )
    missing = [n for n in ("metrics.jsonl", "summary.json") if not (path / n).is_file()]
    if missing:
        raise UserError(
            f"run directory {path} has no {' / '.join(missing)}: the run has not finished; "
            "let `python -m trainer fit` complete (it resumes from the checkpoint)"
        )
    summary = RunSummary.read(path / "summary.json")
    config: Mapping[str, Any] = {}
    if (path / "config.yaml").is_file():
        loaded = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        config = loaded if isinstance(loaded, dict) else {}
    predictions = {}
    for split in ("base", "novel"):
        f = path / f"predictions_{split}.npz"
        if f.is_file():
            with np.load(f) as z:
                predictions[split] = (np.asarray(z["probs"]), np.asarray(z["targets"]))
    name = path.resolve().name
    return RunRecord(
        path=path,
        label=config_label(config, name),
        slug=_slug(name),
        config=config,
        metrics=_read_jsonl(path / "metrics.jsonl"),
        summary=summary,
        predictions=predictions,
    )


def load_runs(run_dirs: Sequence[str | Path]) -> list[RunRecord]:
    """Load several runs and make labels and file-name slugs unique (the directory name disambiguates)."""
    if not run_dirs:
        raise UserError(
            "no run directories given: pass one or more folders written by `python -m trainer fit`"
        )
    runs = [load_run(d) for d in run_dirs]
    labels = [r.label for r in runs]
    for r in runs:
        if labels.count(r.label) > 1 and r.label != r.path.resolve().name:
            r.label = f"{r.label} ({r.path.resolve().name})"
    seen: dict[str, int] = {}
    for r in runs:
        base = r.slug
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            r.slug = f"{base}-{seen[base]}"
    for i, r in enumerate(runs):  # labels may still collide (same dir name in different parents)
        if [x.label for x in runs].count(r.label) > 1:
            r.label = f"{r.label} #{i + 1}"
    return runs


# ----------------------------------------------------------------------------------------------- helpers


def _pct(v: Any) -> float:
    """A fraction as percent; None / non-finite as NaN."""
    if v is None:
        return math.nan
    f = float(v)
    return 100.0 * f if math.isfinite(f) else math.nan


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    _logger.info("wrote %s", path)
    return path


def drw_switch_epoch(metrics: Sequence[EpochRecord]) -> int | None:
    """The first (1-indexed) epoch whose record has ``reweight_active`` true, or None."""
    for rec in metrics:
        if rec.reweight_active:
            return rec.epoch
    return None


def _eval_series(metrics: Sequence[EpochRecord], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for rec in metrics:
        value = (rec.eval or {}).get(key)
        if value is not None:
            xs.append(rec.epoch)
            ys.append(_pct(value))
    return xs, ys


# ----------------------------------------------------------------------------------------------- figures


def plot_per_class(run: RunRecord, path: Path) -> Path:
    """Per-class accuracy of the tuned prompts against the training count, bands per shot group; with the
    zero-shot accuracy of each class (hollow grey, joined to its tuned dot) where the run recorded it."""
    acc = np.array([_pct(v) for v in run.summary.eval.base.per_class])
    counts = np.asarray(run.summary.class_counts, dtype=np.float64)
    if len(acc) != len(counts) or len(acc) == 0:
        raise UserError(
            f"{run.path / 'summary.json'}: per-class accuracies ({len(acc)}) and class counts ({len(counts)}) "
            "do not match: rerun the evaluation"
        )
    th = run.thresholds
    groups = np.array([th.group(int(c)) for c in counts])
    lo, hi = max(counts.min() / 1.6, 0.5), counts.max() * 1.6
    edges = {
        "few": (lo, th.few_below - 0.5),
        "medium": (th.few_below - 0.5, th.many_above + 0.5),
        "many": (th.many_above + 0.5, hi),
    }
    fig, ax = plt.subplots(figsize=(8.5, 5.0))
    zs = run.zero_shot or {}
    tuned = run.final
    handles: list[Any] = []
    _group_bands(ax, edges, (lo, hi), groups, tuned, zs)
    finite = np.isfinite(acc)
    zs_acc = np.array([_pct(v) for v in run.summary.zero_shot_per_class or []])
    if len(zs_acc) == len(acc):  # runs from before zero-shot per class was recorded have none
        both = finite & np.isfinite(zs_acc)
        ax.vlines(counts[both], zs_acc[both], acc[both], colors="#9a9a9a", linewidth=0.7, alpha=0.7, zorder=2)
        handles.append(
            ax.scatter(
                counts[np.isfinite(zs_acc)],
                zs_acc[np.isfinite(zs_acc)],
                s=18,
                facecolors="none",
                edgecolors=ZERO_SHOT_COLOUR,
                linewidths=0.9,
                zorder=3,
                label="zero-shot, same class",
            )
        )
    for g in ("many", "medium", "few"):
        m = (groups == g) & finite
        if m.any():
            handles.append(
                ax.scatter(
                    counts[m],
                    acc[m],
                    s=22,
                    color=GROUP_COLOURS[g],
                    alpha=0.8,
                    edgecolors="white",
                    linewidths=0.4,
                    zorder=3,
                    label=f"{g}-shot class",
                )
            )
    handles.append(plt.Line2D([], [], color="#333", linewidth=2, label="tuned: group mean"))
    if zs:
        handles.append(
            plt.Line2D(
                [], [], color=ZERO_SHOT_COLOUR, linestyle="--", linewidth=1.6, label="zero-shot: group mean"
            )
        )
    _count_axis(ax, lo, hi)
    overall = _pct(tuned.get("base_top1"))
    ax.set_title(f"{run.label}: per-class accuracy vs training count (overall {overall:.1f}%)")
    # below the axes: inside, it would hide the points of whichever corner it took
    ax.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8, frameon=False
    )
    ax.grid(True, which="major", axis="y", alpha=0.3)
    if run.shot_rule:
        ax.text(0.01, 0.01, run.shot_rule, transform=ax.transAxes, fontsize=7, color="#555")
    return _save(fig, path)


def _group_bands(
    ax: Axes,
    edges: Mapping[str, tuple[float, float]],
    limits: tuple[float, float],
    groups: np.ndarray,
    tuned: Mapping[str, float | None],
    zs: Mapping[str, float | None],
) -> None:
    """A shaded band per shot group, labelled with its class count, with the tuned (solid) and zero-shot
    (dashed) group means across it."""
    lo, hi = limits
    for g, (a, b) in edges.items():
        a, b = max(a, lo), min(b, hi)
        if a >= b:
            continue
        ax.axvspan(a, b, color=BAND_COLOURS[g], zorder=0)
        n = int((groups == g).sum())
        ax.text(math.sqrt(a * b), 103, f"{g} ({n})", ha="center", va="bottom", fontsize=9, color="#444")
        if (t := tuned.get(g)) is not None:
            ax.hlines(_pct(t), a, b, colors=GROUP_COLOURS[g], linewidth=2, zorder=2)
        if (z := zs.get(g)) is not None:
            ax.hlines(_pct(z), a, b, colors=ZERO_SHOT_COLOUR, linestyles="--", linewidth=1.6, zorder=2)


def _count_axis(ax: Axes, lo: float, hi: float) -> None:
    """Log x axis of training counts over [lo, hi], accuracy in percent on y."""
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if _minor_label(v, lo, hi) else ""))
    ax.set_ylim(-3, 112)
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("test accuracy of the class (%)")


def _minor_label(v: float, lo: float, hi: float) -> bool:
    """Label 2 and 5 times a power of ten when the axis spans less than three decades."""
    if hi / lo > 1000:
        return False
    lead = round(v / 10 ** math.floor(math.log10(v)), 6)
    return lead in (2.0, 5.0)


def _mark_drw(ax: Axes, drw: int | None, label: bool) -> None:
    """A dotted line at x = drw - 1: epoch k's record sits at x = k and its training spans (k - 1, k]."""
    if drw is not None:
        ax.axvline(
            drw - 1,
            color="#9467bd",
            linestyle=":",
            linewidth=1.5,
            label=f"re-weighting on (from epoch {drw})" if label else None,
        )


def _accuracy_panel(ax_acc: Axes, run: RunRecord, epochs: list[int], style: Mapping[str, Any]) -> None:
    """Training accuracy and the evaluated test accuracies per epoch, zero-shot overall as a line."""
    m = run.metrics
    ax_acc.plot(epochs, [_pct(r.train_acc) for r in m], color="#999", label="train (running)", **style)
    for key, name, colour in (
        ("base_top1", "test overall", "#1f77b4"),
        ("base_mean_per_class", "test mean/class", "#17becf"),  # dashed: equals overall on a balanced set
        ("novel", "novel", "#2ca02c"),
        ("hm", "HM", "#8c564b"),
    ):
        xs, ys = _eval_series(m, key)
        if xs:
            linestyle = "--" if key == "base_mean_per_class" else "-"
            ax_acc.plot(xs, ys, color=colour, label=name, linestyle=linestyle, **style)
    zs = run.zero_shot or {}
    if zs.get("base_top1") is not None:
        ax_acc.axhline(
            _pct(zs["base_top1"]),
            color=ZERO_SHOT_COLOUR,
            linestyle="--",
            linewidth=1,
            label="zero-shot overall",
        )
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("accuracy")


def plot_training_curves(run: RunRecord, path: Path) -> Path:
    """Loss, accuracy, many / medium / few and learning rate per epoch; the re-weighting switch marked."""
    m = run.metrics
    epochs = [r.epoch for r in m]
    drw = drw_switch_epoch(m)
    style = {"marker": "o", "markersize": 3, "linewidth": 1.5}
    fig, axes = plt.subplots(2, 2, figsize=(13, 7.5), sharex=True, layout="constrained")
    (ax_loss, ax_acc), (ax_grp, ax_lr) = axes

    ax_loss.plot(
        epochs,
        [r.train_loss for r in m],
        color="#333",
        label="training loss (as optimised)",
        **style,
    )
    ax_loss.set_ylabel("loss (per-epoch mean)")
    ax_loss.set_title("training loss" + (" (class-weighted after the switch)" if drw is not None else ""))

    _accuracy_panel(ax_acc, run, epochs, style)

    for g in ("many", "medium", "few"):
        xs, ys = _eval_series(m, g)
        if xs:
            ax_grp.plot(xs, ys, color=GROUP_COLOURS[g], label=g, **style)
    ax_grp.set_ylabel("test accuracy (%)")
    ax_grp.set_title("many / medium / few (test)")

    ax_lr.plot(
        epochs,
        [r.lr for r in m],
        color="#333",
        label="learning rate (end of epoch)",
        **style,
    )
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title(
        "learning rate" + (" and GNM noise factor" if any(r.noise_factor is not None for r in m) else "")
    )
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    noise = [(r.epoch, r.noise_factor) for r in m if r.noise_factor is not None]
    lr_handles, lr_labels = ax_lr.get_legend_handles_labels()
    if noise:
        ax_nf = ax_lr.twinx()
        # the factor of epoch k holds over (k - 1, k]
        ax_nf.step(
            [noise[0][0] - 1] + [e for e, _ in noise],
            [noise[0][1]] + [v for _, v in noise],
            where="pre",
            color="#e377c2",
            linewidth=1.5,
            label="GNM noise factor",
        )
        ax_nf.set_ylabel("noise factor", color="#e377c2")
        ax_nf.set_ylim(0, 1.1)
        h, lab = ax_nf.get_legend_handles_labels()
        lr_handles, lr_labels = lr_handles + h, lr_labels + lab

    for i, ax in enumerate(axes.flat):
        _mark_drw(ax, drw, label=i == 0)
        ax.grid(True, alpha=0.3)
        if i >= 2:
            ax.set_xlabel("epoch (a point = the end of that epoch)")
    for ax in (ax_loss, ax_acc, ax_grp):
        ax.legend(bbox_to_anchor=(1.02, 1.0), fontsize=8, loc="upper left", borderaxespad=0.0)
    lr_anchor = (1.14 if noise else 1.02, 1.0)
    ax_lr.legend(
        lr_handles, lr_labels, bbox_to_anchor=lr_anchor, fontsize=8, loc="upper left", borderaxespad=0.0
    )
    for ax in axes.flat:
        ax.set_xlim(0, max(epochs, default=1) + 0.5)
        if len(epochs) <= 12:
            ax.set_xticks([0, *epochs])
    switch = f"; dotted line: re-weighting on from epoch {drw}" if drw is not None else ""
    fig.suptitle(f"{run.label}: training curves ({len(epochs)} epochs{switch})", fontsize=13)
    return _save(fig, path)


def reliability_bins(
    probs: np.ndarray, targets: np.ndarray, n_bins: int = N_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin ``(lo, hi]``: accuracy, mean confidence, sample count (NaN when empty),
    and the bin edges. Same binning as :func:`trainer.metrics.expected_calibration_error`."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == targets).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    acc, mean_conf, count = np.full(n_bins, np.nan), np.full(n_bins, np.nan), np.zeros(n_bins)
    for b in range(n_bins):
        mask = (conf > edges[b]) & (conf <= edges[b + 1])
        count[b] = mask.sum()
        if count[b]:
            acc[b] = correct[mask].mean()
            mean_conf[b] = conf[mask].mean()
    return acc, mean_conf, count, edges


def _draw_reliability(ax: Axes, ax_hist: Axes, probs: np.ndarray, targets: np.ndarray, name: str) -> float:
    acc, conf, count, edges = reliability_bins(probs, targets)
    ece = expected_calibration_error(probs, targets, N_BINS)
    width = edges[1] - edges[0]
    centres = edges[:-1] + width / 2
    filled = count > 0
    ax.bar(
        centres[filled],
        acc[filled],
        width=width * 0.95,
        color="#1f77b4",
        edgecolor="#0b3c66",
        label="accuracy in bin",
    )
    gap_lo = np.minimum(acc, conf)[filled]
    ax.bar(
        centres[filled],
        np.abs(acc - conf)[filled],
        bottom=gap_lo,
        width=width * 0.95,
        color="none",
        edgecolor="#d62728",
        hatch="//",
        linewidth=0.8,
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], "--", color="#555", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    top1 = float((probs.argmax(1) == targets).mean()) if len(targets) else math.nan
    ax.set_title(f"{name}: ECE {100 * ece:.2f}% ({N_BINS} bins), top-1 {100 * top1:.1f}%", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, alpha=0.3)
    ax_hist.bar(centres, count / max(count.sum(), 1), width=width * 0.95, color="#999")
    ax_hist.set_xlim(0, 1)
    ax_hist.set_xlabel("confidence (max softmax probability)")
    ax_hist.set_ylabel("share of images")
    ax_hist.grid(True, alpha=0.3)
    return ece


def plot_reliability(run: RunRecord, path: Path) -> tuple[Path, dict[str, float]]:
    """Reliability diagram(s) from ``predictions_base.npz`` (and ``predictions_novel.npz``); returns the ECEs."""
    splits = [s for s in ("base", "novel") if s in run.predictions]
    fig, axes = plt.subplots(
        2, len(splits), figsize=(5.2 * len(splits), 5.8), squeeze=False, gridspec_kw={"height_ratios": [3, 1]}
    )
    eces: dict[str, float] = {}
    for j, split in enumerate(splits):
        probs, targets = run.predictions[split]
        eces[split] = _draw_reliability(axes[0, j], axes[1, j], probs, targets, f"{split} classes")
    fig.suptitle(f"{run.label}: reliability diagram", fontsize=12)
    fig.tight_layout()
    return _save(fig, path), eces


def _comparison_rows(runs: Sequence[RunRecord]) -> list[tuple[str, dict[str, float | None], bool]]:
    """``(name, headline, is_zero_shot)`` rows: one zero-shot row per distinct zero-shot result, then runs."""
    rows: list[tuple[str, dict[str, float | None], bool]] = []
    zero_shots: list[dict[str, float | None]] = []
    users: list[list[str]] = []
    for r in runs:
        if r.zero_shot:
            if r.zero_shot not in zero_shots:
                zero_shots.append(r.zero_shot)
                users.append([])
            users[zero_shots.index(r.zero_shot)].append(r.label)
    for zs, who in zip(zero_shots, users, strict=True):
        if len(zero_shots) == 1:
            name = "zero-shot"
        else:  # runs on different data or models: say which runs each zero-shot row belongs to
            name = f"zero-shot ({who[0]}" + (f" +{len(who) - 1} more)" if len(who) > 1 else ")")
        rows.append((name, zs, True))
    rows.extend((r.label, r.final, False) for r in runs)
    return rows


def plot_comparison(runs: Sequence[RunRecord], path: Path) -> Path:
    """Grouped bars: one group per metric, one bar per run (zero-shot hatched grey)."""
    rows = _comparison_rows(runs)
    metrics = [(k, n) for k, n in BAR_METRICS if any(h.get(k) is not None for _, h, _ in rows)]
    n_bars = len(rows)
    width = 0.8 / n_bars
    x = np.arange(len(metrics))
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(min(14.0, max(8.0, 0.32 * len(metrics) * n_bars + 3)), 5.2))
    colour_i = 0
    top = 0.0
    colour: Any
    for i, (name, h, is_zs) in enumerate(rows):
        vals = np.array([_pct(h.get(k)) for k, _ in metrics])
        top = max(top, float(np.nanmax(vals, initial=0.0)))
        pos = x - 0.4 + width * (i + 0.5)
        if is_zs:
            colour, hatch = ZERO_SHOT_COLOUR, "//"
        else:
            colour, hatch = cmap(colour_i % 10), None
            colour_i += 1
        bars = ax.bar(
            pos, np.nan_to_num(vals), width * 0.92, color=colour, hatch=hatch, edgecolor="white", label=name
        )
        for b, v in zip(bars, vals, strict=True):
            if math.isfinite(v):
                ax.text(
                    b.get_x() + b.get_width() / 2,
                    v + 1,
                    f"{v:.1f}",
                    ha="center",
                    va="bottom",
                    fontsize=7 if n_bars <= 5 else 6,
                    rotation=90,
                )
    ax.set_xticks(x, [n for _, n in metrics])
    ax.set_ylim(0, min(118.0, top * 1.12 + 8))  # room for the rotated value labels
    ax.set_ylabel("accuracy (%)")
    ax.set_xlabel("metric (overall = top-1 on the base test set; novel/HM: base-to-novel protocol)")
    ax.set_title("comparison of runs (test accuracy)")
    ax.legend(fontsize=8, loc="upper center", ncol=min(n_bars, 4), bbox_to_anchor=(0.5, -0.14))
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_landscape(
    results: Sequence[Landscape], path: Path, colour_index: dict[str, int] | None = None
) -> Path:
    """Loss vs alpha per run (mean over directions, min..max band), absolute and relative to the centre.

    ``colour_index`` maps a run label to its position among all runs, so a run keeps the colour it has in
    ``comparison.png`` when other runs are missing from the landscape.
    """
    fig, (ax_abs, ax_rel) = plt.subplots(1, 2, figsize=(12, 4.8))
    cmap = plt.get_cmap("tab10")
    linestyles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v"]
    for i, res in enumerate(results):
        colour = cmap((colour_index or {}).get(res.label, i) % 10)
        mean = res.mean_curve
        for ax, offset in ((ax_abs, 0.0), (ax_rel, res.center_loss)):
            ax.fill_between(
                res.alphas,
                res.losses.min(0) - offset,
                res.losses.max(0) - offset,
                color=colour,
                alpha=0.15,
                linewidth=0,
            )
            ax.plot(
                res.alphas,
                mean - offset,
                color=colour,
                linewidth=1.8,
                linestyle=linestyles[i % len(linestyles)],  # runs with near-identical curves stay visible
                marker=markers[i % len(markers)],
                markersize=3.5,
                label=res.label,
            )
            ax.plot(
                [0],
                [res.center_loss - offset],
                marker="*",
                color=colour,
                markersize=10,
                markeredgecolor="black",
            )
    for ax in (ax_abs, ax_rel):
        ax.axvline(0, color="#999", linewidth=0.8)
        ax.set_xlabel("alpha (step along a filter-normalised random direction)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for r in (-0.5, 0.5):
        ax_rel.axvline(r, color="#555", linestyle=":", linewidth=1)
    ax_abs.set_ylabel("training cross-entropy")
    ax_abs.set_title("loss L(theta + alpha d): mean over directions, band = min..max")
    ax_rel.set_ylabel("L(theta + alpha d) - L(theta)")
    ax_rel.set_title("rise above the centre (dotted: |alpha| = 0.5, the sharpness radius)")
    first = results[0]
    fig.suptitle(
        f"loss landscape around the final prompts ({first.n_images} training images, "
        f"{first.losses.shape[0]} directions, {len(first.alphas)} points)",
        fontsize=12,
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_sharpness(results: Sequence[Landscape], path: Path) -> Path:
    """Bars per run: sharpness at |alpha| = 0.5 and the max rise over the grid."""
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * len(results) + 3), 4.5))
    x = np.arange(len(results))
    sharp = [r.sharpness for r in results]
    rise = [r.max_rise for r in results]
    b1 = ax.bar(x - 0.2, sharp, 0.38, color="#1f77b4", label="sharpness: mean rise at |alpha| = 0.5")
    b2 = ax.bar(x + 0.2, rise, 0.38, color="#ff7f0e", label="max rise over alpha in [-1, 1]")
    for bars in (b1, b2):
        for b, v in zip(bars, [*sharp] if bars is b1 else [*rise], strict=True):
            va = "bottom" if v >= 0 else "top"
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3g}", ha="center", va=va, fontsize=8)
    ax.set_xticks(
        x,
        [r.label for r in results],
        rotation=20 if len(results) > 4 else 0,
        ha="right" if len(results) > 4 else "center",
    )
    ax.set_ylabel("training-loss increase (nats)")
    ax.set_title("sharpness of the final prompts (lower = flatter)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    lo, hi = min(0.0, *sharp, *rise), max(1e-9, *sharp, *rise)
    ax.set_ylim(lo - 0.1 * (hi - lo) if lo < 0 else 0.0, hi + 0.15 * (hi - lo))
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- HTML


def _fmt_pct(v: Any) -> str:
    p = _pct(v)
    return "–" if not math.isfinite(p) else f"{p:.2f}"


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
tr.zs td { color: #666; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
.note { color: #555; font-size: .9em; } code { background: #f5f5f5; padding: 0 .2em; }
"""


def _table_html(runs: Sequence[RunRecord]) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for _, n in TABLE_COLUMNS)
    lines = [f'<table class="runs"><tr><th class="name">run</th><th class="name">directory</th>{head}</tr>']
    dirs = {r.label: r.path.name for r in runs}
    for name, h, is_zs in _comparison_rows(runs):
        cells = "".join(f"<td>{_fmt_pct(h.get(k))}</td>" for k, _ in TABLE_COLUMNS)
        cls = ' class="zs"' if is_zs else ""
        d = "" if is_zs else html.escape(dirs.get(name, ""))
        lines.append(
            f'<tr{cls}><td class="name">{html.escape(name)}</td><td class="name">{d}</td>{cells}</tr>'
        )
    lines.append("</table>")
    return "\n".join(lines)


def _config_html(run: RunRecord) -> str:
    """The settings that tell runs apart, from the run's ``config.yaml``."""

    def sec(name: str) -> Mapping[str, Any]:
        return dict(run.config.get(name) or {})

    model, data, prompt, optim, rw, train = (
        sec(n) for n in ("model", "data", "prompt", "optim", "reweight", "train")
    )
    data_bits = [str(data.get("kind"))]
    data_bits += [f"{k} {data[k]}" for k in ("root", "imbalance", "shots") if data.get(k) is not None]
    data_bits += ["base-to-novel"] if data.get("base_to_novel") else []
    data_bits += [f"seed {data.get('seed')}"]
    prompt_bits = [f"ctx M={prompt.get('n_ctx')}"]
    if prompt.get("n_ctx"):
        prompt_bits.append(f"init {prompt.get('ctx_init')!r}" if prompt.get("ctx_init") else "random init")
    else:
        prompt_bits.append(f"template {prompt.get('template')!r}")
    if prompt.get("vpt_length"):
        prompt_bits.append(f"VPT Lp={prompt['vpt_length']} {'deep' if prompt.get('vpt_deep') else 'shallow'}")
    optim_bits = [f"{optim.get('name')}", f"lr {optim.get('lr')}", f"wd {optim.get('weight_decay')}"]
    if optim.get("name") in ("sam", "asam", "gnm", "gcsam"):
        optim_bits.insert(1, f"over {optim.get('base')}")
        optim_bits.append(f"rho {optim.get('rho') if optim.get('rho') is not None else 'default'}")
    if optim.get("name") == "gnm":
        optim_bits.append(f"kappa {optim.get('kappa')}")
    if optim.get("name") == "gcsam":
        optim_bits.append(f"beta {optim.get('beta1')} / {optim.get('beta2')}")
    rw_text = str(rw.get("name"))
    if rw.get("name") == "drw":
        rw_text += f", beta {rw.get('beta')}, on from epoch {drw_switch_epoch(run.metrics) or '-'}"
    elif rw.get("name") == "logit_adjust":
        rw_text += f", tau {rw.get('tau')}"
    items = [
        ("model", f"{model.get('name')} ({model.get('pretrained') or 'packaged weights / random init'})"),
        ("data", ", ".join(data_bits)),
        ("prompts", ", ".join(prompt_bits)),
        ("optimizer", ", ".join(optim_bits)),
        ("re-weighting", rw_text),
        (
            "training",
            f"{train.get('epochs')} epochs, batch {data.get('batch_size')}, seed {train.get('seed')}",
        ),
        ("shot rule", run.shot_rule or "-"),
    ]
    rows = "".join(
        f'<tr><td class="name">{html.escape(k)}</td><td class="name">{html.escape(str(v))}</td></tr>'
        for k, v in items
    )
    return f"<table>{rows}</table>"


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'


def write_html(
    path: Path,
    runs: Sequence[RunRecord],
    figures: dict[str, dict[str, str]],
    shared: dict[str, str],
    landscapes: Sequence[Landscape],
    notes: Sequence[str],
    eces: dict[str, dict[str, float]],
) -> Path:
    """The report page; ``figures[slug][kind]`` and ``shared[kind]`` are PNG names relative to ``path``."""
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>flatprompt report</title>',
        f"<style>{CSS}</style></head><body>",
        "<h1>flatprompt report</h1>",
        f'<p class="note">{len(runs)} run(s), generated {when}. Accuracies in percent on the test sets; ECE in '
        "percent (15 equal-width confidence bins, base classes). Overall = top-1 over the base test images.</p>",
        "<h2>Summary</h2>",
        _table_html(runs),
    ]
    if "comparison" in shared:
        parts.append(_img(shared["comparison"], "grouped bar plot of the runs' accuracies"))
    if landscapes:
        parts.append("<h2>Loss landscape and sharpness</h2>")
        first = landscapes[0]
        parts.append(
            f'<p class="note">Training cross-entropy (unweighted) on a fixed, seeded subset of {first.n_images} '
            f"training images (evaluation transform), at theta + alpha&middot;d for {len(first.alphas)} values of "
            f"alpha in [-1, 1] and {first.losses.shape[0]} seeded Gaussian directions d, filter-normalised per "
            "prompt token (Li et al. 2018): each row of d (one context vector, one visual prompt token of one "
            "block) is rescaled to the norm of the same row of the final prompts theta.</p>"
        )
        parts.append(f'<p class="note"><b>Definition.</b> {html.escape(SHARPNESS_DEFINITION)}</p>')
        rows = "".join(
            f'<tr><td class="name">{html.escape(r.label)}</td><td>{r.center_loss:.4f}</td>'
            f"<td>{r.loss_at(-0.5):.4f}</td><td>{r.loss_at(0.5):.4f}</td><td>{r.sharpness:.4f}</td>"
            f"<td>{r.max_rise:.4f}</td></tr>"
            for r in landscapes
        )
        parts.append(
            '<table><tr><th class="name">run</th><th>L(theta)</th><th>L(-0.5)</th><th>L(+0.5)</th>'
            f"<th>sharpness</th><th>max rise</th></tr>{rows}</table>"
        )
        for kind, alt in (("landscape", "loss along random directions"), ("sharpness", "sharpness per run")):
            if kind in shared:
                parts.append(_img(shared[kind], alt))
    for note in notes:
        parts.append(f'<p class="note">Note: {html.escape(note)}</p>')
    for run in runs:
        parts.append(f"<h2>Run: {html.escape(run.label)} <small>({html.escape(str(run.path))})</small></h2>")
        parts.append(_config_html(run))
        e = eces.get(run.slug, {})
        if e:
            parts.append(
                '<p class="note">ECE: ' + ", ".join(f"{k} {100 * v:.2f}%" for k, v in e.items()) + "</p>"
            )
        for kind, alt in (
            ("per_class", "per-class accuracy against training count"),
            ("curves", "training curves"),
            ("reliability", "reliability diagram"),
        ):
            if kind in figures.get(run.slug, {}):
                parts.append(_img(figures[run.slug][kind], f"{run.label}: {alt}"))
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    _logger.info("wrote %s", path)
    return path


# ----------------------------------------------------------------------------------------------- driver


@dataclass
class ReportResult:
    out_dir: Path
    html: Path
    figures: list[Path]
    landscapes: list[Landscape]
    table: list[dict[str, str | float | bool | None]]


def _landscape_figures(
    runs: Sequence[RunRecord],
    out: Path,
    notes: list[str],
    written: list[Path],
    shared: dict[str, str],
    *,
    n_images: int,
    n_directions: int,
    n_points: int,
    seed: int,
    device: str,
    build_task: TaskBuilder | None,
) -> list[Landscape]:
    """The loss landscape of every run that has a checkpoint and whose task can be rebuilt here, and its
    two figures (appended to ``written`` / ``shared``); what was left out goes to ``notes``."""
    results: list[Landscape] = []
    for run in runs:
        if not run.has_checkpoint:
            notes.append(f"{run.label}: no checkpoint.pt, left out of the loss landscape")
            continue
        try:
            results.append(
                run_landscape(
                    run.path,
                    label=run.label,
                    n_images=n_images,
                    n_directions=n_directions,
                    n_points=n_points,
                    seed=seed,
                    device=device,
                    build_task=build_task,
                )
            )
        except UserError as e:
            _logger.warning("loss landscape of %s skipped: %s", run.path, e)
            notes.append(f"{run.label}: loss landscape skipped ({e})")
    if results:
        index = {r.label: i for i, r in enumerate(runs)}
        written.append(plot_landscape(results, out / "landscape.png", index))
        shared["landscape"] = written[-1].name
        written.append(plot_sharpness(results, out / "sharpness.png"))
        shared["sharpness"] = written[-1].name
    return results


def build_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    landscape: bool = True,
    landscape_images: int = 256,
    landscape_directions: int = 3,
    landscape_points: int = 21,
    seed: int = 0,
    device: str = "cpu",
    build_task: TaskBuilder | None = None,
) -> ReportResult:
    """Write every figure, ``report.html`` and ``report.json`` for ``run_dirs`` into ``out_dir``.

    A run without ``checkpoint.pt``, or whose dataset cannot be rebuilt here, is left out of the landscape
    with a note on the page; a missing run directory, ``metrics.jsonl`` or ``summary.json`` is a
    :class:`UserError`.
    """
    runs = load_runs(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, dict[str, str]] = {}
    shared: dict[str, str] = {}
    written: list[Path] = []
    notes: list[str] = []
    eces: dict[str, dict[str, float]] = {}
    for run in runs:
        f: dict[str, str] = {}
        written.append(plot_per_class(run, out / f"{run.slug}_per_class.png"))
        f["per_class"] = written[-1].name
        written.append(plot_training_curves(run, out / f"{run.slug}_curves.png"))
        f["curves"] = written[-1].name
        if run.predictions:
            p, eces[run.slug] = plot_reliability(run, out / f"{run.slug}_reliability.png")
            written.append(p)
            f["reliability"] = p.name
        else:
            notes.append(f"{run.label}: no predictions_base.npz, so no reliability diagram")
        figures[run.slug] = f
    if len(runs) > 1 or any(r.zero_shot for r in runs):
        written.append(plot_comparison(runs, out / "comparison.png"))
        shared["comparison"] = written[-1].name
    results = (
        _landscape_figures(
            runs,
            out,
            notes,
            written,
            shared,
            n_images=landscape_images,
            n_directions=landscape_directions,
            n_points=landscape_points,
            seed=seed,
            device=device,
            build_task=build_task,
        )
        if landscape
        else []
    )
    table = [
        {"run": name, "zero_shot": is_zs, **{k: h.get(k) for k, _ in TABLE_COLUMNS}}
        for name, h, is_zs in _comparison_rows(runs)
    ]
    page = write_html(out / "report.html", runs, figures, shared, results, notes, eces)
    (out / "report.json").write_text(
        json.dumps(
            {
                "runs": [{"label": r.label, "path": str(r.path), "slug": r.slug} for r in runs],
                "table": table,
                "ece_15_bins": eces,
                "landscape": [r.to_dict() for r in results],
                "notes": notes,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return ReportResult(out, page, written, results, table)


def default_out_dir(run_dirs: Sequence[str | Path]) -> Path:
    """``RUN_DIR/report`` for one run; ``<common parent>/report`` for several."""
    paths = [Path(p).resolve() for p in run_dirs]
    if len(paths) == 1:
        return paths[0] / "report"
    common = Path(*_common_parts(paths))
    return common / "report"


def _common_parts(paths: Sequence[Path]) -> list[str]:
    parts: list[str] = []
    for items in zip(*(p.parts for p in paths), strict=False):
        if all(i == items[0] for i in items):
            parts.append(items[0])
        else:
            break
    return parts or [str(Path.cwd())]
