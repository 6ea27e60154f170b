"""``fit``: a prepared run (:func:`trainer.training.prepare`) through its epochs, then its final report.

``fit`` writes into ``train.out_dir``: ``checkpoint.pt`` (:class:`~trainer.checkpoint.RunCheckpoint`, latest,
atomic), ``metrics.jsonl`` (one :class:`EpochRecord` per epoch), ``summary.json``
(:class:`~trainer.evaluation.RunSummary`), ``config.yaml`` (the resolved config), ``per_class.csv`` and the
predictions of the final evaluation.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data.distributed import DistributedSampler

from trainer import distributed as dist_utils
from trainer.checkpoint import BestEpoch, RunCheckpoint
from trainer.config import RunConfig
from trainer.engine import EpochStats, autocast_factory, train_one_epoch
from trainer.errors import UserError
from trainer.evaluation import EvalReport, Headline, RunSummary, Selection
from trainer.optim import epoch_stats, on_epoch
from trainer.prompts import PromptedCLIP
from trainer.training import EpochRecord, TrainingRun, prepare

_logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    out_dir: Path
    zero_shot: Headline | None
    final: Headline


@dataclass
class LoopState:
    """What the epoch loop carries from one epoch to the next (and the checkpoint keeps)."""

    start_epoch: int = 0
    zero_shot: Headline | None = None
    zero_shot_per_class: list[float] | None = None  # base classes, for per_class.csv and the report
    best: BestEpoch | None = None  # under best_val: the best evaluated epoch so far
    last_eval: EvalReport | None = None


RUN_OUTPUTS = ("summary.json", "per_class.csv", "predictions_base.npz", "predictions_novel.npz")


def _reset_run_files(out: Path, keep_epochs: int) -> None:
    """Start ``out`` clean for a run that begins at epoch ``keep_epochs``: metrics.jsonl keeps only the
    lines of the epochs before it (none for a fresh start; a crash between the metrics line and the
    checkpoint leaves one too many), and a fresh start drops the previous run's final outputs."""
    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists():
        lines = metrics_path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("epoch", 0) <= keep_epochs]
        if kept != lines:
            metrics_path.write_text("".join(line + "\n" for line in kept))
    if keep_epochs == 0:
        for name in RUN_OUTPUTS:
            (out / name).unlink(missing_ok=True)


def fit(cfg: RunConfig, progress: bool = True, check_args: str = "-c CONFIG") -> FitResult:
    """Train prompts as configured; resumes from ``out_dir/checkpoint.pt`` when present and allowed.

    A checkpoint written with a different config (outside :data:`trainer.config.RESUME_FREE_FIELDS`), model
    or data is refused, not silently continued under the new settings.
    """
    run = prepare(cfg, progress=progress, check_args=check_args)
    state = _resume_or_baseline(run)
    train_model = run.train_model()
    if run.info.is_main:
        _reset_run_files(run.out, keep_epochs=state.start_epoch)
    for epoch in range(state.start_epoch, cfg.train.epochs):
        record = _train_epoch(run, train_model, epoch)
        if run.info.is_main:
            _evaluate_epoch(run, state, record)
            with open(run.out / "metrics.jsonl", "a") as f:
                f.write(record.to_json() + "\n")
            _logger.info(
                "epoch %d: loss %.4f acc %.3f %s",
                record.epoch,
                record.train_loss,
                record.train_acc,
                _fmt(record.eval),
            )
            _checkpoint(run, state, record.epoch).save(run.ckpt_path)
        dist_utils.barrier()
    selection = _select(run, state)
    if state.last_eval is None and run.info.is_main:  # resumed a finished run: evaluate what is there
        state.last_eval = run.evaluate(run.model, run.out, state.zero_shot_per_class)
    final = state.last_eval.headline() if state.last_eval is not None else {}
    if run.info.is_main and state.last_eval is not None:
        RunSummary(
            zero_shot=state.zero_shot,
            zero_shot_per_class=state.zero_shot_per_class,
            final=final,
            eval=state.last_eval,
            selection=selection,
            class_names=run.task.class_names,
            class_counts=run.counts,
            data_check=run.checked.summary(cfg.data.skip_unreadable),
        ).write(run.out / "summary.json", run.thresholds)
    dist_utils.cleanup()
    return FitResult(run.out, state.zero_shot, final)


def _resume_or_baseline(run: TrainingRun) -> LoopState:
    """The loop's state from the checkpoint being resumed, or a fresh one with the zero-shot baseline (the
    frozen CLIP with the hand-written template) evaluated on the main process."""
    saved = run.saved
    if saved is not None:
        if saved.optimizer is None or saved.scheduler is None:
            raise UserError(
                f"{run.ckpt_path} holds no optimizer / scheduler state (not written by `python -m trainer fit`): "
                "pass --out NEW_DIR, or --set train.resume=false to start this folder over"
            )
        run.model.load_trainable_state_dict(saved.prompt_state)
        run.optimizer.load_state_dict(saved.optimizer)
        run.scheduler.load_state_dict(saved.scheduler)
        if run.scaler is not None and saved.scaler:
            run.scaler.load_state_dict(saved.scaler)
        _logger.info("resumed from %s at epoch %d", run.ckpt_path, saved.epoch)
        return LoopState(saved.epoch, saved.zero_shot, saved.zero_shot_per_class, saved.best)
    state = LoopState()
    if run.info.is_main:
        clip, template = run.model.clip, run.config.prompt.template
        zs_model = PromptedCLIP(clip, run.model.tokenizer, n_ctx=0, template=template).to(run.device)
        zs_eval = run.evaluate(zs_model)
        state.zero_shot = zs_eval.headline()
        state.zero_shot_per_class = [float(a) for a in zs_eval.base.per_class]
        _logger.info("zero-shot: %s", _fmt(state.zero_shot))
    return state


