"""The torch-free runtime against open_clip: token ids, preprocessed pixels, torch-free imports."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.export_fixtures import TINY_CONFIG, TINY_NAME, tokenizer_files

REPO = Path(__file__).resolve().parents[1]

GOLDEN_TEXTS = [
    "a photo of a cat.",
    "",
    " ",
    "A Photo Of A CAT!",
    "MiXeD CaSe NaMe",
    "Crème brûlée",
    "café vs cafe\u0301 (combining accent)",
    "naïve façade jalapeño",
    "日本語のテキスト",
    "中文 名字 汉字",
    "한국어 이름",
    "Ελληνικά λέξεις",
    "Русский текст",
    "مرحبا بالعالم",
    "emoji 🐱🐶👍🏽 👨‍👩‍👧",
    "Tom &amp; Jerry",
    "double &amp;amp; escaped",
    "&lt;b&gt;bold&lt;/b&gt; &#39;apos&#39; &quot;q&quot;",
    "ﬁsh ﬂower ﬀ",
    "it's they're we've I'm you'll he'd",
    "123 4567 3.14 1,000,000",
    "!!!???... --- ***",
    "  many   spaces\t\tand\nnewlines\r\n ",
    "hello\u00a0world\u3000ideographic\u2003em",
    "zero\u200bwidth joiner",
    "a-b_c/d\\e|f",
    "‘curly’ “quotes” — dash",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "Ⅻ ½ ¾ ² ٣",
    "İstanbul straße ẞ",
    "ͅ combining ypogegrammeni",
    "<start_of_text> literal <end_of_text>",
    "!<start_of_text> glued",
    "'ſ long s",
    "x" * 300,
    "word " * 100,
    "supercalifragilisticexpialidocious " * 20,
]


@pytest.fixture(scope="module")
def tok_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tokenizer_files(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    import open_clip

    from trainer.models import register_model_config

    register_model_config(TINY_CONFIG)
    return open_clip.get_tokenizer(TINY_NAME)


@pytest.fixture(scope="module")
def clip_tokenizer(tok_files):
    from serving.runtime.tokenizer import ClipTokenizer

    return ClipTokenizer(*tok_files, context_length=77)


# --------------------------------------------------------------------------------------------- tokenizer


def test_golden_token_ids_equal_open_clip(clip_tokenizer, open_clip_tokenizer):
    assert len(GOLDEN_TEXTS) >= 30
    ref = open_clip_tokenizer(GOLDEN_TEXTS).numpy()
    got = clip_tokenizer(GOLDEN_TEXTS)
    assert got.dtype == np.int64 and got.shape == (len(GOLDEN_TEXTS), 77)
    for text, r, g in zip(GOLDEN_TEXTS, ref, got, strict=True):
        assert np.array_equal(r, g), f"{text!r}: {r[:12]} != {g[:12]}"


def test_fuzzed_unicode_token_ids_equal_open_clip(clip_tokenizer, open_clip_tokenizer):
    rng = random.Random(7)
    pools = [
        range(0x20, 0x7F),
        range(0xA0, 0x250),
        range(0x300, 0x370),
        range(0x370, 0x530),
        range(0x600, 0x6FF),
        range(0x900, 0x97F),
        range(0x2000, 0x2070),
        range(0x2150, 0x2190),
        range(0x4E00, 0x4E80),
        range(0xAC00, 0xAC80),
        range(0xFF00, 0xFFEF),
        range(0x1D400, 0x1D500),
        range(0x1F300, 0x1F650),
        range(0x10D40, 0x10D50),
        range(0x30000, 0x30100),
    ]
    texts = [
        "".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(0, 40))) for _ in range(400)
    ]
    assert np.array_equal(open_clip_tokenizer(texts).numpy(), clip_tokenizer(texts))


def test_truncation_keeps_eot_last_and_pads_with_zero(clip_tokenizer):
    ids = clip_tokenizer(["word " * 100, "cat"])
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and (ids[0] > 0).all()
    assert ids[1, :3].tolist() == [49406, 2368, 49407] and (ids[1, 3:] == 0).all()
    short = clip_tokenizer(["word " * 100], context_length=8)
    assert short.shape == (1, 8) and short[0, -1] == 49407


def test_tokenizer_json_alone_matches_on_ordinary_text(tok_files, open_clip_tokenizer):
    """Without pretokenizer.json the JSON's own regex split is used: equal on everyday text."""
    from serving.runtime.tokenizer import ClipTokenizer

    texts = [t for t in GOLDEN_TEXTS if "ͅ" not in t and "_of_text>" not in t and "ſ" not in t]
    plain = ClipTokenizer(tok_files[0], None)
    assert np.array_equal(open_clip_tokenizer(texts).numpy(), plain(texts))


def test_tokenizer_rejects_a_single_string(clip_tokenizer):
    with pytest.raises(TypeError):
        clip_tokenizer("a photo")


# --------------------------------------------------------------------------------------------- preprocess


def _rng_image(w: int, h: int, seed: int) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def _open_clip_transform(size: int, resize_mode: str = "shortest", interpolation: str = "bicubic"):
    from open_clip.transform import image_transform

    return image_transform(size, is_train=False, resize_mode=resize_mode, interpolation=interpolation)


