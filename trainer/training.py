"""A training run made ready: the builders from a :class:`~trainer.config.RunConfig`, and :func:`prepare`.

The builders turn the typed config sections into the library's typed arguments: :func:`build_model` (the
frozen CLIP of ``model`` wrapped with the prompts of ``prompt``), :func:`build_train_loader`,
:func:`build_training` (optimizer, warm-up + cosine schedule, loss) and :func:`resolve_precision`.
``python -m trainer check`` uses them for its timed dry run, :func:`trainer.runner.fit` through
:func:`prepare`, which checks the data, builds the model and everything the epoch loop needs, in the order
that keeps a run reproducible (the seeds are drawn in the same order on every run and on a resume), and
returns a :class:`TrainingRun`.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from trainer import distributed as dist_utils
from trainer.checkpoint import CHECKPOINT_NAME, RunCheckpoint
from trainer.config import DataConfig, RunConfig, resume_conflicts
from trainer.data.base import LabelledImages, TaskData, Transformed
from trainer.data.checks import CheckedTask
from trainer.data.sampling import carve_validation
from trainer.data.tasks import checked_task
from trainer.distributed import DistInfo
from trainer.engine import autocast_factory, predict, warmup_cosine
from trainer.errors import UserError
from trainer.evaluation import EvalReport, Headline, eval_loader, evaluate_task, evaluation_summary
from trainer.kgcoop import KgCoOpRegulariser, build_kg_regulariser
from trainer.metrics import ShotThresholds
from trainer.models import LoadedClip, ModelIdentity, load_model
from trainer.optim import TWO_PASS, build_optimizer
from trainer.prompts import PromptedCLIP
from trainer.reweight import StepLoss, build_loss
from trainer.transforms import build_transform

_logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- builders


def build_model(cfg: RunConfig, device: torch.device) -> tuple[PromptedCLIP, LoadedClip]:
    """The frozen CLIP named by the config, wrapped with the configured prompts."""
    import open_clip

    m, p = cfg.model, cfg.prompt
    loaded = load_model(m.name, m.pretrained, m.config_path, device, quick_gelu=m.quick_gelu)
    model = PromptedCLIP(
        loaded.model,
        open_clip.get_tokenizer(loaded.identity.name),
        n_ctx=p.n_ctx,
        ctx_init=p.ctx_init,
        vpt_length=p.vpt_length,
        vpt_deep=p.vpt_deep,
        template=p.template,
    ).to(device)
    return model, loaded


def optimizer_steps_per_epoch(batches: int, accumulation: int) -> int:
    """Optimizer steps in one epoch of ``batches`` loader batches: ceil(batches / k), since the engine steps
    on the last, shorter group of micro-batches too (a floor would leave the schedule's last steps at lr 0)."""
    return max(1, math.ceil(batches / accumulation))


def resolve_precision(precision: str, device_type: str, optimizer: str, vpt_length: int) -> str:
    """``train.precision`` made concrete: auto is bf16 on CUDA and fp32 elsewhere, except for the two-pass
    optimizers with visual prompts, which default to fp32.

    Their update rests on g(theta + eps) - g(theta), and at the ViT-B/16 + deep-VPT scale SAM's eps (about
    1.6e-4 per element at rho 0.05) is of the order of bf16 rounding: in an emulation rounding made up 89% of
    that difference. A forced bf16 is kept, with a warning.
    """
    fragile = optimizer in TWO_PASS and vpt_length > 0
    if precision == "auto":
        if device_type != "cuda":
            return "fp32"
        if fragile:
            _logger.info(
                "precision auto -> fp32: %s with visual prompts needs fp32 for g(theta + eps) - g(theta)",
                optimizer,
            )
            return "fp32"
        return "bf16"
    if precision == "bf16" and fragile:
        _logger.warning(
            "precision=bf16 with two-pass optimizer %s and visual prompts: bf16 rounding is of the order of the "
            "perturbation's gradient difference (89%% of it in an emulation at ViT-B/16 scale); "
            "train.precision=fp32 (or auto) computes it exactly",
            optimizer,
        )
    return precision


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_train_loader(
    dataset: Transformed,
    data: DataConfig,
    sampler: torch.utils.data.Sampler[int],
    device: torch.device,
    world_size: int = 1,
) -> DataLoader:
    """The training loader: ``data.batch_size`` per process, ``data.num_workers`` workers, the last short
    batch dropped unless it is the only one."""
    return DataLoader(
        dataset,
        batch_size=data.batch_size,
        sampler=sampler,
        num_workers=data.num_workers,
        drop_last=len(dataset) > data.batch_size * max(1, world_size),
        pin_memory=device.type == "cuda",
    )


def build_training(
    cfg: RunConfig,
    model: torch.nn.Module,
    counts: list[int],
    batches_per_epoch: int,
    device: torch.device,
    rank: int = 0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, StepLoss]:
    """The configured optimizer over the model's trainable parameters, its warm-up + cosine schedule (per
    optimizer step) and the training loss: what ``fit`` trains with and ``check``'s dry run times."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, o, seed=cfg.train.seed * 1000 + rank)  # GNM: noise seeded per rank
    base_opt = getattr(optimizer, "base_optimizer", optimizer)
    steps_per_epoch = optimizer_steps_per_epoch(batches_per_epoch, o.accumulation)
    total_steps = steps_per_epoch * cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        base_opt, warmup_cosine(total_steps, int(cfg.train.warmup_epochs * steps_per_epoch))
    )
    loss_fn = build_loss(cfg.reweight, counts, start_epoch=cfg.drw_epoch()).to(device)
    return optimizer, scheduler, loss_fn


# ----------------------------------------------------------------------------------------------- the run


@dataclass
class EpochRecord:
    """One line of ``metrics.jsonl``."""

    epoch: int
    train_loss: float
    train_acc: float
    lr: float
    reweight_active: bool
    noise_factor: float | None
    skipped_steps: int
    kg_distance: float | None  # KgCoOp: 1 - mean cos(learned, hand-written), mean over the steps
    seconds: float
    eval: Headline | None = None
    val_mean_per_class: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EpochRecord:
        """A parsed ``metrics.jsonl`` line; fields added later than the line default to empty."""
        ev = d.get("eval")
        return cls(
            epoch=int(d["epoch"]),
            train_loss=float(d["train_loss"]),
            train_acc=float(d["train_acc"]),
            lr=float(d["lr"]),
            reweight_active=bool(d.get("reweight_active", False)),
            noise_factor=None if d.get("noise_factor") is None else float(d["noise_factor"]),
            skipped_steps=int(d.get("skipped_steps") or 0),
            kg_distance=None if d.get("kg_distance") is None else float(d["kg_distance"]),
            seconds=float(d.get("seconds") or 0.0),
            eval={str(k): None if v is None else float(v) for k, v in ev.items()}
            if isinstance(ev, Mapping)
            else None,
            val_mean_per_class=None
            if d.get("val_mean_per_class") is None
            else float(d["val_mean_per_class"]),
        )

    def to_json(self) -> str:
        d = asdict(self)
        for key in ("eval", "val_mean_per_class"):  # present only when the epoch evaluated
            if d[key] is None:
                del d[key]
        return json.dumps(d)


@dataclass
class TrainingRun:
    """Everything the epoch loop of :func:`trainer.runner.fit` works with, built by :func:`prepare`."""

    config: RunConfig
    out: Path
    saved: RunCheckpoint | None  # the checkpoint to resume from
    info: DistInfo
    device: torch.device
    precision: str
    progress: bool
    checked: CheckedTask
    task: TaskData  # the checked task, less the validation split under best_val
    val_ds: LabelledImages | None
    model: PromptedCLIP
    loaded: LoadedClip
    thresholds: ShotThresholds
    kg: KgCoOpRegulariser | None
    sampler: torch.utils.data.Sampler[int]
    generator: torch.Generator
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: StepLoss
    scaler: torch.amp.GradScaler | None

    @property
    def ckpt_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    @property
    def counts(self) -> list[int]:
        return self.task.train_counts

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose parameter groups hold the learning rate (the base of a sharpness wrapper)."""
        return getattr(self.optimizer, "base_optimizer", self.optimizer)

    def evaluate(
        self,
        model: PromptedCLIP,
        predictions_dir: Path | None = None,
        zero_shot_per_class: list[float] | None = None,
    ) -> EvalReport:
        """:func:`~trainer.evaluation.evaluate_task` of ``model`` on the run's task and settings."""
        cfg = self.config
        return evaluate_task(
            model,
            self.task,
            self.loaded.preprocess,
            self.device,
            batch_size=cfg.data.eval_batch_size,
            thresholds=self.thresholds,
            workers=cfg.data.num_workers,
            progress=self.progress,
            precision=self.precision,
            predictions_dir=predictions_dir,
            zero_shot_per_class=zero_shot_per_class,
            posthoc_tau=cfg.eval.posthoc_tau,
        )

    def val_score(self) -> float:
        """Mean per-class accuracy on the validation split (model selection never sees the test set)."""
        assert self.val_ds is not None
        d = self.config.data
        vprobs, vtargets = predict(
            self.model,
            eval_loader(self.val_ds, self.loaded.preprocess, d.eval_batch_size, d.num_workers),
            self.task.class_names,
            self.device,
            autocast=autocast_factory(self.device, self.precision),
            progress=False,
            description="eval val",
        )
        return evaluation_summary(
            vprobs.argmax(1), vtargets, self.counts, None, self.thresholds
        ).mean_per_class

    def train_model(self) -> torch.nn.Module:
        """The module the loop trains: the model, compiled (``train.compile`` on CUDA), DDP-wrapped."""
        model: torch.nn.Module = self.model
        if self.config.train.compile and self.device.type == "cuda":
            model = torch.compile(model)  # type: ignore[assignment]
        if self.info.enabled:
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model


def resumable_checkpoint(cfg: RunConfig) -> RunCheckpoint | None:
    """``out_dir/checkpoint.pt`` when it exists and ``train.resume`` allows it; a checkpoint written with
    a different config (outside :data:`trainer.config.RESUME_FREE_FIELDS`) is refused, not silently
    continued under the new settings."""
    ckpt_path = Path(cfg.train.out_dir) / CHECKPOINT_NAME
    if not (cfg.train.resume and ckpt_path.exists()):
        return None
    saved = RunCheckpoint.load(ckpt_path)
    if conflicts := resume_conflicts(saved.config, cfg):
        shown = "; ".join(conflicts[:4]) + (f"; and {len(conflicts) - 4} more" if len(conflicts) > 4 else "")
        raise UserError(
            f"{ckpt_path} was written with another config ({shown}): pass --out NEW_DIR for a new run, "
            "or --set train.resume=false to start this folder over"
        )
    return saved


def resume_data_conflicts(
    saved: RunCheckpoint, identity: ModelIdentity, class_names: list[str], counts: list[int]
) -> list[str]:
    """What differs between the model / data a checkpoint was trained on and the ones built now."""
    old, out = saved.identity, []
    if old.name != identity.name:
        out.append(f"model {old.name!r} -> {identity.name!r}")
    elif old.weights_sha256 and identity.weights_sha256:
        if old.weights_sha256 != identity.weights_sha256:
            out.append(f"model weights sha256 {old.weights_sha256[:12]} -> {identity.weights_sha256[:12]}")
    elif old.pretrained != identity.pretrained:
        out.append(f"model weights {old.pretrained!r} -> {identity.pretrained!r}")
    if old.quick_gelu is not None and old.quick_gelu != identity.quick_gelu:
        out.append(f"model activation quick_gelu {old.quick_gelu} -> {identity.quick_gelu}")
    if list(saved.class_names) != list(class_names):
        out.append(f"class names ({len(saved.class_names)} saved, {len(class_names)} now)")
    elif list(saved.class_counts) != list(counts):
        out.append("training images per class")
    return out


def _checked_training_task(cfg: RunConfig, checked: CheckedTask) -> tuple[TaskData, LabelledImages | None]:
    """The task to train on (less the validation split under ``best_val``) and that split."""
    task, val_ds = checked.task, None
    if cfg.eval.select == "best_val":  # carved from the training data, before anything is counted
        train_part, val_ds = carve_validation(task.train, cfg.eval.val_fraction, seed=cfg.data.seed)
        task = TaskData(train=train_part, test=task.test, novel_test=task.novel_test)
    if min(counts := task.train_counts) == 0:
        empty = [task.class_names[i] for i, c in enumerate(counts) if c == 0][:5]
        raise UserError(f"classes with no training images: {empty}: fix the data or the long-tail profile")
    return task, val_ds


def prepare(cfg: RunConfig, progress: bool = True, check_args: str = "-c CONFIG") -> TrainingRun:
    """Everything :func:`trainer.runner.fit` needs, cheap checks first: the resumable checkpoint, the
    process group, the data paths, class lists and image files (before any weight is fetched), then the
    model, the KgCoOp reference, the loader, the optimizer, schedule and loss."""
    out, saved = Path(cfg.train.out_dir), resumable_checkpoint(cfg)
    device = dist_utils.resolve_device(cfg.train.device, dist_utils.world_info_from_env())
    info = dist_utils.init_distributed(device)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    progress = progress and info.is_main
    precision = resolve_precision(cfg.train.precision, device.type, cfg.optim.name, cfg.prompt.vpt_length)
    if precision in ("bf16", "fp16") and device.type == "cpu":
        _logger.warning("precision=%s on CPU is slow and approximate; fp32 is recommended there", precision)
    seed_everything(cfg.train.seed)
    checked = checked_task(cfg.data, is_main=info.is_main, progress=progress, check_args=check_args)
    model, loaded = build_model(cfg, device)
    task, val_ds = _checked_training_task(cfg, checked)
    if saved is not None and (
        changed := resume_data_conflicts(saved, loaded.identity, task.class_names, task.train_counts)
    ):
        raise UserError(
            f"{saved.path} was trained on another model or data ({'; '.join(changed)}): pass --out NEW_DIR "
            "for a new run, or --set train.resume=false to start this folder over"
        )
    model.set_class_names(task.class_names)
    # KgCoOp's reference: the frozen text tower over the hand-written template, once, for the training classes
    kg = build_kg_regulariser(model, task.class_names, cfg.prompt.template, cfg.loss.kg_weight)
    train_ds = Transformed(task.train, build_transform(loaded.preprocess, train=cfg.data.augment))
    generator = torch.Generator()
    sampler: torch.utils.data.Sampler[int] = (
        DistributedSampler(train_ds, info.world_size, info.rank, shuffle=True, seed=cfg.train.seed)
        if info.enabled
        else RandomSampler(train_ds, generator=generator)
    )
    loader = build_train_loader(train_ds, cfg.data, sampler, device, world_size=info.world_size)
    optimizer, scheduler, loss_fn = build_training(
        cfg, model, task.train_counts, len(loader), device, info.rank
    )
    return TrainingRun(
        config=cfg,
        out=out,
        saved=saved,
        info=info,
        device=device,
        precision=precision,
        progress=progress,
        checked=checked,
        task=task,
        val_ds=val_ds,
        model=model,
        loaded=loaded,
        thresholds=ShotThresholds(cfg.eval.many_above, cfg.eval.few_below),
        kg=kg,
        sampler=sampler,
        generator=generator,
        loader=loader,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None,
    )
