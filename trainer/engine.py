"""The training step, one epoch, and prediction. Plain typed arguments only.

One ``train_step`` serves every optimizer:

- plain (sgd / adamw): forward, backward, [unscale], clip, step.
- one pass with a perturbation (GNM): ``first_step()`` perturbs theta *before* the forward; forward and
  backward at theta + eps; [unscale]; ``restore()`` copies theta back; clip; base step.
- two passes (SAM / ASAM / GCSAM): forward and backward at theta (under DDP ``no_sync``: each rank forms its
  own ascent direction, as in the SAM paper's per-accelerator epsilon); ``first_step(grad_scale=S)`` builds
  eps from the *unscaled* gradient g / S and perturbs; forward and backward at theta + eps (synchronised,
  except for GCSAM whose cosine rule runs per rank on local gradients, after which the engine all-reduces
  the final gradient itself); [unscale]; ``restore()``; clip; base step.

AMP order with a GradScaler (fp16): every backward runs on ``scaler.scale(loss)``; pass-1 gradients are
checked for inf/NaN (a skipped step halves the scale and leaves theta untouched); after the final backward
``scaler.unscale_(base)`` runs *before* ``restore()`` (GCSAM mixes g0 and g1, both must be unscaled) and
before clipping; ``scaler.step(base)`` then skips the update on inf/NaN, and theta has already been
restored either way; ``scaler.update()`` last. Gradient clipping acts on the final gradient only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from trainer.distributed import all_reduce_mean_
from trainer.optim import SharpnessOptimizer
from trainer.prompts import PromptedCLIP
from trainer.reweight import StepLoss

Batch = tuple[torch.Tensor, torch.Tensor]
AutocastFactory = Callable[[], contextlib.AbstractContextManager[None]]


@dataclass
class StepOutput:
    loss: float  # mean loss of the (first) forward pass, regulariser included
    correct: int
    count: int
    skipped: bool = False  # the GradScaler found inf/NaN and skipped the update
    regulariser: float | None = None  # the text regulariser's value in the (first) forward pass


def autocast_factory(device: torch.device, precision: str) -> AutocastFactory:
    """bf16 / fp16 autocast on the given device, or a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16

    def factory() -> contextlib.AbstractContextManager[None]:
        return torch.autocast(device_type=device.type, dtype=dtype)

    return factory


