"""Optimizers: sharpness / neighbourhood wrappers (SAM, ASAM, GNM, GCSAM) around a torch base optimizer."""

from trainer.optim.base import NORM_EPS, SharpnessOptimizer, check_hyperparameter
from trainer.optim.factory import (
    BASE_OPTIMIZER_NAMES,
    DEFAULT_RHO,
    OPTIMIZER_NAMES,
    build_optimizer,
    passes_of,
)
from trainer.optim.gcsam import GCSAM, GCSAM_GRANULARITIES, constrained_gradient
from trainer.optim.gnm import GNM
from trainer.optim.sam import SAM

__all__ = [
    "BASE_OPTIMIZER_NAMES",
    "DEFAULT_RHO",
    "GCSAM",
    "GCSAM_GRANULARITIES",
    "GNM",
    "NORM_EPS",
    "OPTIMIZER_NAMES",
    "SAM",
    "SharpnessOptimizer",
    "build_optimizer",
    "check_hyperparameter",
    "constrained_gradient",
    "passes_of",
]
