"""Views over a :class:`LabelledImages`: long-tail profiles, few-shot sampling, the base-to-novel split.

Everything here returns a :class:`LabelledSubset`, a lazy view (indices into the base dataset plus an optional
relabelling); no image is copied or decoded.

- ``long_tail_counts`` / ``apply_long_tail``: the exponential profile of LDAM-DRW's ``imbalance_cifar.py``
  (spec §4.1): ``n_i = int(n_max * IF ** (-i / (C - 1)))``, class 0 the head; per class, in label order, the
  indices are shuffled by one ``np.random.RandomState(seed)`` stream and the first ``n_i`` are kept. With
  CIFAR-100 (500 per class) and IF 100 this keeps exactly 10,847 images, 500 down to 5.
- ``few_shot``: K images per class, drawn without replacement by a seeded generator.
- ``base_to_novel_split``: the CoCoOp protocol (spec §4.4): sorted label ids, the first ``ceil(C/2)`` are base,
  the rest novel, each half relabelled to ``0..k-1`` with its own class names.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.data.base import LabelledImages, TaskData, class_counts
from trainer.errors import UserError

_logger = logging.getLogger(__name__)


class LabelledSubset(LabelledImages):
    """A relabelled view of some items of ``base``.

    Args:
        base: the dataset viewed.
        indices: the base items kept, in the order of the view.
        class_names: the view's label space; defaults to ``base.class_names``.
        label_map: ``{base label: view label}``; defaults to the identity. Every kept item's label must be in it.
        description: what the view is (used in logs and errors), e.g. ``"CIFAR-100 train, IF 100"``.
    """

    def __init__(
        self,
        base: LabelledImages,
        indices: Sequence[int],
        class_names: Sequence[str] | None = None,
        label_map: dict[int, int] | None = None,
        description: str = "",
    ) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        self.class_names = list(class_names) if class_names is not None else list(base.class_names)
        self.description = description
        n = len(base)
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"LabelledSubset: index {bad[0]} out of range for a dataset of {n} items")
        base_targets = base.targets
        if label_map is None:
            self.targets = [base_targets[i] for i in self.indices]
        else:
            self.targets = [label_map[base_targets[i]] for i in self.indices]
        c = len(self.class_names)
        if any(not 0 <= t < c for t in self.targets):
            raise ValueError(f"LabelledSubset: a label falls outside 0..{c - 1}")

    def load(self, index: int) -> Image.Image:
        return self.base.load(self.indices[index])

    def source_file(self, index: int) -> Path | None:
        return self.base.source_file(self.indices[index])

    def __repr__(self) -> str:
        what = self.description or type(self.base).__name__
        return f"LabelledSubset({what}: {len(self)} items, {self.num_classes} classes)"


def _describe(dataset: LabelledImages) -> str:
    return getattr(dataset, "description", "") or repr(dataset)


def long_tail_counts(n_max: float, num_classes: int, imbalance: float) -> list[int]:
    """Images per class of the exponential profile: ``int(n_max * (1/IF) ** (i / (C - 1)))``, class 0 first.

    Computed exactly as LDAM-DRW's ``get_img_num_per_cls`` (``img_max * imb_factor ** (i / (C - 1.0))`` with
    ``imb_factor = 1 / IF``), so the integer floors match its published counts (IF 100, 500, 100 classes:
    500 ... 5, total 10,847).

    Raises:
        UserError: ``imbalance < 1`` or ``num_classes < 1``.
    """
    if num_classes < 1:
        raise UserError(f"long-tail profile: num_classes is {num_classes}; it must be at least 1.")
    if not imbalance >= 1:
        raise UserError(
            f"long-tail profile: imbalance factor {imbalance} is below 1; use IF >= 1 "
            "(n_max / n_min, e.g. 100 for CIFAR-100-LT; 1 keeps the data balanced)."
        )
    if num_classes == 1:
        return [int(n_max)]
    imb_factor = 1.0 / imbalance
    return [int(n_max * imb_factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def apply_long_tail(
    dataset: LabelledImages, imbalance: float, seed: int = 0, n_max: float | None = None
) -> LabelledSubset:
    """Subsample ``dataset`` to the exponential long-tail profile (class 0 the head).

    ``n_max`` defaults to the largest class (for a balanced set that is LDAM's ``len(data) / C``). Per class, in
    label order, the class's indices are shuffled by one ``np.random.RandomState(seed)`` and the first ``n_i``
    kept, exactly as LDAM-DRW does after ``np.random.seed(seed)``; the view lists the classes in label order.
    A class with fewer images than its quota keeps all of them (logged).

    Raises:
        UserError: the profile gives some class zero images (imbalance too large for ``n_max``).
    """
    targets = np.asarray(dataset.targets, dtype=np.int64)
    counts = class_counts(dataset.targets, dataset.num_classes)
    if n_max is None:
        n_max = float(max(counts)) if counts else 0.0
    quotas = long_tail_counts(n_max, dataset.num_classes, imbalance)
    rng = np.random.RandomState(seed)
    kept: list[int] = []
    for c, quota in enumerate(quotas):
        idx = np.where(targets == c)[0]
        rng.shuffle(idx)
        if len(idx) < quota:
            _logger.warning(
                "%s: class %d (%r) has %d images, fewer than its long-tail quota %d; keeping all of them",
                _describe(dataset),
                c,
                dataset.class_names[c],
                len(idx),
                quota,
            )
        take = idx[:quota]
        if len(take) == 0:
            raise UserError(
                f"{_describe(dataset)}: the long-tail profile (IF {imbalance:g}, n_max {n_max:g}) leaves class "
                f"{c} ({dataset.class_names[c]!r}) with zero images; lower the imbalance factor to at most "
                f"{n_max:g} or add images to that class."
            )
        kept.extend(int(i) for i in take)
    _logger.info(
        "long-tail profile IF %g seed %d: %d of %d images kept (%d .. %d per class)",
        imbalance,
        seed,
        len(kept),
        len(dataset),
        quotas[0],
        quotas[-1],
    )
    return LabelledSubset(dataset, kept, description=f"{_describe(dataset)}, long tail IF {imbalance:g}")


def few_shot(dataset: LabelledImages, shots: int, seed: int = 0) -> LabelledSubset:
    """Keep ``shots`` images per class, drawn without replacement by ``np.random.RandomState(seed)``.

    Classes are visited in label order with one generator, so the draw is reproducible for a given seed. A
    class with fewer than ``shots`` images keeps all of them (logged), as Dassl does without ``repeat``. The
    kept indices stay in dataset order inside each class.

    Raises:
        UserError: ``shots < 1``.
    """
    if shots < 1:
        raise UserError(f"few-shot sampling: shots is {shots}; it must be at least 1 (16 for base-to-novel).")
    targets = np.asarray(dataset.targets, dtype=np.int64)
    rng = np.random.RandomState(seed)
    kept: list[int] = []
    for c in range(dataset.num_classes):
        idx = np.where(targets == c)[0]
        if len(idx) > shots:
            idx = np.sort(rng.choice(idx, size=shots, replace=False))
        elif len(idx) < shots:
            _logger.warning(
                "%s: class %d (%r) has %d images, fewer than %d shots; keeping all of them",
                _describe(dataset),
                c,
                dataset.class_names[c],
                len(idx),
                shots,
            )
        kept.extend(int(i) for i in idx)
    return LabelledSubset(dataset, kept, description=f"{_describe(dataset)}, {shots} shots seed {seed}")


def select_classes(dataset: LabelledImages, labels: Sequence[int], description: str = "") -> LabelledSubset:
    """Keep only the items whose label is in ``labels``, relabelled to their position in ``labels``."""
    label_map = {int(old): new for new, old in enumerate(labels)}
    keep = [i for i, t in enumerate(dataset.targets) if t in label_map]
    names = [dataset.class_names[int(old)] for old in labels]
    return LabelledSubset(
        dataset, keep, class_names=names, label_map=label_map, description=description or _describe(dataset)
    )


def base_novel_labels(num_classes: int) -> tuple[list[int], list[int]]:
    """The CoCoOp split of ``0..C-1``: the first ``ceil(C/2)`` label ids are base, the rest novel."""
    n_base = math.ceil(num_classes / 2)
    labels = sorted(range(num_classes))
    return labels[:n_base], labels[n_base:]


def base_to_novel_split(train: LabelledImages, test: LabelledImages) -> TaskData:
    """Split a task by classes into base (trained and tested) and novel (tested only), the CoCoOp protocol.

    Returns ``TaskData(train=base train, test=base test, novel_test=novel test)``; base and novel are separate
    label spaces, each relabelled to ``0..k-1`` with its own ``class_names``.

    Raises:
        UserError: fewer than two classes.
        ValueError: ``train`` and ``test`` do not share the same class names.
    """
    if list(train.class_names) != list(test.class_names):
        raise ValueError("base_to_novel_split: train and test must share the same class_names")
    if train.num_classes < 2:
        raise UserError(
            f"{_describe(train)}: base-to-novel needs at least 2 classes, found {train.num_classes}; "
            "turn base_to_novel off."
        )
    base, novel = base_novel_labels(train.num_classes)
    _logger.info("base-to-novel: %d base classes, %d novel classes", len(base), len(novel))
    return TaskData(
        train=select_classes(train, base, f"{_describe(train)}, base classes"),
        test=select_classes(test, base, f"{_describe(test)}, base classes"),
        novel_test=select_classes(test, novel, f"{_describe(test)}, novel classes"),
    )


def carve_validation(
    dataset: LabelledImages, fraction: float, seed: int = 0
) -> tuple[LabelledSubset, LabelledSubset]:
    """Split the *training* data into (train, validation), per class, for model selection without the test
    set: class c with n >= 2 images gives min(n - 1, max(1, round(fraction * n))) to validation (so every
    class keeps at least one training image and, when it can spare one, validates), drawn by
    ``np.random.RandomState(seed)`` visiting the classes in label order; a class with one image stays in train.

    Raises:
        UserError: ``fraction`` outside (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise UserError(f"validation fraction {fraction} must lie strictly between 0 and 1 (e.g. 0.1).")
    targets = np.asarray(dataset.targets, dtype=np.int64)
    rng = np.random.RandomState(seed)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for c in range(dataset.num_classes):
        idx = np.where(targets == c)[0]
        n = len(idx)
        n_val = min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0
        perm = rng.permutation(n)
        val_idx.extend(int(i) for i in np.sort(idx[perm[:n_val]]))
        train_idx.extend(int(i) for i in np.sort(idx[perm[n_val:]]))
    what = _describe(dataset)
    _logger.info(
        "validation split: %d of %d training images (fraction %g)", len(val_idx), len(dataset), fraction
    )
    return (
        LabelledSubset(dataset, train_idx, description=f"{what}, minus validation"),
        LabelledSubset(dataset, val_idx, description=f"{what}, validation {fraction:g}"),
    )
