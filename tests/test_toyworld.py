"""The embedded toy world: determinism, long-tail counts, class names, vocabulary, and the committed toy CLIP."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from trainer.models import TOY_MODEL_CHECKPOINT, TOY_MODEL_NAME, load_clip, load_toy_clip
from trainer.toyworld import (
    BASE_COLOURS,
    BASE_SHAPES,
    COLOURS,
    DOMAINS,
    IMAGE_SIZE,
    SHAPES,
    Split,
    base_class_names,
    caption,
    long_tail_counts,
    novel_class_names,
    render_class_image,
    render_item,
    sample_scene,
    toy_task,
    vocabulary,
)
from trainer.toyworld.evaluate import encode_images, pixels_to_tensor, zero_shot_accuracy


@pytest.fixture(scope="module")
def tokenizer():
    import open_clip

    from trainer.models import ensure_toy_model_registered

    ensure_toy_model_registered()
    return open_clip.get_tokenizer(TOY_MODEL_NAME)


@pytest.fixture(scope="module")
def compact():
    return torch.load(TOY_MODEL_CHECKPOINT, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def toy_clip():
    return load_toy_clip()


# ---------------------------------------------------------------------------------------------------------
# world


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_same_seed_same_pixels_different_seed_different(domain: str) -> None:
    a, scene_a = render_item(3, Split.PRETRAIN, 17, domain)
    b, scene_b = render_item(3, Split.PRETRAIN, 17, domain)
    assert scene_a == scene_b
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, render_item(4, Split.PRETRAIN, 17, domain)[0])
    assert not np.array_equal(a, render_item(3, Split.PRETRAIN_EVAL, 17, domain)[0])
    assert not np.array_equal(a, render_item(3, Split.PRETRAIN, 18, domain)[0])


def test_class_images_are_keyed_by_class_not_by_task_layout() -> None:
    a = render_class_image(0, Split.TEST, "red", "star", 5, "shifted")
    np.testing.assert_array_equal(a, render_class_image(0, Split.TEST, "red", "star", 5, "shifted"))
    assert not np.array_equal(a, render_class_image(1, Split.TEST, "red", "star", 5, "shifted"))
    assert not np.array_equal(a, render_class_image(0, Split.TEST, "red", "star", 6, "shifted"))
    # a bigger task renders the very same images for the classes both contain
    small = toy_task(seed=0, n_max=8, test_per_class=2)
    big = toy_task(seed=0, n_max=20, test_per_class=3)
    np.testing.assert_array_equal(small.test.pixels(0), big.test.pixels(0))
    np.testing.assert_array_equal(small.train.pixels(0), big.train.pixels(0))


def test_domains_differ() -> None:
    clean, _ = render_item(0, Split.TEST, 1, "clean", colour="red", shape="star")
    shifted, _ = render_item(0, Split.TEST, 1, "shifted", colour="red", shape="star")
    assert not np.array_equal(clean, shifted)
    with pytest.raises(ValueError):
        render_item(0, Split.TEST, 1, "nowhere")


def test_captions_name_colour_and_shape() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng)
        text = caption(scene, rng)
        assert scene.colour in text.split() or f"{scene.colour}," in text or f"{scene.colour}." in text
        assert scene.shape in text.replace(",", " ").replace(".", " ").split()
        assert "  " not in text and text == text.strip()


# ---------------------------------------------------------------------------------------------------------
# task


def test_long_tail_counts_formula() -> None:
    # CIFAR-100-LT (LDAM-DRW): 500 .. 5, 10,847 images in total
    counts = long_tail_counts(100, 500, 100.0)
    assert counts[0] == 500 and counts[-1] == 5 and sum(counts) == 10_847 and counts[69] == 20
    counts = long_tail_counts(30, 200, 100.0)
    assert counts == [int(200 * 0.01 ** (i / 29)) for i in range(30)]
    assert counts[0] == 200 and counts[-1] == 2 and sum(counts) == 1336
    assert all(a >= b for a, b in itertools.pairwise(counts))
    assert min(long_tail_counts(30, 10, 100.0)) == 1  # at least one image per class
    assert long_tail_counts(5, 7, 1.0) == [7] * 5


def test_default_task_shape() -> None:
    task = toy_task(seed=0, n_max=20, test_per_class=2)
    assert task.class_names == base_class_names()
    assert task.train_counts == long_tail_counts(30, 20, 100.0)
    assert len(task.test) == 60 and task.test.targets == [c for c in range(30) for _ in range(2)]
    assert task.novel_test is not None
    assert task.novel_test.class_names == novel_class_names() and len(task.novel_test) == 2 * 34
    assert toy_task(novel=False, n_max=4, test_per_class=1).novel_test is None
    image, label = task.train[len(task.train) - 1]
    assert image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert label == 29
    image, label = task.novel_test[5]
    assert image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert task.novel_test.pixels(5).dtype == np.uint8 and task.novel_test.pixels(5).shape == (32, 32, 3)


def test_novel_names_disjoint_from_base() -> None:
    base, novel = base_class_names(), novel_class_names()
    assert len(base) == len(set(base)) == 30 and len(novel) == len(set(novel)) == 34
    assert not set(base) & set(novel)
    assert set(base) | set(novel) == {f"{c} {s}" for c in COLOURS for s in SHAPES}
    for name in novel:  # every novel class has a colour or a shape no base class name contains
        colour, shape = name.split()
        assert colour not in BASE_COLOURS or shape not in BASE_SHAPES
    # the head and the tail both mix colours
    assert len({n.split()[0] for n in base[:6]}) == 6 and len({n.split()[0] for n in base[-6:]}) == 6


def test_pixels_to_tensor_matches_open_clip_preprocess(toy_clip) -> None:
    import open_clip

    spec = toy_clip.preprocess
    transform = open_clip.image_transform(spec.image_size, is_train=False, mean=spec.mean, std=spec.std)
    task = toy_task(n_max=2, test_per_class=1, novel=False)
    ours = pixels_to_tensor(np.stack([task.test.pixels(i) for i in range(3)]), spec)
    theirs = torch.stack([transform(task.test[i][0]) for i in range(3)])
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# vocabulary and the committed checkpoint


def test_class_name_and_caption_tokens_are_in_the_checkpoint(tokenizer, compact) -> None:
    saved = set(compact["token_rows"].tolist())
    names = base_class_names() + novel_class_names()
    for word in {w for n in names for w in n.split()}:
        ids = [t for t in tokenizer([word])[0].tolist() if t not in (0, 49406, 49407)]
        assert 1 <= len(ids) <= 2, word
        assert set(ids) <= saved, word
    texts = [*vocabulary(), "a photo of a red star.", "X X X X red star."]
    rng = np.random.default_rng(1)
    texts += [caption(sample_scene(rng), rng) for _ in range(300)]
    assert set(tokenizer(texts).unique().tolist()) <= saved


def test_checkpoint_is_compact(compact) -> None:
    assert compact["format"] == "flatprompt-compact-clip/1"
    assert TOY_MODEL_CHECKPOINT.stat().st_size < 5_000_000
    assert all(v.dtype != torch.float32 for v in compact["state_dict"].values())
    assert compact["meta"]["recipe"]["domain"] == "clean"


def test_toy_clip_loads_and_zero_shot_beats_chance(toy_clip) -> None:
    model = toy_clip.model
    assert type(model.visual).__name__ == "VisionTransformer" and model.visual.pool_type == "tok"
    assert toy_clip.preprocess.image_size == IMAGE_SIZE
    assert not any(p.requires_grad for p in model.parameters())
    again = load_clip(TOY_MODEL_NAME, pretrained=str(TOY_MODEL_CHECKPOINT))
    assert again.identity.weights_sha256 == toy_clip.identity.weights_sha256
    task = toy_task(seed=0, n_max=2, test_per_class=4)
    assert task.novel_test is not None
    feats = encode_images(model, task.test)
    assert feats.shape == (120, model.visual.output_dim)
    base = zero_shot_accuracy(model, task.test, image_features=feats)
    novel = zero_shot_accuracy(model, task.novel_test)
    # measured with the committed checkpoint: 0.36 and 0.59 (chance 1/30 and 1/34)
    assert base > 0.2, base
    assert novel > 0.3, novel
    # the clean (pretraining) domain is near the ceiling (measured 0.98): the shift is what makes it hard
    clean = zero_shot_accuracy(model, toy_task(seed=0, n_max=2, test_per_class=4, domain="clean").test)
    assert clean > 0.8 and clean > base + 0.3, (clean, base)


@pytest.mark.slow
def test_prompt_tuning_clearly_beats_zero_shot_on_base(tmp_path) -> None:
    """The toy task is one where prompt tuning helps: a short run on a smaller long tail (head 100 images,
    3 epochs) must beat zero-shot on base by 10 points (measured +18 to +23 over two seeds) while novel
    stays far above chance. Guards against a world or checkpoint change that makes the default meaningless."""
    import json

    from trainer.config import load_config
    from trainer.runner import fit

    overrides = [f"train.out_dir={tmp_path}", "data.n_max=100", "train.epochs=3", "train.eval_every=3"]
    fit(load_config(None, overrides), progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    zero, tuned = summary["zero_shot"], summary["final"]
    assert tuned["base_top1"] > zero["base_top1"] + 0.10, (zero["base_top1"], tuned["base_top1"])
    assert zero["novel"] > 10 / 34 and tuned["novel"] > 5 / 34, (zero["novel"], tuned["novel"])
