"""The one interface every dataset implements, and the task bundle the training loop consumes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset


class LabelledImages(Dataset[tuple[Image.Image, int]]):
    """A labelled image set: ``ds[i] -> (RGB PIL image, label in [0, len(class_names)))``.

    Subclasses set ``class_names`` (clean, human-readable) and ``targets`` (one int per item) and implement
    ``load(i)``. Images are decoded lazily.
    """

    class_names: list[str]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index), self.targets[index]

    def source_file(self, index: int) -> Path | None:
        """The image file item ``index`` is decoded from; ``None`` for images held in memory (CIFAR, the toy
        world), which need no file check."""
        return None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class Transformed(Dataset[tuple[Any, int]]):
    """Apply an image transform (e.g. open_clip's preprocess) on top of a :class:`LabelledImages`."""

    def __init__(self, base: LabelledImages, transform: Callable[[Image.Image], Any]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[index]
        return self.transform(image), label


def class_counts(targets: Sequence[int], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for t in targets:
        counts[t] += 1
    return counts


@dataclass
class TaskData:
    """What a run trains and evaluates on.

    ``train`` and ``test`` share the (base) label space ``train.class_names``. ``novel_test``, when present,
    has its own label space (the novel class names, never seen in training) and is evaluated against its own
    names only, as in the CoCoOp base-to-novel protocol.
    """

    train: LabelledImages
    test: LabelledImages
    novel_test: LabelledImages | None = None

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    @property
    def train_counts(self) -> list[int]:
        return class_counts(self.train.targets, self.train.num_classes)
