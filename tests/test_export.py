"""End-to-end export: tiny prompted / zero-shot models -> bundle -> torch-free runtime, plus failure modes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.export_fixtures import (
    CLASS_COUNTS,
    CLASS_NAMES,
    TINY_CONFIG,
    TINY_NAME,
    load_tiny,
    make_prompted,
    tiny_weights,
    variant_config,
    write_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5


def _export_cli(*args: str) -> int:
    from export.cli import main

    return main([*args, "--log-level", "WARNING"])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory):
    """A prompt-tuned run on the tiny CLIP (4 learned ctx vectors, deep visual prompts) and its checkpoint."""
    root = tmp_path_factory.mktemp("tuned")
    weights = tiny_weights(root / "tiny-weights.pt")
    loaded = load_tiny(weights)
    model = make_prompted(loaded)
    ckpt = write_checkpoint(root / "run" / "checkpoint.pt", loaded, model, CLASS_NAMES, CLASS_COUNTS)
    return {"root": root, "ckpt": ckpt, "model": model, "weights": weights}


@pytest.fixture(scope="module")
def tuned_bundle(tuned):
    """The checkpoint exported through the CLI with the default (dynamo) exporter."""
    out = tuned["root"] / "bundle"
    assert _export_cli("--checkpoint", str(tuned["ckpt"]), "--out", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def zero_shot_bundle(tmp_path_factory: pytest.TempPathFactory):
    """A zero-shot tiny bundle with fp16 files, TorchScript exporter."""
    root = tmp_path_factory.mktemp("zs")
    classes = root / "names.txt"
    classes.write_text("# pets\ncat\ndog\n\nsnow leopard\n", encoding="utf-8")
    out = root / "bundle"
    rc = _export_cli(
        "--zero-shot",
        "--model",
        TINY_NAME,
        "--model-config",
        str(TINY_CONFIG),
        "--classes",
        str(classes),
        "--template",
        "a drawing of a {}.",
        "--out",
        str(out),
        "--fp16",
        "--exporter",
        "torchscript",
    )
    assert rc == 0
    return out


def _load(path: Path, **kw):
    from serving.runtime.bundle import Bundle

    return Bundle.load(path, providers=["CPUExecutionProvider"], **kw)


# --------------------------------------------------------------------------------------------- bundle contents


def test_manifest_lists_every_file_with_its_checksum(tuned_bundle):
    from serving.runtime.bundle import sha256_file
    from serving.runtime.manifest import Manifest

    manifest = json.loads((tuned_bundle / "manifest.json").read_text())
    # the typed record gives back exactly what the exporter wrote (same keys, values, order and bytes)
    assert Manifest.read(tuned_bundle).to_dict() == manifest
    assert Manifest.read(tuned_bundle).to_json() == (tuned_bundle / "manifest.json").read_text()
    on_disk = {p.name for p in tuned_bundle.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {
        "image_encoder.onnx",
        "text_encoder.onnx",
        "class_embeddings.npy",
        "classes.json",
        "tokenizer.json",
        "pretokenizer.json",
    } <= on_disk
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(tuned_bundle / name)
        assert entry["bytes"] == (tuned_bundle / name).stat().st_size
    assert manifest["format_version"] == 1
    assert manifest["source"]["kind"] == "prompt_tuned"
    assert manifest["model"]["activation"] == "gelu"  # recorded from the checkpoint's identity
    assert manifest["source"]["checkpoint_sha256"] == manifest["model"]["checkpoint_sha256"]
    assert manifest["prompt"] == {
        "template": "X X X X {}.",
        "n_ctx": 4,
        "placeholder": "X",
        "vpt_length": 2,
        "vpt_deep": True,
        "handwritten_template": "a photo of a {}.",
        "default_text_path": "learned",  # not a toy-world run: nothing to measure the paths on
        "default_text_path_source": "default",
    }
    assert "text_encoder_handwritten.onnx" in on_disk
    assert manifest["graphs"]["text_encoder_handwritten"]["fp32"] == "text_encoder_handwritten.onnx"
    assert manifest["preprocess"]["exif_transpose"] is False
    assert manifest["onnx"]["exporter"] == "dynamo"
    par = manifest["parity"]
    assert list(par) == [  # export.parity.ParityReport writes the keys the dict literal wrote, in its order
        "tolerance",
        "fp16_tolerance",
        "provider",
        "tokenizer",
        "preprocess",
        "image_fp32",
        "text_fp32",
        "class_bank_fp32",
        "text_handwritten_fp32",
        "text_paths",
        "top1",
        "top1_agreement",
    ]
    assert list(par["image_fp32"]) == ["max_abs_diff", "batch_sizes", "per_batch", "parity_images"]
    assert list(par["text_paths"]) == ["names", "learned", "handwritten", "ensemble"]
    assert list(json.loads((tuned_bundle / "classes.json").read_text())) == ["names", "counts"]
    assert par["image_fp32"]["batch_sizes"] == [1, 2, 5] and par["text_fp32"]["batch_sizes"] == [1, 2, 5]
    assert par["image_fp32"]["max_abs_diff"] <= 1e-4 and par["text_fp32"]["max_abs_diff"] <= 1e-4
    assert par["top1_agreement"] == 1.0 and par["tokenizer"]["mismatches"] == 0
    assert par["preprocess"]["max_abs_diff"] <= 1e-6
    assert not [p for p in tuned_bundle.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_bundle_embeddings_equal_torch(tuned, tuned_bundle):
    bundle = _load(tuned_bundle)
    model = tuned["model"]
    assert bundle.provider == "CPUExecutionProvider" and bundle.precision == "fp32"
    assert bundle.class_names == CLASS_NAMES and bundle.class_counts == CLASS_COUNTS
    assert bundle.class_embeddings.dtype == np.float32 and bundle.class_embeddings.shape == (6, 32)
    assert bundle.embed_dim == 32 and bundle.image_size == 32
    assert bundle.logit_scale == pytest.approx(model.logit_scale) and bundle.logit_bias is None
    with torch.no_grad():
        ref_bank = model.encode_names(CLASS_NAMES).numpy()
        pixels = np.random.default_rng(3).standard_normal((7, 3, 32, 32)).astype(np.float32)
        ref_img = model.encode_image(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(bundle.class_embeddings, ref_bank, atol=ATOL)
    np.testing.assert_allclose(bundle.embed_texts(CLASS_NAMES), ref_bank, atol=ATOL)
    np.testing.assert_allclose(bundle.embed_images(pixels), ref_img, atol=ATOL)
    np.testing.assert_allclose(bundle.embed_images(pixels, batch_size=3), ref_img, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(bundle.embed_images(pixels), axis=1), 1.0, atol=1e-5)
    logits = bundle.logits(bundle.embed_images(pixels))
    np.testing.assert_allclose(logits, model.logit_scale * ref_img @ ref_bank.T, atol=1e-3)


def test_new_class_names_get_the_learned_context(tuned, tuned_bundle):
    bundle = _load(tuned_bundle)
    model = tuned["model"]
    new = ["okapi", "Ünïcödé 名前", "a very long class name " * 5]
    with torch.no_grad():
        ref = model.encode_names(new).numpy()
        plain = model.clip.encode_text(model.tokenize(new))  # same prompt text, no learned context
        plain = torch.nn.functional.normalize(plain, dim=-1).numpy()
    got = bundle.embed_texts(new)
    np.testing.assert_allclose(got, ref, atol=ATOL)
    assert np.abs(got - plain).max() > 0.05  # the learned context really is in the graph
    assert bundle.prompt_text("okapi") == "X X X X okapi."
    assert bundle.prompt_text("okapi", "X X X X {}, an animal.") == "X X X X okapi, an animal."
    with pytest.raises(ValueError, match="learned context"):
        bundle.prompt_text("okapi", "a photo of a {}.")
    np.testing.assert_array_equal(bundle.tokenize(["X X X X okapi."]), model.tokenize(["okapi"]).numpy())


def test_each_text_path_embeds_as_the_matching_torch_path(tuned, tuned_bundle):
    from serving.runtime.bundle import TEXT_PATHS

    bundle = _load(tuned_bundle)
    model = tuned["model"]
    assert bundle.text_paths == TEXT_PATHS and bundle.handwritten_template == "a photo of a {}."
    names = [*CLASS_NAMES, "okapi", "Ünïcödé 名前"]
    with torch.no_grad():
        learned = model.encode_names(names)
        # the hand-written path, computed independently of PromptedCLIP: open_clip's own encode_text
        plain = model.clip.encode_text(model.tokenizer([f"a photo of a {n}." for n in names]))
        hand = torch.nn.functional.normalize(plain, dim=-1)
        ensemble = torch.nn.functional.normalize(learned + hand, dim=-1)
    refs = {"learned": learned, "handwritten": hand, "ensemble": ensemble}
    for path, ref in refs.items():
        np.testing.assert_allclose(
            bundle.embed_texts(names, text_path=path), ref.numpy(), atol=ATOL, err_msg=path
        )
    assert (learned - hand).abs().max() > 0.05  # two different paths, not one graph twice
    manifest = bundle.manifest.to_dict()
    assert set(manifest["parity"]["text_paths"]) == {"names", *TEXT_PATHS}
    assert all(manifest["parity"]["text_paths"][p]["max_abs_diff"] <= 1e-4 for p in TEXT_PATHS)
    assert manifest["parity"]["text_handwritten_fp32"]["batch_sizes"] == [1, 2, 5]
    with pytest.raises(ValueError, match="text_path"):
        bundle.embed_texts(names, text_path="zero-shot")
    with pytest.raises(ValueError, match="no template"):
        bundle.embed_texts(names, "a photo of a {}.", text_path="ensemble")


def test_old_bundle_without_the_handwritten_graph_still_loads(tuned_bundle, tmp_path):
    from serving.runtime.bundle import sha256_file

    old = tmp_path / "old"
    shutil.copytree(tuned_bundle, old)
    (old / "text_encoder_handwritten.onnx").unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["files"]["text_encoder_handwritten.onnx"], manifest["graphs"]["text_encoder_handwritten"]
    del manifest["prompt"]["handwritten_template"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    bundle = _load(old, verify=True)
    assert bundle.text_paths == ("learned",) and bundle.handwritten_template is None
    assert bundle.embed_texts(["okapi"]).shape == (1, 32)
    for path in ("handwritten", "ensemble"):
        with pytest.raises(ValueError, match="re-export"):
            bundle.embed_texts(["okapi"], text_path=path)
    assert sha256_file(old / "text_encoder.onnx") == sha256_file(tuned_bundle / "text_encoder.onnx")


def test_zero_shot_bundle_handwritten_path_is_its_own_graph(zero_shot_bundle):
    bundle = _load(zero_shot_bundle)
    assert "text_encoder_handwritten.onnx" not in bundle.manifest.files  # no second copy of the same graph
    assert bundle.handwritten_template == "a drawing of a {}."
    names = ["cat", "okapi"]
    for path in ("handwritten", "ensemble"):
        np.testing.assert_allclose(
            bundle.embed_texts(names, text_path=path), bundle.embed_texts(names), atol=1e-6
        )


def test_bundle_preprocess_equals_open_clip_transform(tuned, tuned_bundle):
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    bundle = _load(tuned_bundle)
    cfg = PreprocessCfg(**tuned["model"].clip.visual.preprocess_cfg)
    tf = image_transform_v2(cfg, is_train=False)
    rng = np.random.default_rng(0)
    for w, h in [(32, 32), (50, 20), (20, 50), (7, 9), (300, 200)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert np.abs(tf(img).numpy() - bundle.preprocess(img)).max() <= 1e-6
    batch = bundle.preprocess_batch([img, img.convert("L")])
    assert batch.shape == (2, 3, 32, 32)


def test_zero_shot_bundle_with_fp16_files(zero_shot_bundle):
    manifest = json.loads((zero_shot_bundle / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "zero_shot" and manifest["prompt"]["n_ctx"] == 0
    assert manifest["model"]["activation"] == "gelu"
    assert manifest["prompt"]["template"] == "a drawing of a {}."
    assert manifest["onnx"]["exporter"] == "torchscript"
    assert {"image_encoder.fp16.onnx", "text_encoder.fp16.onnx"} <= set(manifest["files"])
    for key in ("image_fp16", "text_fp16"):
        entry = manifest["parity"][key]
        assert entry["status"] in ("measured", "not measured on CPU")
        if entry["status"] == "measured":
            assert entry["max_abs_diff"] <= 1e-2
    bundle = _load(zero_shot_bundle)
    assert bundle.precision == "fp32"  # fp16 files only on CUDA
    assert bundle.class_names == ["cat", "dog", "snow leopard"] and bundle.class_counts == [0, 0, 0]
    assert bundle.prompt_text("cat", "a photo of a {}.") == "a photo of a cat."  # any template when n_ctx = 0
    from serving.runtime.bundle import BundleError

    with pytest.raises(BundleError, match="fp16"):
        _load(zero_shot_bundle, precision="fp16")


# --------------------------------------------------------------------------------------------- bad bundles


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_tampered_file_is_refused(tuned_bundle, tmp_path):
    from serving.runtime.bundle import BundleError

    b = _copy(tuned_bundle, tmp_path)
    emb = b / "class_embeddings.npy"
    data = bytearray(emb.read_bytes())
    data[-1] ^= 0x01  # same size, different content
    emb.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"class_embeddings\.npy.*sha256"):
        _load(b)
    _load(b, verify=False)  # sizes only: loads
    (b / "classes.json").write_text("{}")
    with pytest.raises(BundleError, match=r"classes\.json"):
        _load(b, verify=False)


def test_missing_file_corrupt_manifest_and_newer_format_are_refused(tuned_bundle, tmp_path):
    from serving.runtime.bundle import BundleError

    b = _copy(tuned_bundle, tmp_path)
    (b / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json is missing"):
        _load(b)
    shutil.copyfile(tuned_bundle / "tokenizer.json", b / "tokenizer.json")
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["format_version"] = 2
    (b / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version 2, newer than"):
        _load(b)
    (b / "manifest.json").write_text('{"format_version": 1, "files": ')
    with pytest.raises(BundleError, match=r"manifest\.json is not valid JSON"):
        _load(b)
    with pytest.raises(BundleError, match="not a directory"):
        _load(tmp_path / "nope")


# --------------------------------------------------------------------------------------------- CLI failures


def test_bad_inputs_exit_2_with_one_line(tuned, tmp_path, capsys):
    out = str(tmp_path / "out")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt")], "does not exist"),
        (["--checkpoint", str(garbage)], "corrupt"),
        (
            ["--checkpoint", str(tuned["ckpt"]), "--model", "ViT-B-16"],
            "trained on model 'tiny-clip', not 'ViT-B-16'",
        ),
        (["--zero-shot", "--model", TINY_NAME, "--model-config", str(TINY_CONFIG)], "needs --classes"),
        (["--checkpoint", str(tuned["ckpt"]), "--template", "a {}."], "carries its own classes and prompt"),
        (["--zero-shot", "--model", "no-such-model", "--classes", str(garbage)], "class file"),
    ]
    for args, msg in cases:
        assert _export_cli(*args, "--out", out) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("error: ") and msg in err[-1], (args, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "text", "vision", "top", "msg"),
    [
        ("tiny-firstpool", {"pool_type": "first"}, None, None, "text_pool_type 'first'"),
        (
            "tiny-attnpool",
            None,
            {"attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 4},
            None,
            "attentional pooling",
        ),
        ("tiny-customtext", None, None, {"custom_text": True}, "custom"),
    ],
)
def test_unsupported_models_exit_2(tmp_path, capsys, name, text, vision, top, msg):
    cfg = variant_config(tmp_path, name, text, vision, top)
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    rc = _export_cli(
        "--zero-shot",
        "--model",
        name,
        "--model-config",
        str(cfg),
        "--classes",
        str(names),
        "--out",
        str(tmp_path / "out"),
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and msg in err[-1], err
    assert not (tmp_path / "out").exists()


def test_existing_out_needs_force_and_force_never_deletes_non_bundles(tuned, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "precious.txt").write_text("keep me")
    assert _export_cli("--checkpoint", str(tuned["ckpt"]), "--out", str(occupied)) == 2
    assert "--force" in capsys.readouterr().err
    assert _export_cli("--checkpoint", str(tuned["ckpt"]), "--out", str(occupied), "--force") == 2
    assert "not a bundle" in capsys.readouterr().err
    assert (occupied / "precious.txt").read_text() == "keep me"


def test_failed_export_leaves_nothing_behind(tuned, tmp_path, capsys):
    out = tmp_path / "bundle"
    rc = _export_cli(
        "--checkpoint", str(tuned["ckpt"]), "--out", str(out), "--exporter", "torchscript", "--tol", "-1"
    )  # no graph can meet a negative tolerance
    assert rc == 1
    assert "onnxruntime does not match torch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing_behind(tuned, tmp_path, monkeypatch):
    from export import builder, sources

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(builder, "write_tokenizer_json", boom)
    source = sources.from_checkpoint(tuned["ckpt"])
    with pytest.raises(KeyboardInterrupt):
        builder.export_bundle(source, tmp_path / "b", builder.ExportOptions(exporter="torchscript"))
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_a_bundle_and_hands_it_to_bentoml(tuned, tuned_bundle, tmp_path, monkeypatch, capsys):
    from export import bentoml_store

    saved: list[tuple[Path, str]] = []

    def fake_save(path, name):
        saved.append((Path(path), name))
        return f"{name}:v1"

    monkeypatch.setattr(bentoml_store, "save_to_bentoml", fake_save)
    out = tmp_path / "b"
    shutil.copytree(tuned_bundle, out)
    rc = _export_cli(
        "--checkpoint",
        str(tuned["ckpt"]),
        "--out",
        str(out),
        "--force",
        "--exporter",
        "torchscript",
        "--to-bentoml",
        "flatprompt-test",
    )
    assert rc == 0
    assert json.loads((out / "manifest.json").read_text())["onnx"]["exporter"] == "torchscript"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no .partial / .old leftovers
    assert saved == [(out, "flatprompt-test")]
    assert "bentoml: flatprompt-test:v1" in capsys.readouterr().out
    assert _load(out).class_names == CLASS_NAMES


def test_save_to_bentoml_copies_the_bundle_into_the_store(tuned_bundle, tmp_path):
    home = tmp_path / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    code = "import sys; from export.bentoml_store import save_to_bentoml; print(save_to_bentoml(sys.argv[1], 'fp-test'))"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tuned_bundle)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    tag = proc.stdout.strip().splitlines()[-1]
    assert tag.startswith("fp-test:")
    stored = home / "models" / tag.replace(":", "/")
    assert (stored / "manifest.json").read_bytes() == (tuned_bundle / "manifest.json").read_bytes()
    assert _load(stored).class_names == CLASS_NAMES


def test_bad_bentoml_name_is_a_user_error(tuned_bundle):
    from export.bentoml_store import save_to_bentoml
    from trainer.errors import UserError

    with pytest.raises(UserError, match="BentoML could not save model"):
        save_to_bentoml(tuned_bundle, "Not A Valid Name!")


def test_fp16_parity_reports_not_measured_when_onnxruntime_cannot_run_it(tmp_path):
    from export.parity import fp16_parity

    bogus = tmp_path / "broken.fp16.onnx"
    bogus.write_bytes(b"not an onnx graph")
    x = np.zeros((1, 3, 4, 4), np.float32)
    entry = fp16_parity(bogus, "pixels", [x], [np.zeros((1, 2), np.float32)], cuda=False)
    assert entry.status == "not measured on CPU" and entry.reason and "CPUExecutionProvider" in entry.reason
    assert list(entry.to_dict()) == ["status", "reason"]


def test_default_text_path_is_recorded(tuned, tuned_bundle, tmp_path):
    """Not a toy-world run: learned by default (nothing measured); --default-text-path is recorded as asked."""
    prompt = json.loads((tuned_bundle / "manifest.json").read_text())["prompt"]
    assert prompt["default_text_path"] == "learned" and prompt["default_text_path_source"] == "default"
    out = tmp_path / "hand"
    rc = _export_cli(
        "--checkpoint", str(tuned["ckpt"]), "--out", str(out), "--default-text-path", "handwritten"
    )
    assert rc == 0
    prompt = json.loads((out / "manifest.json").read_text())["prompt"]
    assert (prompt["default_text_path"], prompt["default_text_path_source"]) == ("handwritten", "requested")


def test_toy_run_measures_its_default_text_path() -> None:
    """For a toy-world run the exporter scores each path on the novel test set and keeps the best."""
    from export.text_paths import choose_default

    class FakeBundle:
        text_paths = ("learned", "handwritten", "ensemble")
        n_ctx = 4

    import export.text_paths as tp

    scores = {"learned": 0.6, "handwritten": 0.7, "ensemble": 0.65}
    original = tp.toy_novel_top1
    tp.toy_novel_top1 = lambda bundle, seed=0, per_class=25: scores  # type: ignore[assignment]
    try:
        chosen = choose_default(FakeBundle(), "toy", 0)
        assert chosen.default_text_path == "handwritten" and chosen.text_path_novel_top1 == scores
        assert choose_default(FakeBundle(), "cifar100_lt", 0).default_text_path == "learned"
        with pytest.raises(ValueError):
            choose_default(type("Old", (), {"text_paths": ("learned",), "n_ctx": 4})(), "toy", 0, "ensemble")
    finally:
        tp.toy_novel_top1 = original
