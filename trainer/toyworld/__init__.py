"""The embedded toy world: a procedural image-text world, its toy CLIP, and the default long-tailed task.

* :mod:`trainer.toyworld.world`: deterministic rendering of coloured shapes and their captions, in a clean
  (pretraining) and a shifted (downstream) domain.
* :mod:`trainer.toyworld.pretrain`: contrastive pretraining of the toy CLIP (``python -m trainer pretrain-toy``),
  saved to ``trainer/assets/toyclip.pt``.
* :mod:`trainer.toyworld.task`: :func:`toy_task`, the long-tailed base-to-novel task in the shifted domain.
* :mod:`trainer.toyworld.evaluate`: zero-shot accuracy and the linear-probe / visual-prompt tuning proxies.
* :mod:`trainer.toyworld.cli`: the ``pretrain-toy`` and ``eval-toy`` command lines.
"""

from trainer.toyworld.task import (
    BASE_COLOURS,
    BASE_SHAPES,
    ToyImages,
    all_class_names,
    base_class_names,
    long_tail_counts,
    novel_class_names,
    toy_task,
)
from trainer.toyworld.world import (
    COLOURS,
    DOMAINS,
    IMAGE_SIZE,
    SHAPES,
    Domain,
    Scene,
    Split,
    caption,
    render_class_image,
    render_image,
    render_item,
    sample_scene,
    vocabulary,
)

__all__ = [
    "BASE_COLOURS",
    "BASE_SHAPES",
    "COLOURS",
    "DOMAINS",
    "IMAGE_SIZE",
    "SHAPES",
    "Domain",
    "Scene",
    "Split",
    "ToyImages",
    "all_class_names",
    "base_class_names",
    "caption",
    "long_tail_counts",
    "novel_class_names",
    "render_class_image",
    "render_image",
    "render_item",
    "sample_scene",
    "toy_task",
    "vocabulary",
]
