"""Torch-free runtime for model bundles: the manifest record, tokenizer, image preprocessing, onnxruntime sessions.

Imports only the standard library, numpy, Pillow, onnxruntime, tokenizers and ftfy. Submodules are
imported lazily so that ``serving.runtime.preprocess`` alone does not pull in onnxruntime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.runtime.bundle import Bundle, BundleError
    from serving.runtime.manifest import Manifest
    from serving.runtime.preprocess import PreprocessConfig
    from serving.runtime.tokenizer import ClipTokenizer

__all__ = ["Bundle", "BundleError", "ClipTokenizer", "Manifest", "PreprocessConfig"]


def __getattr__(name: str) -> Any:
    if name in ("Bundle", "BundleError"):
        from serving.runtime import bundle

        return getattr(bundle, name)
    if name == "Manifest":
        from serving.runtime.manifest import Manifest

        return Manifest
    if name == "PreprocessConfig":
        from serving.runtime.preprocess import PreprocessConfig

        return PreprocessConfig
    if name == "ClipTokenizer":
        from serving.runtime.tokenizer import ClipTokenizer

        return ClipTokenizer
    raise AttributeError(f"module 'serving.runtime' has no attribute {name!r}")
