"""Class re-weighting and logit adjustment for long-tailed training.

- DRW, deferred re-weighting with effective-number weights: K. Cao et al., "Learning Imbalanced Datasets with
  Label-Distribution-Aware Margin Loss", NeurIPS 2019 (kaidic/LDAM-DRW ``cifar_train.py``), using the class-
  balanced weights of Y. Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019:
  w_j = (1 - beta) / (1 - beta^n_j), normalised to sum to C. Plain CE before ``start_epoch``, weighted CE from it
  on (0-indexed epochs; LDAM-DRW: beta 0.9999 from epoch 160 of 200).
- Logit adjustment: A. K. Menon et al., "Long-tail learning via logit adjustment", ICLR 2021, arXiv:2007.07314.
  Loss form CE(z + tau log pi, y); post-hoc form argmax_j (z_j - tau log pi_j), with pi_j = n_j / sum_k n_k.

Every module maps ``(logits [B, C], targets [B]) -> scalar loss`` and has ``set_epoch(epoch)``; weights and priors
are buffers, so they follow ``.to(device)``. For gradient accumulation each also splits its mean into
``summed(logits, targets)`` and ``normaliser(targets)`` (sum_i w_{y_i} for DRW, the count otherwise), so
that k micro-batches are normalised by the whole step's sum and equal one batch.

The rules are registered (timm-style) as one frozen :class:`RelossSpec` each in :data:`RELOSSES` (name,
class, paper, the ``ReweightConfig`` fields it reads, its builder); ``trainer/config.py`` validates
``reweight.name`` against it and takes its field defaults from :data:`DRW_BETA` / :data:`LOGIT_ADJUST_TAU`,
the classes' own constructor defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from trainer.config import ReweightConfig

__all__ = [
    "DRW_BETA",
    "LOGIT_ADJUST_TAU",
    "RELOSSES",
    "RELOSS_NAMES",
    "CrossEntropy",
    "DRWLoss",
    "LogitAdjustedLoss",
    "RelossSpec",
    "StepLoss",
    "build_loss",
    "effective_number_weights",
    "get_reloss_spec",
    "log_prior",
    "posthoc_adjust",
    "register_reloss",
]

DRW_BETA = 0.9999
"""Default effective-number beta of DRW (LDAM-DRW; GNM-PT uses 0.9998)."""
LOGIT_ADJUST_TAU = 1.0
"""Default temperature of the logit adjustment (Menon et al.)."""


def _check_counts(counts: Sequence[int]) -> list[int]:
    out = list(counts)
    if not out:
        raise ValueError("counts must list at least one class")
    for j, n in enumerate(out):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"counts[{j}] = {n!r}: every class needs an integer training count >= 1")
    return out


def _check_epoch(name: str, epoch: int) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {epoch!r}")
    return epoch


def effective_number_weights(counts: Sequence[int], beta: float) -> Tensor:
    """Class-balanced weights w_j = (1 - beta) / (1 - beta^n_j), normalised to sum to C. Shape [C], fp32.

    beta = 0 gives all ones; beta -> 1 gives weights proportional to 1 / n_j.

    Raises:
        ValueError: if beta is outside [0, 1) or a count is not an integer >= 1 (naming the class index).
    """
    n = _check_counts(counts)
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if beta == 0.0:
        return torch.ones(len(n))  # 0^n = 0 for n >= 1: every raw weight is exactly 1
    nt = torch.tensor(n, dtype=torch.float64)
    # 1 - beta^n = -expm1(n log beta): no cancellation when beta is close to 1
    raw = (1.0 - beta) / -torch.expm1(nt * math.log(beta))
    return (raw * (len(n) / raw.sum())).to(torch.float32)


def log_prior(counts: Sequence[int]) -> Tensor:
    """log pi_j = log(n_j / sum_k n_k). Shape [C], fp32."""
    nt = torch.tensor(_check_counts(counts), dtype=torch.float64)
    return (nt / nt.sum()).log().to(torch.float32)


def _check_logits(logits: Tensor, num_classes: int) -> None:
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be [batch, {num_classes}], got {list(logits.shape)}")


class StepLoss(nn.Module):
    """The common interface: ``forward`` is the batch mean, ``summed / normaliser`` its two halves."""

    def summed(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The numerator of the mean (sum of the per-sample, possibly weighted, losses)."""
        return F.cross_entropy(logits, targets, reduction="sum")

    def normaliser(self, targets: Tensor) -> Tensor:
        """The denominator of the mean over ``targets``: the number of samples (fp32 scalar)."""
        return torch.tensor(float(targets.numel()), device=targets.device)

    def set_epoch(self, epoch: int) -> None:
        _check_epoch("epoch", epoch)


