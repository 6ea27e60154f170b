"""The named training augmentations (data.augment): what each composes, and that it does what it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from trainer.config import load_config
from trainer.errors import UserError
from trainer.models import PreprocessSpec
from trainer.transforms import Cutout, build_transform, train_transform

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPEC = PreprocessSpec(224, CLIP_MEAN, CLIP_STD, "bicubic", "shortest")


def _steps(transform) -> list:
    return list(transform.transforms)


def _of(transform, kind) -> list:
    return [t for t in _steps(transform) if isinstance(t, kind)]


def _image(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    arr[:, : size // 2] = 0  # an asymmetric image: a flip is visible
    return Image.fromarray(arr)


def test_default_is_open_clips_rrc_without_flip_and_the_toy_recipes_name_it():
    from pathlib import Path

    assert load_config().data.augment == "clip_rrc"
    t = build_transform(SPEC, load_config().data.augment)
    (rrc,) = _of(t, T.RandomResizedCrop)
    assert rrc.scale == (0.9, 1.0) and rrc.interpolation == T.InterpolationMode.BICUBIC
    assert not _of(t, T.RandomHorizontalFlip)
    # the same transform as before the field was named (a bool True meant open_clip's is_train=True)
    torch.manual_seed(3)
    a = t(_image(256))
    import open_clip

    ref = open_clip.image_transform(224, is_train=True, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic")
    torch.manual_seed(3)
    assert torch.equal(a, ref(_image(256)))
    for recipe in sorted(Path("recipes").glob("toy_*.yaml")):
        assert "augment: clip_rrc" in recipe.read_text(), recipe


def test_bools_of_older_configs_still_load():
    assert load_config(None, ["data.augment=true"]).data.augment == "clip_rrc"
    assert load_config(None, ["data.augment=false"]).data.augment == "none"
    with pytest.raises(UserError, match=r"data\.augment"):
        load_config(None, ["data.augment=autoaugment"])


def test_coop_is_dassls_random_resized_crop_and_flip():
    t = train_transform(SPEC, "coop")
    (rrc,) = _of(t, T.RandomResizedCrop)
    assert rrc.scale == (0.08, 1.0) and rrc.size == (224, 224)
    assert rrc.interpolation == T.InterpolationMode.BICUBIC
    (flip,) = _of(t, T.RandomHorizontalFlip)
    assert flip.p == 0.5
    (norm,) = _of(t, T.Normalize)
    assert tuple(norm.mean) == CLIP_MEAN and tuple(norm.std) == CLIP_STD
    # the flip really happens: with the crop pinned to the whole image, some draws mirror it
    whole = PreprocessSpec(32, CLIP_MEAN, CLIP_STD, "bicubic", "shortest")
    t = train_transform(whole, "coop")
    t.transforms[0] = T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC)
    img = _image(32)
    plain = T.Compose(t.transforms[2:])(img)
    mirrored = plain.flip(-1)
    torch.manual_seed(0)
    outs = [t(img) for _ in range(20)]
    assert any(torch.allclose(o, mirrored) for o in outs) and any(torch.allclose(o, plain) for o in outs)


def test_gnm_cifar_is_gnm_pts_pipeline_in_its_order():
    t = train_transform(SPEC, "gnm_cifar")
    kinds = [type(s).__name__ for s in _steps(t)]
    assert kinds == [
        "Lambda",
        "RequireSize",
        "RandomCrop",
        "RandomHorizontalFlip",
        "AutoAugment",
        "ToTensor",
        "Cutout",
        "Resize",
        "Normalize",
    ]
    crop = _of(t, T.RandomCrop)[0]
    assert crop.size == (32, 32) and crop.padding == 4
    assert _of(t, T.AutoAugment)[0].policy == T.AutoAugmentPolicy.CIFAR10
    cut = _of(t, Cutout)[0]
    assert (cut.holes, cut.length) == (1, 16)
    resize = _of(t, T.Resize)[0]
    assert resize.size == 224 and resize.antialias is False
    torch.manual_seed(0)
    out = t(_image(32))
    assert out.shape == (3, 224, 224) and torch.isfinite(out).all()
    with pytest.raises(UserError, match="32x32"):
        t(_image(64))


def test_cutout_zeroes_one_clipped_square():
    torch.manual_seed(1)
    for _ in range(50):
        out = Cutout(1, 16)(torch.ones(3, 32, 32))
        zero = (out[0] == 0).nonzero()
        assert torch.equal(out[0], out[1])
        if len(zero):
            h = zero[:, 0].max() - zero[:, 0].min() + 1
            w = zero[:, 1].max() - zero[:, 1].min() + 1
            assert h <= 16 and w <= 16 and int((out[0] == 0).sum()) == int(h * w)
