"""Optimizers: sharpness / neighbourhood wrappers (SAM, ASAM, GNM, GCSAM) around a torch base optimizer, their
registry of specs (``registry.py``) and the factory that builds one from the typed config (``factory.py``)."""

from trainer.optim.base import (
    NORM_EPS,
    EpochStats,
    SharpnessOptimizer,
    check_hyperparameter,
    epoch_stats,
    on_epoch,
)
from trainer.optim.factory import (
    BASE_OPTIMIZER_NAMES,
    DEFAULT_RHO,
    OPTIMIZER_NAMES,
    TWO_PASS,
    build_optimizer,
    passes_of,
)
from trainer.optim.gcsam import GCSAM, GCSAM_GRANULARITIES, constrained_gradient
from trainer.optim.gnm import GNM
from trainer.optim.registry import (
    BASE_OPTIMIZERS,
    OPTIMIZERS,
    BaseOptimizerSpec,
    OptimizerSpec,
    get_base_optimizer_spec,
    get_optimizer_spec,
    register_base_optimizer,
    register_optimizer,
)
from trainer.optim.sam import SAM

__all__ = [
    "BASE_OPTIMIZERS",
    "BASE_OPTIMIZER_NAMES",
    "DEFAULT_RHO",
    "GCSAM",
    "GCSAM_GRANULARITIES",
    "GNM",
    "NORM_EPS",
    "OPTIMIZERS",
    "OPTIMIZER_NAMES",
    "SAM",
    "TWO_PASS",
    "BaseOptimizerSpec",
    "EpochStats",
    "OptimizerSpec",
    "SharpnessOptimizer",
    "build_optimizer",
    "check_hyperparameter",
    "constrained_gradient",
    "epoch_stats",
    "get_base_optimizer_spec",
    "get_optimizer_spec",
    "on_epoch",
    "passes_of",
    "register_base_optimizer",
    "register_optimizer",
]
