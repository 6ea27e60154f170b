"""CIFAR-100 from its standard python pickles, and CIFAR-100-LT built from it.

Layout (``cifar-100-python.tar.gz`` extracted): ``<root>/cifar-100-python/{train,test,meta}``; ``root`` may also
be the ``cifar-100-python`` folder itself. ``train``/``test`` are dicts with ``b"data"`` (N x 3072 uint8 rows,
channel-planar R, G, B of 32 x 32) and ``b"fine_labels"``; ``meta`` has ``b"fine_label_names"``.

The pickles are read with an unpickler that only admits the numpy array machinery, so a tampered file cannot
run code; anything else is reported as a corrupt file.

CIFAR-100-LT (spec §4.1) is :func:`cifar100_lt`: the train split under the exponential profile of
:func:`trainer.data.sampling.apply_long_tail` (IF 100 -> 10,847 images), the test split untouched.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from trainer.data.base import LabelledImages
from trainer.data.names import clean_class_names
from trainer.data.sampling import LabelledSubset, apply_long_tail
from trainer.errors import UserError, shorten

_logger = logging.getLogger(__name__)

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_FOLDER = "cifar-100-python"
# how a user asks for the download: the config field (CLI) and this module's argument (Python)
_DOWNLOAD_HINT = "--set data.download=true (download=True in Python)"
_ROW_BYTES = 3 * 32 * 32

# The only globals a CIFAR pickle needs (numpy 1.x and 2.x module names; py2 strings via _codecs).
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict[bytes, Any]:
    """Read one CIFAR pickle; every failure is a :class:`UserError` naming ``path``."""
    if not path.is_file():
        raise UserError(
            f"{path}: CIFAR-100 file not found; extract cifar-100-python.tar.gz under the dataset root "
            f"(data.root) again, or download it: {_DOWNLOAD_HINT}."
        )
    try:
        with path.open("rb") as fh:
            obj = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        IndexError,
    ) as e:
        raise UserError(
            f"{path}: not a readable CIFAR-100 pickle ({type(e).__name__}: {e}); re-extract "
            f"cifar-100-python.tar.gz (md5 {CIFAR100_MD5})."
        ) from e
    if not isinstance(obj, dict):
        raise UserError(
            f"{path}: expected a pickled dict, found {type(obj).__name__}; re-extract the archive."
        )
    return obj


def _require(obj: dict[bytes, Any], key: bytes, path: Path) -> Any:
    if key not in obj:
        raise UserError(
            f"{path}: key {key!r} missing (found {sorted(obj)!r}); this is not a CIFAR-100 python pickle — "
            "use cifar-100-python.tar.gz (not the CIFAR-10 or binary version)."
        )
    return obj[key]


def resolve_cifar100_folder(root: str | Path, download: bool = False) -> Path:
    """Return the ``cifar-100-python`` folder under ``root`` (downloading it first when allowed and missing)."""
    root = Path(root).expanduser()
    if root.name == CIFAR100_FOLDER and (root / "meta").exists():
        return root
    folder = root / CIFAR100_FOLDER
    if folder.is_dir():
        return folder
    if download:
        from torchvision.datasets.utils import download_and_extract_archive

        _logger.info("downloading CIFAR-100 (about 169 MB) to %s", root)
        try:
            download_and_extract_archive(CIFAR100_URL, download_root=str(root), md5=CIFAR100_MD5)
        except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError; a bad md5 a RuntimeError
            raise UserError(
                f"{root}: could not download CIFAR-100 from {CIFAR100_URL} ({type(e).__name__}: "
                f"{shorten(str(e), 160)}); fetch cifar-100-python.tar.gz (md5 {CIFAR100_MD5}) yourself and "
                "extract it there."
            ) from e
        return folder
    if not root.exists():
        raise UserError(
            f"{root}: CIFAR-100 root does not exist; point data.root at the folder holding {CIFAR100_FOLDER}/ "
            f"(--set data.root=DIR), or download it there: {_DOWNLOAD_HINT}."
        )
    raise UserError(
        f"{folder}: not found; extract cifar-100-python.tar.gz into {root}, or download it: {_DOWNLOAD_HINT}."
    )


class CIFAR100(LabelledImages):
    """The CIFAR-100 train or test split (100 fine classes), decoded into memory as ``(N, 32, 32, 3)`` uint8.

    Args:
        root: the folder holding ``cifar-100-python/`` (or that folder itself).
        train: the train split (50,000) when True, else the test split (10,000).
        download: fetch and extract the archive with torchvision's downloader when the files are missing.
        keep_case: keep the class names' letter case (they are lower case already).

    Raises:
        UserError: missing files, a corrupt pickle, wrong shapes, labels out of range, duplicate names.
    """

    def __init__(
        self, root: str | Path, train: bool = True, download: bool = False, keep_case: bool = False
    ) -> None:
        folder = resolve_cifar100_folder(root, download)
        split = "train" if train else "test"
        meta_path = folder / "meta"
        raw_names = _require(_load_pickle(meta_path), b"fine_label_names", meta_path)
        self.class_names = clean_class_names(
            [n.decode() if isinstance(n, bytes) else str(n) for n in raw_names], str(meta_path), keep_case
        )
        path = folder / split
        obj = _load_pickle(path)
        data = np.asarray(_require(obj, b"data", path))
        labels = np.asarray(_require(obj, b"fine_labels", path))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_BYTES:
            raise UserError(
                f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, {_ROW_BYTES}); "
                "re-extract cifar-100-python.tar.gz."
            )
        if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(
                f"{path}: b'fine_labels' has {labels.shape} {labels.dtype}, expected {len(data)} integers; "
                "re-extract cifar-100-python.tar.gz."
            )
        bad = np.flatnonzero((labels < 0) | (labels >= len(self.class_names)))
        if len(bad):
            i = int(bad[0])
            raise UserError(
                f"{path}: item {i} has label {int(labels[i])}, outside 0..{len(self.class_names) - 1} "
                f"({meta_path} names {len(self.class_names)} classes); re-extract cifar-100-python.tar.gz."
            )
        self.data = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets = [int(t) for t in labels]
        self.description = f"CIFAR-100 {split} ({path})"
        _logger.info("loaded %s: %d images, %d classes", self.description, len(self), self.num_classes)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(self.data[index]))

    def __repr__(self) -> str:
        return self.description


def cifar100_lt(
    root: str | Path,
    imbalance: float = 100.0,
    seed: int = 0,
    download: bool = False,
    keep_case: bool = False,
) -> tuple[LabelledSubset, CIFAR100]:
    """CIFAR-100-LT: ``(long-tailed train, untouched balanced test)``.

    ``seed`` is LDAM-DRW's ``rand_number`` (0 in every published run); IF 100 keeps 10,847 train images.
    """
    train = CIFAR100(root, train=True, download=download, keep_case=keep_case)
    test = CIFAR100(root, train=False, download=download, keep_case=keep_case)
    return apply_long_tail(train, imbalance, seed), test
