"""The papers' protocols: base / novel / HM from sample top-1, post-hoc logit adjustment in evaluation,
model selection on a validation split carved from the training data, DRW under gradient accumulation, the
LR schedule's length with accumulation, and the precision of two-pass optimizers."""

from __future__ import annotations

import math

import pytest
import torch

from tests.synthetic import ColourPatches
from trainer import runner
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
    return runner.evaluate_task(
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
    base, novel = result["base"], result["novel"]
    assert not math.isclose(novel["top1"], novel["mean_per_class"])  # the test below can tell them apart
    assert result["hm"] == pytest.approx(harmonic_mean(base["top1"], novel["top1"]))
    assert result["hm_mean_per_class"] == pytest.approx(
        harmonic_mean(base["mean_per_class"], novel["mean_per_class"])
    )
    h = runner.headline(result)
    assert h["novel"] == novel["top1"] and h["hm"] == result["hm"]
    assert h["novel_mean_per_class"] == novel["mean_per_class"]
    assert h["hm_mean_per_class"] == result["hm_mean_per_class"]
    assert "top-1" in result["hm_rule"]
