"""Image transforms: open_clip's evaluation transform, and the named training augmentations of the papers.

Training augmentations (``data.augment``), each ending in the model's own normalisation (its
``preprocess_cfg`` mean / std):

- ``"none"``: the evaluation transform (resize the shortest side, centre crop).
- ``"clip_rrc"``: open_clip's ``image_transform(is_train=True)``, i.e. ``RandomResizedCrop(size,
  scale=(0.9, 1.0))`` with the model's interpolation, **no flip**. The default (the toy world's numbers
  were measured with it).
- ``"coop"``: Dassl's ``["random_resized_crop", "random_flip", "normalize"]`` as CoOp, CoCoOp, KgCoOp and
  GCSCoOp configure it: ``RandomResizedCrop(size, scale=(0.08, 1.0))`` (Dassl's ``INPUT.RRCROP_SCALE``
  default) with the model's interpolation (bicubic for CLIP), then ``RandomHorizontalFlip(0.5)``.
- ``"gnm_cifar"``: GNM-PT's CIFAR-100-LT pipeline (``datasets/cifar100.py``): ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip``, AutoAugment with the CIFAR-10 policy, ``ToTensor``, Cutout (1 hole of 16 px),
  then a bilinear ``Resize(size)`` of the tensor without antialiasing. 32x32 inputs only (CIFAR). Two
  differences remain (docs/recipes.md): the AutoAugment is torchvision's implementation of the policy, and
  the normalisation is the CLIP model's, not GNM-PT's CIFAR statistics (its backbone is not CLIP).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from PIL import Image

from trainer.errors import UserError
from trainer.models import PreprocessSpec

Augment = Literal["none", "clip_rrc", "coop", "gnm_cifar"]
AUGMENTATIONS: tuple[str, ...] = ("none", "clip_rrc", "coop", "gnm_cifar")

COOP_RRC_SCALE = (0.08, 1.0)  # Dassl's INPUT.RRCROP_SCALE
CUTOUT_HOLES = 1  # GNM-PT: Cutout(n_holes=1, length=16)
CUTOUT_LENGTH = 16


def eval_transform(spec: PreprocessSpec) -> Any:
    """open_clip's own evaluation transform for the model's preprocess config."""
    import open_clip

    return open_clip.image_transform(
        spec.image_size,
        is_train=False,
        mean=spec.mean,
        std=spec.std,
        resize_mode=spec.resize_mode,
        interpolation=spec.interpolation,
    )


def _interpolation(name: str) -> Any:
    from torchvision.transforms import InterpolationMode

    return InterpolationMode.BICUBIC if name == "bicubic" else InterpolationMode.BILINEAR


class Cutout:
    """Zero ``holes`` squares of side ``length`` in a [C, H, W] tensor (DeVries & Taylor 2017, as GNM-PT uses
    it: each centre uniform over the image, the square clipped at the borders). Draws from torch's RNG, so
    the DataLoader's per-worker seeding applies."""

    def __init__(self, holes: int = CUTOUT_HOLES, length: int = CUTOUT_LENGTH) -> None:
        self.holes = holes
        self.length = length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        mask = torch.ones(h, w, dtype=img.dtype)
        for _ in range(self.holes):
            y = int(torch.randint(h, ()))
            x = int(torch.randint(w, ()))
            y1, y2 = max(0, y - self.length // 2), min(h, y + self.length // 2)
            x1, x2 = max(0, x - self.length // 2), min(w, x + self.length // 2)
            mask[y1:y2, x1:x2] = 0.0
        return img * mask

    def __repr__(self) -> str:
        return f"Cutout(holes={self.holes}, length={self.length})"


class RequireSize:
    """Refuse images that are not ``size`` x ``size`` (GNM-PT's CIFAR crop assumes 32x32 inputs)."""

    def __init__(self, size: int, augment: str) -> None:
        self.size = size
        self.augment = augment

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size != (self.size, self.size):
            raise UserError(
                f"data.augment={self.augment} is GNM-PT's CIFAR pipeline and needs {self.size}x{self.size} "
                f"images, got {img.size[0]}x{img.size[1]}: use data.augment=coop for other datasets"
            )
        return img

    def __repr__(self) -> str:
        return f"RequireSize({self.size})"


def _to_rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB") if img.mode != "RGB" else img


def train_transform(spec: PreprocessSpec, augment: str) -> Any:
    """The training transform called ``augment`` (one of :data:`AUGMENTATIONS`) for the model's spec."""
    import open_clip
    from torchvision import transforms as T

    if augment == "none":
        return eval_transform(spec)
    if augment == "clip_rrc":
        return open_clip.image_transform(
            spec.image_size,
            is_train=True,
            mean=spec.mean,
            std=spec.std,
            resize_mode=spec.resize_mode,
            interpolation=spec.interpolation,
        )
    normalize = T.Normalize(mean=spec.mean, std=spec.std)
    if augment == "coop":
        return T.Compose(
            [
                T.RandomResizedCrop(
                    spec.image_size, scale=COOP_RRC_SCALE, interpolation=_interpolation(spec.interpolation)
                ),
                T.RandomHorizontalFlip(),
                T.Lambda(_to_rgb),
                T.ToTensor(),
                normalize,
            ]
        )
    if augment == "gnm_cifar":
        return T.Compose(
            [
                T.Lambda(_to_rgb),
                RequireSize(32, augment),
                T.RandomCrop(32, padding=4),
                T.RandomHorizontalFlip(),
                T.AutoAugment(T.AutoAugmentPolicy.CIFAR10),
                T.ToTensor(),
                Cutout(CUTOUT_HOLES, CUTOUT_LENGTH),
                T.Resize(spec.image_size, interpolation=T.InterpolationMode.BILINEAR, antialias=False),
                normalize,
            ]
        )
    raise UserError(f"unknown data.augment {augment!r}: use one of {AUGMENTATIONS}")


def build_transform(spec: PreprocessSpec, train: bool | str) -> Any:
    """The evaluation transform (``train`` False / ``"none"``), or the training augmentation named by
    ``train`` (``"clip_rrc"``, ``"coop"``, ``"gnm_cifar"``; True means ``"clip_rrc"``)."""
    if train is False or train == "none":
        return eval_transform(spec)
    return train_transform(spec, "clip_rrc" if train is True else str(train))
