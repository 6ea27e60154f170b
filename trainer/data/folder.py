"""ImageFolder datasets (``root/<class folder>/**/<image>``) and the shared image loader.

Class folders are the sorted sub-folders of ``root`` (hidden ones skipped); their names, cleaned by
:mod:`trainer.data.names`, are the class names, and label ``i`` is the ``i``-th folder. Images are found
recursively with the usual extensions, in sorted order, like torchvision's ``ImageFolder``. A long-tail profile
is applied on top by :func:`trainer.data.sampling.apply_long_tail` (see the registry's ``imbalance`` option).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from trainer.data.base import LabelledImages
from trainer.data.names import clean_class_names
from trainer.errors import UserError

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_rgb_image(path: Path) -> Image.Image:
    """Decode one image file as RGB; a missing or undecodable file is a :class:`UserError` naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise UserError(
            f"{path}: image file not found; restore it or remove it from the dataset (or skip unreadable "
            "files: --set data.skip_unreadable=true)."
        ) from e
    except _DECODE_ERRORS as e:
        raise UserError(
            f"{path}: cannot decode image ({type(e).__name__}: {e}); replace the file or remove it from the "
            "dataset (`python -m trainer check` lists every such file; --set data.skip_unreadable=true skips them)."
        ) from e


def decode_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be used as a training image (``None`` when it decodes): the same full RGB decode as
    :func:`load_rgb_image`, with the reason as a short string."""
    try:
        with Image.open(path) as im:
            im.convert("RGB")
    except FileNotFoundError:
        return "file not found"
    except _DECODE_ERRORS as e:
        return f"cannot decode image ({type(e).__name__}: {e})"
    return None


def _list_images(folder: Path, extensions: Sequence[str]) -> list[Path]:
    exts = tuple(e.lower() for e in extensions)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(exts))
    return found


def list_class_folders(root: Path) -> list[str]:
    """The sorted, non-hidden sub-folder names of ``root``."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolderImages(LabelledImages):
    """Images in ``root/<class folder>/...``.

    Args:
        root: the folder holding one sub-folder per class.
        class_folders: the class folders in label order; defaults to ``root``'s sorted sub-folders. Give the
            train split's folders when loading a test split so both share one label space.
        keep_case: keep the folder names' letter case in the class names.
        extensions: the image file suffixes (case-insensitive).
        allow_empty_classes: accept a class folder with no images (test splits); otherwise it is an error.

    Raises:
        UserError: ``root`` missing or without class folders, a folder not in ``class_folders``, an empty class,
            two folders whose names clean to the same class name.
    """

    def __init__(
        self,
        root: str | Path,
        class_folders: Sequence[str] | None = None,
        keep_case: bool = False,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        allow_empty_classes: bool = False,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise UserError(
                f"{self.root}: image folder does not exist; point it at a folder with one sub-folder per class."
            )
        present = list_class_folders(self.root)
        if class_folders is None:
            if not present:
                raise UserError(
                    f"{self.root}: no class sub-folders found; lay images out as root/<class>/<img>."
                )
            class_folders = present
        else:
            extra = sorted(set(present) - set(class_folders))
            if extra:
                raise UserError(
                    f"{self.root / extra[0]}: class folder not in the training classes; rename it to one of "
                    "the training classes or remove it."
                )
        self.class_folders = list(class_folders)
        self.class_names = clean_class_names(self.class_folders, str(self.root), keep_case)
        self.paths: list[Path] = []
        self.targets = []
        self.empty_folders: list[Path] = []  # class folders without images (allow_empty_classes)
        for label, name in enumerate(self.class_folders):
            folder = self.root / name
            files = _list_images(folder, extensions) if folder.is_dir() else []
            if not files and not allow_empty_classes:
                raise UserError(
                    f"{folder}: class folder has no images ({', '.join(extensions)}); add images or remove it."
                )
            if not files:
                self.empty_folders.append(folder)
                _logger.warning("%s: no images for class %r", folder, name)
            self.paths.extend(files)
            self.targets.extend([label] * len(files))
        self.description = f"image folder {self.root}"
        _logger.info("loaded %s: %d images, %d classes", self.description, len(self), self.num_classes)

    def load(self, index: int) -> Image.Image:
        return load_rgb_image(self.paths[index])

    def source_file(self, index: int) -> Path:
        return self.paths[index]

    def __repr__(self) -> str:
        return self.description
