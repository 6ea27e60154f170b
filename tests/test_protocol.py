"""The papers' protocols: base / novel / HM from sample top-1, post-hoc logit adjustment in evaluation,
model selection on a validation split carved from the training data, DRW under gradient accumulation, the
LR schedule's length with accumulation, and the precision of two-pass optimizers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import TINY_NAME
from tests.synthetic import ColourPatches
from trainer import evaluation, runner, training
from trainer.config import load_config
from trainer.data import tasks
from trainer.data.base import TaskData
from trainer.metrics import LIFT_THRESHOLDS, harmonic_mean
from trainer.prompts import PromptedCLIP


def _prompted(tiny_clip, tiny_tokenizer, names, seed=0):
    torch.manual_seed(seed)
    m = PromptedCLIP(tiny_clip.model, tiny_tokenizer, n_ctx=2, ctx_init=None, vpt_length=2)
    m.set_class_names(names)
    return m


def _unbalanced_task() -> TaskData:
    """Base test 10 / 2 / 2 images, novel test 9 / 1: sample top-1 and mean per-class accuracy differ."""
    return TaskData(
        train=ColourPatches([12, 6, 3], seed=1),
        test=ColourPatches([10, 2, 2], seed=2),
        novel_test=ColourPatches([9, 1], seed=3, names=ColourPatches.NAMES[3:5]),
    )


def _evaluate(tiny_clip, tiny_tokenizer, task, **kw):
    model = _prompted(tiny_clip, tiny_tokenizer, task.class_names)
    return evaluation.evaluate_task(
        model,
        task,
        tiny_clip.preprocess,
        torch.device("cpu"),
        batch_size=8,
        thresholds=LIFT_THRESHOLDS,
        progress=False,
        **kw,
    )


# --------------------------------------------------------------------------------------------- base / novel / HM


def test_novel_and_hm_are_sample_top1_like_dassl(tiny_clip, tiny_tokenizer):
    result = _evaluate(tiny_clip, tiny_tokenizer, _unbalanced_task())
    base, novel = result.base, result.novel
    assert novel is not None and result.hm_rule is not None
    assert not math.isclose(novel.top1, novel.mean_per_class)  # the test below can tell them apart
    assert result.hm == pytest.approx(harmonic_mean(base.top1, novel.top1))
    assert result.hm_mean_per_class == pytest.approx(harmonic_mean(base.mean_per_class, novel.mean_per_class))
    h = result.headline()
    assert h["novel"] == novel.top1 and h["hm"] == result.hm
    assert h["novel_mean_per_class"] == novel.mean_per_class
    assert h["hm_mean_per_class"] == result.hm_mean_per_class
    assert "top-1" in result.hm_rule


# --------------------------------------------------------------------------------------------- accumulation


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 0, 0, 1, 2, 2])


@pytest.mark.parametrize(
    ("loss", "split"),
    [("drw", 3), ("drw", 5), ("none", 5), ("logit_adjust", 4)],
)
def test_accumulated_micro_batches_equal_one_batch(tiny_clip, tiny_tokenizer, loss, split):
    """DRW's weighted mean is normalised by the whole step's sum of weights (and every loss by the whole
    step's count), so k micro-batches of any sizes equal one batch."""
    from trainer.config import OptimConfig, ReweightConfig
    from trainer.engine import train_step
    from trainer.optim import build_optimizer
    from trainer.reweight import build_loss

    images, labels = _batch()
    states, losses = [], []
    for micro in ([(images, labels)], [(images[:split], labels[:split]), (images[split:], labels[split:])]):
        m = _prompted(tiny_clip, tiny_tokenizer, ["red", "green", "blue"])
        opt = build_optimizer(
            [p for p in m.parameters() if p.requires_grad], OptimConfig(name="sgd", lr=1.0, weight_decay=0.0)
        )
        loss_fn = build_loss(ReweightConfig(name=loss, beta=0.999), [100, 10, 2], start_epoch=0)
        losses.append(train_step(m, micro, loss_fn, opt).loss)
        states.append(m.trainable_state_dict())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for key in states[0]:
        diff = (states[0][key] - states[1][key]).abs().max().item()
        assert diff < 1e-5, (key, diff)


def test_schedule_counts_the_last_short_accumulation_group(tmp_path, tiny_clip, monkeypatch):
    """21 images, batch 4 -> 5 batches; accumulation 2 -> 3 optimizer steps per epoch (ceil), none at lr 0."""
    from tests.synthetic import synthetic_task
    from trainer import engine

    assert training.optimizer_steps_per_epoch(5, 2) == 3 and training.optimizer_steps_per_epoch(4, 2) == 2
    monkeypatch.setattr(tasks, "task_from_config", lambda data, problems=None: synthetic_task())
    seen: list[float] = []
    real_step = engine.train_step

    def recording_step(model, micro_batches, loss_fn, optimizer, **kw):
        seen.append(optimizer.param_groups[0]["lr"])
        return real_step(model, micro_batches, loss_fn, optimizer, **kw)

    monkeypatch.setattr(engine, "train_step", recording_step)
    cfg = _cfg(tmp_path, "optim.accumulation=2", "optim.name=gnm", "train.warmup_epochs=0", "train.epochs=2")
    runner.fit(cfg, progress=False)
    assert len(seen) == 6
    assert min(seen) > 0.0, seen  # floor(5 / 2) = 2 steps per epoch would run the last one at lr 0


def _cfg(tmp_path, *extra: str):
    return load_config(
        None,
        [
            f"model.name={TINY_NAME}",
            f"train.out_dir={tmp_path / 'run'}",
            "data.batch_size=4",
            "prompt.vpt_length=2",
            "prompt.ctx_init=null",
            "optim.lr=0.05",
            "train.device=cpu",
            "train.epochs=1",
            *extra,
        ],
    )


# --------------------------------------------------------------------------------------------- post-hoc tau


def test_posthoc_tau_reports_adjusted_groups_beside_the_plain_ones(tiny_clip, tiny_tokenizer):
    from trainer.reweight import posthoc_adjust

    task = TaskData(
        train=ColourPatches([150, 40, 5], seed=1),  # many / medium / few under LIFT's rule
        test=ColourPatches([6, 6, 6], seed=2),
    )
    result = _evaluate(tiny_clip, tiny_tokenizer, task, posthoc_tau=1.0)
    plain, adjusted = result.base, result.base.posthoc
    assert adjusted is not None and adjusted.tau == 1.0
    # recompute from the logits: argmax of z - tau log pi, pi from the training counts
    model = _prompted(tiny_clip, tiny_tokenizer, task.class_names)
    from trainer.engine import predict

    loader = evaluation.eval_loader(task.test, tiny_clip.preprocess, 8, 0)
    probs, targets = predict(model, loader, task.class_names, torch.device("cpu"), progress=False)
    logits = torch.from_numpy(np.log(probs))
    preds = posthoc_adjust(logits, task.train_counts, 1.0).argmax(1).numpy()
    assert adjusted.top1 == pytest.approx(float((preds == targets).mean()))
    per_class = [float((preds[targets == c] == c).mean()) for c in range(3)]
    assert [adjusted.many, adjusted.medium, adjusted.few] == pytest.approx(per_class)
    assert plain.top1 == pytest.approx(float((probs.argmax(1) == targets).mean()))
    h = result.headline()
    assert h["posthoc_few"] == adjusted.few and h["few"] == plain.few
    # off by default: nothing extra
    assert _evaluate(tiny_clip, tiny_tokenizer, task).base.posthoc is None
    assert load_config().eval.posthoc_tau is None


def test_posthoc_tau_favours_the_tail():
    probs = np.array([[0.5, 0.3, 0.2]] * 4)
    out = evaluation.posthoc_summary(probs, np.array([0, 1, 2, 2]), [1000, 100, 10], 1.0, LIFT_THRESHOLDS)
    assert out.top1 == pytest.approx(0.5)  # every sample now goes to the tail class 2


# --------------------------------------------------------------------------------------------- model selection


def test_validation_split_is_carved_from_training_data_per_class():
    from trainer.data.sampling import carve_validation

    ds = ColourPatches([12, 6, 3, 1], seed=1, names=["a", "b", "c", "d"])
    train, val = carve_validation(ds, 0.25, seed=0)
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted(train.indices + val.indices) == list(range(len(ds)))
    assert [val.targets.count(c) for c in range(4)] == [3, 2, 1, 0]  # round(f n), >= 1, a lone image stays
    again, _ = carve_validation(ds, 0.25, seed=0)
    assert again.indices == train.indices


def test_best_val_selects_on_validation_and_ships_the_selected_prompts(tmp_path, tiny_clip, monkeypatch):
    from tests.synthetic import synthetic_task
    from trainer.checkpoint import read_checkpoint

    monkeypatch.setattr(tasks, "task_from_config", lambda data, problems=None: synthetic_task())
    cfg = _cfg(tmp_path, "eval.select=best_val", "eval.val_fraction=0.25", "train.epochs=3", "optim.lr=0.5")
    result = runner.fit(cfg, progress=False)
    lines = [json.loads(x) for x in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    scores = [line["val_mean_per_class"] for line in lines]
    summary = json.loads((result.out_dir / "summary.json").read_text())
    sel = summary["selection"]
    assert sel["rule"] == "best_val" and sel["epoch"] == 1 + scores.index(max(scores))
    assert sel["val_images"] == 6  # 3 + 2 + 1 of the (12, 6, 3) training images
    assert summary["class_counts"] == [9, 4, 2]  # what is left to train on
    ckpt = read_checkpoint(result.out_dir / "checkpoint.pt")
    assert ckpt.best is not None and ckpt.selected is not None
    for key, value in ckpt.best.prompt_state.items():
        assert torch.equal(ckpt.prompt_state[key], value), key
    assert ckpt.selected.epoch == sel["epoch"]
    assert load_config().eval.select == "last"


# --------------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize(
    ("precision", "device", "optim", "vpt", "expected"),
    [
        ("auto", "cuda", "sam", 10, "fp32"),
        ("auto", "cuda", "asam", 10, "fp32"),
        ("auto", "cuda", "gcsam", 4, "fp32"),
        ("auto", "cuda", "gcsam", 0, "bf16"),  # CoOp context only (GCSCoOp): bf16 as before
        ("auto", "cuda", "gnm", 10, "bf16"),  # one pass: no gradient difference
        ("auto", "cuda", "sgd", 10, "bf16"),
        ("auto", "cpu", "sam", 10, "fp32"),
        ("bf16", "cuda", "sam", 10, "bf16"),  # forced: kept, with a warning
        ("fp16", "cuda", "sam", 10, "fp16"),
    ],
)
def test_two_pass_with_visual_prompts_defaults_to_fp32(precision, device, optim, vpt, expected):
    assert training.resolve_precision(precision, device, optim, vpt) == expected


def test_forced_bf16_two_pass_warns(caplog):
    with caplog.at_level("WARNING", logger="trainer.runner"):
        training.resolve_precision("bf16", "cuda", "sam", 10)
    assert "bf16 rounding" in caplog.text
