"""The task a run config names: its ``data`` section turned into a :class:`~trainer.data.base.TaskData`.

:func:`task_from_config` is the one place where :class:`~trainer.config.DataConfig` meets the dataset
builders: the toy world (``kind: toy``) or a kind of :data:`trainer.data.registry.BUILDERS`, with the
protocol options gathered into one :class:`~trainer.data.registry.TaskOptions`. :func:`checked_task` adds
the file checks of :mod:`trainer.data.checks` (``fit`` and ``check`` use it before any weight is loaded).
"""

from __future__ import annotations

import functools

from trainer import distributed as dist_utils
from trainer.config import DataConfig
from trainer.data.base import TaskData
from trainer.data.checks import CheckedTask, DataFault, check_files
from trainer.data.registry import TaskOptions, build_task_from
from trainer.errors import UserError

__all__ = ["checked_task", "task_from_config", "task_options"]


def task_options(data: DataConfig, problems: list[DataFault] | None = None) -> TaskOptions:
    """The protocol options of ``data`` (``problems``: see :func:`trainer.data.registry.build_task`)."""
    return TaskOptions(
        imbalance=data.imbalance,
        n_max=data.n_max,
        shots=data.shots,
        base_to_novel=data.base_to_novel,
        seed=data.seed,
        train_file=data.train_file,
        test_file=data.test_file,
        names_file=data.names_file,
        class_order=data.class_order,
        download=data.download,
        problems=problems,
    )


def task_from_config(data: DataConfig, problems: list[DataFault] | None = None) -> TaskData:
    """The dataset named by the config, as train / test / novel-test sets."""
    if data.kind == "toy":
        from trainer.toyworld.task import toy_task

        build = functools.partial(toy_task, seed=data.seed)  # unset fields keep the toy world's defaults
        if data.imbalance is not None:
            build = functools.partial(build, imbalance=data.imbalance)
        if data.n_max is not None:
            build = functools.partial(build, n_max=data.n_max)
        return build()
    if data.root is None:
        raise UserError(
            f"data.root is required for data.kind={data.kind}: set it to the dataset folder (--set data.root=DIR)"
        )
    return build_task_from(data.kind, data.root, task_options(data, problems))


def checked_task(
    data: DataConfig, *, is_main: bool = True, progress: bool = True, check_args: str = "-c CONFIG"
) -> CheckedTask:
    """The task, its data checked before anything expensive (see :func:`trainer.data.checks.check_files`):
    the paths and class lists as it is built, then (``data.scan``) a full decode of every image file it reads.
    Under DDP the main process decodes and the others take its list."""
    problems: list[DataFault] = []
    task = task_from_config(data, problems)
    return check_files(
        task,
        problems,
        scan=data.scan,
        skip_unreadable=data.skip_unreadable,
        scan_here=is_main,
        share=dist_utils.broadcast_object,
        progress=progress,
        check_args=check_args,
    )
