"""``python -m trainer check -c RECIPE [--set ...]``: everything a long run needs, checked in seconds to
minutes, without training.

The report has four sections, printed as each finishes:

- **config**: the resolved config, section by section, and what each ``--set`` changed;
- **data**: classes, images per split, the long-tail profile (head / tail, imbalance factor, many / medium /
  few under the run's thresholds), base / novel classes where the protocol has them, the split-file lines
  whose image is missing, the training classes without images, and a full decode of every image file the run
  reads, on all cores, with the list of files that do not decode;
- **weights**: where they come from (a local file, the hub cache, or a download of N MB; ``HF_HUB_OFFLINE``
  honoured) and whether the model loads;
- **dry run**: a few optimizer steps of the run's own optimizer, loss, augmentation and batch size on the
  run's device, timed: step time, images/s, peak memory (CUDA's peak allocation, or this process's peak
  RSS), and the projected time of an epoch and of the whole run (evaluations included).

The exit status is 0 when every section passed and 1 otherwise (2, as everywhere, for a command line that
cannot be parsed), so a job script can gate on it. Nothing is written to disk except a download of missing
weights (as ``fit`` would), and ``--json`` when asked.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import resource
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import UserError, shorten

_logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
_WIDTH = 110
_NAMES_SHOWN = 8


@dataclass
class Section:
    name: str
    faults: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # warnings that do not fail the check
    skipped: str | None = None  # why the section did not run

    @property
    def ok(self) -> bool:
        return not self.faults and self.skipped is None


@dataclass
class DryRun:
    device: str
    precision: str
    optimizer: str
    batch_size: int
    accumulation: int
    warmup_steps: int
    steps: int
    step_seconds: float  # mean of the timed steps
    step_seconds_min: float
    step_seconds_max: float
    data_wait_seconds: float  # mean time per step spent waiting for the loader
    first_step_seconds: float  # the warm-up step (loader start, allocations, kernels' first calls)
    images_per_second: float
    peak_memory_bytes: int
    memory_kind: str  # "CUDA peak allocated" | "peak RSS of this process"
    memory_total_bytes: int | None
    steps_per_epoch: int
    epoch_seconds: float  # projected
    eval_seconds: float  # projected, one evaluation (test + novel test)
    evaluations: int  # in the whole run, the zero-shot one included
    epochs: int
    run_seconds: float  # projected: epochs and evaluations


@dataclass
class DataSummary:
    kind: str
    classes: int
    train_images: int
    test_images: int
    novel_classes: int | None
    novel_test_images: int | None
    train_counts: list[int]
    group_sizes: dict[str, int]
    imbalance_factor: float | None
    scanned_files: int | None
    unreadable: list[dict[str, str | int]]
    missing: list[dict[str, str | int]]
    empty_classes: list[dict[str, str | int]]


@dataclass
class CheckReport:
    sections: list[Section] = field(default_factory=list)
    data: DataSummary | None = None
    weights: dict[str, object] | None = None  # where the weights come from and whether they load
    dry_run: DryRun | None = None

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.sections)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_FAILED

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "sections": [{**asdict(s), "ok": s.ok} for s in self.sections],
            "data": asdict(self.data) if self.data else None,
            "weights": self.weights,
            "dry_run": asdict(self.dry_run) if self.dry_run else None,
        }


# ------------------------------------------------------------------------------------------------ helpers


def _n(x: int) -> str:
    return f"{x:,}"


def format_seconds(s: float) -> str:
    if s < 1:
        return f"{1000 * s:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.0f} MiB"


def _names(names: list[str], limit: int = _NAMES_SHOWN) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[: limit - 2]) + f", ... ({len(names) - limit + 1} more) ..., " + names[-1]


def _per_class(counts: list[int]) -> str:
    if not counts:
        return "no classes"
    lo, hi = min(counts), max(counts)
    return f"{lo} per class" if lo == hi else f"{hi} .. {lo} per class"


def _flatten(tree: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class _Printer:
    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write

    def head(self, text: str) -> None:
        self.write(text)

    def line(self, text: str, indent: int = 2) -> None:
        pad = " " * indent
        self.write(
            textwrap.fill(
                text,
                _WIDTH,
                initial_indent=pad,
                subsequent_indent=pad + "    ",
                break_long_words=False,  # paths stay whole
                break_on_hyphens=False,
            )
        )

    def fault(self, text: str) -> None:
        self.line(f"FAIL {text}")

    def note(self, text: str) -> None:
        self.line(f"note {text}")


@contextlib.contextmanager
def _collect_warnings() -> Iterator[list[str]]:
    """The project's WARNING records while the block runs, collected instead of logged (the report prints them
    as notes)."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("trainer")
    handler = _Collect(logging.WARNING)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


