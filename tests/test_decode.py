"""One decode path for the service and the bundle, and reduced-scale JPEG decoding that keeps the answers.

The parity test exports the committed toy CLIP (``python -m export --toy``), saves the toy world's base and
novel test sets as 640x480 JPEGs (what a client uploads) and compares the reduced-scale decode the service
uses with a full-resolution decode: top-1 agreement >= 99% and embedding cosine >= 0.99 (issue 9).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.images import decode_image
from serving.runtime.preprocess import PreprocessConfig, prepare_image, preprocess


def _png16(value: int, size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0]), value, np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_a_16_bit_png_is_scaled_the_same_way_by_the_service_and_the_bundle_path() -> None:
    data = _png16(32768)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    cfg = PreprocessConfig(image_size=16)
    served = np.asarray(decode_image(data, 0, 10**7, cfg))
    direct = np.asarray(prepare_image(Image.open(io.BytesIO(data)), cfg))
    np.testing.assert_array_equal(served, direct)
    assert served.mean() == pytest.approx(128.0)  # 32768 >> 8, not PIL's saturation at 255
    assert np.asarray(decode_image(data, 0, 10**7)).mean() == pytest.approx(128.0)  # without a config too


def test_a_large_jpeg_decodes_at_reduced_scale_and_a_small_one_does_not() -> None:
    cfg = PreprocessConfig(image_size=224)
    rng = np.random.default_rng(0)
    big = _jpeg(Image.fromarray(rng.integers(0, 256, (960, 1280, 3), dtype=np.uint8)))
    small = _jpeg(Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)))
    # 1280x960 resizes to 298x224; 1/2 (640x480) is the largest reduction keeping 2x that per side
    assert decode_image(big, 0, 10**8, cfg).size == (640, 480)
    assert decode_image(big, 0, 10**8).size == (1280, 960)  # no config: full resolution
    assert decode_image(small, 0, 10**8, cfg).size == (400, 300)  # under 2x the resized size: untouched
    phone = _jpeg(Image.new("RGB", (4032, 3024), (9, 9, 9)))
    assert decode_image(phone, 0, 10**8, cfg).size == (1008, 756)  # 1/4
    tiny_model = PreprocessConfig(image_size=32)
    assert decode_image(phone, 0, 10**8, tiny_model).size == (504, 378)  # 1/8, the most libjpeg offers


def test_the_bundle_and_the_service_decode_uploads_identically(tmp_path: Path) -> None:
    from serving.runtime.bundle import Bundle
    from tests.serving_fixtures import make_bundle

    bundle = Bundle.load(make_bundle(tmp_path / "b", image_size=64), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    data = _jpeg(Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)))
    served = bundle.preprocess(decode_image(data, 0, 10**8, bundle.preprocess_config))
    np.testing.assert_array_equal(served, bundle.decode(data))
    full = preprocess(Image.open(io.BytesIO(data)).convert("RGB"), bundle.preprocess_config)
    np.testing.assert_array_equal(full, bundle.decode(data, reduced=False))
    assert np.abs(full - served).max() > 0  # the reduced path is really taken


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.cli import main

    out = tmp_path_factory.mktemp("toy") / "bundle"
    assert main(["--toy", "--out", str(out), "--log-level", "WARNING"]) == 0
    return out


def test_reduced_scale_decode_keeps_the_toy_models_answers(toy_bundle: Path) -> None:
    from serving.runtime.bundle import Bundle
    from trainer.toyworld.task import toy_task

    bundle = Bundle.load(toy_bundle, providers=["CPUExecutionProvider"])
    task = toy_task()
    assert task.novel_test is not None
    full, reduced = [], []
    for images in (task.test, task.novel_test):
        for k in range(len(images)):
            upload = _jpeg(images.load(k).convert("RGB").resize((640, 480), Image.Resampling.BICUBIC))
            full.append(bundle.decode(upload, reduced=False))
            reduced.append(bundle.decode(upload))
    assert len(full) == 750 + 850
    emb_full = bundle.embed_images(np.stack(full))
    emb_reduced = bundle.embed_images(np.stack(reduced))
    cosine = np.sum(emb_full * emb_reduced, axis=1)
    top_full = bundle.logits(emb_full).argmax(axis=1)
    top_reduced = bundle.logits(emb_reduced).argmax(axis=1)
    agreement = float(np.mean(top_full == top_reduced))
    assert agreement >= 0.99, agreement
    assert float(cosine.min()) >= 0.99, float(cosine.min())
