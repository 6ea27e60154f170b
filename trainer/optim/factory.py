"""Build an optimizer from the typed ``optim`` config section: plain SGD / AdamW, or a sharpness wrapper (SAM,
ASAM, GNM, GCSAM) around one. Registers the built-in specs of :mod:`trainer.optim.registry`.

Only this factory reads the config section; the optimizer classes take plain typed arguments, and their
constructor defaults are the module constants (``SAM_RHO``, ``GNM_KAPPA``...) that the specs and
``OptimConfig``'s field defaults also use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from trainer.optim.base import SharpnessOptimizer
from trainer.optim.gcsam import GCSAM, GCSAM_RHO
from trainer.optim.gnm import GNM, GNM_RHO
from trainer.optim.registry import (
    OPTIMIZERS,
    BaseKwargs,
    BaseOptimizerSpec,
    OptimizerSpec,
    get_base_optimizer_spec,
    get_optimizer_spec,
    register_base_optimizer,
    register_optimizer,
)
from trainer.optim.sam import ASAM_RHO, SAM, SAM_RHO

if TYPE_CHECKING:
    from trainer.config import OptimConfig

__all__ = [
    "BASE_OPTIMIZER_NAMES",
    "DEFAULT_RHO",
    "OPTIMIZER_NAMES",
    "TWO_PASS",
    "build_optimizer",
    "passes_of",
]


# --------------------------------------------------------------------------------------------- base optimizers
def _sgd_kwargs(o: OptimConfig) -> BaseKwargs:
    return {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay}


def _adamw_kwargs(o: OptimConfig) -> BaseKwargs:
    return {"lr": o.lr, "weight_decay": o.weight_decay}


register_base_optimizer(
    BaseOptimizerSpec(
        "sgd", torch.optim.SGD, _sgd_kwargs, ("lr", "momentum", "weight_decay"), "SGD with momentum, L2 decay"
    )
)
register_base_optimizer(
    BaseOptimizerSpec(
        "adamw",
        torch.optim.AdamW,
        _adamw_kwargs,
        ("lr", "weight_decay"),
        "AdamW, decoupled weight decay (Loshchilov & Hutter, ICLR 2019)",
    )
)


# ------------------------------------------------------------------------------------------------- builders
def _plain(name: str) -> OptimizerSpec:
    base = get_base_optimizer_spec(name)

    def build(params: ParamsT, o: OptimConfig, rho: float | None, seed: int | None) -> Optimizer:
        return base.cls(params, **base.kwargs(o))

    cls = base.cls if isinstance(base.cls, type) else Optimizer
    return OptimizerSpec(name, cls, build, 1, None, (), f"plain {base.description}")


def _base_of(o: OptimConfig) -> BaseOptimizerSpec:
    return get_base_optimizer_spec(o.base)


def _build_sam(params: ParamsT, o: OptimConfig, rho: float | None, seed: int | None) -> Optimizer:
    base = _base_of(o)
    return SAM(params, base.cls, rho=rho, **base.kwargs(o))


def _build_asam(params: ParamsT, o: OptimConfig, rho: float | None, seed: int | None) -> Optimizer:
    base = _base_of(o)
    return SAM(params, base.cls, rho=rho, adaptive=True, **base.kwargs(o))


def _build_gnm(params: ParamsT, o: OptimConfig, rho: float | None, seed: int | None) -> Optimizer:
    base = _base_of(o)
    return GNM(
        params,
        base.cls,
        rho=GNM_RHO if rho is None else rho,
        kappa=o.kappa,
        sigma=o.sigma,
        clip_sigmas=o.clip_sigmas,
        seed=seed,
        noise_decay=o.noise_decay,
        **base.kwargs(o),
    )


def _build_gcsam(params: ParamsT, o: OptimConfig, rho: float | None, seed: int | None) -> Optimizer:
    base = _base_of(o)
    return GCSAM(
        params,
        base.cls,
        rho=GCSAM_RHO if rho is None else rho,
        beta1=o.beta1,
        beta2=o.beta2,
        granularity=o.granularity,
        **base.kwargs(o),
    )


register_optimizer(_plain("sgd"))
register_optimizer(_plain("adamw"))
register_optimizer(
    OptimizerSpec(
        "sam",
        SAM,
        _build_sam,
        SAM.passes,
        SAM_RHO,
        ("rho",),
        "SAM, sharpness-aware minimization (Foret et al., ICLR 2021, arXiv:2010.01412)",
    )
)
register_optimizer(
    OptimizerSpec(
        "asam",
        SAM,
        _build_asam,
        SAM.passes,
        ASAM_RHO,
        ("rho",),
        "ASAM, adaptive SAM with T = |theta| + 0.01 (Kwon et al., ICML 2021, arXiv:2102.11600)",
    )
)
register_optimizer(
    OptimizerSpec(
        "gnm",
        GNM,
        _build_gnm,
        GNM.passes,
        GNM_RHO,
        ("rho", "kappa", "sigma", "clip_sigmas", "noise_decay"),
        "GNM, Gaussian neighbourhood minimization, one pass (GNM-PT, NeurIPS 2024, arXiv:2410.21042)",
    )
)
register_optimizer(
    OptimizerSpec(
        "gcsam",
        GCSAM,
        _build_gcsam,
        GCSAM.passes,
        GCSAM_RHO,
        ("rho", "beta1", "beta2", "granularity"),
        "GCSAM, gradient-constrained SAM (GCSCoOp, arXiv:2309.07866)",
    )
)

# snapshots of the built-in registrations (the registries themselves are the live source)
OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZERS)
BASE_OPTIMIZER_NAMES: tuple[str, ...] = ("sgd", "adamw")
DEFAULT_RHO: dict[str, float] = {n: s.default_rho for n, s in OPTIMIZERS.items() if s.default_rho is not None}
"""rho used when ``optim.rho`` is null, from each spec's ``default_rho``."""
TWO_PASS: tuple[str, ...] = tuple(n for n, s in OPTIMIZERS.items() if s.passes == 2)
"""The optimizers that run two forward+backward passes per step (no gradient accumulation)."""


def build_optimizer(params: ParamsT, optim: OptimConfig, *, seed: int | None = None) -> Optimizer:
    """Return the optimizer ``optim.name`` over ``params``, configured from the typed ``optim`` section.

    Args:
        params: tensors or param-group dicts (only trainable ones should be passed).
        optim: the config section. "sgd" / "adamw" give the plain torch optimizer; the others a
            :class:`SharpnessOptimizer` wrapping ``optim.base``. ``optim.rho`` null takes the spec's
            ``default_rho``; each spec's ``hyperparameters`` lists the fields it reads.
        seed: GNM's noise seed (None draws one from torch's global generator); ignored by the others.

    Raises:
        ValueError: for an unknown ``optim.name`` or ``optim.base``, naming the value and the allowed names, or
            for a hyperparameter out of range.
    """
    spec = get_optimizer_spec(optim.name)
    return spec.builder(params, optim, optim.rho, seed)


def passes_of(optimizer: Optimizer) -> int:
    """Forward+backward passes one step of ``optimizer`` needs (1 for a plain torch optimizer)."""
    return optimizer.passes if isinstance(optimizer, SharpnessOptimizer) else 1