SIZES = [(32, 32), (10, 7), (7, 10), (500, 300), (300, 500), (33, 32), (32, 97), (1, 1), (640, 641)]
MODES = ["RGB", "RGBA", "L", "P", "CMYK"]


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_pixels_equal_open_clip_transform(resize_mode):
    from serving.runtime.preprocess import PreprocessConfig, preprocess

    worst = 0.0
    for size, interp in ((32, "bicubic"), (224, "bicubic"), (32, "bilinear")):
        cfg = PreprocessConfig(image_size=size, resize_mode=resize_mode, interpolation=interp)
        ref_tf = _open_clip_transform(size, resize_mode, interp)
        for k, (w, h) in enumerate(SIZES):
            for mode in MODES:
                img = _rng_image(w, h, k).convert(mode)
                ref = ref_tf(img.convert("RGB")).numpy()  # the trainer decodes to RGB first
                got = preprocess(img, cfg)
                assert got.shape == (3, size, size) and got.dtype == np.float32
                worst = max(worst, float(np.abs(ref - got).max()))
    assert worst <= 1e-6


def test_rgb_pixels_equal_raw_open_clip_transform():
    """For RGB input the runtime equals open_clip's transform applied directly (no conversion involved)."""
    from serving.runtime.preprocess import PreprocessConfig, preprocess

    cfg = PreprocessConfig(image_size=224)
    tf = _open_clip_transform(224)
    for k, (w, h) in enumerate(SIZES):
        img = _rng_image(w, h, 100 + k)
        assert np.abs(tf(img).numpy() - preprocess(img, cfg)).max() <= 1e-6


def _exif_rotated_jpeg() -> Image.Image:
    base = _rng_image(60, 40, 5)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buf = io.BytesIO()
    base.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    buf.seek(0)
    img = Image.open(buf)
    img.load()
    return img


def test_exif_orientation_ignored_by_default_like_open_clip():
    from serving.runtime.preprocess import PreprocessConfig, preprocess

    img = _exif_rotated_jpeg()
    assert img.getexif().get(0x0112) == 6
    ref = _open_clip_transform(32)(img.convert("RGB")).numpy()
    assert np.abs(preprocess(img, PreprocessConfig(image_size=32)) - ref).max() <= 1e-6
    rotated = ImageOps.exif_transpose(img)
    assert rotated is not None and rotated.size == (40, 60)
    ref_t = _open_clip_transform(32)(rotated.convert("RGB")).numpy()
    got_t = preprocess(img, PreprocessConfig(image_size=32, exif_transpose=True))
    assert np.abs(got_t - ref_t).max() <= 1e-6
    assert np.abs(got_t - ref).max() > 0.1  # the flag really changes the pixels


@pytest.mark.parametrize(
    "mode", ["1", "LA", "PA", "La", "RGBa", "RGBX", "YCbCr", "HSV", "I", "I;16", "I;16B", "F"]
)
def test_every_mode_gives_finite_rgb_pixels(mode):
    from serving.runtime.preprocess import PreprocessConfig, preprocess, to_rgb

    if mode == "I;16":
        img = Image.fromarray(np.full((9, 14), 40000, np.uint16))
    elif mode == "I;16B":
        img = Image.frombytes("I;16B", (14, 9), np.full((9, 14), 40000, ">u2").tobytes())
    elif mode == "I":
        img = Image.fromarray(np.full((9, 14), 40000, np.int32))
    elif mode == "F":
        img = Image.fromarray(np.full((9, 14), 100.4, np.float32))
    else:
        img = _rng_image(14, 9, 3).convert("RGBA" if mode in ("La", "RGBa", "PA") else "RGB")
        img = img.convert(mode) if mode != "PA" else img.convert("P").convert("PA")
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (14, 9)
    if mode.startswith("I"):
        assert np.asarray(rgb)[0, 0].tolist() == [156, 156, 156]  # 40000 >> 8, not PIL's saturation at 255
    if mode == "F":
        assert np.asarray(rgb)[0, 0].tolist() == [100, 100, 100]
    out = preprocess(img, PreprocessConfig(image_size=32))
    assert out.shape == (3, 32, 32) and np.isfinite(out).all()


def test_preprocess_config_round_trips_through_the_manifest():
    from serving.runtime.preprocess import PreprocessConfig

    cfg = PreprocessConfig(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_mode="squash")
    assert PreprocessConfig.from_manifest(cfg.to_manifest()) == cfg
    with pytest.raises(ValueError):
        PreprocessConfig(image_size=224, resize_mode="crop")


# --------------------------------------------------------------------------------------------- torch-free


def test_runtime_imports_no_torch():
    code = (
        "import sys, serving.runtime.bundle, serving.runtime.tokenizer, serving.runtime.preprocess\n"
        "from serving.runtime import Bundle, BundleError, ClipTokenizer, PreprocessConfig\n"
        "bad = [m for m in ('torch', 'torchvision', 'open_clip', 'trainer', 'export') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
