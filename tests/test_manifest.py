"""The bundle manifest record (serving/runtime/manifest.py): round trip, old bundles, errors."""

from __future__ import annotations

import copy
import json
import typing

import pytest

from serving.runtime.manifest import BundleError, Manifest


def _today() -> dict[str, typing.Any]:
    """A manifest as export/builder.py writes it today (a prompt-tuned toy run, fp16, measured text path)."""
    tensor = {"name": "token_ids", "dtype": "int64", "shape": ["N", 77]}
    out = {"name": "embeddings", "dtype": "float32", "shape": ["N", 32], "l2_normalised": True}
    return {
        "format_version": 1,
        "created": "2026-12-01T10:00:00+00:00",
        "model": {
            "name": "toy-clip",
            "pretrained": None,
            "config_path": "trainer/toyworld/toy_clip.json",
            "open_clip_version": "3.2.0",
            "weights_sha256": "ab" * 32,
            "checkpoint_sha256": "cd" * 32,
            "activation": "gelu",
        },
        "source": {
            "kind": "prompt_tuned",
            "checkpoint": "/runs/toy/last.pt",
            "checkpoint_sha256": "cd" * 32,
            "epoch": 4,
            "data_kind": "toy",
            "data_seed": 0,
        },
        "onnx": {
            "opset": 18,
            "exporter": {"image_encoder": "dynamo", "text_encoder": "torchscript"},
            "onnx_version": "1.17.0",
            "onnxruntime_version": "1.32.0",
            "torch_version": "2.5.1",
            "graphs": {
                "image_encoder": {"opset": 18, "nodes": 120, "inputs": [["pixels", ["N", 3, 64, 64]]]}
            },
        },
        "logit_scale": 100.0,
        "logit_bias": None,
        "embed_dim": 32,
        "context_length": 77,
        "prompt": {
            "template": "X X X X {}.",
            "n_ctx": 4,
            "placeholder": "X",
            "vpt_length": 2,
            "vpt_deep": True,
            "handwritten_template": "a photo of a {}.",
            "default_text_path": "handwritten",
            "default_text_path_source": "measured: toy world novel test set, top-1 among the novel classes",
            "text_path_novel_top1": {"learned": 0.6, "handwritten": 0.7, "ensemble": 0.65},
        },
        "tokenizer": {
            "file": "tokenizer.json",
            "pretokenizer_file": "pretokenizer.json",
            "kind": "open_clip.SimpleTokenizer",
            "sot_id": 49406,
            "eot_id": 49407,
            "pad_id": 0,
            "vocab_size": 49408,
            "context_length": 77,
            "lowercase": True,
            "clean": "whitespace",
            "truncate": "cut to context_length, last kept id := eot_id",
        },
        "preprocess": {
            "image_size": 64,
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
            "fill_color": 0,
            "exif_transpose": False,
            "crop": "center",
            "convert": "RGB before resize (see docs/bundle.md)",
            "antialias": True,
        },
        "classes": {"count": 10, "file": "classes.json", "embeddings": "class_embeddings.npy"},
        "graphs": {
            "image_encoder": {
                "fp32": "image_encoder.onnx",
                "fp16": "image_encoder.fp16.onnx",
                "input": {"name": "pixels", "dtype": "float32", "shape": ["N", 3, 64, 64]},
                "output": out,
            },
            "text_encoder": {
                "fp32": "text_encoder.onnx",
                "fp16": "text_encoder.fp16.onnx",
                "input": tensor,
                "output": out,
            },
            "text_encoder_handwritten": {
                "fp32": "text_encoder_handwritten.onnx",
                "fp16": None,
                "input": tensor,
                "output": out,
            },
        },
        "parity": {"tolerance": 0.0001, "top1": {"top1_agreement": 1.0, "images": 12}, "top1_agreement": 1.0},
        "files": {"classes.json": {"sha256": "ef" * 32, "bytes": 120}},
    }