# ------------------------------------------------------------------------------------------------ sections


def _config_section(out: _Printer, config: str | None, overrides: list[str]) -> tuple[Section, Any | None]:
    from trainer.config import RunConfig, load_config

    sec = Section("config")
    out.head(
        f"config: {config or '(defaults)'}, {len(overrides)} --set override{'s' * (len(overrides) != 1)}"
    )
    try:
        cfg = load_config(config, overrides)
    except UserError as e:
        sec.faults.append(str(e))
        out.fault(str(e))
        return sec, None
    try:
        before = _flatten(load_config(config, []).model_dump())
    except UserError:  # the file alone does not validate; the overrides make it valid
        before = _flatten(RunConfig().model_dump())
    after = _flatten(cfg.model_dump())
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        old, new = before.get(key), after.get(key)
        change = "unchanged" if old == new else f"{old!r} -> {new!r}"
        out.line(f"--set {item:<38} {key}: {change}")
    changed = {item.split("=", 1)[0].strip() for item in overrides}
    for section, values in cfg.model_dump().items():
        fields = " ".join(f"{k}={v!r}{'*' if f'{section}.{k}' in changed else ''}" for k, v in values.items())
        out.line(f"{section + ':':<10}{fields}")
    if changed:
        out.line("(* set on the command line)")
    return sec, cfg


def _profile(
    out: _Printer, cfg: Any, task: Any, thresholds: Any, test_counts: list[int], *, list_classes: bool
) -> tuple[dict[str, int], float | None]:
    """The long-tail profile, the base / novel split and the validation split; the class table with
    ``list_classes``. Returns the group sizes and the imbalance factor (None with an empty class)."""
    from trainer.data.sampling import carve_validation
    from trainer.metrics import group_sizes, shot_groups, thresholds_rule

    d, names, counts = cfg.data, task.class_names, task.train_counts
    nonzero = [c for c in counts if c > 0]
    imbalance = (max(counts) / min(counts)) if counts and min(counts) > 0 else None
    head = max(range(len(counts)), key=lambda c: counts[c]) if counts else 0
    tail = max((c for c in range(len(counts)) if counts[c] == min(counts)), default=0)  # the last smallest
    sizes = group_sizes(counts, thresholds)
    if counts:
        spread = (
            f"balanced, {counts[0]} per class"
            if min(counts) == max(counts)
            else f"head {counts[head]} (class {head} {names[head]!r}), tail {counts[tail]} (class {tail} "
            f"{names[tail]!r})"
        )
        out.line(
            f"profile: {spread}, imbalance factor "
            + (f"{imbalance:.1f}" if imbalance is not None else "undefined (empty classes)")
            + f"; many {sizes['many']} / medium {sizes['medium']} / few {sizes['few']} classes "
            f"({thresholds_rule(thresholds)})"
        )
    if task.novel_test is not None:
        out.line(
            f"base / novel: {len(names)} base classes, trained and tested against base names "
            f"({_names(names, 4)}); {task.novel_test.num_classes} novel classes, tested only "
            f"({_names(task.novel_test.class_names, 4)})"
        )
    if cfg.eval.select == "best_val" and nonzero:
        _, val = carve_validation(task.train, cfg.eval.val_fraction, seed=d.seed)
        out.line(f"validation (eval.select best_val): {_n(len(val))} of the training images held out")
    if list_classes:
        groups = shot_groups(counts, thresholds)
        for c, name in enumerate(names):
            out.line(
                f"{c:>5}  {name:<40} train {counts[c]:>6}  test {test_counts[c]:>5}  {groups[c]}", indent=4
            )
    return sizes, imbalance


