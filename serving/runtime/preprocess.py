"""open_clip's eval image transform in PIL + numpy (no torch, no torchvision).

open_clip (``image_transform(..., is_train=False)``) composes, on a PIL image:

- ``resize_mode="shortest"``: torchvision ``Resize(S)`` (short side to S, long side ``int(S * long / short)``,
  skipped when already that size; on PIL the resize always antialiases) + ``CenterCrop(S)``
  (offsets ``int(round((dim - S) / 2))``);
- ``"squash"``: ``Resize((S, S))``;
- ``"longest"``: ``ResizeKeepRatio(S, longest=1)`` (``round(dim / ratio)``) + ``CenterCropOrPad(S, fill)``;
- then ``convert("RGB")``, ``ToTensor`` (uint8 / 255 in float32) and ``Normalize(mean, std)``.

This module repeats those PIL calls one for one and the arithmetic in float32, so the pixels are equal to
open_clip's (tests: max abs diff 0.0).

Decisions (recorded in the bundle manifest's ``preprocess`` section and in ``docs/bundle.md``):

- **RGB first.** Every image is converted to RGB *before* resizing, as the trainer's image loader
  (``trainer.data.folder.load_rgb_image``) and the service's decoder (``serving.images.decode_image``) do;
  open_clip's transform alone would resize a ``P`` image with NEAREST (PIL's rule for palettes) and an
  ``RGBA`` image premultiplied. 8-bit modes use PIL's ``convert("RGB")`` (alpha is dropped, not composited;
  CMYK/YCbCr/HSV through PIL's conversions); 16-bit integer modes (``I;16*``, and ``I`` holding values
  above 255) are scaled to 8 bits (``v >> 8``) instead of PIL's saturation to 255; ``F`` is clipped to
  [0, 255]; ``La``/``RGBa``/``PA`` and other exotic modes go through ``RGBA``/``L`` first.
- **EXIF orientation is NOT applied** by default (``exif_transpose: false``): open_clip, the trainer and the
  service decode the stored pixels and ignore the orientation tag, so the model was trained on unrotated
  pixels; rotating only at serving time would make serving differ from training. A bundle whose manifest
  says ``exif_transpose: true`` gets ``PIL.ImageOps.exif_transpose`` before everything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from serving.runtime.manifest import PreprocessInfo

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
RESIZE_MODES = ("shortest", "longest", "squash")

# modes PIL converts to RGB without loss of meaning
_DIRECT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "HSV"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class PreprocessConfig:
    """The model's eval transform (open_clip's ``preprocess_cfg``) plus the EXIF decision."""

    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0
    exif_transpose: bool = False

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be > 0, got {self.image_size}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {sorted(_RESAMPLE)}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s == 0 for s in self.std):
            raise ValueError(f"mean/std must have 3 values and std no zero: {self.mean}, {self.std}")

    @classmethod
    def from_manifest(cls, section: PreprocessInfo) -> PreprocessConfig:
        """Read the manifest's ``preprocess`` section (``crop``, ``convert``, ``antialias`` are descriptive)."""
        return cls(
            image_size=section.image_size,
            mean=section.mean,
            std=section.std,
            interpolation=section.interpolation,
            resize_mode=section.resize_mode,
            fill_color=section.fill_color or 0,
            exif_transpose=section.exif_transpose,
        )

    def to_manifest(self) -> PreprocessInfo:
        """The manifest's ``preprocess`` section."""
        return PreprocessInfo(
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            interpolation=self.interpolation,
            resize_mode=self.resize_mode,
            fill_color=self.fill_color,
            exif_transpose=self.exif_transpose,
            crop="center" if self.resize_mode != "squash" else "none",
            convert="RGB before resize (see docs/bundle.md)",
            antialias=True,
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """The one RGB conversion used before preprocessing (see the module docstring for each mode)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _DIRECT_MODES:
        return image.convert("RGB")
    if mode in _SIXTEEN_BIT or mode == "I":
        arr = np.asarray(image).astype(np.int64)
        if mode == "I" and arr.size and int(arr.max()) <= 255:
            arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        else:
            arr8 = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr8 = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32)), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    for via in ("RGBA", "LA", "RGB", "L"):  # La, RGBa, LAB, ... : whatever PIL can reach
        try:
            return image.convert(via).convert("RGB")
        except (ValueError, OSError):
            continue
    raise ValueError(f"cannot convert an image of mode {mode!r} to RGB")


DRAFT_MARGIN = 2  # a reduced-scale JPEG decode keeps at least 2x the resized size per side


def prepare_image(image: Image.Image, cfg: PreprocessConfig | None) -> Image.Image:
    """Decode an opened (not yet loaded) image for the model: the one decode + RGB path of the project.

    Used by the service's decoder (``serving.images.decode_image``, after its safety checks) and by
    :meth:`serving.runtime.bundle.Bundle.decode`, so ``/classify`` and in-process callers get the same
    pixels. A JPEG larger than :data:`DRAFT_MARGIN` times the model's resized size per side is decoded at
    reduced scale by libjpeg's DCT scaling (``Image.draft``: 1/2, 1/4 or 1/8, the largest reduction that
    keeps that margin), which skips most of the decode work; the antialiased resize that follows still
    shrinks by 2x or more, so the result stays close to a full decode (toy world: top-1 agreement 99.1%,
    embedding cosine >= 0.9994; with no margin, 97.6%). ``cfg=None`` decodes at full scale. Then
    :func:`to_rgb`.
    """
    if cfg is not None and image.format == "JPEG":
        new_w, new_h = _resized_size(*image.size, cfg)
        if new_w > 0 and new_h > 0:
            image.draft(None, (DRAFT_MARGIN * new_w, DRAFT_MARGIN * new_h))
    image.load()
    return to_rgb(image)


def _resized_size(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """(width, height) after open_clip's resize step (torchvision / timm arithmetic)."""
    s = cfg.image_size
    if cfg.resize_mode == "squash":
        return s, s
    if cfg.resize_mode == "longest":  # ResizeKeepRatio(longest=1)
        ratio = max(height / s, width / s)
        return round(width / ratio), round(height / ratio)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = s, int(s * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _center_crop_or_pad(image: Image.Image, size: int, fill: int) -> Image.Image:
    """torchvision ``center_crop`` / open_clip ``center_crop_or_pad`` on a PIL image."""
    width, height = image.size
    if size > width or size > height:
        border = (
            (size - width) // 2 if size > width else 0,
            (size - height) // 2 if size > height else 0,
            (size - width + 1) // 2 if size > width else 0,
            (size - height + 1) // 2 if size > height else 0,
        )
        bands = len(image.getbands())
        image = ImageOps.expand(image, border=border, fill=(fill,) * bands if bands > 1 else fill)
        width, height = image.size
        if width == size and height == size:
            return image
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def resize_and_crop(image: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """RGB conversion, resize and crop: the PIL part of the transform (an RGB ``S x S`` image)."""
    if cfg.exif_transpose:
        image = ImageOps.exif_transpose(image) or image
    image = to_rgb(image)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ValueError(f"image has an empty size {image.size}")
    new_w, new_h = _resized_size(width, height, cfg)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), _RESAMPLE[cfg.interpolation])
    if cfg.resize_mode != "squash":
        image = _center_crop_or_pad(image, cfg.image_size, cfg.fill_color)
    return image


def to_pixels(rgb: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """``ToTensor`` + ``Normalize`` in float32: ``[3, S, S]``."""
    arr = np.asarray(rgb, dtype=np.uint8)  # [H, W, 3]
    x = arr.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def preprocess(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """One PIL image -> normalised float32 pixels ``[3, S, S]`` equal to open_clip's eval transform."""
    return to_pixels(resize_and_crop(image, cfg), cfg)


def preprocess_batch(images: Sequence[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    """Several images -> ``[N, 3, S, S]`` float32."""
    s = cfg.image_size
    out = np.empty((len(images), 3, s, s), dtype=np.float32)
    for i, image in enumerate(images):
        out[i] = preprocess(image, cfg)
    return out
