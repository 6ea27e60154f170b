"""``build_task(kind, root, **options) -> TaskData``: one entry point for every dataset and protocol.

A *source builder* (one per ``kind``, in :data:`BUILDERS`) only loads the raw train and test splits. The
protocol options are then applied the same way for every kind, in this order:

1. ``imbalance`` (and ``n_max``): the exponential long-tail profile on the train split
   (:func:`~trainer.data.sampling.apply_long_tail`, seeded by ``profile_seed``, LDAM-DRW's fixed 0); the test split
   is untouched. ``imbalance=None``, or 1 without ``n_max``, leaves the train split as loaded.
2. ``shots``: K images per class of the train split (:func:`~trainer.data.sampling.few_shot`, seeded by ``seed``),
   drawn over all classes before the class split, as Dassl does.
3. ``base_to_novel``: the CoCoOp class split (:func:`~trainer.data.sampling.base_to_novel_split`).

Before all three, ``class_order`` (a text file) may relabel the classes: line i names the class that gets
label i, so "the first half of the labels" is the paper's first half (CoOp's label ids follow each
dataset's own order, not the sorted folder names; docs/recipes.md lists where each order comes from).

Finally every training class must have at least one image.

Given a ``problems`` list, the faults that need not stop the build are appended to it instead of raised
(:class:`~trainer.data.checks.DataFault`): split-file lines whose image is missing (those lines are left
out), and training classes without images (kept, with count 0). ``python -m trainer check`` reports them
all at once; ``fit`` decides what to do with them (:func:`~trainer.data.checks.apply_policy`).

Kinds:

- ``"cifar100"``: ``root`` holds ``cifar-100-python/`` (``download=True``, ``data.download``, fetches it).
- ``"cifar100_lt"``: the same with ``imbalance`` defaulting to 100 (10,847 train images).
- ``"splitfile"``: ImageNet-LT / Places-LT / iNat-2018 text files; needs ``train_file``, ``test_file`` and
  ``names_file`` (relative to ``root`` unless absolute); images are under ``root``.
- ``"imagefolder"``: ``root/<train_dir>/<class>/...`` and ``root/<test_dir>/<class>/...``; the classes are the
  train folders.
Other kinds can be added with :func:`register_builder`. The toy world (``data.kind: toy``) is not one of
them: :func:`trainer.data.tasks.task_from_config` builds it directly from the run config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trainer.data.base import TaskData, class_counts
from trainer.data.checks import DataFault
from trainer.data.cifar import CIFAR100
from trainer.data.folder import ImageFolderImages
from trainer.data.names import clean_class_name
from trainer.data.sampling import apply_long_tail, base_to_novel_split, few_shot, select_classes
from trainer.data.splitfile import SplitFileImages, read_class_names
from trainer.errors import UserError

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskOptions:
    """Everything :func:`build_task` accepts besides ``kind`` and ``root`` (see its docstring)."""

    imbalance: float | None = None
    n_max: int | None = None
    profile_seed: int = 0
    shots: int | None = None
    seed: int = 0
    base_to_novel: bool = False
    train_file: str | None = None
    test_file: str | None = None
    names_file: str | None = None
    train_dir: str = "train"
    test_dir: str = "test"
    keep_case: bool = False
    download: bool = False
    check_files: bool = True
    class_order: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # where recoverable faults go instead of being raised (see the module docstring); None: raise
    problems: list[DataFault] | None = field(default=None, compare=False)


SourceBuilder = Callable[[Path, TaskOptions], TaskData]
"""Loads a kind's raw splits: ``(root, options) -> TaskData(train, test)``. A builder may also set
``novel_test`` itself, in which case ``base_to_novel`` must stay off. It should reject ``options.extra`` keys it
does not understand."""


def _reject_extra(kind: str, opts: TaskOptions) -> None:
    if opts.extra:
        raise UserError(
            f"dataset kind {kind!r} takes no extra options, got {sorted(opts.extra)}; remove them."
        )


def _resolve(root: Path, name: str | None, option: str, kind: str) -> Path:
    if not name:
        raise UserError(
            f"dataset kind {kind!r} needs the {option} option, data.{option} in a run config (a path, relative "
            f"to {root} or absolute: --set data.{option}=FILE)."
        )
    p = Path(name).expanduser()
    return p if p.is_absolute() else root / p


def _build_cifar100(root: Path, opts: TaskOptions) -> TaskData:
    _reject_extra("cifar100", opts)
    return TaskData(
        train=CIFAR100(root, train=True, download=opts.download, keep_case=opts.keep_case),
        test=CIFAR100(root, train=False, download=opts.download, keep_case=opts.keep_case),
    )


def _build_splitfile(root: Path, opts: TaskOptions) -> TaskData:
    _reject_extra("splitfile", opts)
    if not root.is_dir():
        raise UserError(
            f"{root}: dataset root does not exist; point data.root at the folder holding the images and the "
            "split files (--set data.root=DIR)."
        )
    names = read_class_names(_resolve(root, opts.names_file, "names_file", "splitfile"), opts.keep_case)
    train_file = _resolve(root, opts.train_file, "train_file", "splitfile")
    test_file = _resolve(root, opts.test_file, "test_file", "splitfile")
    collect = opts.problems is not None
    splits = []
    for split, file in (("train", train_file), ("test", test_file)):
        ds = SplitFileImages(root, file, names, opts.check_files, drop_missing=collect)
        if opts.problems is not None:
            opts.problems.extend(
                DataFault("missing", str(p), "image does not exist", split, str(file), n)
                for n, p in ds.missing_lines
            )
        splits.append(ds)
    return TaskData(train=splits[0], test=splits[1])


def _build_imagefolder(root: Path, opts: TaskOptions) -> TaskData:
    _reject_extra("imagefolder", opts)
    if not root.is_dir():
        raise UserError(
            f"{root}: dataset root does not exist; point data.root at a folder laid out as "
            f"{opts.train_dir}/<class>/<img> and {opts.test_dir}/<class>/<img> (--set data.root=DIR)."
        )
    train = ImageFolderImages(
        root / opts.train_dir, keep_case=opts.keep_case, allow_empty_classes=opts.problems is not None
    )
    if opts.problems is not None:
        opts.problems.extend(
            DataFault("empty_class", str(folder), "class folder has no images", "train")
            for folder in train.empty_folders
        )
    test = ImageFolderImages(
        root / opts.test_dir,
        class_folders=train.class_folders,
        keep_case=opts.keep_case,
        allow_empty_classes=True,
    )
    return TaskData(train=train, test=test)


def read_class_order(path: Path, class_names: list[str], keep_case: bool = False) -> list[int]:
    """The label order a class-order file gives: ``result[i]`` is the loaded label that becomes label ``i``.

    One class per line (blank lines and ``#`` comments skipped): its name as the dataset calls it (a folder
    name or a names-file entry; compared after the usual cleaning) or its loaded integer label. Every class
    must appear exactly once.

    Raises:
        UserError: a missing file, an unknown or repeated class, or a class left out (naming the line / class).
    """
    if not path.is_file():
        raise UserError(f"class order file {path} does not exist; write one class per line in label order.")
    lookup = {name: i for i, name in enumerate(class_names)}
    order: list[int] = []
    seen: dict[int, int] = {}
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        if entry.isdigit():
            label = int(entry)
            if label >= len(class_names):
                raise UserError(
                    f"{path}:{n}: label {label} is outside 0..{len(class_names) - 1}; fix the class order file."
                )
        else:
            name = clean_class_name(entry, keep_case)
            if name not in lookup:
                raise UserError(
                    f"{path}:{n}: class {entry!r} is not one of the dataset's {len(class_names)} classes "
                    f"(e.g. {class_names[:3]}); fix the name or the dataset."
                )
            label = lookup[name]
        if label in seen:
            raise UserError(
                f"{path}:{n}: class {class_names[label]!r} is listed twice (also line {seen[label]}); list it once."
            )
        seen[label] = n
        order.append(label)
    missing = [class_names[i] for i in range(len(class_names)) if i not in seen]
    if missing:
        raise UserError(
            f"{path}: {len(missing)} classes are not listed (e.g. {missing[:3]}); list every class once."
        )
    return order


BUILDERS: dict[str, SourceBuilder] = {
    "cifar100": _build_cifar100,
    "cifar100_lt": _build_cifar100,  # build_task defaults imbalance to 100 for this kind
    "splitfile": _build_splitfile,
    "imagefolder": _build_imagefolder,
    # "toy": registered by the toy world's module through register_builder("toy", ...).
}

DEFAULT_IMBALANCE: dict[str, float] = {"cifar100_lt": 100.0}


def register_builder(kind: str, builder: SourceBuilder, *, replace: bool = False) -> None:
    """Add a dataset kind (e.g. ``"toy"``). Re-registering a kind needs ``replace=True``."""
    if kind in BUILDERS and not replace:
        raise ValueError(f"dataset kind {kind!r} is already registered")
    BUILDERS[kind] = builder


def build_task(
    kind: str,
    root: str | Path,
    *,
    imbalance: float | None = None,
    n_max: int | None = None,
    profile_seed: int = 0,
    shots: int | None = None,
    seed: int = 0,
    base_to_novel: bool = False,
    train_file: str | None = None,
    test_file: str | None = None,
    names_file: str | None = None,
    train_dir: str = "train",
    test_dir: str = "test",
    keep_case: bool = False,
    download: bool = False,
    check_files: bool = True,
    class_order: str | None = None,
    extra: Mapping[str, Any] | None = None,
    problems: list[DataFault] | None = None,
) -> TaskData:
    """Load a dataset and apply the protocol options.

    Args:
        kind: ``"cifar100"``, ``"cifar100_lt"``, ``"splitfile"``, ``"imagefolder"`` or a registered kind.
        root: the dataset folder (see the module docstring per kind).
        imbalance: long-tail imbalance factor IF = n_max / n_min applied to the train split; ``None`` keeps it
            as is (``"cifar100_lt"`` defaults to 100). IF 1 without ``n_max`` also leaves it untouched.
        n_max: head-class count of the profile; defaults to the largest class (500 for CIFAR-100).
        profile_seed: seed of the long-tail subsampling (LDAM-DRW's ``rand_number``, 0 in the papers).
        shots: images per training class (16 in the base-to-novel protocol); ``None`` keeps all.
        seed: seed of the few-shot draw (the run seed: 1, 2, 3 in CoCoOp).
        base_to_novel: split the classes into base (train + test) and novel (``novel_test``).
        train_file, test_file, names_file: ``"splitfile"`` only; paths relative to ``root`` or absolute.
        train_dir, test_dir: ``"imagefolder"`` only; the sub-folders of ``root`` holding each split.
        keep_case: keep class names' letter case (otherwise lower-cased).
        download: ``"cifar100"``/``"cifar100_lt"``: fetch the archive when missing.
        check_files: ``"splitfile"``: check every listed image exists while loading.
        class_order: a text file, one class per line in the new label order (see :func:`read_class_order`).
        extra: options for registered kinds (e.g. the toy world's); built-in kinds reject any.
        problems: collect the recoverable faults here instead of raising them (see the module docstring).

    Raises:
        UserError: an unknown kind, a bad option, or any dataset error (the message names the file).
    """
    return build_task_from(
        kind,
        root,
        TaskOptions(
            imbalance=imbalance,
            n_max=n_max,
            profile_seed=profile_seed,
            shots=shots,
            seed=seed,
            base_to_novel=base_to_novel,
            train_file=train_file,
            test_file=test_file,
            names_file=names_file,
            train_dir=train_dir,
            test_dir=test_dir,
            keep_case=keep_case,
            download=download,
            check_files=check_files,
            class_order=class_order,
            extra=dict(extra or {}),
            problems=problems,
        ),
    )


def build_task_from(kind: str, root: str | Path, opts: TaskOptions) -> TaskData:
    """:func:`build_task` with its options already gathered in a :class:`TaskOptions` (what
    :func:`trainer.data.tasks.task_from_config` builds from a run config's ``data`` section)."""
    if kind not in BUILDERS:
        raise UserError(f"unknown dataset kind {kind!r}; use one of {sorted(BUILDERS)}.")
    if opts.imbalance is None and kind in DEFAULT_IMBALANCE:
        opts = replace(opts, imbalance=DEFAULT_IMBALANCE[kind])
    root_path = Path(root).expanduser()
    task = BUILDERS[kind](root_path, opts)
    train, test = task.train, task.test
    if opts.class_order is not None:
        order_file = _resolve(root_path, opts.class_order, "class_order", kind)
        order = read_class_order(order_file, train.class_names, opts.keep_case)
        if list(test.class_names) != list(train.class_names):
            raise UserError(f"{order_file}: train and test splits name different classes; fix the dataset.")
        described = f"{getattr(train, 'description', root_path)}, class order {order_file.name}"
        train = select_classes(train, order, described)
        test = select_classes(test, order, f"{getattr(test, 'description', root_path)}, class order")
    if opts.imbalance is None:
        if opts.n_max is not None:
            raise UserError(
                f"n_max={opts.n_max} is set but imbalance is not; set imbalance (IF) too (--set data.imbalance=100) "
                "or drop n_max (--set data.n_max=null)."
            )
    elif opts.imbalance != 1 or opts.n_max is not None:
        train = apply_long_tail(train, opts.imbalance, opts.profile_seed, opts.n_max)
    if opts.shots is not None:
        train = few_shot(train, opts.shots, opts.seed)
    if opts.base_to_novel:
        if task.novel_test is not None:
            raise UserError(
                f"dataset kind {kind!r} already defines novel classes; turn base_to_novel off "
                "(--set data.base_to_novel=false)."
            )
        task = base_to_novel_split(train, test)
    else:
        task = TaskData(train=train, test=test, novel_test=task.novel_test)
    empty = [i for i, n in enumerate(class_counts(task.train.targets, task.train.num_classes)) if n == 0]
    if empty and opts.problems is not None:
        reported = {Path(f.path).name for f in opts.problems if f.kind == "empty_class"}
        what = str(getattr(task.train, "description", root_path))
        opts.problems.extend(
            DataFault(
                "empty_class",
                what,
                f"class {c} ({task.train.class_names[c]!r}) has no training images",
                "train",
            )
            for c in empty
            if task.train.class_names[c] not in {clean_class_name(r, opts.keep_case) for r in reported}
        )
    elif empty:
        c = empty[0]
        raise UserError(
            f"{getattr(task.train, 'description', root_path)}: class {c} ({task.train.class_names[c]!r}) has no "
            f"training images ({len(empty)} such classes); add images or fix the labels."
        )
    _logger.info(
        "task %s from %s: %d train / %d test images, %d classes%s",
        kind,
        root_path,
        len(task.train),
        len(task.test),
        task.train.num_classes,
        f", {task.novel_test.num_classes} novel" if task.novel_test is not None else "",
    )
    return task
