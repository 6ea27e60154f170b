"""Split-file datasets: the ImageNet-LT / Places-LT / iNaturalist-2018 format (OLTR's text files).

Split file: one image per line, ``relative/path label`` (path relative to the image root; the label is the last
whitespace-separated field, so paths with spaces work). Blank lines are ignored.

Class-names file, two accepted forms (detected per file):

1. one name per line; line ``i`` (counting non-blank lines from 0) is label ``i``::

       tench
       goldfish

2. ``label name`` lines, when *every* non-blank line starts with an integer followed by a name; the labels must be
   exactly ``0..C-1`` (any order)::

       0 tench
       1 goldfish

Names are cleaned by :mod:`trainer.data.names`. Training counts come from the train file (``TaskData.train_counts``),
as LIFT derives ``cls_num_list``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from trainer.data.base import LabelledImages
from trainer.data.folder import load_rgb_image
from trainer.data.names import clean_class_names
from trainer.errors import UserError

_logger = logging.getLogger(__name__)

_LABELLED_LINE = re.compile(r"^\s*(\d+)\s+(\S.*?)\s*$")


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path}: {what} not found; check the path (relative paths are taken from the root).")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: {what} is not UTF-8 text ({e}); save it as UTF-8.") from e


def read_class_names(path: str | Path, keep_case: bool = False) -> list[str]:
    """Read a class-names file in either form (see the module docstring); returns clean names in label order.

    Raises:
        UserError: missing/unreadable file, no names, a label repeated or missing (form 2), duplicate names.
    """
    path = Path(path)
    lines = _read_lines(path, "class-names file")
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise UserError(f"{path}: class-names file has no names; write one class name per line.")
    matches = [_LABELLED_LINE.match(line) for _, line in numbered]
    if all(m is not None for m in matches):
        by_label: dict[int, tuple[int, str]] = {}
        for (n, _), m in zip(numbered, matches, strict=True):
            assert m is not None
            label = int(m.group(1))
            if label in by_label:
                raise UserError(
                    f"{path}:{n}: label {label} already named on line {by_label[label][0]}; give each label "
                    "one name."
                )
            by_label[label] = (n, m.group(2))
        count = len(by_label)
        for label in range(count):
            if label not in by_label:
                worst = max(by_label, key=lambda k: k)
                raise UserError(
                    f"{path}:{by_label[worst][0]}: labels must be 0..{count - 1}, but {label} is missing "
                    f"(largest is {worst}); number the classes from 0 without gaps."
                )
        raw = [by_label[k][1] for k in range(count)]
        line_numbers = [by_label[k][0] for k in range(count)]
        _logger.debug("%s: 'label name' form, %d classes", path, count)
    else:
        raw = [line for _, line in numbered]
        line_numbers = [n for n, _ in numbered]
        _logger.debug("%s: one name per line, %d classes", path, len(raw))
    return clean_class_names(raw, str(path), keep_case, line_numbers)


def read_split_file(path: str | Path, num_classes: int) -> tuple[list[str], list[int], list[int]]:
    """Parse ``relative/path label`` lines; returns ``(paths, labels, line numbers)``.

    Raises:
        UserError: missing file, a malformed line, a label that is not an integer or not in ``0..C-1`` (naming
            the file and line).
    """
    path = Path(path)
    rel_paths: list[str] = []
    labels: list[int] = []
    line_numbers: list[int] = []
    for n, line in enumerate(_read_lines(path, "split file"), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(None, 1)
        if len(parts) != 2:
            raise UserError(f"{path}:{n}: expected 'relative/path label', found {line.strip()!r}.")
        rel, label_text = parts
        try:
            label = int(label_text)
        except ValueError as e:
            raise UserError(
                f"{path}:{n}: label {label_text!r} is not an integer; write 'relative/path label'."
            ) from e
        if not 0 <= label < num_classes:
            raise UserError(
                f"{path}:{n}: label {label} is outside 0..{num_classes - 1} (the class-names file names "
                f"{num_classes} classes); fix the label or the class-names file."
            )
        rel_paths.append(rel)
        labels.append(label)
        line_numbers.append(n)
    if not labels:
        raise UserError(f"{path}: split file lists no images; write one 'relative/path label' per line.")
    return rel_paths, labels, line_numbers


class SplitFileImages(LabelledImages):
    """The images a split file lists, under ``image_root``.

    Args:
        image_root: the folder the split file's paths are relative to.
        split_file: the ``relative/path label`` text file.
        class_names: the clean class names (from :func:`read_class_names`), label order.
        check_files: check every listed image exists now (one ``stat`` per line), so a missing image is
            reported with its split-file line instead of mid-training.
        drop_missing: with ``check_files``, leave the lines whose image is missing out (listed in
            ``missing_lines`` as ``(line number, path)``) instead of raising.

    Raises:
        UserError: missing root, split-file errors (see :func:`read_split_file`), a listed image that is missing
            (naming the first such line and how many there are).
    """

    def __init__(
        self,
        image_root: str | Path,
        split_file: str | Path,
        class_names: Sequence[str],
        check_files: bool = True,
        drop_missing: bool = False,
    ) -> None:
        self.root = Path(image_root).expanduser()
        self.split_file = Path(split_file)
        if not self.root.is_dir():
            raise UserError(
                f"{self.root}: image root does not exist; point root at the dataset's image folder."
            )
        self.class_names = list(class_names)
        rel, self.targets, lines = read_split_file(self.split_file, len(self.class_names))
        self.paths = [self.root / r for r in rel]
        self.missing_lines: list[tuple[int, Path]] = []
        if check_files:
            present = [p.is_file() for p in self.paths]
            self.missing_lines = [
                (n, p) for p, n, ok in zip(self.paths, lines, present, strict=True) if not ok
            ]
            if self.missing_lines and not drop_missing:
                n, p = self.missing_lines[0]
                more = len(self.missing_lines) - 1
                raise UserError(
                    f"{self.split_file}:{n}: image {p} does not exist"
                    + (f" ({more} more lines of this file name missing images)" if more else "")
                    + "; fix the path, restore the image, or remove the line (`python -m trainer check` lists "
                    "them all; --set data.skip_unreadable=true skips them)."
                )
            if self.missing_lines:
                self.paths = [p for p, ok in zip(self.paths, present, strict=True) if ok]
                self.targets = [t for t, ok in zip(self.targets, present, strict=True) if ok]
        self.description = f"split file {self.split_file}"
        _logger.info("loaded %s: %d images, %d classes", self.description, len(self), self.num_classes)

    def load(self, index: int) -> Image.Image:
        return load_rgb_image(self.paths[index])

    def source_file(self, index: int) -> Path:
        return self.paths[index]

    def __repr__(self) -> str:
        return self.description
