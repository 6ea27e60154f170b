"""A tiny synthetic labelled image set for engine tests (no toy-world rendering, no files)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from PIL import Image

from trainer.data.base import LabelledImages, TaskData


class ColourPatches(LabelledImages):
    """Class k = a flat image of colour k plus seeded noise; learnable in a few steps."""

    PALETTE: ClassVar[list[tuple[int, int, int]]] = [
        (220, 30, 30),
        (30, 200, 30),
        (30, 30, 220),
        (220, 220, 30),
        (200, 30, 200),
        (30, 200, 200),
    ]
    NAMES: ClassVar[list[str]] = ["red", "green", "blue", "yellow", "purple", "cyan"]

    def __init__(self, counts: list[int], seed: int, size: int = 32, names: list[str] | None = None) -> None:
        self.class_names = names or self.NAMES[: len(counts)]
        self.targets = [c for c, n in enumerate(counts) for _ in range(n)]
        self.seed = seed
        self.size = size

    def load(self, index: int) -> Image.Image:
        rng = np.random.default_rng(self.seed * 100_003 + index)
        colour = np.array(self.PALETTE[self.targets[index] % len(self.PALETTE)], dtype=np.float64)
        img = colour + rng.normal(0, 25, size=(self.size, self.size, 3))
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def synthetic_task(counts: tuple[int, ...] = (12, 6, 3), novel: bool = True) -> TaskData:
    counts_l = list(counts)
    k = len(counts_l)
    return TaskData(
        train=ColourPatches(counts_l, seed=1),
        test=ColourPatches([4] * k, seed=2),
        novel_test=ColourPatches([4, 4], seed=3, names=ColourPatches.NAMES[k : k + 2]) if novel else None,
    )
