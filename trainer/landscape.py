"""1-D loss landscapes of learned prompts along filter-normalised random directions (Li et al., NeurIPS 2018).

For a trained run, the *training* loss (plain, unweighted cross-entropy over the trained classes) is evaluated
on a fixed, seeded subset of training images at ``theta + alpha * d`` for a grid of ``alpha`` in [-1, 1] and a
few seeded random directions ``d``. ``theta`` is every trainable prompt tensor of the
:class:`~trainer.prompts.PromptedCLIP` (the CoOp context ``ctx`` [M, W] and the VPT prompts [S, Lp, D]).

Filter normalisation, adapted to prompts: Li et al. rescale each convolution filter of the random direction to
the norm of the corresponding filter of the weights. A prompt tensor has no filters; its natural unit is one
token vector, so every *row* along the last dimension (one context vector, one visual prompt token of one
block) of the Gaussian direction is rescaled to the Euclidean norm of the same row of ``theta``:
``d[r] <- d[r] / ||d[r]|| * ||theta[r]||``. A row of ``theta`` that is exactly zero gets a zero direction.
With this scaling ``alpha = 1`` moves every token by its own length, so landscapes of runs whose prompts have
different scales are comparable.

Sharpness, as reported here (and on the report page):

- ``sharpness`` (at radius 0.5): the mean over directions and over ``alpha = -0.5, +0.5`` of
  ``L(theta + alpha d) - L(theta)``, i.e. ``(Lbar(-0.5) + Lbar(+0.5)) / 2 - L(theta)`` where ``Lbar`` is the
  direction-averaged curve (linearly interpolated if +-0.5 is not a grid point). Larger = sharper minimum.
- ``max_rise``: ``max over the grid of Lbar(alpha) - L(theta)``, the worst increase of the averaged curve
  within ``|alpha| <= 1``.

The image transform is the evaluation one (no augmentation), so every point of the grid sees the very same
pixels. Visual prompts change the image features, so every point runs the full forward pass (no feature
cache), batched, under ``torch.no_grad``. The scan restores the prompts bit-exactly afterwards (a saved copy
is copied back, also on error), and ``alpha = 0`` evaluates the unperturbed parameters without touching them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainer.checkpoint import CHECKPOINT_NAME, load_prompted
from trainer.config import DataConfig, RunConfig
from trainer.data.base import TaskData
from trainer.errors import UserError
from trainer.prompts import PromptedCLIP

_logger = logging.getLogger(__name__)

SHARPNESS_RADIUS = 0.5
SHARPNESS_DEFINITION = (
    "sharpness = mean over the random directions and over alpha = -0.5 and +0.5 of "
    "L(theta + alpha d) - L(theta) (training cross-entropy on the fixed image subset, filter-normalised "
    "directions: every prompt token row of d has the norm of the same row of theta); "
    "max rise = max over alpha in [-1, 1] of the direction-averaged L minus L(theta)."
)

TaskBuilder = Callable[[DataConfig], TaskData]


@dataclass
class Landscape:
    """Losses of one run along ``losses.shape[0]`` random directions at the grid ``alphas``."""

    alphas: np.ndarray  # [P], sorted, contains 0
    losses: np.ndarray  # [D, P] training CE at theta + alpha * d_k
    center_loss: float  # L(theta), the unperturbed prompts
    n_images: int
    seed: int
    label: str = ""
    param_names: list[str] = field(default_factory=list)

    @property
    def mean_curve(self) -> np.ndarray:
        """The direction-averaged loss curve [P]."""
        return np.asarray(self.losses.mean(axis=0))

    def loss_at(self, alpha: float) -> float:
        """The direction-averaged loss at ``alpha`` (linear interpolation between grid points)."""
        return float(np.interp(alpha, self.alphas, self.mean_curve))

    @property
    def sharpness(self) -> float:
        """``(Lbar(-0.5) + Lbar(+0.5)) / 2 - L(theta)``; see the module docstring."""
        r = SHARPNESS_RADIUS
        return 0.5 * (self.loss_at(-r) + self.loss_at(r)) - self.center_loss

    @property
    def max_rise(self) -> float:
        """``max_alpha Lbar(alpha) - L(theta)`` over the grid."""
        return float(self.mean_curve.max() - self.center_loss)

    def to_dict(self) -> dict[str, object]:
        return {
            "label": self.label,
            "alphas": [float(a) for a in self.alphas],
            "losses": [[float(v) for v in row] for row in self.losses],
            "center_loss": self.center_loss,
            "sharpness": self.sharpness,
            "max_rise": self.max_rise,
            "n_images": self.n_images,
            "n_directions": int(self.losses.shape[0]),
            "seed": self.seed,
            "param_names": self.param_names,
            "definition": SHARPNESS_DEFINITION,
        }


def alpha_grid(n_points: int = 21, radius: float = 1.0) -> np.ndarray:
    """``n_points`` evenly spaced values in ``[-radius, radius]``; ``n_points`` must be odd so 0 is on it."""
    if n_points < 3 or n_points % 2 == 0:
        raise UserError(
            f"the landscape grid needs an odd number of points >= 3 (got {n_points}): use e.g. 21"
        )
    grid = np.linspace(-radius, radius, n_points)
    grid[n_points // 2] = 0.0  # exactly zero, whatever linspace's rounding
    return grid


def trainable_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The prompt tensors a landscape perturbs: every parameter that requires grad, sorted by name."""
    params = sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda t: t[0])
    if not params:
        raise UserError("the model has no trainable prompt parameters: nothing to scan")
    return params


