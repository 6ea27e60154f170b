"""`python -m trainer check` on every real-data recipe pointed at small data made here, the order of `fit`'s
checks (data before weights), `data.skip_unreadable`, weights resolution offline, and the messages."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_CONFIG
from tests.test_datasets import write_cifar
from trainer.cli import ThirdPartyFilter, main
from trainer.config import load_config
from trainer.data.checks import scan_files
from trainer.data.sampling import long_tail_counts
from trainer.errors import UserError, shorten
from trainer.metrics import ShotThresholds, group_sizes

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SPLITFILE_RECIPES = ["gnm_drw_imagenet_lt", "gnm_drw_places_lt", "gnm_drw_inat2018"]
REAL_RECIPES = ["gnm_drw_cifar100_lt", *SPLITFILE_RECIPES, "gcsam_coop_base2novel"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache, HF_HUB_OFFLINE set (as the hub client reads it), and no open_clip download."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, tiny_clip) -> list[str]:
    """--set overrides that swap a recipe's ViT-B/16 for the tiny model with a local weights file."""
    import torch

    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(tiny_clip.model.state_dict(), path)
    return [
        "model.name=tiny-clip",
        f"model.config_path={TINY_CONFIG}",
        f"model.pretrained={path}",
        "model.quick_gelu=false",
        "data.num_workers=0",
    ]


def _check(capsys, recipe: str, sets: list[str], *extra: str) -> tuple[int, str]:
    """Exit code and the report with its line wrapping undone (whitespace runs read as one space)."""
    argv = ["check", "-c", str(RECIPES / f"{recipe}.yaml"), "--no-progress", "--steps", "1"]
    for s in sets:
        argv += ["--set", s]
    code = main([*argv, *extra])
    return code, " ".join(capsys.readouterr().out.split())


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (36, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, quality=90)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ------------------------------------------------------------------------------------------- CIFAR-100-LT


def test_check_cifar100_lt_good_data_counts(tmp_path, capsys, tiny_weights):
    write_cifar(tmp_path / "c100", per_class_train=20, per_class_test=2)
    sets = [f"data.root={tmp_path / 'c100'}", "data.n_max=20", "data.imbalance=10", *tiny_weights]
    code, out = _check(capsys, "gnm_drw_cifar100_lt", sets)
    assert code == 0, out
    counts = long_tail_counts(20, 100, 10)
    sizes = group_sizes(counts, ShotThresholds(100, 20))
    assert f"train: {sum(counts):,} images ({max(counts)} .. {min(counts)} per class)" in out
    assert "test: 200 images (2 per class)" in out
    assert "imbalance factor 10.0" in out
    assert f"many {sizes['many']} / medium {sizes['medium']} / few {sizes['few']} classes" in out
    assert "classes: 100: apple, aquarium fish, baby" in out
    assert "held in memory" in out
    assert f"data.root: 'data/cifar100' -> '{tmp_path / 'c100'}'" in out
    assert "projected: epoch" in out and "check: OK" in out


def test_check_cifar100_missing_root_names_the_fix(tmp_path, capsys, tiny_weights):
    code, out = _check(capsys, "gnm_drw_cifar100_lt", [f"data.root={tmp_path / 'nope'}", *tiny_weights])
    assert code == 1
    assert f"{tmp_path / 'nope'}: CIFAR-100 root does not exist" in out
    assert "--set data.root=DIR" in out and "--set data.download=true" in out
    assert "dry run: " in out and "skipped" in out
    assert out.endswith(
        "check: FAILED: data (1 fault); dry run (skipped: the data did not build, or a trained "
        "class has no images)"
    )


def test_check_cifar100_corrupt_pickle_named(tmp_path, capsys, tiny_weights):
    folder = write_cifar(tmp_path / "c100", per_class_train=20, per_class_test=2)
    _truncate(folder / "test")
    sets = [f"data.root={tmp_path / 'c100'}", "data.n_max=20", "data.imbalance=10", *tiny_weights]
    code, out = _check(capsys, "gnm_drw_cifar100_lt", sets)
    assert code == 1
    assert f"FAIL {folder / 'test'}: not a readable CIFAR-100 pickle" in out
    assert "re-extract cifar-100-python.tar.gz" in out


