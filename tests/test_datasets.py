"""Datasets on small made-up files in the real formats: CIFAR-100 pickles, split files, ImageFolder trees."""

from __future__ import annotations

import itertools
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data.base import LabelledImages, TaskData, class_counts
from trainer.data.cifar import CIFAR100, cifar100_lt
from trainer.data.folder import ImageFolderImages
from trainer.data.names import clean_class_name, clean_class_names
from trainer.data.registry import BUILDERS, TaskOptions, build_task, register_builder
from trainer.data.sampling import (
    LabelledSubset,
    apply_long_tail,
    base_novel_labels,
    base_to_novel_split,
    few_shot,
    long_tail_counts,
)
from trainer.data.splitfile import SplitFileImages, read_class_names
from trainer.errors import UserError
from trainer.metrics import group_sizes

# ---------------------------------------------------------------- helpers


class FakeImages(LabelledImages):
    """In-memory dataset; image ``i`` is 1x1 with red value ``i % 256``."""

    def __init__(self, targets: list[int], class_names: list[str]) -> None:
        self.targets = list(targets)
        self.class_names = list(class_names)

    def load(self, index: int) -> Image.Image:
        return Image.new("RGB", (1, 1), (index % 256, 0, 0))


CIFAR_NAMES = ["apple", "aquarium_fish", "baby", *[f"class_{i:02d}" for i in range(3, 100)]]