def filter_normalized_direction(theta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian direction shaped like ``theta`` with every last-dimension row rescaled to ``theta``'s row norm.

    Drawn on the CPU in float32 (so the draw does not depend on the device), returned on ``theta``'s device
    and dtype. Zero rows of ``theta`` give zero rows.
    """
    d = torch.randn(theta.shape, generator=generator, dtype=torch.float32)
    t = theta.detach().float().cpu()
    width = t.shape[-1] if t.ndim > 0 else 1
    d_rows, t_rows = d.reshape(-1, width), t.reshape(-1, width)
    scale = t_rows.norm(dim=1, keepdim=True) / d_rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (d_rows * scale).reshape(theta.shape).to(device=theta.device, dtype=theta.dtype)


@torch.no_grad()
def subset_loss(
    model: PromptedCLIP, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 64
) -> float:
    """Mean plain cross-entropy of ``model`` on ``images`` [N, 3, H, W] / ``labels`` [N] (already on device)."""
    if len(labels) == 0:
        raise UserError("the landscape image subset is empty: the run's training set has no images")
    was_training = model.training
    model.eval()
    try:
        text = model.encode_token_ids(model.class_tokens)
        total = 0.0
        for start in range(0, len(labels), batch_size):
            logits = model.logits(model.encode_image(images[start : start + batch_size]), text)
            total += float(
                F.cross_entropy(logits.float(), labels[start : start + batch_size], reduction="sum").item()
            )
    finally:
        model.train(was_training)
    return total / len(labels)


@torch.no_grad()
def scan_directions(
    model: PromptedCLIP,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    alphas: Sequence[float] | np.ndarray,
    n_directions: int = 3,
    seed: int = 0,
    batch_size: int = 64,
    label: str = "",
) -> Landscape:
    """Evaluate the loss at ``theta + alpha * d_k`` for every ``alpha`` and ``n_directions`` seeded directions.

    Direction ``k`` is drawn from ``torch.Generator().manual_seed(seed * 1009 + k)``, parameter by parameter in
    name order. ``alpha = 0`` is evaluated once, on the untouched parameters, and shared by all directions.
    The parameters are restored exactly afterwards (also when an exception interrupts the scan).
    """
    if n_directions < 1:
        raise UserError(f"the landscape needs at least one direction (got {n_directions})")
    grid = np.asarray(alphas, dtype=np.float64)
    params = trainable_params(model)
    saved = [p.detach().clone() for _, p in params]
    center = subset_loss(model, images, labels, batch_size)
    losses = np.empty((n_directions, len(grid)), dtype=np.float64)
    try:
        for k in range(n_directions):
            gen = torch.Generator().manual_seed(seed * 1009 + k)
            directions = [filter_normalized_direction(theta, gen) for theta in saved]
            for j, alpha in enumerate(grid):
                if alpha == 0.0:
                    losses[k, j] = center
                    continue
                for (_, p), theta, d in zip(params, saved, directions, strict=True):
                    p.copy_(theta + float(alpha) * d)
                losses[k, j] = subset_loss(model, images, labels, batch_size)
            _logger.debug("landscape %s: direction %d/%d done", label, k + 1, n_directions)
    finally:
        for (_, p), theta in zip(params, saved, strict=True):
            p.copy_(theta)
    return Landscape(
        alphas=grid,
        losses=losses,
        center_loss=center,
        n_images=len(labels),
        seed=seed,
        label=label,
        param_names=[n for n, _ in params],
    )


def landscape_subset(
    task: TaskData, transform: Callable[[Any], torch.Tensor], n_images: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed subset of the training split: ``min(n_images, N)`` indices drawn without replacement by
    ``numpy.random.default_rng(seed)``, sorted, transformed with the (evaluation) ``transform``."""
    n_total = len(task.train)
    if n_total == 0:
        raise UserError("the run's training set is empty: no images for the loss landscape")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n_total, size=min(n_images, n_total), replace=False))
    images, labels = [], []
    for i in idx.tolist():
        img, lab = task.train[i]
        images.append(transform(img))
        labels.append(int(lab))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