def _train_epoch(run: TrainingRun, train_model: torch.nn.Module, epoch: int) -> EpochRecord:
    """One epoch of training (seeded per epoch, so that an epoch-boundary resume reproduces the
    uninterrupted run exactly), as its ``metrics.jsonl`` record."""
    cfg, optimizer = run.config, run.optimizer
    t0 = time.time()
    torch.manual_seed(cfg.train.seed * 7919 + epoch * 31 + run.info.rank)
    run.generator.manual_seed(cfg.train.seed * 1000 + epoch)
    if isinstance(run.sampler, DistributedSampler):
        run.sampler.set_epoch(epoch)
    run.loss_fn.set_epoch(epoch)
    on_epoch(optimizer, epoch, cfg.drw_epoch())  # GNM: noise x optim.noise_decay from the DRW epoch on
    stats: EpochStats = train_one_epoch(
        train_model,
        run.loader,
        run.loss_fn,
        optimizer,
        run.scheduler,
        run.device,
        scaler=run.scaler,
        autocast=autocast_factory(run.device, run.precision),
        grad_clip=cfg.optim.grad_clip,
        accumulation=cfg.optim.accumulation,
        progress=run.progress,
        description=f"epoch {epoch + 1}/{cfg.train.epochs}",
        regulariser=run.kg,
    )
    return EpochRecord(
        epoch=epoch + 1,
        train_loss=stats.loss,
        train_acc=stats.accuracy,
        lr=run.base_optimizer.param_groups[0]["lr"],
        reweight_active=bool(getattr(run.loss_fn, "active", False)),
        noise_factor=epoch_stats(optimizer)["noise_factor"],
        skipped_steps=stats.skipped,
        kg_distance=stats.regulariser / run.kg.weight
        if run.kg is not None and stats.regulariser is not None
        else None,
        seconds=round(time.time() - t0, 3),
    )


def _evaluate_epoch(run: TrainingRun, state: LoopState, record: EpochRecord) -> None:
    """Evaluate after this epoch when ``train.eval_every`` (or the last epoch) says so, into ``record``;
    under ``best_val``, score the validation split and keep the best epoch's prompts."""
    epochs = run.config.train.epochs
    is_last = record.epoch == epochs
    if not (record.epoch % run.config.train.eval_every == 0 or is_last):
        return
    state.last_eval = run.evaluate(run.model, run.out if is_last else None, state.zero_shot_per_class)
    record.eval = state.last_eval.headline()
    if run.val_ds is not None:
        score = record.val_mean_per_class = run.val_score()
        if state.best is None or score > state.best.val_mean_per_class:
            prompts = {k: v.detach().clone() for k, v in run.model.trainable_state_dict().items()}
            state.best = BestEpoch(record.epoch, score, prompts)


def _checkpoint(run: TrainingRun, state: LoopState, epoch: int) -> RunCheckpoint:
    """The run's checkpoint after ``epoch``."""
    identity = run.loaded.identity
    return RunCheckpoint(
        config=run.config.model_dump(),
        identity=identity,
        model_config_json=Path(identity.config_path).read_text() if identity.config_path else None,
        prompt_spec=run.model.spec(),
        prompt_state=run.model.trainable_state_dict(),
        class_names=run.task.class_names,
        class_counts=run.counts,
        novel_class_names=run.task.novel_test.class_names if run.task.novel_test else [],
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        scaler=run.scaler.state_dict() if run.scaler is not None else None,
        epoch=epoch,
        zero_shot=state.zero_shot,
        zero_shot_per_class=state.zero_shot_per_class,
        eval=state.last_eval,
        best=state.best,
    )


def _select(run: TrainingRun, state: LoopState) -> Selection:
    """``eval.select``: under ``best_val`` load the best epoch's prompts, evaluate them and write them into
    the checkpoint (what an export of the run holds from then on)."""
    cfg, best = run.config, state.best
    if not (cfg.eval.select == "best_val" and run.info.is_main and best is not None):
        return Selection(cfg.eval.select)
    run.model.load_trainable_state_dict(best.prompt_state)
    selection = Selection(cfg.eval.select, best.epoch, best.val_mean_per_class, len(run.val_ds or []))
    state.last_eval = run.evaluate(run.model, run.out, state.zero_shot_per_class)
    ckpt = RunCheckpoint.load(run.ckpt_path)
    ckpt.prompt_state, ckpt.eval, ckpt.selected = run.model.trainable_state_dict(), state.last_eval, selection
    ckpt.save(run.ckpt_path)
    _logger.info("selected epoch %d (validation mean per class %.4f)", best.epoch, best.val_mean_per_class)
    return selection


def _fmt(h: Headline | None) -> str:
    if not h:
        return ""
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in h.items())