def test_data_download_reaches_the_cifar_loader(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    from trainer.data.tasks import task_from_config as build_task

    calls = []

    def fake_download(url, download_root, md5):
        calls.append((url, download_root, md5))
        write_cifar(Path(download_root), 1, 1)

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    cfg = load_config(None, ["data.kind=cifar100", f"data.root={tmp_path / 'c'}", "data.download=true"])
    task = build_task(cfg.data)
    assert len(calls) == 1 and calls[0][1] == str(tmp_path / "c") and len(task.train) == 100
    with pytest.raises(UserError, match=r"data.download=true: only CIFAR-100"):
        load_config(None, ["data.kind=imagefolder", "data.root=x", "data.download=true"])


# ------------------------------------------------------------------------------------------- split files


def _split_tree(root: Path, recipe: str, classes: int = 3, per_class: int = 4) -> None:
    """The split-file layout the recipe names: its train / test files and its class-names file."""
    d = load_config(RECIPES / f"{recipe}.yaml").data
    train, test = [], []
    for c in range(classes):
        for i in range(per_class + c):  # unequal classes: a small long tail
            rel = f"train/c{c}/{i}.jpg"
            _jpeg(root / rel, seed=c * 100 + i)
            train.append(f"{rel} {c}")
        rel = f"val/c{c}/0.jpg"
        _jpeg(root / rel, seed=10_000 + c)
        test.append(f"{rel} {c}")
    (root / d.train_file).write_text("\n".join(train) + "\n")
    (root / d.test_file).write_text("\n".join(test) + "\n")
    (root / d.names_file).write_text("\n".join(f"class {c}" for c in range(classes)) + "\n")


@pytest.mark.parametrize("recipe", SPLITFILE_RECIPES)
def test_check_splitfile_recipes(tmp_path, capsys, tiny_weights, recipe):
    root = tmp_path / "lt"
    _split_tree(root, recipe)
    sets = [f"data.root={root}", *tiny_weights]
    code, out = _check(capsys, recipe, sets)
    assert code == 0, out
    assert "train: 15 images (6 .. 4 per class); test: 3 images (1 per class)" in out
    assert "imbalance factor 1.5" in out and "few 3 classes" in out
    assert "decode: 18 image files" in out and ": 0 unreadable" in out

    # one line names a missing image, one image is corrupt: both named, exit 1
    d = load_config(RECIPES / f"{recipe}.yaml").data
    (root / "train/c1/2.jpg").unlink()
    _truncate(root / "val/c2/0.jpg")
    code, out = _check(capsys, recipe, sets)
    assert code == 1
    assert f"{root / d.train_file}:7: {root / 'train/c1/2.jpg'}: image does not exist [train]" in out
    assert f"{root / 'val/c2/0.jpg'}: cannot decode image" in out
    assert "check: FAILED: data (2 faults)" in out
    # the dry run still ran on the readable files
    assert "projected: epoch" in out


# ------------------------------------------------------------------------------------------- ImageFolder


def _folder_tree(root: Path, per_class: int = 18) -> None:
    for split, n in (("train", per_class), ("test", 3)):
        for c, name in enumerate(["Abyssinian", "beagle", "sea_lion", "zebra"]):
            for i in range(n):
                _jpeg(root / split / name / f"{i}.jpg", seed=c * 1000 + i + (500 if split == "test" else 0))


def test_check_imagefolder_base2novel(tmp_path, capsys, tiny_weights):
    root = tmp_path / "b2n"
    _folder_tree(root, per_class=16)  # 16 shots: every training image is drawn
    sets = [f"data.root={root}", *tiny_weights]
    code, out = _check(capsys, "gcsam_coop_base2novel", sets)
    assert code == 0, out
    assert "classes: 2: abyssinian, beagle" in out
    assert "train: 32 images (16 per class); test: 6 images (3 per class); novel test: 6 images" in out
    assert "2 novel classes, tested only (sea lion, zebra)" in out
    assert "decode: 44 image files" in out and ": 0 unreadable" in out  # 32 shots + 12 test images

    # one corrupt file and one empty class folder: both named, exit 1
    corrupt = root / "train" / "beagle" / "5.jpg"
    _truncate(corrupt)
    (root / "train" / "walrus").mkdir()
    code, out = _check(capsys, "gcsam_coop_base2novel", sets, "--json", str(tmp_path / "r.json"))
    assert code == 1
    assert f"FAIL {root / 'train' / 'walrus'}: class folder has no images [train]" in out
    assert f"FAIL {corrupt}: cannot decode image (OSError: image file is truncated" in out
    assert "check: FAILED: data (2 faults)" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is False and report["data"]["unreadable"][0]["path"] == str(corrupt)
    assert report["data"]["train_counts"] == [16, 16, 16]  # as listed: abyssinian, beagle, sea lion


def test_check_config_error_exits_1(capsys):
    code, out = _check(capsys, "gnm_drw_cifar100_lt", ["optim.name=adam"])
    assert code == 1
    assert "FAIL invalid config" in out and "optim.name" in out
    assert out.endswith("check: FAILED: config (1 fault)")


# ------------------------------------------------------------------------------------------- fit: cheap first


@pytest.mark.parametrize("recipe", REAL_RECIPES)
def test_fit_wrong_root_fails_fast_without_weights(tmp_path, monkeypatch, capsys, recipe):
    import open_clip

    import trainer.models
    import trainer.runner

    calls: list[str] = []

    def never(*args, **kwargs):
        calls.append("weights")
        raise AssertionError("the weight loader was called before the data was checked")

    monkeypatch.setattr(trainer.models, "load_clip", never)
    monkeypatch.setattr(open_clip, "create_model", never)
    monkeypatch.setattr("trainer.weights.locate_weights", never)
    t0 = time.perf_counter()
    code = main(
        [
            "fit",
            "-c",
            str(RECIPES / f"{recipe}.yaml"),
            "--set",
            f"data.root={tmp_path / 'nope'}",
            "--out",
            "r",
        ]
    )
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and elapsed < 5.0 and calls == []
    assert (
        err[-1].startswith("error: ") and str(tmp_path / "nope") in err[-1] and "--set data.root=" in err[-1]
    )


def test_fit_corrupt_image_stops_before_the_model(tmp_path, monkeypatch, capsys, tiny_weights):
    import trainer.runner

    root = tmp_path / "b2n"
    _folder_tree(root, per_class=3)
    bad = root / "train" / "beagle" / "1.jpg"
    _truncate(bad)
    called = []
    monkeypatch.setattr(trainer.training, "build_model", lambda *a, **k: called.append(1))
    sets = [f"data.root={root}", *tiny_weights, "train.epochs=1"]
    argv = ["fit", "-c", str(RECIPES / "gcsam_coop_base2novel.yaml"), "--no-progress", "--out", "r"]
    code = main([*argv, *[x for s in sets for x in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and called == []
    assert f"1 image file cannot be read: {bad}: cannot decode image" in err
    assert "python -m trainer check -c" in err and "--set data.skip_unreadable=true" in err


def test_fit_skip_unreadable_counts_in_summary(tmp_path, caplog, tiny_weights):
    from trainer.runner import fit

    root = tmp_path / "b2n"
    _folder_tree(root, per_class=3)
    bad = root / "train" / "beagle" / "1.jpg"
    _truncate(bad)
    cfg = load_config(
        RECIPES / "gcsam_coop_base2novel.yaml",
        [
            f"data.root={root}",
            *tiny_weights,
            "train.epochs=1",
            "data.skip_unreadable=true",
            "data.batch_size=4",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )
    with caplog.at_level(logging.WARNING, logger="trainer"):
        fit(cfg, progress=False)
    assert any(str(bad) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    check = summary["data_check"]
    assert check["skipped_files"] == 1 and check["skipped_unreadable"] == 1 and check["scanned_files"] == 18
    assert check["files"][0]["path"] == str(bad)
    assert summary["class_counts"] == [3, 2]  # abyssinian 3, beagle 3 - 1 skipped


# ------------------------------------------------------------------------------------------- weights


def test_weights_offline_one_line_no_download(tmp_path, capsys, offline_hub, monkeypatch):
    import open_clip

    write_cifar(tmp_path / "c100", 20, 2)
    created = []
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: created.append(1))
    t0 = time.perf_counter()
    code, out = _check(
        capsys,
        "gnm_drw_cifar100_lt",
        [f"data.root={tmp_path / 'c100'}", "data.n_max=20", "data.imbalance=10"],
    )
    assert time.perf_counter() - t0 < 5.0 and created == []
    assert code == 1
    assert "HF_HUB_OFFLINE is set: the hub is not contacted" in out
    assert (
        "FAIL timm/vit_base_patch16_clip_224.openai/open_clip_pytorch_model.bin is not in the hub cache"
        in out
    )
    assert "and HF_HUB_OFFLINE is set, so the hub is not asked" in out
    assert out.endswith("check: FAILED: weights (1 fault); dry run (skipped: no model)")

    # fit: the same one line, at once, no retries
    code = main(["fit", "--set", "model.name=ViT-B-16", "--set", "model.pretrained=openai", "--out", "r"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "HF_HUB_OFFLINE is set" in err[0] and created == []


def test_weights_unreachable_hub_asks_once(monkeypatch, tmp_path):
    from huggingface_hub import constants

    import trainer.weights as w

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    calls = []

    def unreachable(url, timeout=None, **kwargs):
        calls.append(url)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr("huggingface_hub.get_hf_file_metadata", unreachable)
    source = w.locate_weights("ViT-B-16", "openai")
    assert source.kind == "unavailable" and len(calls) == 1
    assert "cannot be reached" in source.detail and "no retries" in source.detail


def test_weights_download_size_from_one_request_per_candidate(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError

    import trainer.weights as w

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    asked = []

    def metadata(url, timeout=None, **kwargs):
        asked.append(url.rsplit("/", 1)[-1])
        if url.endswith(".safetensors"):
            raise EntryNotFoundError("404: no such file")
        return SimpleNamespace(size=598_641_023)

    monkeypatch.setattr("huggingface_hub.get_hf_file_metadata", metadata)
    source = w.locate_weights("ViT-B-16", "openai")
    assert asked == ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    assert source.kind == "download" and source.size_bytes == 598_641_023
    assert source.describe() == (
        "a download of 598.6 MB (from the hub, timm/vit_base_patch16_clip_224.openai/open_clip_pytorch_model.bin)"
    )


def test_weights_sources(tmp_path, monkeypatch, offline_hub):
    import trainer.weights as w

    assert w.locate_weights("tiny-clip", None).kind == "none"
    assert w.locate_weights("flatprompt-toyclip", None).kind == "packaged"
    local = tmp_path / "w.pt"
    local.write_bytes(b"x" * 10)
    src = w.locate_weights("ViT-B-16", str(local))
    assert src.kind == "local" and src.size_bytes == 10
    assert w.locate_weights("ViT-B-16", str(tmp_path / "no.pt")).kind == "unavailable"
    typo = w.locate_weights("ViT-B-16", "opena")
    assert typo.kind == "unavailable" and "openai" in typo.detail
    assert "unknown open_clip model" in w.locate_weights("ViT-Q-99", "openai").detail
    # a file in the hub cache (the layout huggingface_hub writes) is found without any request
    repo = offline_hub / "models--timm--vit_base_patch16_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"y" * 123)
    cached = w.locate_weights("ViT-B-16", "openai")
    assert cached.kind == "cache" and cached.size_bytes == 123 and cached.offline
    assert cached.describe().startswith("hub cache ")


def test_pretrained_error_is_not_cut_mid_word(monkeypatch):
    import trainer.models as models

    long = "Failed to download weights for tag 'openai': " + "An error happened while trying to locate " * 12
    monkeypatch.setattr(models, "require_weights", lambda *a, **k: None)

    def fail(*args, **kwargs):
        raise RuntimeError(long)

    monkeypatch.setattr(models, "_create", fail)
    with pytest.raises(UserError) as info:
        models.load_clip("ViT-B-16", "openai")
    message = str(info.value)
    inner = message.split("(", 1)[1].split(" ...)", 1)[0]
    assert " ...)" in message and long.startswith(inner)
    assert inner.split()[-1] in long.split()  # the last word shown is a whole word


def test_shorten():
    assert shorten("short text") == "short text"
    s = shorten("alpha beta gamma delta " * 20, 50)
    assert len(s) <= 50 and s.endswith(" ...")
    assert all(word in {"alpha", "beta", "gamma", "delta"} for word in s[:-4].split())
    assert shorten("a\nmulti-line\n\tmessage") == "a multi-line message"


# ------------------------------------------------------------------------------------------- scan, logging


def test_scan_files_in_parallel_names_each_bad_file(tmp_path):
    paths = []
    for i in range(12):
        p = tmp_path / f"{i}.jpg"
        _jpeg(p, seed=i)
        paths.append(str(p))
    _truncate(Path(paths[3]))
    (tmp_path / "7.jpg").write_bytes(b"not an image at all")
    paths.append(str(tmp_path / "gone.jpg"))
    result = scan_files(paths, workers=2, chunk=4, progress=False)
    assert result.processes == 2 and result.files == 13
    assert set(result.unreadable) == {paths[3], paths[7], str(tmp_path / "gone.jpg")}
    assert result.unreadable[str(tmp_path / "gone.jpg")] == "file not found"
    assert "UnidentifiedImageError" in result.unreadable[paths[7]]


def test_third_party_root_logs_renamed_and_below_the_project_level():
    import open_clip.factory

    def record(name: str, level: int, pathname: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, pathname, 1, "Loaded built-in config", None, None)

    info = ThirdPartyFilter(logging.INFO)
    r = record("root", logging.INFO, open_clip.factory.__file__)
    assert info.filter(r) is False and r.name == "open_clip.factory"
    assert info.filter(record("root", logging.WARNING, open_clip.factory.__file__)) is True
    assert info.filter(record("trainer.runner", logging.INFO, __file__)) is True
    assert info.filter(record("huggingface_hub.utils._http", logging.INFO, __file__)) is False
    assert ThirdPartyFilter(logging.DEBUG).filter(record("root", logging.INFO, open_clip.factory.__file__))
