"""The optimizer registries (timm-style): one frozen :class:`OptimizerSpec` per optimizer name, one
:class:`BaseOptimizerSpec` per base optimizer.

A spec is the single source of what the rest of the code needs to know about an optimizer without building it:
its passes per step (the engine, the accumulation check of the config), its default rho (the class's own
constructor default, pinned equal by a test), the ``OptimConfig`` fields it reads and a one-line description
with the paper. ``trainer/optim/factory.py`` registers the built-in ones; ``trainer/config.py`` validates
``optim.name`` / ``optim.base`` against these registries, so a name registered here is accepted there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, TypedDict

from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

if TYPE_CHECKING:
    from trainer.config import OptimConfig

__all__ = [
    "BASE_OPTIMIZERS",
    "OPTIMIZERS",
    "BaseKwargs",
    "BaseOptimizerSpec",
    "OptimizerBuilder",
    "OptimizerSpec",
    "get_base_optimizer_spec",
    "get_optimizer_spec",
    "register_base_optimizer",
    "register_optimizer",
]


class BaseKwargs(TypedDict, total=False):
    """Keyword arguments of a base optimizer (``momentum`` only where it has one)."""

    lr: float
    weight_decay: float
    momentum: float


@dataclass(frozen=True)
class BaseOptimizerSpec:
    """A base optimizer: the torch class the wrappers inject and the ``OptimConfig`` fields it reads.

    Attributes:
        name: the ``optim.base`` (and, for a plain run, ``optim.name``) value.
        cls: the torch optimizer class, built as ``cls(params, **kwargs(optim))``.
        kwargs: the class's keyword arguments from the typed config section.
        hyperparameters: the ``OptimConfig`` fields ``kwargs`` reads.
        description: one line, for listings and errors.
    """

    name: str
    cls: Callable[..., Optimizer]
    kwargs: Callable[[OptimConfig], BaseKwargs]
    hyperparameters: tuple[str, ...]
    description: str


OptimizerBuilder = Callable[["ParamsT", "OptimConfig", float | None, int | None], Optimizer]
"""``builder(params, optim, rho, seed)``: the optimizer over ``params``; ``rho`` None means ``default_rho``."""


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer name of ``optim.name``.

    Attributes:
        name: the registry key.
        cls: the class built (a torch optimizer or a :class:`~trainer.optim.base.SharpnessOptimizer`).
        builder: see :data:`OptimizerBuilder`.
        passes: forward+backward passes per step (1, or 2 for the ascent-then-descent methods).
        default_rho: the neighbourhood radius used when ``optim.rho`` is null; None for the plain optimizers.
        hyperparameters: the ``OptimConfig`` fields it reads besides the base optimizer's.
        description: one line with the paper.
    """

    name: str
    cls: type[Optimizer]
    builder: OptimizerBuilder
    passes: int
    default_rho: float | None
    hyperparameters: tuple[str, ...]
    description: str

    def __post_init__(self) -> None:
        if self.passes not in (1, 2):
            raise ValueError(f"optimizer {self.name!r}: passes must be 1 or 2, got {self.passes!r}")


_OPTIMIZERS: dict[str, OptimizerSpec] = {}
_BASES: dict[str, BaseOptimizerSpec] = {}
OPTIMIZERS: Mapping[str, OptimizerSpec] = MappingProxyType(_OPTIMIZERS)
"""Every registered optimizer by name (read-only view; add with :func:`register_optimizer`)."""
BASE_OPTIMIZERS: Mapping[str, BaseOptimizerSpec] = MappingProxyType(_BASES)
"""Every registered base optimizer by name (read-only view; add with :func:`register_base_optimizer`)."""


def register_optimizer(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec`` under ``spec.name``; returns it.

    Raises:
        ValueError: if the name is taken.
    """
    if spec.name in _OPTIMIZERS:
        raise ValueError(f"optimizer {spec.name!r} is already registered: pick another name")
    _OPTIMIZERS[spec.name] = spec
    return spec


def register_base_optimizer(spec: BaseOptimizerSpec) -> BaseOptimizerSpec:
    """Add ``spec`` under ``spec.name``; returns it.

    Raises:
        ValueError: if the name is taken.
    """
    if spec.name in _BASES:
        raise ValueError(f"base optimizer {spec.name!r} is already registered: pick another name")
    _BASES[spec.name] = spec
    return spec


def get_optimizer_spec(name: str) -> OptimizerSpec:
    """The spec registered as ``name``.

    Raises:
        ValueError: for an unknown name, naming it and the allowed ones.
    """
    try:
        return _OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown optimizer {name!r}: expected one of {tuple(_OPTIMIZERS)}") from None


def get_base_optimizer_spec(name: str) -> BaseOptimizerSpec:
    """The base optimizer spec registered as ``name``.

    Raises:
        ValueError: for an unknown name, naming it and the allowed ones.
    """
    try:
        return _BASES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown base optimizer {name!r}: expected one of {tuple(_BASES)}") from None
