"""Data checks done before any weight is loaded: faults found while building a task, and a full decode of
every image file a run reads, on all cores.

A :class:`DataFault` is one thing wrong with the data that does not stop the task from being built when
:func:`trainer.data.registry.build_task` is given a ``problems`` list: a split-file line whose image is
missing, a training class with no images, and (found by :func:`scan_task`) an image file that cannot be
decoded. ``python -m trainer check`` lists them all; ``fit`` either stops on them before the model is loaded
(:func:`apply_policy`) or, with ``data.skip_unreadable``, leaves the missing and unreadable files out with a
warning and records them in ``summary.json``. A class without training images always stops ``fit``.

In-memory datasets (CIFAR-100's arrays, the toy world) have no files (``source_file`` is ``None``): nothing
to decode, their loaders already validated the arrays.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Literal

from tqdm import tqdm

from trainer.data.base import LabelledImages, TaskData
from trainer.data.folder import decode_problem
from trainer.data.sampling import LabelledSubset
from trainer.errors import UserError

_logger = logging.getLogger(__name__)

FaultKind = Literal["missing", "unreadable", "empty_class"]
SKIPPABLE: tuple[FaultKind, ...] = ("missing", "unreadable")


@dataclass(frozen=True)
class DataFault:
    """One problem with the data: ``path`` is the image file (or the class folder / dataset of an empty class)."""

    kind: FaultKind
    path: str
    reason: str
    split: str = ""  # "train" / "test" / "novel test" (joined with "+" when a file serves several)
    list_file: str | None = None  # the split file naming a missing image
    line: int | None = None  # its line

    def __str__(self) -> str:
        where = f"{self.list_file}:{self.line}: " if self.list_file and self.line else ""
        split = f" [{self.split}]" if self.split else ""
        return f"{where}{self.path}: {self.reason}{split}"

    def to_dict(self) -> dict[str, str | int]:
        """The fault's set fields (empty ones left out), for ``summary.json`` and the check report."""
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


def _splits(task: TaskData) -> list[tuple[str, LabelledImages]]:
    out = [("train", task.train), ("test", task.test)]
    if task.novel_test is not None:
        out.append(("novel test", task.novel_test))
    return out


