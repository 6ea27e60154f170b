"""The downstream long-tailed, base-to-novel task of the toy world (rendered in the *shifted* domain).

Classes are colour-shape pairs named ``"<colour> <shape>"`` (``"red star"``).

* **Base** (30 classes): 6 colours (red green blue yellow orange purple) x 5 shapes (circle square triangle
  star heart). The class order interleaves colours and shapes, so the head and the tail both mix all of
  them. Training counts follow the CIFAR-LT profile n_i = floor(n_max * IF^(-i/(C-1))), class 0 the head,
  at least one image per class. The test set is balanced.
* **Novel** (34 classes): every other pair of the world, i.e. each one uses a colour (pink, white) or a shape
  (cross, diamond, moon) that no base class name contains. The toy CLIP saw all of them in pretraining, so
  it knows the words; the downstream training never does. Balanced test set, own label space.

Images render lazily and deterministically (see :func:`trainer.toyworld.world.render_class_image`) and are
cached in memory by the dataset object.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from trainer.data.base import LabelledImages, TaskData
from trainer.toyworld.world import COLOURS, IMAGE_SIZE, SHAPES, Domain, Split, render_class_image

BASE_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple")
BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart")


def base_class_names() -> list[str]:
    """The 30 base classes in label order (class 0 is the head).

    Class i is colour ``i % 6`` with shape ``(i + i // 6) % 5``: every run of 6 consecutive classes has all
    six colours, and each colour meets each shape exactly once.
    """
    nc, ns = len(BASE_COLOURS), len(BASE_SHAPES)
    return [f"{BASE_COLOURS[i % nc]} {BASE_SHAPES[(i + i // nc) % ns]}" for i in range(nc * ns)]


def novel_class_names() -> list[str]:
    """The 34 novel classes: every colour-shape pair of the world that is not a base class."""
    base = set(base_class_names())
    return [f"{c} {s}" for s in SHAPES for c in COLOURS if f"{c} {s}" not in base]


def all_class_names() -> list[str]:
    """Base then novel names (64 = every colour-shape pair of the world)."""
    return base_class_names() + novel_class_names()


def long_tail_counts(num_classes: int, n_max: int, imbalance: float) -> list[int]:
    """n_i = floor(n_max * imbalance^(-i/(C-1))), at least 1 (CIFAR-LT / LDAM-DRW profile).

    Computed exactly as LDAM-DRW's ``imbalance_cifar.py`` does (``int(img_max * imb_factor**(i / (C - 1.0)))``
    with ``imb_factor = 1 / imbalance``), so (500, 100 classes, IF 100) gives 10,847 images.
    """
    if num_classes < 1 or n_max < 1 or imbalance < 1:
        raise ValueError("need num_classes >= 1, n_max >= 1 and imbalance >= 1")
    if num_classes == 1:
        return [n_max]
    factor = 1.0 / imbalance
    return [max(1, int(n_max * factor ** (i / (num_classes - 1.0)))) for i in range(num_classes)]


def split_class_name(name: str) -> tuple[str, str]:
    """``"red star"`` -> ``("red", "star")``."""
    colour, _, shape = name.partition(" ")
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"{name!r} is not a toy-world class (expected '<colour> <shape>')")
    return colour, shape


class ToyImages(LabelledImages):
    """A labelled toy-world image set; item k is the ``ordinal[k]``-th image of class ``targets[k]``."""

    def __init__(
        self,
        class_names: list[str],
        counts: list[int],
        split: Split,
        seed: int = 0,
        domain: str | Domain = "shifted",
        image_size: int = IMAGE_SIZE,
        cache: bool = True,
    ) -> None:
        if len(counts) != len(class_names):
            raise ValueError("one count per class")
        self.class_names = list(class_names)
        self.targets = [c for c, n in enumerate(counts) for _ in range(n)]
        self.ordinal = [j for n in counts for j in range(n)]
        self._pairs = [split_class_name(n) for n in self.class_names]
        self.split = split
        self.seed = seed
        self.domain = domain
        self.image_size = image_size
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def pixels(self, index: int) -> np.ndarray:
        """Item ``index`` as uint8 RGB [S, S, 3]."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        colour, shape = self._pairs[self.targets[index]]
        arr = render_class_image(
            self.seed, self.split, colour, shape, self.ordinal[index], self.domain, self.image_size
        )
        if self._cache is not None:
            self._cache[index] = arr
        return arr

    def load(self, index: int) -> Image.Image:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return Image.fromarray(self.pixels(index % len(self)), "RGB")


def toy_task(
    seed: int = 0,
    n_max: int = 200,
    imbalance: float = 100.0,
    test_per_class: int = 25,
    novel: bool = True,
    domain: str | Domain = "shifted",
    image_size: int = IMAGE_SIZE,
) -> TaskData:
    """The default offline task: long-tailed base classes plus a novel-class test set.

    Args:
        seed: world seed (which images are drawn; class definitions do not change).
        n_max: training images of the head class (class 0).
        imbalance: the imbalance factor IF = n_0 / n_{C-1} of the exponential profile.
        test_per_class: balanced test images per class (base and novel).
        novel: build ``novel_test`` (the 34 held-out colour-shape classes).
        domain: ``"shifted"`` (the default downstream domain) or ``"clean"`` (the pretraining domain).
        image_size: rendered side in pixels (the toy CLIP takes 32).

    With the defaults: 30 base classes, 1,336 training images (200 down to 2), 750 base test images and
    850 novel test images.
    """
    base = base_class_names()
    train = ToyImages(
        base, long_tail_counts(len(base), n_max, imbalance), Split.TRAIN, seed, domain, image_size
    )
    test = ToyImages(base, [test_per_class] * len(base), Split.TEST, seed, domain, image_size)
    novel_test = None
    if novel:
        names = novel_class_names()
        novel_test = ToyImages(
            names, [test_per_class] * len(names), Split.NOVEL_TEST, seed, domain, image_size
        )
    return TaskData(train=train, test=test, novel_test=novel_test)