def write_cifar(
    root: Path, per_class_train: int, per_class_test: int, names: list[str] = CIFAR_NAMES
) -> Path:
    """Write a fake ``cifar-100-python`` folder. Row ``i`` has R(0,0) = label, G(0,0) = 7, B(0,1) = 9."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    with (folder / "meta").open("wb") as fh:
        pickle.dump({b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": []}, fh)
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = np.tile(np.arange(100), per_class)  # interleaved, as in the real files
        data = np.zeros((len(labels), 3072), dtype=np.uint8)
        data[:, 0] = labels
        data[:, 1024] = 7
        data[:, 2048 + 1] = 9
        with (folder / split).open("wb") as fh:
            pickle.dump({b"data": data, b"fine_labels": labels.tolist(), b"filenames": []}, fh)
    return folder


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-size fake CIFAR-100 (500 train and 100 test images per class)."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, 500, 100)
    return root


@pytest.fixture(scope="module")
def cifar_train(cifar_root: Path) -> CIFAR100:
    return CIFAR100(cifar_root, train=True)


@pytest.fixture()
def tiny_cifar(tmp_path: Path) -> Path:
    write_cifar(tmp_path, 2, 1)
    return tmp_path


def save_png(path: Path, color: tuple[int, int, int] = (10, 20, 30), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (4, 3), color if mode == "RGB" else color[0]).save(path)


# ---------------------------------------------------------------- names


def test_clean_class_name() -> None:
    assert clean_class_name("  Aquarium_fish ") == "aquarium fish"
    assert clean_class_name("Great__White\t shark") == "great white shark"
    assert clean_class_name("Ursus_Arctos", keep_case=True) == "Ursus Arctos"


def test_clean_class_names_duplicate_names_source_and_line() -> None:
    with pytest.raises(UserError, match=r"names\.txt:7: duplicate class name 'cat'.*line 3"):
        clean_class_names(["dog", "Cat", "cat"], "names.txt", line_numbers=[1, 3, 7])
    with pytest.raises(UserError, match=r"/data/x \(label 1\): class name '_ ' is empty"):
        clean_class_names(["a", "_ "], "/data/x")


# ---------------------------------------------------------------- CIFAR-100 / CIFAR-100-LT


def test_long_tail_counts_match_ldam() -> None:
    counts = long_tail_counts(500, 100, 100)
    assert counts[0] == 500 and counts[-1] == 5
    assert sum(counts) == 10847
    assert all(a >= b for a, b in itertools.pairwise(counts))
    assert counts[69] == 20
    assert group_sizes(counts) == {"many": 35, "medium": 35, "few": 30}
    assert long_tail_counts(500, 100, 1) == [500] * 100
    assert long_tail_counts(7, 1, 10) == [7]
    with pytest.raises(UserError, match=r"imbalance factor 0\.5 is below 1"):
        long_tail_counts(500, 100, 0.5)


def test_cifar100_loads_pixels_and_names(cifar_train: CIFAR100) -> None:
    ds = cifar_train
    assert len(ds) == 50000 and ds.num_classes == 100
    assert ds.class_names[:3] == ["apple", "aquarium fish", "baby"]
    assert class_counts(ds.targets, 100) == [500] * 100
    image, label = ds[123]
    assert label == 123 % 100
    assert image.mode == "RGB" and image.size == (32, 32)
    assert image.getpixel((0, 0)) == (label, 7, 0)  # channel-planar rows -> HWC
    assert image.getpixel((1, 0)) == (0, 0, 9)


def test_cifar100_lt_exact_counts_and_ldam_order(cifar_root: Path, cifar_train: CIFAR100) -> None:
    lt = apply_long_tail(cifar_train, 100, seed=0)
    counts = class_counts(lt.targets, 100)
    assert len(lt) == 10847
    assert counts[0] == 500 and counts[99] == 5 and counts == long_tail_counts(500, 100, 100)
    assert group_sizes(counts) == {"many": 35, "medium": 35, "few": 30}
    # Oracle: LDAM-DRW's gen_imbalanced_data (np.random.seed then one shuffle per class, label order).
    np.random.seed(0)
    targets = np.asarray(cifar_train.targets)
    expected: list[int] = []
    for c, n in enumerate(long_tail_counts(500, 100, 100)):
        idx = np.where(targets == c)[0]
        np.random.shuffle(idx)
        expected.extend(idx[:n].tolist())
    assert lt.indices == expected
    assert lt[0][1] == 0 and lt[0][0].getpixel((0, 0)) == (0, 7, 0)
    # The registry kind: same train, untouched balanced test.
    task = build_task("cifar100_lt", str(cifar_root))
    assert task.train_counts == counts
    assert len(task.test) == 10000 and class_counts(task.test.targets, 100) == [100] * 100
    assert task.novel_test is None


def test_cifar100_lt_function_other_seed(cifar_root: Path) -> None:
    train, test = cifar100_lt(cifar_root, imbalance=10, seed=1)
    assert class_counts(train.targets, 100) == long_tail_counts(500, 100, 10)
    assert len(test) == 10000
    other = apply_long_tail(train.base, 10, seed=2)
    assert other.indices != train.indices


def test_cifar_base_to_novel_with_shots(cifar_root: Path) -> None:
    task = build_task("cifar100", cifar_root, shots=16, seed=1, base_to_novel=True)
    assert task.novel_test is not None
    assert task.train.num_classes == 50 and task.novel_test.num_classes == 50
    assert task.train_counts == [16] * 50
    assert task.class_names[:2] == ["apple", "aquarium fish"]
    assert task.novel_test.class_names[0] == "class 50"
    assert len(task.test) == 5000 and len(task.novel_test) == 5000
    _, label = task.novel_test[0]
    assert label == 0


def test_cifar_missing_root(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=rf"{tmp_path / 'nope'}: CIFAR-100 root does not exist"):
        CIFAR100(tmp_path / "nope")
    with pytest.raises(UserError, match="cifar-100-python: not found"):
        CIFAR100(tmp_path)


def test_cifar_root_may_be_the_inner_folder(tiny_cifar: Path) -> None:
    ds = CIFAR100(tiny_cifar / "cifar-100-python", train=False)
    assert len(ds) == 100


@pytest.mark.parametrize(
    "content",
    [b"this is not a pickle", b"\x80\x04\x95", pickle.dumps([1, 2, 3])],
    ids=["garbage", "truncated", "not-a-dict"],
)
def test_cifar_corrupt_pickle_names_file(tiny_cifar: Path, content: bytes) -> None:
    path = tiny_cifar / "cifar-100-python" / "train"
    path.write_bytes(content)
    with pytest.raises(UserError, match=rf"{path}: "):
        CIFAR100(tiny_cifar, train=True)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_pickle_with_foreign_globals_is_refused(tiny_cifar: Path) -> None:
    path = tiny_cifar / "cifar-100-python" / "test"
    path.write_bytes(pickle.dumps({b"data": _Evil()}))
    with pytest.raises(UserError, match=r"test: not a readable CIFAR-100 pickle .*refusing global"):
        CIFAR100(tiny_cifar, train=False)


def test_cifar_missing_key_and_bad_shape(tiny_cifar: Path) -> None:
    path = tiny_cifar / "cifar-100-python" / "test"
    path.write_bytes(pickle.dumps({b"data": np.zeros((100, 3072), np.uint8), b"coarse_labels": [0] * 100}))
    with pytest.raises(UserError, match=r"test: key b'fine_labels' missing"):
        CIFAR100(tiny_cifar, train=False)
    path.write_bytes(pickle.dumps({b"data": np.zeros((100, 100), np.uint8), b"fine_labels": [0] * 100}))
    with pytest.raises(UserError, match=r"test: b'data' is uint8 \(100, 100\)"):
        CIFAR100(tiny_cifar, train=False)


def test_cifar_label_out_of_range(tiny_cifar: Path) -> None:
    path = tiny_cifar / "cifar-100-python" / "test"
    labels = list(range(100))
    labels[42] = 100
    path.write_bytes(pickle.dumps({b"data": np.zeros((100, 3072), np.uint8), b"fine_labels": labels}))
    with pytest.raises(UserError, match=r"test: item 42 has label 100, outside 0\.\.99"):
        CIFAR100(tiny_cifar, train=False)


def test_cifar_duplicate_class_names(tmp_path: Path) -> None:
    names = list(CIFAR_NAMES)
    names[5] = "Aquarium_Fish"
    write_cifar(tmp_path, 1, 1, names)
    with pytest.raises(UserError, match=r"meta \(label 5\): duplicate class name 'aquarium fish'"):
        CIFAR100(tmp_path)


def test_cifar_profile_leaving_a_class_empty(tiny_cifar: Path) -> None:
    with pytest.raises(UserError, match=r"CIFAR-100 train .*IF 100, n_max 2\) leaves class 15 .*zero images"):
        build_task("cifar100_lt", tiny_cifar)


# ---------------------------------------------------------------- split files


@pytest.fixture()
def split_tree(tmp_path: Path) -> Path:
    root = tmp_path / "lt"
    for i in range(4):
        save_png(root / "train" / "n01" / f"a{i}.png", (i, 0, 0))
    for i in range(2):
        save_png(root / "train" / "n02 x" / f"b{i}.png", (0, i, 0), mode="L")
    save_png(root / "train" / "n03" / "c0.png")
    for c in ("n01", "n02 x", "n03"):
        save_png(root / "val" / c / "t.png")
    (root / "ImageNet_LT_train.txt").write_text(
        "train/n01/a0.png 0\ntrain/n01/a1.png 0\ntrain/n01/a2.png 0\ntrain/n01/a3.png 0\n"
        "train/n02 x/b0.png 1\ntrain/n02 x/b1.png 1\n\ntrain/n03/c0.png 2\n"
    )
    (root / "ImageNet_LT_test.txt").write_text("val/n01/t.png 0\nval/n02 x/t.png 1\nval/n03/t.png 2\n")
    (root / "names.txt").write_text("Tench\ngold_fish\n great  white shark \n\n")
    return root


def test_splitfile_task(split_tree: Path) -> None:
    task = build_task(
        "splitfile",
        str(split_tree),
        train_file="ImageNet_LT_train.txt",
        test_file=str(split_tree / "ImageNet_LT_test.txt"),
        names_file="names.txt",
    )
    assert task.class_names == ["tench", "gold fish", "great white shark"]
    assert task.train_counts == [4, 2, 1]
    assert len(task.test) == 3 and task.test.targets == [0, 1, 2]
    image, label = task.train[4]  # an "L" PNG, converted
    assert label == 1 and image.mode == "RGB" and image.getpixel((0, 0)) == (0, 0, 0)
    assert task.train[2][0].getpixel((0, 0)) == (2, 0, 0)


def test_class_names_labelled_form(tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    path.write_text("2 Great_White_Shark\n0 tench\n\n1   gold fish \n")
    assert read_class_names(path) == ["tench", "gold fish", "great white shark"]
    assert read_class_names(path, keep_case=True)[2] == "Great White Shark"
    # Lines that are not all "label name" are read one name per line.
    path.write_text("0 tench\ngoldfish\n")
    assert read_class_names(path) == ["0 tench", "goldfish"]


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("0 tench\n1 goldfish\n0 shark\n", r"names\.txt:3: label 0 already named on line 1"),
        ("0 tench\n2 shark\n", r"names\.txt:2: labels must be 0\.\.1, but 1 is missing"),
        ("tench\ngoldfish\nTench\n", r"names\.txt:3: duplicate class name 'tench'.*line 1"),
        ("\n\n", r"names\.txt: class-names file has no names"),
    ],
    ids=["repeated-label", "missing-label", "duplicate-name", "empty"],
)
def test_class_names_file_errors(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "names.txt"
    path.write_text(text)
    with pytest.raises(UserError, match=pattern):
        read_class_names(path)


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ("train/n01/missing.png 0", r"train\.txt:2: image .*missing\.png does not exist"),
        ("train/n01/a1.png 3", r"train\.txt:2: label 3 is outside 0\.\.2"),
        ("train/n01/a1.png -1", r"train\.txt:2: label -1 is outside"),
        ("train/n01/a1.png zero", r"train\.txt:2: label 'zero' is not an integer"),
        ("train/n01/a1.png", r"train\.txt:2: expected 'relative/path label'"),
    ],
    ids=["missing-image", "label-too-big", "negative-label", "non-integer", "no-label"],
)
def test_split_file_errors_name_file_and_line(split_tree: Path, line: str, pattern: str) -> None:
    path = split_tree / "train.txt"
    path.write_text(f"train/n01/a0.png 0\n{line}\n")
    with pytest.raises(UserError, match=pattern):
        SplitFileImages(split_tree, path, ["a", "b", "c"])


def test_splitfile_missing_things(split_tree: Path, tmp_path: Path) -> None:
    train, test = "ImageNet_LT_train.txt", "ImageNet_LT_test.txt"
    with pytest.raises(UserError, match=r"nope: dataset root does not exist"):
        build_task("splitfile", tmp_path / "nope", train_file=train, test_file=test, names_file="names.txt")
    with pytest.raises(UserError, match=r"other\.txt: split file not found"):
        build_task("splitfile", split_tree, train_file=train, test_file="other.txt", names_file="names.txt")
    with pytest.raises(UserError, match="needs the names_file option"):
        build_task("splitfile", split_tree, train_file=train, test_file=test)
    with pytest.raises(UserError, match=r"missing\.txt: class-names file not found"):
        build_task("splitfile", split_tree, train_file=train, test_file=test, names_file="missing.txt")
    with pytest.raises(UserError, match=r"nope: image root does not exist"):
        SplitFileImages(tmp_path / "nope", split_tree / "ImageNet_LT_train.txt", ["a", "b", "c"])


def test_splitfile_class_without_training_images(split_tree: Path) -> None:
    (split_tree / "names.txt").write_text("tench\ngoldfish\nshark\nwhale\n")
    with pytest.raises(
        UserError, match=r"ImageNet_LT_train\.txt: class 3 \('whale'\) has no training images"
    ):
        build_task(
            "splitfile",
            split_tree,
            train_file="ImageNet_LT_train.txt",
            test_file="ImageNet_LT_test.txt",
            names_file="names.txt",
        )


def test_corrupt_image_names_file(split_tree: Path) -> None:
    bad = split_tree / "train" / "n01" / "a0.png"
    bad.write_bytes(b"not a png")
    ds = SplitFileImages(split_tree, split_tree / "ImageNet_LT_train.txt", ["a", "b", "c"])
    with pytest.raises(UserError, match=rf"{bad}: cannot decode image"):
        ds.load(0)


# ---------------------------------------------------------------- ImageFolder


@pytest.fixture()
def folder_tree(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    for c, n in (("Golden_Retriever", 8), ("cat", 5), ("zebra", 3)):
        for i in range(n):
            save_png(root / "train" / c / "sub" / f"{i}.PNG" if i == 0 else root / "train" / c / f"{i}.jpg")
        save_png(root / "test" / c / "0.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_task_and_profile(folder_tree: Path) -> None:
    task = build_task("imagefolder", folder_tree)
    assert task.class_names == ["golden retriever", "cat", "zebra"]
    assert task.train_counts == [8, 5, 3]
    assert task.test.targets == [0, 1, 2]
    lt = build_task("imagefolder", folder_tree, imbalance=4, profile_seed=3)
    assert lt.train_counts == [8, 4, 2]  # int(8 * 4 ** (-i / 2)), the zebra class capped by what exists
    again = build_task("imagefolder", folder_tree, imbalance=4, profile_seed=3)
    assert isinstance(lt.train, LabelledSubset) and isinstance(again.train, LabelledSubset)
    assert lt.train.indices == again.train.indices
    assert len(lt.test) == 3
    capped = build_task("imagefolder", folder_tree, imbalance=2, n_max=4)
    assert capped.train_counts == [4, 2, 2]  # int(4 * 2 ** (-i / 2))
    untouched = build_task("imagefolder", folder_tree, imbalance=1.0)  # IF 1, no n_max: as loaded
    assert isinstance(untouched.train, ImageFolderImages)
    with pytest.raises(UserError, match="n_max=4 is set but imbalance is not"):
        build_task("imagefolder", folder_tree, n_max=4)
    cased = build_task("imagefolder", folder_tree, keep_case=True)
    assert cased.class_names[0] == "Golden Retriever"


def test_imagefolder_errors(folder_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"zero images"):
        build_task("imagefolder", folder_tree, imbalance=100)
    (folder_tree / "test" / "dog").mkdir()
    with pytest.raises(UserError, match=rf"{folder_tree / 'test' / 'dog'}: class folder not in the training"):
        build_task("imagefolder", folder_tree)
    (folder_tree / "test" / "dog").rmdir()
    (folder_tree / "train" / "empty").mkdir()
    with pytest.raises(UserError, match=rf"{folder_tree / 'train' / 'empty'}: class folder has no images"):
        build_task("imagefolder", folder_tree)
    (folder_tree / "train" / "empty").rmdir()
    save_png(folder_tree / "train" / "Cat" / "0.png")
    with pytest.raises(UserError, match=r"train \(label 2\): duplicate class name 'cat'"):
        ImageFolderImages(folder_tree / "train")
    with pytest.raises(UserError, match=r"nope: dataset root does not exist"):
        build_task("imagefolder", tmp_path / "nope")


# ---------------------------------------------------------------- few-shot and base-to-novel


def test_few_shot_counts_and_seeding() -> None:
    targets = [c for c in range(5) for _ in range(10)] + [5]  # class 5 has a single image
    ds = FakeImages(targets, [f"c{i}" for i in range(6)])
    a = few_shot(ds, 4, seed=1)
    assert class_counts(a.targets, 6) == [4, 4, 4, 4, 4, 1]
    assert few_shot(ds, 4, seed=1).indices == a.indices
    assert few_shot(ds, 4, seed=2).indices != a.indices
    assert all(ds.targets[i] == t for i, t in zip(a.indices, a.targets, strict=True))
    assert len(set(a.indices)) == len(a.indices)
    with pytest.raises(UserError, match="shots is 0"):
        few_shot(ds, 0)


def test_base_to_novel_relabelling() -> None:
    names = ["a", "b", "c", "d", "e"]
    train = FakeImages([i % 5 for i in range(20)], names)
    test = FakeImages([i % 5 for i in range(10)], names)
    assert base_novel_labels(5) == ([0, 1, 2], [3, 4])
    task = base_to_novel_split(train, test)
    assert task.novel_test is not None
    assert task.train.class_names == ["a", "b", "c"] and task.test.class_names == ["a", "b", "c"]
    assert task.novel_test.class_names == ["d", "e"]
    assert sorted(set(task.train.targets)) == [0, 1, 2] and sorted(set(task.novel_test.targets)) == [0, 1]
    assert task.train_counts == [4, 4, 4]
    assert isinstance(task.test, LabelledSubset) and isinstance(task.novel_test, LabelledSubset)
    assert not set(task.test.indices) & set(task.novel_test.indices)
    assert len(task.test) + len(task.novel_test) == len(test)
    # Each view item is the right base image, with the relabelled target.
    for view, offset in ((task.test, 0), (task.novel_test, 3)):
        for j in range(len(view)):
            image, label = view[j]
            base_index = view.indices[j]
            assert test.targets[base_index] == label + offset
            assert image.getpixel((0, 0)) == (base_index, 0, 0)
    with pytest.raises(UserError, match="at least 2 classes"):
        base_to_novel_split(FakeImages([0], ["a"]), FakeImages([0], ["a"]))


# ---------------------------------------------------------------- registry


def test_registry_errors_and_toy_slot(folder_tree: Path) -> None:
    with pytest.raises(UserError, match=r"unknown dataset kind 'imagenet'.*'cifar100'"):
        build_task("imagenet", folder_tree)
    with pytest.raises(UserError, match=r"takes no extra options, got \['size'\]"):
        build_task("imagefolder", folder_tree, extra={"size": 3})
    assert "toy" not in BUILDERS

    def toy(root: Path, opts: TaskOptions) -> TaskData:
        n = int(opts.extra.get("per_class", 3))
        ds = FakeImages([c for c in range(4) for _ in range(n)], ["w", "x", "y", "z"])
        return TaskData(train=ds, test=ds)

    register_builder("toy", toy)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_builder("toy", toy)
        task = build_task("toy", "", extra={"per_class": 5}, shots=2, base_to_novel=True)
        assert task.train_counts == [2, 2] and task.novel_test is not None
        assert task.novel_test.class_names == ["y", "z"]
    finally:
        del BUILDERS["toy"]


# ---------------------------------------------------------------- class order (base-to-novel split)


def test_class_order_file_decides_the_base_to_novel_split(folder_tree: Path) -> None:
    sorted_split = build_task("imagefolder", folder_tree, base_to_novel=True)
    assert sorted_split.class_names == ["golden retriever", "cat"]
    order = folder_tree / "order.txt"
    order.write_text("# the dataset's own label order\nzebra\ncat\n\nGolden_Retriever\n")
    task = build_task("imagefolder", folder_tree, base_to_novel=True, class_order="order.txt")
    assert task.class_names == ["zebra", "cat"]
    assert task.train_counts == [3, 5]
    assert task.novel_test is not None and task.novel_test.class_names == ["golden retriever"]
    assert sorted(task.test.targets) == [0, 1]
    # the images follow their class
    plain = build_task("imagefolder", folder_tree, class_order=str(order))
    assert plain.class_names == ["zebra", "cat", "golden retriever"] and plain.train_counts == [3, 5, 8]


def test_class_order_by_loaded_labels_for_split_files(split_tree: Path) -> None:
    (split_tree / "order.txt").write_text("2\n0\n1\n")
    task = build_task(
        "splitfile",
        str(split_tree),
        train_file="ImageNet_LT_train.txt",
        test_file="ImageNet_LT_test.txt",
        names_file="names.txt",
        class_order="order.txt",
    )
    assert task.class_names == ["great white shark", "tench", "gold fish"]
    assert task.train_counts == [1, 4, 2]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("zebra\ncat\n", "1 classes are not listed"),
        ("zebra\ncat\nzebra\nGolden_Retriever\n", "listed twice"),
        ("zebra\ncat\nlion\n", "'lion' is not one of"),
        ("0\n1\n7\n", "label 7 is outside"),
    ],
)
def test_class_order_errors_name_the_line(folder_tree: Path, text: str, needle: str) -> None:
    (folder_tree / "order.txt").write_text(text)
    with pytest.raises(UserError, match=needle):
        build_task("imagefolder", folder_tree, class_order="order.txt")
    with pytest.raises(UserError, match="does not exist"):
        build_task("imagefolder", folder_tree, class_order="missing.txt")


def test_class_order_reaches_the_run_config() -> None:
    from trainer.config import load_config

    assert load_config(None, ["data.class_order=order.txt"]).data.class_order == "order.txt"


def test_config_dataset_kinds_are_the_registered_ones() -> None:
    """``data.kind`` accepts exactly the registry's kinds plus the toy world (built by trainer.data.tasks)."""
    import typing

    from trainer.config import DataConfig

    allowed = set(typing.get_args(DataConfig.model_fields["kind"].annotation))
    assert allowed == set(BUILDERS) | {"toy"}, allowed ^ (set(BUILDERS) | {"toy"})