def _file_faults(out: _Printer, sec: Section, problems: list[Any]) -> tuple[list[Any], list[Any]]:
    """The split-file lines naming a missing image and the training classes without images, as faults."""
    missing = [f for f in problems if f.kind == "missing"]
    empty = [f for f in problems if f.kind == "empty_class"]
    if missing:
        out.line(f"split files: {len(missing)} lines name a missing image:")
        for f in missing:
            sec.faults.append(str(f))
            out.fault(str(f))
    if empty:
        out.line(f"{len(empty)} training class{'es' * (len(empty) != 1)} without images:")
        for f in empty:
            sec.faults.append(str(f))
            out.fault(str(f))
    return missing, empty


def _decode(
    out: _Printer, sec: Section, task: Any, *, workers: int | None, progress: bool
) -> tuple[list[Any], int | None]:
    """A full decode of every image file the task reads (none for in-memory data): the unreadable ones as
    faults, and how many files were decoded."""
    from trainer.data.checks import DataFault, scan_task, task_files_exist

    unreadable: list[DataFault] = []
    scanned: int | None = None
    if not task_files_exist(task):
        out.line("images: held in memory (no files to decode; the arrays were checked as they loaded)")
    else:
        unreadable, result = scan_task(task, workers=workers, progress=progress)
        scanned = result.files
        out.line(
            f"decode: {_n(result.files)} image files, each decoded in full to RGB, in "
            f"{format_seconds(result.seconds)} on {result.processes} process{'es' * (result.processes != 1)} "
            f"({result.files / max(result.seconds, 1e-9):,.0f} images/s): {len(unreadable)} unreadable"
        )
        for f in unreadable:
            sec.faults.append(str(f))
            out.fault(str(f))
    return unreadable, scanned


def _data_section(
    out: _Printer, cfg: Any, *, workers: int | None, progress: bool, list_classes: bool
) -> tuple[Section, Any | None, DataSummary | None]:
    from trainer.data.base import class_counts
    from trainer.data.checks import DataFault, drop_files
    from trainer.data.tasks import task_from_config as build_task
    from trainer.metrics import ShotThresholds

    sec = Section("data")
    d = cfg.data
    out.head(f"data: {d.kind}" + (f" at {d.root}" if d.kind != "toy" else " (the embedded toy world)"))
    problems: list[DataFault] = []
    t0 = time.perf_counter()
    with _collect_warnings() as warned:  # what the loaders warn about becomes notes of the report
        try:
            task = build_task(d, problems)
        except UserError as e:
            error: UserError | None = e
        else:
            error = None
    sec.notes.extend(warned)
    if error is not None:
        for message in sec.notes:
            out.note(message)
        for text in [str(error), *(str(f) for f in problems)]:
            sec.faults.append(text)
            out.fault(text)
        return sec, None, None
    built = time.perf_counter() - t0
    names = task.class_names
    counts = task.train_counts
    thresholds = ShotThresholds(cfg.eval.many_above, cfg.eval.few_below)
    out.line(f"classes: {len(names)}: {_names(names)}")
    test_counts = class_counts(task.test.targets, len(names))
    line = (
        f"train: {_n(len(task.train))} images ({_per_class(counts)}); "
        f"test: {_n(len(task.test))} images ({_per_class(test_counts)})"
    )
    if task.novel_test is not None:
        line += f"; novel test: {_n(len(task.novel_test))} images"
    out.line(line + f"  [built in {format_seconds(built)}]")
    sizes, imbalance = _profile(out, cfg, task, thresholds, test_counts, list_classes=list_classes)
    fault_paths = {f.path for f in problems}
    sec.notes = [m for m in sec.notes if not any(p in m for p in fault_paths)]  # those are FAIL lines below
    for message in sec.notes:
        out.note(message)
    if min(test_counts, default=1) == 0:
        untested = [names[c] for c, n in enumerate(test_counts) if n == 0]
        note = f"{len(untested)} classes have no test images ({_names(untested, 4)}): their accuracy is undefined"
        sec.notes.append(note)
        out.note(note)

    missing, empty = _file_faults(out, sec, problems)

    unreadable, scanned = _decode(out, sec, task, workers=workers, progress=progress)
    summary = DataSummary(
        kind=d.kind,
        classes=len(names),
        train_images=len(task.train),
        test_images=len(task.test),
        novel_classes=task.novel_test.num_classes if task.novel_test is not None else None,
        novel_test_images=len(task.novel_test) if task.novel_test is not None else None,
        train_counts=list(counts),
        group_sizes=sizes,
        imbalance_factor=imbalance,
        scanned_files=scanned,
        unreadable=[f.to_dict() for f in unreadable],
        missing=[f.to_dict() for f in missing],
        empty_classes=[f.to_dict() for f in empty],
    )
    # the dry run still runs on the readable files, unless a trained class has no image at all
    usable = None if min(counts, default=0) == 0 else drop_files(task, {f.path for f in unreadable})
    return sec, usable, summary


