"""Build an optimizer by name: plain SGD / AdamW, or a sharpness wrapper (SAM, ASAM, GNM, GCSAM) around one."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from trainer.optim.base import SharpnessOptimizer
from trainer.optim.gcsam import GCSAM
from trainer.optim.gnm import GNM
from trainer.optim.sam import SAM

__all__ = ["BASE_OPTIMIZER_NAMES", "DEFAULT_RHO", "OPTIMIZER_NAMES", "build_optimizer", "passes_of"]

OPTIMIZER_NAMES = ("sgd", "adamw", "sam", "asam", "gnm", "gcsam")
BASE_OPTIMIZER_NAMES = ("sgd", "adamw")

DEFAULT_RHO: dict[str, float] = {
    "sam": 0.05,  # davda54/sam default; ASAM README: 0.05 (CIFAR-10), 0.1 (CIFAR-100)
    "asam": 0.5,  # ASAM README: 0.5 (CIFAR-10), 1.0 (CIFAR-100), ~10x SAM's because T rescales g
    "gnm": 0.05,  # GNM-PT
    "gcsam": 0.1,  # GCSCoOp README example (the paper's value is unconfirmed)
}
"""rho used when ``build_optimizer(rho=None)``."""


def _base(
    name: str, lr: float, weight_decay: float, momentum: float
) -> tuple[type[Optimizer], dict[str, Any]]:
    if name == "sgd":
        return torch.optim.SGD, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    if name == "adamw":
        return torch.optim.AdamW, {"lr": lr, "weight_decay": weight_decay}
    raise ValueError(f"unknown base optimizer {name!r}: expected one of {BASE_OPTIMIZER_NAMES}")


def build_optimizer(
    params: ParamsT,
    name: str,
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    base: str = "sgd",
    rho: float | None = None,
    adaptive_eta: float = 0.01,
    kappa: float = 0.1,
    sigma: float = 1.0 / 3.0,
    clip_sigmas: float = 3.0,
    beta1: float = 0.5,
    beta2: float = 0.8,
    granularity: str = "tensor",
    seed: int | None = None,
) -> Optimizer:
    """Return the optimizer called ``name`` over ``params``.

    Args:
        params: tensors or param-group dicts (only trainable ones should be passed).
        name: one of ``OPTIMIZER_NAMES``. "sgd" / "adamw" return the plain torch optimizer; the others return a
            :class:`SharpnessOptimizer` wrapping the ``base`` optimizer.
        lr, weight_decay: of the (base) optimizer; decoupled for AdamW, L2 for SGD.
        momentum: SGD momentum (ignored by AdamW).
        base: "sgd" or "adamw", the base optimizer of the wrappers (ignored for "sgd" / "adamw").
        rho: neighbourhood radius; None takes ``DEFAULT_RHO[name]``.
        adaptive_eta: ASAM's eta in T = |theta| + eta.
        kappa, sigma, clip_sigmas, seed: GNM's noise (see :class:`GNM`).
        beta1, beta2, granularity: GCSAM's cosine bounds and where the cosine is taken (see :class:`GCSAM`).

    Raises:
        ValueError: for an unknown ``name`` or ``base``, naming the value and the allowed names, or for a
            hyperparameter out of range.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}: expected one of {OPTIMIZER_NAMES}")
    if name in BASE_OPTIMIZER_NAMES:
        cls, kwargs = _base(name, lr, weight_decay, momentum)
        return cls(params, **kwargs)
    base_cls, base_kwargs = _base(base, lr, weight_decay, momentum)
    r = DEFAULT_RHO[name] if rho is None else rho
    if name in ("sam", "asam"):
        return SAM(params, base_cls, rho=r, adaptive=name == "asam", eta=adaptive_eta, **base_kwargs)
    if name == "gnm":
        return GNM(
            params,
            base_cls,
            rho=r,
            kappa=kappa,
            sigma=sigma,
            clip_sigmas=clip_sigmas,
            seed=seed,
            **base_kwargs,
        )
    return GCSAM(params, base_cls, rho=r, beta1=beta1, beta2=beta2, granularity=granularity, **base_kwargs)


def passes_of(optimizer: Optimizer) -> int:
    """Forward+backward passes one step of ``optimizer`` needs (1 for a plain torch optimizer)."""
    return optimizer.passes if isinstance(optimizer, SharpnessOptimizer) else 1