def task_files(task: TaskData) -> dict[str, list[str]]:
    """Every image file the task reads, once, with the splits that read it (insertion order: train first)."""
    files: dict[str, list[str]] = {}
    for split, ds in _splits(task):
        for i in range(len(ds)):
            path = ds.source_file(i)
            if path is not None:
                splits = files.setdefault(str(path), [])
                if split not in splits:
                    splits.append(split)
    return files


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _decode_chunk(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(path, reason) for every path of ``paths`` that does not decode (runs in a worker process)."""
    out = []
    for p in paths:
        reason = decode_problem(p)
        if reason is not None:
            out.append((p, reason))
    return out


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class ScanResult:
    files: int
    seconds: float
    processes: int
    unreadable: dict[str, str]  # path -> reason


def scan_files(
    paths: Sequence[str],
    *,
    workers: int | None = None,
    progress: bool = True,
    description: str = "decode images",
    chunk: int = 64,
) -> ScanResult:
    """Decode every file of ``paths`` fully (as training will, to RGB) on ``workers`` processes (default: all
    available cores), with a progress bar; returns the undecodable ones with the reason."""
    t0 = time.perf_counter()
    workers = max(1, workers or available_cores())
    bad: dict[str, str] = {}
    bar = tqdm(total=len(paths), desc=description, unit="img", disable=not progress, leave=False)
    processes = 1
    try:
        if workers == 1 or len(paths) <= chunk:
            for part in _chunks(paths, chunk):
                bad.update(_decode_chunk(part))
                bar.update(len(part))
        else:
            processes = min(workers, -(-len(paths) // chunk))
            # fork where there is one: the workers need nothing but PIL, and forking skips re-importing
            # torch in each of them
            method = "fork" if sys.platform.startswith("linux") else None
            context = multiprocessing.get_context(method)
            with ProcessPoolExecutor(processes, mp_context=context) as pool:
                futures = {pool.submit(_decode_chunk, part): len(part) for part in _chunks(paths, chunk)}
                for future in as_completed(futures):
                    bad.update(future.result())
                    bar.update(futures[future])
    finally:
        bar.close()
    return ScanResult(len(paths), time.perf_counter() - t0, processes, bad)


def scan_task(
    task: TaskData, *, workers: int | None = None, progress: bool = True
) -> tuple[list[DataFault], ScanResult]:
    """Decode every image file of the task's splits once; one ``unreadable`` fault per bad file."""
    files = task_files(task)
    result = scan_files(list(files), workers=workers, progress=progress)
    faults = [
        DataFault("unreadable", path, reason, split="+".join(files[path]))
        for path, reason in sorted(result.unreadable.items())
    ]
    return faults, result


def drop_files(task: TaskData, bad: set[str]) -> TaskData:
    """The task without the items decoded from the files in ``bad`` (class names and labels unchanged)."""
    if not bad:
        return task

    def keep(ds: LabelledImages, split: str) -> LabelledImages:
        kept = [i for i in range(len(ds)) if str(ds.source_file(i)) not in bad]
        if len(kept) == len(ds):
            return ds
        what = getattr(ds, "description", "") or split
        return LabelledSubset(ds, kept, description=f"{what}, {len(ds) - len(kept)} unreadable skipped")

    return TaskData(
        train=keep(task.train, "train"),
        test=keep(task.test, "test"),
        novel_test=keep(task.novel_test, "novel test") if task.novel_test is not None else None,
    )


def _listed(faults: Sequence[DataFault], limit: int = 3) -> str:
    shown = "; ".join(str(f) for f in faults[:limit])
    return shown + (f"; and {len(faults) - limit} more" if len(faults) > limit else "")


def raise_on_empty_classes(faults: Sequence[DataFault]) -> None:
    """A class without training images cannot be trained: always an error (naming them)."""
    empty = [f for f in faults if f.kind == "empty_class"]
    if empty:
        raise UserError(
            f"{len(empty)} training class{'es' if len(empty) > 1 else ''} without images: {_listed(empty)}; add "
            "images, fix the labels, or remove the class."
        )


def apply_policy(
    task: TaskData, faults: Sequence[DataFault], *, skip_unreadable: bool, check_args: str = "-c CONFIG"
) -> tuple[TaskData, list[DataFault]]:
    """What ``fit`` does with the faults found: empty classes stop it; missing and unreadable files stop it
    unless ``skip_unreadable``, when they are left out with a warning. Returns the task to train on and the
    skipped faults (for ``summary.json``). ``check_args``: the arguments the message suggests for
    ``python -m trainer check``."""
    raise_on_empty_classes(faults)
    skippable = [f for f in faults if f.kind in SKIPPABLE]
    if not skippable:
        return task, []
    if not skip_unreadable:
        raise UserError(
            f"{len(skippable)} image file{'s' if len(skippable) > 1 else ''} cannot be read: {_listed(skippable)}; "
            f"fix or remove them (`python -m trainer check {check_args}` lists them all), or skip them with "
            "--set data.skip_unreadable=true"
        )
    for f in skippable:
        _logger.warning("skipping unreadable image (data.skip_unreadable): %s", f)
    _logger.warning(
        "data.skip_unreadable: %d image file(s) left out of the run (recorded in summary.json)",
        len(skippable),
    )
    task = drop_files(task, {f.path for f in skippable if f.kind == "unreadable"})
    raise_on_empty_classes(empty_class_faults(task))
    return task, skippable


def empty_class_faults(task: TaskData) -> list[DataFault]:
    counts = task.train_counts
    what = getattr(task.train, "description", "") or "train"
    return [
        DataFault("empty_class", what, f"class {c} ({task.class_names[c]!r}) has no training images", "train")
        for c, n in enumerate(counts)
        if n == 0
    ]


def skipped_summary(skipped: Sequence[DataFault]) -> dict[str, object]:
    """What ``summary.json`` records of the files ``data.skip_unreadable`` left out."""
    return {
        "skip_unreadable": True,
        "skipped_files": len(skipped),
        "skipped_missing": sum(f.kind == "missing" for f in skipped),
        "skipped_unreadable": sum(f.kind == "unreadable" for f in skipped),
        "files": [f.to_dict() for f in skipped],
    }


def task_files_exist(task: TaskData) -> bool:
    """Whether any split reads image files (CIFAR and the toy world hold their images in memory)."""
    return any(len(ds) and ds.source_file(0) is not None for _, ds in _splits(task))


@dataclass
class CheckedTask:
    """A task whose data passed :func:`check_files`, and what the check did (for ``summary.json``)."""

    task: TaskData
    scanned_files: int | None  # image files decoded before the run (None: in memory, or the scan off)
    skipped: list[DataFault]  # left out by skip_unreadable

    def summary(self, skip_unreadable: bool) -> dict[str, object]:
        """``summary.json``'s ``data_check``: files decoded before the run, and what was left out."""
        out: dict[str, object] = {"scanned_files": self.scanned_files, "skip_unreadable": skip_unreadable}
        return {**out, **skipped_summary(self.skipped)} if self.skipped else {**out, "skipped_files": 0}


def check_files(
    task: TaskData,
    problems: list[DataFault],
    *,
    scan: bool,
    skip_unreadable: bool,
    scan_here: bool = True,
    share: Callable[[list[DataFault]], list[DataFault]] = lambda faults: faults,
    workers: int | None = None,
    progress: bool = True,
    check_args: str = "-c CONFIG",
) -> CheckedTask:
    """``fit``'s data check, after the task was built with ``problems`` collected: empty classes stop it;
    with ``scan``, every image file is decoded (on all cores) and the undecodable ones join the problems;
    then :func:`apply_policy`. ``scan_here`` / ``share``: under DDP only the main process decodes and
    ``share`` hands its list to the others (a broadcast)."""
    raise_on_empty_classes(problems)
    problems = list(problems)
    scanned: int | None = None
    if scan and task_files_exist(task):
        faults: list[DataFault] = []
        if scan_here:
            faults, result = scan_task(task, workers=workers, progress=progress)
            scanned = result.files
            _logger.info(
                "decoded %d image files in %.1f s on %d process(es): %d unreadable",
                result.files,
                result.seconds,
                result.processes,
                len(faults),
            )
        problems.extend(share(faults))
    task, skipped = apply_policy(task, problems, skip_unreadable=skip_unreadable, check_args=check_args)
    return CheckedTask(task, scanned, skipped)