@dataclass
class PreparedRun:
    """A run's model and its fixed landscape subset, ready to scan (also used by the tests)."""

    model: PromptedCLIP
    images: torch.Tensor
    labels: torch.Tensor
    config: RunConfig


def prepare_run(
    run_dir: str | Path,
    *,
    n_images: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
    build_task: TaskBuilder | None = None,
) -> PreparedRun:
    """Load ``run_dir/checkpoint.pt`` and rebuild its task from the checkpoint's config.

    ``build_task`` defaults to :func:`trainer.data.tasks.task_from_config`, looked up at call time (so a test may
    monkeypatch it there).
    """
    from trainer.data import tasks
    from trainer.models import preprocess_spec
    from trainer.transforms import build_transform

    path = Path(run_dir) / CHECKPOINT_NAME
    run = load_prompted(path, device)
    cfg = RunConfig.model_validate(run.config)
    task = (build_task or tasks.task_from_config)(cfg.data)
    if list(task.class_names) != list(run.class_names):
        raise UserError(
            f"{path}: the rebuilt task's classes ({len(task.class_names)}) differ from the checkpoint's "
            f"({len(run.class_names)}): the dataset changed since training; point data.* at the original data"
        )
    transform = build_transform(preprocess_spec(run.model.clip), train=False)
    images, labels = landscape_subset(task, transform, n_images, seed)
    dev = torch.device(device)
    return PreparedRun(run.model, images.to(dev), labels.to(dev), cfg)


def run_landscape(
    run_dir: str | Path,
    *,
    label: str = "",
    n_images: int = 256,
    n_directions: int = 3,
    n_points: int = 21,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    build_task: TaskBuilder | None = None,
) -> Landscape:
    """The landscape of one run directory (see the module docstring for what is measured)."""
    grid = alpha_grid(n_points)
    prepared = prepare_run(run_dir, n_images=n_images, seed=seed, device=device, build_task=build_task)
    result = scan_directions(
        prepared.model,
        prepared.images,
        prepared.labels,
        alphas=grid,
        n_directions=n_directions,
        seed=seed,
        batch_size=batch_size,
        label=label,
    )
    if not math.isfinite(result.center_loss):
        _logger.warning("landscape %s: the centre loss is not finite (%s)", label, result.center_loss)
    _logger.info(
        "landscape %s: L(theta) %.4f, sharpness %.4f, max rise %.4f (%d images, %d directions)",
        label or run_dir,
        result.center_loss,
        result.sharpness,
        result.max_rise,
        result.n_images,
        n_directions,
    )
    return result
