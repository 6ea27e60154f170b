"""Which text path a bundle's ``/register`` uses by default: measured, not assumed.

A prompt-tuned bundle can embed a new class name three ways (``learned`` context, ``handwritten``
template through the frozen tower, their ``ensemble``; :data:`serving.runtime.bundle.TEXT_PATHS`). Which
one serves unseen names best depends on the run: on the demo's toy run (CoOp context + deep visual prompts)
the hand-written path wins on the novel classes by 7 points, on KgCoOp runs the three agree. So for a run
on the toy world, whose novel classes are known, the exporter measures the novel-class top-1 of each path
on the toy world's novel test set and records the best as ``prompt.default_text_path`` (with the figures);
for any other run it records ``learned`` (``--default-text-path`` overrides both).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

_logger = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(frozen=True)
class TextPathChoice:
    """The manifest's ``prompt`` entries on the default text path (``PromptInfo`` fields of the same names)."""

    default_text_path: str
    default_text_path_source: str
    text_path_novel_top1: dict[str, float] | None = None  # only when measured


def toy_novel_top1(bundle: Any, seed: int = 0, per_class: int = 25) -> dict[str, float]:
    """Novel-class top-1 (among the novel classes) of each text path the bundle offers, on the toy world."""
    from trainer.toyworld.task import ToyImages, novel_class_names
    from trainer.toyworld.world import Split

    names = novel_class_names()
    test = ToyImages(names, [per_class] * len(names), Split.NOVEL_TEST, seed)
    pixels = np.stack([bundle.preprocess(test.load(i)) for i in range(len(test))])
    images = bundle.embed_images(pixels)
    targets = np.asarray(test.targets)
    out = {}
    for path in bundle.text_paths:
        text = bundle.embed_texts(names, text_path=path)
        out[path] = round(float(((images @ text.T).argmax(axis=1) == targets).mean()), 4)
    return out


def choose_default(
    bundle: Any, data_kind: str | None, data_seed: int, requested: str = AUTO
) -> TextPathChoice:
    """The manifest's ``prompt`` entries: ``default_text_path`` and how it was chosen."""
    if requested != AUTO:
        if requested not in bundle.text_paths:
            raise ValueError(
                f"--default-text-path {requested} is not available in this bundle ({bundle.text_paths})"
            )
        return TextPathChoice(requested, "requested")
    if data_kind != "toy" or len(bundle.text_paths) == 1 or int(bundle.n_ctx) == 0:
        return TextPathChoice("learned", "default")
    scores = toy_novel_top1(bundle, seed=data_seed)
    best = max(scores, key=lambda p: (scores[p], p == "learned"))
    _logger.info("text paths on the toy world's novel classes: %s -> default %s", scores, best)
    return TextPathChoice(
        best, "measured: toy world novel test set, top-1 among the novel classes", text_path_novel_top1=scores
    )