def _grads_finite(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _passes(sharp: SharpnessOptimizer | None, optimizer: torch.optim.Optimizer, micro_batches: int) -> int:
    """Forward+backward passes per step; two-pass optimizers refuse gradient accumulation."""
    passes = sharp.passes if sharp is not None else 1
    if passes == 2 and micro_batches != 1:
        raise ValueError(
            f"gradient accumulation ({micro_batches} micro-batches) is not supported with the two-pass "
            f"optimizer {type(optimizer).__name__}: use accumulation 1"
        )
    return passes


def _ascent_overflowed(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, params: list[torch.Tensor]
) -> bool:
    """fp16 overflow in the ascent pass: nothing was perturbed; skip the step like GradScaler would."""
    if scaler is None or _grads_finite(params):
        return False
    optimizer.zero_grad(set_to_none=True)
    scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    return True


def _update(
    base: torch.optim.Optimizer,
    sharp: SharpnessOptimizer | None,
    params: list[torch.Tensor],
    *,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float | None,
    is_ddp: bool,
) -> bool:
    """The end of a step: unscale, restore theta (sharpness optimizers), clip, step the base optimizer.
    True when the scaler skipped the step (an fp16 overflow)."""
    if scaler is not None:
        scaler.unscale_(base)
    if sharp is not None:
        sharp.restore()  # exact copy of theta_old; GCSAM writes its constrained gradient here
        if sharp.local_final_grad and is_ddp:
            all_reduce_mean_([p.grad for p in params if p.grad is not None])
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is None:
        base.step()
        return False
    scale_before = scaler.get_scale()
    scaler.step(base)
    scaler.update()
    return scaler.get_scale() < scale_before


def train_step(
    model: nn.Module,
    micro_batches: list[Batch],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast: AutocastFactory = contextlib.nullcontext,
    grad_clip: float | None = None,
    regulariser: nn.Module | None = None,
) -> StepOutput:
    """One optimizer step over one or more micro-batches (gradient accumulation: one-pass optimizers only).

    ``model`` maps images to logits (a :class:`PromptedCLIP`, possibly wrapped in DDP). ``regulariser`` maps
    the class text features of the forward pass to a scalar added to the loss (KgCoOp's term,
    :mod:`trainer.kgcoop`) in every pass, so two-pass optimizers form their ascent from it too; with k
    micro-batches each adds 1/k of it.
    """
    sharp: SharpnessOptimizer | None = optimizer if isinstance(optimizer, SharpnessOptimizer) else None
    passes = _passes(sharp, optimizer, len(micro_batches))
    base = sharp.base_optimizer if sharp is not None else optimizer
    params = [p for g in base.param_groups for p in g["params"] if p.requires_grad]
    is_ddp = isinstance(model, DDP)
    k = len(micro_batches)
    # k > 1: every micro-batch's summed loss is divided by the whole step's normaliser (the count, or for DRW
    # the sum of the weights of all its labels), so k micro-batches give the gradient of one batch
    step_norm = _step_normaliser(loss_fn, [labels for _, labels in micro_batches]) if k > 1 else None

    def forward_backward(
        images: torch.Tensor, labels: torch.Tensor, sync: bool
    ) -> tuple[float, int, float | None]:
        ctx = cast(DDP, model).no_sync() if (is_ddp and not sync) else contextlib.nullcontext()
        reg_value: float | None = None
        with ctx:
            with autocast():
                if regulariser is None:
                    logits = model(images)
                else:
                    logits, text = model(images, return_text=True)
            if step_norm is None:
                loss = loss_fn(logits.float(), labels)
            else:
                loss = _summed_loss(loss_fn, logits.float(), labels) / step_norm
            if regulariser is not None:
                reg = regulariser(text.float())
                reg_value = float(reg.detach())
                loss = loss + reg / k
            (scaler.scale(loss) if scaler is not None else loss).backward()
        correct = int((logits.detach().argmax(-1) == labels).sum())
        return float(loss.detach()), correct, reg_value

    optimizer.zero_grad(set_to_none=True)
    if sharp is not None and sharp.perturb_before_forward:
        sharp.first_step()  # GNM: theta <- theta + eps before the only forward

    losses, correct, count = [], 0, 0
    reg_value: float | None = None
    if passes == 2:
        images, labels = micro_batches[0]
        loss, correct, reg_value = forward_backward(images, labels, sync=False)
        losses.append(loss)
        count = len(labels)
        assert sharp is not None
        if _ascent_overflowed(optimizer, scaler, params):
            return StepOutput(loss, correct, count, skipped=True, regulariser=reg_value)
        sharp.first_step(zero_grad=True, grad_scale=scaler.get_scale() if scaler is not None else 1.0)
        forward_backward(images, labels, sync=not sharp.local_final_grad)
    else:
        for i, (images, labels) in enumerate(micro_batches):
            loss, c, r = forward_backward(images, labels, sync=(i == k - 1))
            losses.append(loss)
            correct += c
            count += len(labels)
            reg_value = r if reg_value is None else reg_value

    skipped = _update(base, sharp, params, scaler=scaler, grad_clip=grad_clip, is_ddp=is_ddp)
    # k > 1: the micro-batch terms add up to the whole step's loss
    return StepOutput(float(np.sum(losses)) if k > 1 else losses[0], correct, count, skipped, reg_value)


def _summed_loss(loss_fn: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(loss_fn, StepLoss):
        return loss_fn.summed(logits, labels)
    return loss_fn(logits, labels) * labels.numel()  # any other mean loss: count-normalised


def _step_normaliser(loss_fn: nn.Module, labels: list[torch.Tensor]) -> torch.Tensor:
    if isinstance(loss_fn, StepLoss):
        return torch.stack([loss_fn.normaliser(y) for y in labels]).sum()
    return torch.tensor(float(sum(y.numel() for y in labels)))


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _chunks(it: Iterable[Batch], k: int) -> Iterator[list[Batch]]:
    group: list[Batch] = []
    for b in it:
        group.append(b)
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    steps: int
    skipped: int
    regulariser: float | None = None  # mean over the steps of the text regulariser's value


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast: AutocastFactory = contextlib.nullcontext,
    grad_clip: float | None = None,
    accumulation: int = 1,
    progress: bool = True,
    description: str = "train",
    regulariser: nn.Module | None = None,
) -> EpochStats:
    model.train()
    total_loss, total_correct, total_count, steps, skipped = 0.0, 0, 0, 0, 0
    reg_values: list[float] = []
    bar = tqdm(_chunks(loader, accumulation), desc=description, disable=not progress, leave=False)
    for group in bar:
        batches = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in group]
        out = train_step(
            model,
            batches,
            loss_fn,
            optimizer,
            scaler=scaler,
            autocast=autocast,
            grad_clip=grad_clip,
            regulariser=regulariser,
        )
        scheduler.step()
        if out.regulariser is not None:
            reg_values.append(out.regulariser)
        total_loss += out.loss * out.count
        total_correct += out.correct
        total_count += out.count
        steps += 1
        skipped += int(out.skipped)
        bar.set_postfix(loss=f"{out.loss:.3f}")
    return EpochStats(
        loss=total_loss / max(1, total_count),
        accuracy=total_correct / max(1, total_count),
        steps=steps,
        skipped=skipped,
        regulariser=float(np.mean(reg_values)) if reg_values else None,
    )


@torch.no_grad()
def predict(
    model: PromptedCLIP,
    loader: Iterable[Batch],
    class_names: list[str],
    device: torch.device,
    *,
    autocast: AutocastFactory = contextlib.nullcontext,
    progress: bool = True,
    description: str = "eval",
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities [N, C] over ``class_names`` and the targets [N]."""
    model.eval()
    with autocast():
        text = model.encode_names(class_names)  # [C, E]
    probs, targets = [], []
    for images, labels in tqdm(loader, desc=description, disable=not progress, leave=False):
        with autocast():
            logits = model.logits(model.encode_image(images.to(device)), text)
        probs.append(logits.float().softmax(-1).cpu().numpy())
        targets.append(labels.numpy())
    return np.concatenate(probs), np.concatenate(targets)