class CrossEntropy(StepLoss):
    """Plain mean cross-entropy; ``set_epoch`` is a no-op (the common interface of the losses here)."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits, targets)


class DRWLoss(StepLoss):
    """Deferred re-weighting: plain CE before ``start_epoch``, effective-number weighted CE from it on.

    The weighted loss is torch's weighted mean, sum_i w_{y_i} l_i / sum_i w_{y_i} (not divided by the batch
    size), as in LDAM-DRW and GNM-PT.

    Args:
        counts: training images per class, [C].
        beta: effective-number beta in [0, 1) (0.9999 LDAM-DRW; 0.9998 GNM-PT).
        start_epoch: first (0-indexed) epoch with weights on.
    """

    weight: Tensor

    def __init__(self, counts: Sequence[int], beta: float = DRW_BETA, *, start_epoch: int) -> None:
        super().__init__()
        self.register_buffer("weight", effective_number_weights(counts, beta))  # [C]
        self.beta = float(beta)
        self.start_epoch = _check_epoch("start_epoch", start_epoch)
        self.epoch = 0

    @property
    def active(self) -> bool:
        """Whether the class weights are applied in the current epoch."""
        return self.epoch >= self.start_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_epoch("epoch", epoch)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        _check_logits(logits, self.weight.numel())
        if not self.active:
            return F.cross_entropy(logits, targets)  # exactly plain CE, not CE with unit weights
        return F.cross_entropy(logits, targets, weight=self.weight.to(logits.dtype))

    def summed(self, logits: Tensor, targets: Tensor) -> Tensor:
        _check_logits(logits, self.weight.numel())
        if not self.active:
            return F.cross_entropy(logits, targets, reduction="sum")
        return F.cross_entropy(logits, targets, weight=self.weight.to(logits.dtype), reduction="sum")

    def normaliser(self, targets: Tensor) -> Tensor:
        """sum_i w_{y_i} once the weights are on (torch's weighted-mean denominator), else the count."""
        if not self.active:
            return super().normaliser(targets)
        return self.weight[targets].sum()

    def extra_repr(self) -> str:
        return f"classes={self.weight.numel()}, beta={self.beta}, start_epoch={self.start_epoch}"


class LogitAdjustedLoss(StepLoss):
    """Logit-adjusted cross-entropy (loss form): CE(z + tau * log pi, y).

    Args:
        counts: training images per class, [C].
        tau: temperature of the adjustment, >= 0 (1.0; 0 gives plain CE).
    """

    log_prior: Tensor

    def __init__(self, counts: Sequence[int], tau: float = LOGIT_ADJUST_TAU) -> None:
        super().__init__()
        if isinstance(tau, bool) or not isinstance(tau, int | float) or not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
        self.tau = float(tau)
        self.register_buffer("log_prior", log_prior(counts))  # [C]

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        _check_logits(logits, self.log_prior.numel())
        if self.tau == 0.0:
            return F.cross_entropy(logits, targets)
        # [B, C] + [C]: tau*log pi is most negative for the tail, so a tail class must win by a larger raw margin
        return F.cross_entropy(logits + self.tau * self.log_prior.to(logits.dtype), targets)

    def summed(self, logits: Tensor, targets: Tensor) -> Tensor:
        _check_logits(logits, self.log_prior.numel())
        adjusted = logits + self.tau * self.log_prior.to(logits.dtype) if self.tau else logits
        return F.cross_entropy(adjusted, targets, reduction="sum")

    def extra_repr(self) -> str:
        return f"classes={self.log_prior.numel()}, tau={self.tau}"


def posthoc_adjust(logits: Tensor, counts: Sequence[int], tau: float = 1.0) -> Tensor:
    """Post-hoc logit adjustment: z - tau * log pi, shape of ``logits`` ([..., C]); take its argmax."""
    lp = log_prior(counts).to(device=logits.device, dtype=logits.dtype)
    if logits.shape[-1] != lp.numel():
        raise ValueError(f"logits must end in {lp.numel()} classes, got {list(logits.shape)}")
    return logits - tau * lp


LossBuilder = Callable[[Sequence[int], "ReweightConfig", int], StepLoss]
"""``builder(counts, reweight, start_epoch)``: the loss for class ``counts``."""


@dataclass(frozen=True)
class RelossSpec:
    """A re-weighting rule of ``reweight.name``.

    Attributes:
        name: the registry key.
        cls: the loss class built.
        builder: see :data:`LossBuilder`.
        hyperparameters: the ``ReweightConfig`` fields it reads (plus the DRW epoch where ``start_epoch`` is
            listed).
        description: one line with the paper.
    """

    name: str
    cls: type[StepLoss]
    builder: LossBuilder
    hyperparameters: tuple[str, ...]
    description: str


_RELOSSES: dict[str, RelossSpec] = {}
RELOSSES: Mapping[str, RelossSpec] = MappingProxyType(_RELOSSES)
"""Every registered re-weighting rule by name (read-only view; add with :func:`register_reloss`)."""


def register_reloss(spec: RelossSpec) -> RelossSpec:
    """Add ``spec`` under ``spec.name``; returns it.

    Raises:
        ValueError: if the name is taken.
    """
    if spec.name in _RELOSSES:
        raise ValueError(f"re-weighting {spec.name!r} is already registered: pick another name")
    _RELOSSES[spec.name] = spec
    return spec


def get_reloss_spec(name: str) -> RelossSpec:
    """The spec registered as ``name``.

    Raises:
        ValueError: for an unknown name, naming it and the allowed ones.
    """
    try:
        return _RELOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown re-weighting {name!r}: expected one of {tuple(_RELOSSES)}") from None


register_reloss(
    RelossSpec("none", CrossEntropy, lambda counts, r, start: CrossEntropy(), (), "plain cross-entropy")
)
register_reloss(
    RelossSpec(
        "drw",
        DRWLoss,
        lambda counts, r, start: DRWLoss(counts, r.beta, start_epoch=start),
        ("beta", "start_epoch"),
        "deferred re-weighting, effective-number weights (Cao et al., NeurIPS 2019; Cui et al., CVPR 2019)",
    )
)
register_reloss(
    RelossSpec(
        "logit_adjust",
        LogitAdjustedLoss,
        lambda counts, r, start: LogitAdjustedLoss(counts, r.tau),
        ("tau",),
        "logit-adjusted cross-entropy (Menon et al., ICLR 2021, arXiv:2007.07314)",
    )
)

RELOSS_NAMES: tuple[str, ...] = tuple(RELOSSES)
"""Snapshot of the built-in names (the registry :data:`RELOSSES` is the live source)."""


def build_loss(reweight: ReweightConfig, counts: Sequence[int], *, start_epoch: int) -> StepLoss:
    """The training loss ``reweight.name`` for class ``counts``, from the typed ``reweight`` section.

    "none": plain CE; "drw": :class:`DRWLoss` (``reweight.beta``, from ``start_epoch``, the run's DRW epoch);
    "logit_adjust": :class:`LogitAdjustedLoss` (``reweight.tau``). Fields a loss does not use are ignored.

    Raises:
        ValueError: for an unknown name (listing the allowed ones) or an out-of-range argument.
    """
    return get_reloss_spec(reweight.name).builder(counts, reweight, start_epoch)
