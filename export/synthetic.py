"""A synthetic bundle (``docs/bundle.md``) with tiny ONNX graphs, and plain-colour images for it.

Used by the serving tests and the serving benchmarks (``benchmarks/chaos.py``): a complete, valid bundle
in well under a second, no training, no download.

* image tower: ``pixels [N,3,S,S]`` -> per-channel mean ``[N,3]`` -> MatMul ``[3,E]`` -> L2 normalise;
  the trained classes are colours whose class embedding is the image embedding of a plain image of
  that colour, so a red picture classifies as ``red``;
* text tower: ``token_ids [N,L]`` -> Gather (ids mod 4096) -> masked sum over tokens -> L2 normalise
  (distinct names get distinct embeddings; there is no learned context).

``tokenizer.json`` comes from ``export.tokenizer`` (open_clip's own BPE vocabulary, built offline).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 200, 40),
    "blue": (30, 40, 220),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
    "yellow": (240, 230, 30),
}
COUNTS = (1000, 300, 100, 30, 10, 3)  # long-tailed training counts, in COLOURS order
IMAGE_SIZE = 32
EMBED_DIM = 16
CONTEXT_LENGTH = 77
TEXT_VOCAB = 4096


def _normalised_colour(rgb: tuple[int, int, int]) -> np.ndarray:
    return (np.asarray(rgb, np.float64) / 255.0 - np.asarray(MEAN)) / np.asarray(STD)


def _image_graph(weights: np.ndarray, path: Path, image_size: int = IMAGE_SIZE) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMean", ["pixels"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w_img"], ["proj"]),
        helper.make_node("ReduceL2", ["proj"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["safe_norm"]),
        helper.make_node("Div", ["proj", "safe_norm"], ["embeddings"]),
    ]
    graph = helper.make_graph(
        nodes,
        "synthetic_image_encoder",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", EMBED_DIM])],
        [
            numpy_helper.from_array(weights.astype(np.float32), "w_img"),
            numpy_helper.from_array(np.asarray(1e-12, np.float32), "eps"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="flatprompt-tests"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _text_graph(table: np.ndarray, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Mod", ["token_ids", "vocab"], ["ids_mod"]),
        helper.make_node("Gather", ["table", "ids_mod"], ["tok"], axis=0),  # [N, L, E]
        helper.make_node("Equal", ["token_ids", "zero"], ["is_pad"]),
        helper.make_node("Not", ["is_pad"], ["keep"]),
        helper.make_node("Cast", ["keep"], ["keep_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["keep_f", "axis2"], ["mask"]),  # [N, L, 1]
        helper.make_node("Mul", ["tok", "mask"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),  # [N, E]
        helper.make_node("ReduceL2", ["summed"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["safe_norm"]),
        helper.make_node("Div", ["summed", "safe_norm"], ["embeddings"]),
    ]
    inits = [
        numpy_helper.from_array(table.astype(np.float32), "table"),
        numpy_helper.from_array(np.asarray(TEXT_VOCAB, np.int64), "vocab"),
        numpy_helper.from_array(np.asarray(0, np.int64), "zero"),
        numpy_helper.from_array(np.asarray([2], np.int64), "axis2"),
        numpy_helper.from_array(np.asarray([1], np.int64), "axis1"),
        numpy_helper.from_array(np.asarray(1e-12, np.float32), "eps"),
    ]
    graph = helper.make_graph(
        nodes,
        "synthetic_text_encoder",
        [helper.make_tensor_value_info("token_ids", TensorProto.INT64, ["batch", CONTEXT_LENGTH])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", EMBED_DIM])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="flatprompt-tests"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _tokenizer_json(target: Path) -> dict[str, object]:
    """Copy a cached ``tokenizer.json`` built by ``export.tokenizer`` (about 1 s to build once)."""
    from export.tokenizer import tokenizer_manifest, write_tokenizer_json

    cache = Path(os.environ.get("FLATPROMPT_TEST_CACHE", "/tmp/flatprompt-test-cache"))
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / "tokenizer.json"
    if not cached.is_file():
        tmp = cache / f"tokenizer.{os.getpid()}.tmp"
        write_tokenizer_json(tmp)
        tmp.replace(cached)
    shutil.copyfile(cached, target)
    return dict(tokenizer_manifest(CONTEXT_LENGTH))


def make_bundle(out: Path, seed: int = 0, logit_scale: float = 100.0, image_size: int = IMAGE_SIZE) -> Path:
    """Write a complete, valid synthetic bundle into ``out`` (created) and return it.

    Different ``seed`` values give different weights, hence a different bundle hash; ``image_size`` is the
    model input side (the graph's mean pooling works at any size).
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w_img = rng.standard_normal((3, EMBED_DIM))
    table = rng.standard_normal((TEXT_VOCAB, EMBED_DIM))
    _image_graph(w_img, out / "image_encoder.onnx", image_size)
    _text_graph(table, out / "text_encoder.onnx")
    classes = np.stack([_normalised_colour(rgb) @ w_img for rgb in COLOURS.values()])
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    np.save(out / "class_embeddings.npy", classes.astype(np.float32))
    (out / "classes.json").write_text(
        json.dumps({"names": list(COLOURS), "counts": list(COUNTS)}), encoding="utf-8"
    )
    tokenizer = _tokenizer_json(out / "tokenizer.json")
    files = [
        "image_encoder.onnx",
        "text_encoder.onnx",
        "class_embeddings.npy",
        "classes.json",
        "tokenizer.json",
    ]
    manifest = {
        "format_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "name": "synthetic-test",
            "pretrained": None,
            "open_clip_version": None,
            "checkpoint_sha256": None,
        },
        "source": {"kind": "zero_shot", "checkpoint": None, "checkpoint_sha256": None},
        "onnx": {"opset": 17, "onnx_version": _onnx_version(), "torch_version": None},
        "logit_scale": float(logit_scale),
        "logit_bias": None,
        "embed_dim": EMBED_DIM,
        "context_length": CONTEXT_LENGTH,
        "prompt": {"template": "a photo of a {}.", "n_ctx": 0, "placeholder": "X"},
        "tokenizer": tokenizer,
        "preprocess": {
            "image_size": image_size,
            "resize_mode": "shortest",
            "interpolation": "bicubic",
            "crop": "center",
            "mean": list(MEAN),
            "std": list(STD),
            "convert": "RGB",
            "exif_transpose": False,
        },
        "parity": {},
        "files": {
            name: {
                "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest(),
                "bytes": (out / name).stat().st_size,
            }
            for name in files
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out


def _onnx_version() -> str:
    import onnx

    return str(onnx.__version__)


def png_bytes(
    rgb: tuple[int, int, int] = (220, 20, 20), size: tuple[int, int] = (48, 40), fmt: str = "PNG"
) -> bytes:
    """A plain-colour image file."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format=fmt)
    return buf.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 1-bit PNG of ``width x height`` pixels compressed to a few hundred KB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