def _older() -> dict[str, typing.Any]:
    """A minimal older manifest: no classes/graphs sections, no handwritten or default text path."""
    return {
        "format_version": 1,
        "created": "2025-01-01T00:00:00+00:00",
        "model": {"name": "old", "pretrained": None, "open_clip_version": None, "checkpoint_sha256": None},
        "source": {"kind": "zero_shot", "checkpoint": None, "checkpoint_sha256": None},
        "onnx": {"opset": 17, "onnx_version": "1.15.0", "torch_version": None},
        "logit_scale": 100.0,
        "logit_bias": None,
        "embed_dim": 32,
        "context_length": 77,
        "prompt": {"template": "a photo of a {}.", "n_ctx": 0, "placeholder": "X"},
        "tokenizer": {"file": "tokenizer.json"},
        "preprocess": {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "parity": {},
        "files": {"classes.json": {"sha256": "ef" * 32, "bytes": 120}},
    }


def test_todays_manifest_round_trips_to_the_same_dict_and_bytes():
    d = _today()
    m = Manifest.from_dict(copy.deepcopy(d))
    assert m.to_dict() == d
    assert list(m.to_dict()) == list(d)  # same key order: the same bytes on disk
    assert m.to_json() == json.dumps(d, indent=2, ensure_ascii=False) + "\n"
    assert m.prompt.default_text_path == "handwritten" and m.source.extra["epoch"] == 4
    assert m.graphs is not None and m.graphs["text_encoder"].output.l2_normalised is True
    assert m.files["classes.json"].bytes == 120


def test_zero_shot_manifest_round_trips_without_the_optional_keys():
    d = _today()
    del d["graphs"]["text_encoder_handwritten"]
    d["prompt"] = {
        "template": "a photo of a {}.",
        "n_ctx": 0,
        "placeholder": "X",
        "vpt_length": 0,
        "vpt_deep": False,
        "handwritten_template": "a photo of a {}.",
        "default_text_path": "learned",
        "default_text_path_source": "default",
    }
    d["onnx"]["exporter"] = "dynamo"
    assert Manifest.from_dict(copy.deepcopy(d)).to_dict() == d


def test_older_manifest_loads_with_the_defaults_the_readers_used():
    m = Manifest.from_dict(_older())
    assert m.classes is None and m.graphs is None
    assert m.prompt.handwritten_template is None and m.default_text_path == "learned"
    assert m.prompt.vpt_length is None and m.model.activation is None and m.model.config_path is None
    assert m.onnx.exporter is None and m.onnx.graphs is None
    tok = m.tokenizer
    assert (tok.file, tok.pretokenizer_file, tok.sot_id, tok.eot_id, tok.pad_id) == (
        "tokenizer.json",
        None,
        49406,
        49407,
        0,
    )
    pre = m.preprocess
    assert (pre.interpolation, pre.resize_mode, pre.fill_color, pre.exif_transpose) == (
        "bicubic",
        "shortest",
        None,
        False,
    )
    # written back, it gains the always-written keys as their defaults (null), the sometimes-written ones stay out
    again = m.to_dict()
    assert Manifest.from_dict(again) == m and set(again) == set(_older())
    assert again["model"]["activation"] is None and "handwritten_template" not in again["prompt"]


def test_unknown_keys_are_kept():
    d = _today()
    d["future_section"] = {"a": 1}
    d["prompt"]["future_key"] = "x"
    d["files"]["classes.json"]["md5"] = "00"
    m = Manifest.from_dict(copy.deepcopy(d))
    assert m.extra == {"future_section": {"a": 1}} and m.prompt.extra == {"future_key": "x"}
    assert m.to_dict() == d


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.pop("embed_dim"), "lacks the 'embed_dim' entry"),
        (lambda d: d.update(format_version=2), "newer than this runtime"),
        (lambda d: d.update(format_version="1"), "no valid format_version"),
        (lambda d: d.update(files=[]), "'files' must map"),
        (lambda d: d["files"]["classes.json"].pop("bytes"), "needs 'sha256' and 'bytes'"),
        (lambda d: d["prompt"].pop("template"), "lacks 'template'"),
        (lambda d: d.update(embed_dim="wide"), "bad entry"),
        (lambda d: d.update(prompt="a photo"), "'prompt' must be a JSON object"),
    ],
)
def test_a_bad_manifest_is_a_bundle_error_naming_the_fix(edit, match):
    d = _older()
    edit(d)
    with pytest.raises(BundleError, match=match) as info:
        Manifest.from_dict(d, "b/manifest.json")
    assert "b/manifest.json" in str(info.value) and (
        "re-export" in str(info.value) or "upgrade" in str(info.value)
    )


def test_read_and_write(tmp_path):
    m = Manifest.from_dict(_today())
    path = m.write(tmp_path)
    assert path.read_text(encoding="utf-8") == m.to_json() and Manifest.read(tmp_path) == m
    path.write_text("[1]", encoding="utf-8")
    with pytest.raises(BundleError, match="not a JSON object"):
        Manifest.read(tmp_path)
    path.write_text("{", encoding="utf-8")
    with pytest.raises(BundleError, match="not valid JSON"):
        Manifest.read(tmp_path)
    with pytest.raises(BundleError, match="is not a directory"):
        Manifest.read(tmp_path / "nothing")  # not a directory
