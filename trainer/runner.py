"""Orchestration at the edge: turn a :class:`RunConfig` into builders' typed arguments, train, evaluate.

``fit`` writes into ``train.out_dir``: ``checkpoint.pt`` (latest, atomic), ``metrics.jsonl`` (one line per
epoch), ``summary.json`` (final evaluation), ``config.yaml`` (the resolved config).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from trainer import distributed as dist_utils
from trainer.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_NAME, atomic_torch_save, read_checkpoint
from trainer.config import DataConfig, RunConfig, resume_conflicts
from trainer.data.base import LabelledImages, TaskData, Transformed
from trainer.data.checks import CheckedTask, DataFault, check_files
from trainer.data.sampling import carve_validation
from trainer.engine import autocast_factory, predict, train_one_epoch, warmup_cosine
from trainer.errors import UserError
from trainer.evaluation import evaluation_summary, write_per_class_csv, write_summary_json
from trainer.kgcoop import build_kg_regulariser
from trainer.metrics import ShotThresholds, harmonic_mean, thresholds_rule
from trainer.models import LoadedClip, ModelIdentity, PreprocessSpec, load_clip, load_toy_clip
from trainer.optim import TWO_PASS, build_optimizer, epoch_stats, on_epoch
from trainer.prompts import PromptedCLIP
from trainer.reweight import StepLoss, build_loss, log_prior
from trainer.transforms import eval_transform, train_transform

_logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- builders


def build_task(data: DataConfig, problems: list[DataFault] | None = None) -> TaskData:
    """The dataset named by the config, as train / test / novel-test sets (``problems``: see
    :func:`trainer.data.registry.build_task`)."""
    if data.kind == "toy":
        from trainer.toyworld.task import toy_task

        kwargs: dict[str, Any] = {"seed": data.seed}
        if data.imbalance is not None:
            kwargs["imbalance"] = data.imbalance
        if data.n_max is not None:
            kwargs["n_max"] = data.n_max
        return toy_task(**kwargs)
    from trainer.data.registry import build_task as build_dataset_task

    if data.root is None:
        raise UserError(
            f"data.root is required for data.kind={data.kind}: set it to the dataset folder (--set data.root=DIR)"
        )
    return build_dataset_task(
        data.kind,
        data.root,
        imbalance=data.imbalance,
        n_max=data.n_max,
        shots=data.shots,
        base_to_novel=data.base_to_novel,
        seed=data.seed,
        train_file=data.train_file,
        test_file=data.test_file,
        names_file=data.names_file,
        class_order=data.class_order,
        download=data.download,
        problems=problems,
    )


def checked_task(
    data: DataConfig, *, is_main: bool = True, progress: bool = True, check_args: str = "-c CONFIG"
) -> CheckedTask:
    """The task, its data checked before anything expensive (see :func:`trainer.data.checks.check_files`):
    the paths and class lists as it is built, then (``data.scan``) a full decode of every image file it reads.
    Under DDP the main process decodes and the others take its list."""
    problems: list[DataFault] = []
    task = build_task(data, problems)
    return check_files(
        task,
        problems,
        scan=data.scan,
        skip_unreadable=data.skip_unreadable,
        scan_here=is_main,
        share=dist_utils.broadcast_object,
        progress=progress,
        check_args=check_args,
    )


def build_transform(spec: PreprocessSpec, train: bool | str) -> Any:
    """The evaluation transform (``train`` False / ``"none"``), or the training augmentation named by
    ``train`` (``"clip_rrc"``, ``"coop"``, ``"gnm_cifar"``; True means ``"clip_rrc"``; see
    :mod:`trainer.transforms`)."""
    if train is False or train == "none":
        return eval_transform(spec)
    return train_transform(spec, "clip_rrc" if train is True else str(train))


def build_model(cfg: RunConfig, device: torch.device) -> tuple[PromptedCLIP, LoadedClip]:
    """The frozen CLIP named by the config, wrapped with the configured prompts."""
    import open_clip

    m = cfg.model
    if m.name == "flatprompt-toyclip" and m.pretrained is None:
        loaded = load_toy_clip(device)
    else:
        loaded = load_clip(m.name, m.pretrained, m.config_path, device, quick_gelu=m.quick_gelu)
    p = cfg.prompt
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


def _eval_loader(ds: LabelledImages, spec: PreprocessSpec, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(
        Transformed(ds, build_transform(spec, train=False)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
    )


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate_task(
    model: PromptedCLIP,
    task: TaskData,
    spec: PreprocessSpec,
    device: torch.device,
    *,
    batch_size: int,
    thresholds: ShotThresholds,
    workers: int = 0,
    progress: bool = True,
    precision: str = "fp32",
    predictions_dir: Path | None = None,
    zero_shot_per_class: list[float] | None = None,
    posthoc_tau: float | None = None,
) -> dict[str, Any]:
    """Base-class report (top1, per-class, many / medium / few, ECE), novel-class report, harmonic mean.

    With ``predictions_dir``, also writes ``per_class.csv`` (with ``zero_shot_per_class`` beside the tuned
    accuracies when given) and ``predictions_{base,novel}.npz`` (softmax probabilities and targets) there,
    for ``python -m trainer report``. With ``posthoc_tau``, ``base["posthoc"]`` holds the same report for the
    post-hoc logit-adjusted prediction argmax_j (z_j - tau log pi_j), pi from the training counts.
    """
    autocast = autocast_factory(device, precision)
    counts = task.train_counts
    probs, targets = predict(
        model,
        _eval_loader(task.test, spec, batch_size, workers),
        task.class_names,
        device,
        autocast=autocast,
        progress=progress,
        description="eval base",
    )
    base = evaluation_summary(probs.argmax(1), targets, counts, probs, thresholds)
    if posthoc_tau is not None:
        base["posthoc"] = posthoc_summary(probs, targets, counts, posthoc_tau, thresholds)
    result: dict[str, Any] = {"base": base, "shot_rule": thresholds_rule(thresholds)}
    if predictions_dir is not None:
        np.savez_compressed(predictions_dir / "predictions_base.npz", probs=probs, targets=targets)
        write_per_class_csv(
            predictions_dir / "per_class.csv",
            task.class_names,
            counts,
            base["per_class"],
            thresholds,
            zero_shot_acc=zero_shot_per_class,
        )
    if task.novel_test is not None:
        nprobs, ntargets = predict(
            model,
            _eval_loader(task.novel_test, spec, batch_size, workers),
            task.novel_test.class_names,
            device,
            autocast=autocast,
            progress=progress,
            description="eval novel",
        )
        novel = evaluation_summary(
            nprobs.argmax(1), ntargets, [0] * task.novel_test.num_classes, nprobs, thresholds
        )
        result["novel"] = {k: novel[k] for k in ("top1", "mean_per_class", "per_class", "ece", "num_test")}
        # HM of the sample top-1 accuracies, as Dassl's evaluator reports it (CoCoOp, KgCoOp, GCSCoOp); the
        # HM of the mean per-class accuracies is kept beside it
        result["hm"] = harmonic_mean(float(base["top1"]), float(novel["top1"]))
        result["hm_mean_per_class"] = harmonic_mean(
            float(base["mean_per_class"]), float(novel["mean_per_class"])
        )
        result["hm_rule"] = HM_RULE
        if predictions_dir is not None:
            np.savez_compressed(predictions_dir / "predictions_novel.npz", probs=nprobs, targets=ntargets)
    return result


HM_RULE = "base / novel / hm: sample top-1 (Dassl's evaluator, CoCoOp protocol); *_mean_per_class: per class"


def posthoc_summary(
    probs: np.ndarray,
    targets: np.ndarray,
    counts: list[int],
    tau: float,
    thresholds: ShotThresholds,
) -> dict[str, Any]:
    """top1 / mean per class / many / medium / few of the post-hoc logit-adjusted prediction.

    argmax_j (log p_j - tau log pi_j) = argmax_j (z_j - tau log pi_j), since log softmax shifts every logit of
    a row by the same constant; probabilities that underflowed to 0 stay -inf (their logits are > 87 below
    the row's maximum, far beyond any adjustment tau * log(n_max / n_min)).
    """
    with np.errstate(divide="ignore"):
        log_p = np.log(np.asarray(probs, dtype=np.float64))
    adjusted = log_p - tau * log_prior(counts).double().numpy()[None, :]
    report = evaluation_summary(adjusted.argmax(1), targets, counts, None, thresholds)
    return {
        "tau": float(tau),
        **{k: report[k] for k in ("top1", "mean_per_class", "many", "medium", "few", "per_class")},
    }


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """The numbers people compare: overall, many / medium / few, novel and HM (sample top-1, as the
    base-to-novel papers report them), plus the per-class versions of novel and HM."""
    b = result["base"]
    out: dict[str, float | None] = {
        "base_top1": b["top1"],
        "base_mean_per_class": b["mean_per_class"],
        "many": b["many"],
        "medium": b["medium"],
        "few": b["few"],
        "ece": b.get("ece"),
    }
    if "posthoc" in b:
        for key in ("top1", "many", "medium", "few"):
            out[f"posthoc_{key}"] = b["posthoc"][key]
    if "novel" in result:
        out["novel"] = result["novel"]["top1"]
        out["hm"] = result["hm"]
        out["novel_mean_per_class"] = result["novel"]["mean_per_class"]
        out["hm_mean_per_class"] = result.get("hm_mean_per_class")
    return out


# ----------------------------------------------------------------------------------------------- fit


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


def _seed_everything(seed: int) -> None:
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


@dataclass
class FitResult:
    out_dir: Path
    zero_shot: dict[str, float | None] | None
    final: dict[str, float | None]


RUN_OUTPUTS = ("summary.json", "per_class.csv", "predictions_base.npz", "predictions_novel.npz")


def _resume_data_conflicts(
    saved: dict[str, Any], identity: ModelIdentity, class_names: list[str], counts: list[int]
) -> list[str]:
    """What differs between the model / data a checkpoint was trained on and the ones built now."""
    old = saved.get("identity") or {}
    out = []
    if old.get("name", identity.name) != identity.name:
        out.append(f"model {old['name']!r} -> {identity.name!r}")
    elif old.get("weights_sha256") and identity.weights_sha256:
        if old["weights_sha256"] != identity.weights_sha256:
            out.append(f"model weights sha256 {old['weights_sha256'][:12]} -> {identity.weights_sha256[:12]}")
    elif old.get("pretrained") != identity.pretrained:
        out.append(f"model weights {old.get('pretrained')!r} -> {identity.pretrained!r}")
    if old.get("quick_gelu") is not None and old["quick_gelu"] != identity.quick_gelu:
        out.append(f"model activation quick_gelu {old['quick_gelu']} -> {identity.quick_gelu}")
    if list(saved.get("class_names", class_names)) != list(class_names):
        out.append(f"class names ({len(saved['class_names'])} saved, {len(class_names)} now)")
    elif list(saved.get("class_counts", counts)) != list(counts):
        out.append("training images per class")
    return out


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

    A checkpoint written with a different config (outside :data:`trainer.config.RESUME_FREE_FIELDS`) is refused, not
    silently continued under the new settings.
    """
    out = Path(cfg.train.out_dir)
    ckpt_path = out / CHECKPOINT_NAME
    saved = read_checkpoint(ckpt_path) if cfg.train.resume and ckpt_path.exists() else None
    if saved is not None and (conflicts := resume_conflicts(saved.get("config") or {}, cfg)):
        shown = "; ".join(conflicts[:4]) + (f"; and {len(conflicts) - 4} more" if len(conflicts) > 4 else "")
        raise UserError(
            f"{ckpt_path} was written with another config ({shown}): pass --out NEW_DIR for a new run, "
            "or --set train.resume=false to start this folder over"
        )
    requested = dist_utils.resolve_device(cfg.train.device, dist_utils.world_info_from_env())
    info = dist_utils.init_distributed(requested)
    device = requested
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    progress = progress and info.is_main
    precision = resolve_precision(cfg.train.precision, device.type, cfg.optim.name, cfg.prompt.vpt_length)
    if precision in ("bf16", "fp16") and device.type == "cpu":
        _logger.warning("precision=%s on CPU is slow and approximate; fp32 is recommended there", precision)
    _seed_everything(cfg.train.seed)

    # cheap things first: the data paths, the class lists and every image file are checked before any weight
    # is fetched (the config was checked when it was loaded)
    checked = checked_task(cfg.data, is_main=info.is_main, progress=progress, check_args=check_args)
    task = checked.task
    model, loaded = build_model(cfg, device)
    val_ds: LabelledImages | None = None
    if cfg.eval.select == "best_val":  # carved from the training data, before anything is counted
        train_part, val_ds = carve_validation(task.train, cfg.eval.val_fraction, seed=cfg.data.seed)
        task = TaskData(train=train_part, test=task.test, novel_test=task.novel_test)
    counts = task.train_counts
    if min(counts) == 0:
        empty = [task.class_names[i] for i, c in enumerate(counts) if c == 0][:5]
        raise UserError(f"classes with no training images: {empty}: fix the data or the long-tail profile")
    if saved is not None and (
        changed := _resume_data_conflicts(saved, loaded.identity, task.class_names, counts)
    ):
        raise UserError(
            f"{ckpt_path} was trained on another model or data ({'; '.join(changed)}): pass --out NEW_DIR "
            "for a new run, or --set train.resume=false to start this folder over"
        )
    model.set_class_names(task.class_names)
    # KgCoOp's reference: the frozen text tower over the hand-written template, once, for the training classes
    kg = build_kg_regulariser(model, task.class_names, cfg.prompt.template, cfg.loss.kg_weight)
    spec = loaded.preprocess
    thresholds = ShotThresholds(cfg.eval.many_above, cfg.eval.few_below)

    train_ds = Transformed(task.train, build_transform(spec, train=cfg.data.augment))
    sampler: torch.utils.data.Sampler[int]
    generator = torch.Generator()
    if info.enabled:
        sampler = DistributedSampler(train_ds, info.world_size, info.rank, shuffle=True, seed=cfg.train.seed)
    else:
        sampler = RandomSampler(train_ds, generator=generator)
    loader = build_train_loader(train_ds, cfg.data, sampler, device, world_size=info.world_size)

    o = cfg.optim
    optimizer, scheduler, loss_fn = build_training(cfg, model, counts, len(loader), device, rank=info.rank)
    base_opt = getattr(optimizer, "base_optimizer", optimizer)
    drw_epoch = cfg.drw_epoch()
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    autocast = autocast_factory(device, precision)

    evaluate = functools.partial(
        evaluate_task,
        task=task,
        spec=spec,
        device=device,
        batch_size=cfg.data.eval_batch_size,
        thresholds=thresholds,
        workers=cfg.data.num_workers,
        progress=progress,
        precision=precision,
        posthoc_tau=cfg.eval.posthoc_tau,
    )

    def val_score() -> float:
        """Mean per-class accuracy on the validation split (model selection never sees the test set)."""
        assert val_ds is not None
        vprobs, vtargets = predict(
            model,
            _eval_loader(val_ds, spec, cfg.data.eval_batch_size, cfg.data.num_workers),
            task.class_names,
            device,
            autocast=autocast,
            progress=False,
            description="eval val",
        )
        return float(
            evaluation_summary(vprobs.argmax(1), vtargets, counts, None, thresholds)["mean_per_class"]
        )

    best: dict[str, Any] | None = None  # {"epoch", "val_mean_per_class", "prompt_state"} under best_val
    start_epoch = 0
    zero_shot: dict[str, float | None] | None = None
    zero_shot_per_class: list[float] | None = None  # base classes, for per_class.csv and the report
    if saved is not None:
        ckpt = saved
        model.load_trainable_state_dict(ckpt["prompt_state"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"])
        zero_shot = ckpt.get("zero_shot")
        zero_shot_per_class = ckpt.get("zero_shot_per_class")
        best = ckpt.get("best")
        _logger.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    elif info.is_main:
        zs_model = PromptedCLIP(model.clip, model.tokenizer, n_ctx=0, template=cfg.prompt.template).to(device)
        zs_eval = evaluate(zs_model)
        zero_shot = headline(zs_eval)
        zero_shot_per_class = [float(a) for a in zs_eval["base"]["per_class"]]
        _logger.info("zero-shot: %s", _fmt(zero_shot))

    train_model: torch.nn.Module = model
    if cfg.train.compile and device.type == "cuda":
        train_model = torch.compile(model)  # type: ignore[assignment]
    if info.enabled:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics_path = out / "metrics.jsonl"
    if info.is_main:
        _reset_run_files(out, keep_epochs=start_epoch)
    last_eval: dict[str, Any] | None = None
    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.time()
        # per-epoch seeding makes an epoch-boundary resume reproduce the uninterrupted run exactly
        torch.manual_seed(cfg.train.seed * 7919 + epoch * 31 + info.rank)
        generator.manual_seed(cfg.train.seed * 1000 + epoch)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        loss_fn.set_epoch(epoch)
        on_epoch(optimizer, epoch, drw_epoch)  # GNM: noise x optim.noise_decay from the DRW epoch on
        stats = train_one_epoch(
            train_model,
            loader,
            loss_fn,
            optimizer,
            scheduler,
            device,
            scaler=scaler,
            autocast=autocast,
            grad_clip=o.grad_clip,
            accumulation=o.accumulation,
            progress=progress,
            description=f"epoch {epoch + 1}/{cfg.train.epochs}",
            regulariser=kg,
        )
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": stats.loss,
            "train_acc": stats.accuracy,
            "lr": base_opt.param_groups[0]["lr"],
            "reweight_active": bool(getattr(loss_fn, "active", False)),
            "noise_factor": epoch_stats(optimizer)["noise_factor"],
            "skipped_steps": stats.skipped,
            # KgCoOp: 1 - mean cos(learned, hand-written) of the training classes (mean over the steps)
            "kg_distance": stats.regulariser / kg.weight
            if kg is not None and stats.regulariser is not None
            else None,
            "seconds": round(time.time() - t0, 3),
        }
        is_last = epoch + 1 == cfg.train.epochs
        if info.is_main and ((epoch + 1) % cfg.train.eval_every == 0 or is_last):
            last_eval = evaluate(
                model, predictions_dir=out if is_last else None, zero_shot_per_class=zero_shot_per_class
            )
            record["eval"] = headline(last_eval)
            if val_ds is not None:
                score = val_score()
                record["val_mean_per_class"] = score
                if best is None or score > best["val_mean_per_class"]:
                    state = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
                    best = {"epoch": epoch + 1, "val_mean_per_class": score, "prompt_state": state}
        if info.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            _logger.info(
                "epoch %d: loss %.4f acc %.3f %s",
                epoch + 1,
                stats.loss,
                stats.accuracy,
                _fmt(record.get("eval")),
            )
            atomic_torch_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": cfg.model_dump(),
                    "identity": loaded.identity.to_dict(),
                    "model_config_json": Path(loaded.identity.config_path).read_text()
                    if loaded.identity.config_path
                    else None,
                    "prompt_spec": model.spec(),
                    "prompt_state": model.trainable_state_dict(),
                    "class_names": task.class_names,
                    "class_counts": counts,
                    "novel_class_names": task.novel_test.class_names if task.novel_test else [],
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "epoch": epoch + 1,
                    "zero_shot": zero_shot,
                    "zero_shot_per_class": zero_shot_per_class,
                    "eval": last_eval,
                    "best": best,
                },
                ckpt_path,
            )
        dist_utils.barrier()

    selection: dict[str, Any] = {"rule": cfg.eval.select}
    if cfg.eval.select == "best_val" and info.is_main and best is not None:
        # the selected prompts are what the run's checkpoint (and an export of it) holds from now on
        model.load_trainable_state_dict(best["prompt_state"])
        selection.update(
            epoch=best["epoch"], val_mean_per_class=best["val_mean_per_class"], val_images=len(val_ds or [])
        )
        last_eval = evaluate(model, predictions_dir=out, zero_shot_per_class=zero_shot_per_class)
        ckpt = read_checkpoint(ckpt_path)
        ckpt.pop("_path", None)
        ckpt.update(prompt_state=model.trainable_state_dict(), eval=last_eval, selected=selection)
        atomic_torch_save(ckpt, ckpt_path)
        _logger.info(
            "selected epoch %d (validation mean per class %.4f)", best["epoch"], best["val_mean_per_class"]
        )

    if last_eval is None and info.is_main:  # resumed a finished run: evaluate what is there
        last_eval = evaluate(model, predictions_dir=out, zero_shot_per_class=zero_shot_per_class)
    final = headline(last_eval) if last_eval is not None else {}
    if info.is_main and last_eval is not None:
        summary = {
            "zero_shot": zero_shot,
            "zero_shot_per_class": zero_shot_per_class,
            "final": final,
            "eval": last_eval,
            "selection": selection,
            "class_names": task.class_names,
            "class_counts": counts,
            "data_check": checked.summary(cfg.data.skip_unreadable),
        }
        write_summary_json(out / "summary.json", summary, thresholds, counts)
    dist_utils.cleanup()
    return FitResult(out, zero_shot, final)


def _fmt(h: dict[str, Any] | None) -> str:
    if not h:
        return ""
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in h.items())