def _weights_section(
    out: _Printer, cfg: Any, device: Any, *, download: bool
) -> tuple[Section, Any | None, Any | None, dict[str, object] | None]:
    import torch

    from trainer.models import ensure_toy_model_registered, register_model_config
    from trainer.training import build_model
    from trainer.weights import hub_offline, locate_weights

    sec = Section("weights")
    m = cfg.model
    out.head(f"weights: {m.name} / {m.pretrained if m.pretrained is not None else '(none)'}")
    if hub_offline():
        out.line("HF_HUB_OFFLINE is set: the hub is not contacted; only local files and the hub cache count")
    try:
        ensure_toy_model_registered()
        if m.config_path:
            register_model_config(m.config_path)
    except UserError as e:
        sec.faults.append(str(e))
        out.fault(str(e))
        return sec, None, None, None
    source = locate_weights(m.name, m.pretrained)
    info: dict[str, object] = {
        "source": source.kind,
        "detail": source.detail,
        "path": source.path,
        "size_bytes": source.size_bytes,
        "offline": source.offline,
        "loaded": False,
    }
    if not source.available:
        sec.faults.append(source.detail)
        out.fault(source.detail)
        return sec, None, None, info
    out.line(f"from: {source.describe()}")
    if source.kind == "none":
        note = "random init: the frozen towers are untrained (fine for a smoke test, not for a real run)"
        sec.notes.append(note)
        out.note(note)
    if source.kind == "download" and not download:
        sec.skipped = "not downloaded (--no-download): whether the model loads is not known"
        out.line(f"model: {sec.skipped}")
        return sec, None, None, info
    t0 = time.perf_counter()
    try:
        model, loaded = build_model(cfg, device)
    except UserError as e:
        sec.faults.append(str(e))
        out.fault(str(e))
        return sec, None, None, info
    except (RuntimeError, OSError) as e:  # anything open_clip or torch raise while loading
        msg = f"the model does not load ({type(e).__name__}: {shorten(str(e), 300)})"
        sec.faults.append(msg)
        out.fault(msg)
        return sec, None, None, info
    seconds = time.perf_counter() - t0
    frozen = sum(p.numel() for p in loaded.model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info.update(loaded=True, load_seconds=seconds, frozen_parameters=frozen, trained_parameters=trained)
    out.line(
        f"model: loads in {format_seconds(seconds)} on {device}: activation {loaded.identity.activation}, "
        f"{frozen / 1e6:.1f} M frozen parameters, {_n(trained)} trained, input "
        f"{loaded.preprocess.image_size} px"
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sec, model, loaded, info


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            return


def _timed_steps(
    model: Any,
    loader: Any,
    step: Any,
    scheduler: Any,
    device: Any,
    *,
    k: int,
    count: int,
    progress: bool,
    sync: Any,
) -> tuple[list[float], list[float]]:
    """``count`` optimizer steps of ``k`` micro-batches each (``step(group)``): each step's seconds, and the
    part of it spent waiting for the loader."""
    from tqdm import tqdm

    batches = _cycle(loader)
    times: list[float] = []
    waits: list[float] = []
    model.train()
    bar = tqdm(total=count, desc="dry run", unit="step", disable=not progress, leave=False)
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            group = []
            for _ in range(k):
                x, y = next(batches)
                group.append((x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
            t1 = time.perf_counter()
            step(group)
            scheduler.step()
            sync()
            times.append(time.perf_counter() - t0)
            waits.append(t1 - t0)
            bar.update(1)
    finally:
        bar.close()
        del batches  # stops the loader's workers
    return times, waits


def _no_sync() -> None:
    """Nothing to wait for off CUDA."""


def _peak_memory(device: Any) -> tuple[int, int | None, str]:
    """Peak memory so far: CUDA peak allocated (and the device's total) or this process's peak RSS."""
    import torch

    if device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device))
        return peak, int(torch.cuda.get_device_properties(device).total_memory), "CUDA peak allocated"
    return _peak_rss_bytes(), None, "peak RSS of this process"


def _projection(
    cfg: Any,
    device: Any,
    precision: str,
    times: list[float],
    waits: list[float],
    *,
    warmup: int,
    k: int,
    batches: int,
    eval_one: float,
    best_val: bool,
) -> DryRun:
    """The dry run's figures: the timed steps (after ``warmup``), an epoch and the whole run projected."""
    from trainer.training import optimizer_steps_per_epoch

    peak, total, kind = _peak_memory(device)  # training steps and evaluation batches alike
    timed = times[warmup:] or times
    step = sum(timed) / len(timed)
    per_epoch = optimizer_steps_per_epoch(batches, k)
    # every epoch starts the loader again: its first batch's wait (workers starting) recurs per epoch
    epoch_overhead = max(0.0, waits[0] - sum(waits[warmup:] or waits) / len(waits[warmup:] or waits))
    epoch = per_epoch * step + (epoch_overhead if cfg.data.num_workers > 0 else 0.0)

    every = cfg.train.eval_every
    epochs = cfg.train.epochs
    evaluated = {e for e in range(1, epochs + 1) if e % every == 0} | {epochs}
    evaluations = 1 + len(evaluated) + (1 if best_val else 0)  # zero-shot first, best_val re-evaluates
    return DryRun(
        device=str(device),
        precision=precision,
        optimizer=cfg.optim.name + (f" ({cfg.optim.base})" if cfg.optim.name not in ("sgd", "adamw") else ""),
        batch_size=cfg.data.batch_size,
        accumulation=k,
        warmup_steps=warmup,
        steps=len(timed),
        step_seconds=step,
        step_seconds_min=min(timed),
        step_seconds_max=max(timed),
        data_wait_seconds=sum(waits[warmup:] or waits) / len(waits[warmup:] or waits),
        first_step_seconds=times[0],
        images_per_second=cfg.data.batch_size * k / step,
        peak_memory_bytes=peak,
        memory_kind=kind,
        memory_total_bytes=total,
        steps_per_epoch=per_epoch,
        epoch_seconds=epoch,
        eval_seconds=eval_one,
        evaluations=evaluations,
        epochs=epochs,
        run_seconds=epochs * epoch + evaluations * eval_one,
    )


def dry_run(
    cfg: Any,
    model: Any,
    loaded: Any,
    task: Any,
    device: Any,
    *,
    steps: int = 5,
    warmup: int = 1,
    progress: bool = True,
    eval_batches: int = 3,
) -> DryRun:
    """Time ``warmup + steps`` optimizer steps of the run's training (its optimizer, loss, schedule,
    augmentation, loader, batch size and precision) and a few evaluation batches, and project an epoch and
    the whole run from them. Only the in-memory model changes."""
    import torch
    from torch.utils.data import RandomSampler

    from trainer.data.base import Transformed, class_counts
    from trainer.data.sampling import carve_validation
    from trainer.engine import autocast_factory, train_step
    from trainer.optim import TWO_PASS
    from trainer.training import (
        build_train_loader,
        build_training,
        resolve_precision,
    )
    from trainer.transforms import build_transform

    precision = resolve_precision(cfg.train.precision, device.type, cfg.optim.name, cfg.prompt.vpt_length)
    autocast = autocast_factory(device, precision)
    spec = loaded.preprocess
    train = task.train
    val = None
    if cfg.eval.select == "best_val":
        train, val = carve_validation(task.train, cfg.eval.val_fraction, seed=cfg.data.seed)
    counts = class_counts(train.targets, train.num_classes)
    model.set_class_names(task.class_names)
    train_ds = Transformed(train, build_transform(spec, train=cfg.data.augment))
    generator = torch.Generator().manual_seed(cfg.train.seed)
    loader = build_train_loader(train_ds, cfg.data, RandomSampler(train_ds, generator=generator), device)
    optimizer, scheduler, loss_fn = build_training(cfg, model, counts, len(loader), device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    k = cfg.optim.accumulation if cfg.optim.name not in TWO_PASS else 1

    sync = functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else _no_sync
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, waits = _timed_steps(
        model,
        loader,
        lambda group: train_step(
            model, group, loss_fn, optimizer, scaler=scaler, autocast=autocast, grad_clip=cfg.optim.grad_clip
        ),
        scheduler,
        device,
        k=k,
        count=warmup + steps,
        progress=progress,
        sync=sync,
    )
    eval_one = _time_evaluation(model, task, spec, device, cfg, autocast, eval_batches, sync)
    if val is not None:
        eval_one += _time_split(model, val, task.class_names, spec, device, cfg, autocast, eval_batches, sync)
    model.eval()
    with contextlib.suppress(Exception):
        optimizer.zero_grad(set_to_none=True)
    return _projection(
        cfg,
        device,
        precision,
        times,
        waits,
        warmup=warmup,
        k=k,
        batches=len(loader),
        eval_one=eval_one,
        best_val=val is not None,
    )


def _time_split(
    model: Any,
    ds: Any,
    class_names: list[str],
    spec: Any,
    device: Any,
    cfg: Any,
    autocast: Any,
    batches: int,
    sync: Callable[[], None],
) -> float:
    """Projected seconds to predict ``ds`` (text features once, then every batch), from a few batches."""
    import torch
    from torch.utils.data import DataLoader

    from trainer.data.base import Transformed
    from trainer.transforms import build_transform

    if len(ds) == 0:
        return 0.0
    bs = cfg.data.eval_batch_size
    loader = DataLoader(
        Transformed(ds, build_transform(spec, train=False)),
        batch_size=bs,
        shuffle=True,  # a sample of the split, not its first classes
        num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(0),
    )
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        with autocast():
            text = model.encode_names(class_names)
        sync()
        text_s = time.perf_counter() - t0
        times = []
        it = iter(loader)
        for _ in range(min(batches, len(loader))):
            t0 = time.perf_counter()
            images, _ = next(it)
            with autocast():
                model.logits(model.encode_image(images.to(device)), text).float().softmax(-1).cpu()
            sync()
            times.append(time.perf_counter() - t0)
        del it
    per_batch = sum(times[1:]) / len(times[1:]) if len(times) > 1 else times[0]
    return text_s + math.ceil(len(ds) / bs) * per_batch


def _time_evaluation(
    model: Any, task: Any, spec: Any, device: Any, cfg: Any, autocast: Any, batches: int, sync: Any
) -> float:
    seconds = _time_split(model, task.test, task.class_names, spec, device, cfg, autocast, batches, sync)
    if task.novel_test is not None:
        seconds += _time_split(
            model, task.novel_test, task.novel_test.class_names, spec, device, cfg, autocast, batches, sync
        )
    return seconds


def _dry_run_section(
    out: _Printer,
    cfg: Any,
    model: Any,
    loaded: Any,
    task: Any,
    device: Any,
    *,
    steps: int,
    warmup: int,
    progress: bool,
) -> tuple[Section, DryRun | None]:
    sec = Section("dry run")
    out.head(
        f"dry run: {cfg.optim.name} at batch {cfg.data.batch_size} on {device}, {warmup} warm-up + {steps} "
        "timed steps"
    )
    if model is None or task is None:
        sec.skipped = "skipped: " + (
            "no model" if model is None else "the data did not build, or a trained class has no images"
        )
        out.line(sec.skipped)
        return sec, None
    if cfg.train.compile:
        out.note("train.compile is not applied in the dry run (compilation time would swamp the steps)")
    from trainer.data.checks import available_cores

    if cfg.data.num_workers > available_cores():
        note = (
            f"data.num_workers={cfg.data.num_workers} is more than the {available_cores()} cores available here "
            f"(--set data.num_workers={available_cores()})"
        )
        sec.notes.append(note)
        out.note(note)
    try:
        result = dry_run(cfg, model, loaded, task, device, steps=steps, warmup=warmup, progress=progress)
    except UserError as e:
        sec.faults.append(str(e))
        out.fault(str(e))
        return sec, None
    except (RuntimeError, OSError, ValueError) as e:  # e.g. CUDA out of memory
        msg = f"a training step failed ({type(e).__name__}: {shorten(str(e), 300)})"
        sec.faults.append(msg)
        out.fault(msg)
        return sec, None
    r = result
    out.line(
        f"precision {r.precision}, optimizer {r.optimizer}"
        + (f", {r.accumulation} micro-batches per step" if r.accumulation > 1 else "")
    )
    out.line(
        f"step: {format_seconds(r.step_seconds)} (min {format_seconds(r.step_seconds_min)}, max "
        f"{format_seconds(r.step_seconds_max)}; {format_seconds(r.data_wait_seconds)} of it waiting for data; "
        f"first step {format_seconds(r.first_step_seconds)}) -> {r.images_per_second:,.1f} images/s"
    )
    mem = f"peak memory: {_gib(r.peak_memory_bytes)} ({r.memory_kind}"
    mem += f", of {_gib(r.memory_total_bytes)})" if r.memory_total_bytes else ")"
    out.line(mem)
    out.line(
        f"projected: epoch {format_seconds(r.epoch_seconds)} ({_n(r.steps_per_epoch)} "
        f"step{'s' * (r.steps_per_epoch != 1)}), evaluation "
        f"{format_seconds(r.eval_seconds)} each x {r.evaluations}; run of {r.epochs} epochs "
        f"{format_seconds(r.run_seconds)}"
    )
    return sec, result


# ------------------------------------------------------------------------------------------------ entry


def run_check(
    config: str | None,
    overrides: list[str] | None = None,
    *,
    device: str | None = None,
    steps: int = 5,
    warmup: int = 1,
    workers: int | None = None,
    progress: bool = True,
    download: bool = True,
    do_dry_run: bool = True,
    list_classes: bool = False,
    write: Callable[[str], None] = print,
) -> CheckReport:
    """Run every check on the config ``config`` + ``overrides`` and print the report through ``write``."""
    import torch

    from trainer.distributed import DistInfo, resolve_device

    out = _Printer(write)
    report = CheckReport()
    steps, warmup = max(1, steps), max(0, warmup)
    overrides = list(overrides or [])
    sec, cfg = _config_section(out, config, overrides)
    report.sections.append(sec)
    if cfg is None:
        _finish(out, report)
        return report
    try:
        dev = resolve_device(device or cfg.train.device, DistInfo())
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {dev} asked for, but CUDA is not available: --set train.device=cpu")
    except (UserError, RuntimeError) as e:
        sec.faults.append(str(e))
        out.fault(str(e))
        _finish(out, report)
        return report

    dsec, task, summary = _data_section(
        out, cfg, workers=workers, progress=progress, list_classes=list_classes
    )
    report.sections.append(dsec)
    report.data = summary
    wsec, model, loaded, winfo = _weights_section(out, cfg, dev, download=download)
    report.sections.append(wsec)
    report.weights = winfo
    if do_dry_run:
        rsec, result = _dry_run_section(
            out, cfg, model, loaded, task, dev, steps=steps, warmup=warmup, progress=progress
        )
        report.sections.append(rsec)
        report.dry_run = result
    _finish(out, report)
    return report


def _finish(out: _Printer, report: CheckReport) -> None:
    if report.ok:
        out.head("check: OK")
        return
    failed = [
        f"{s.name} ({len(s.faults)} fault{'s' * (len(s.faults) != 1)})"
        if s.faults
        else f"{s.name} ({s.skipped})"
        for s in report.sections
        if not s.ok
    ]
    out.head("check: FAILED: " + "; ".join(failed))


def write_json(report: CheckReport, path: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
