"""Measuring the toy CLIP: zero-shot accuracy, in-batch retrieval and a linear-probe tuning proxy.

These numbers are what makes the toy world *mean* something: zero-shot must be clearly above chance on the
shifted downstream task (base and novel), and training on the long-tailed base set must clearly beat it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.data.base import LabelledImages
from trainer.models import PreprocessSpec, preprocess_spec
from trainer.toyworld.task import ToyImages, toy_task

if TYPE_CHECKING:
    from open_clip import CLIP  # untyped package: mypy treats it as Any

_logger = logging.getLogger(__name__)

ZERO_SHOT_TEMPLATE = "a photo of a {}."


def pixels_to_tensor(pixels: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 RGB [N, S, S, 3] at the model's size -> normalised float [N, 3, S, S].

    For images already at the model's size this equals open_clip's eval preprocess (its resize and
    center crop are the identity there).
    """
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _pixels(ds: LabelledImages, index: int, size: int) -> np.ndarray:
    if isinstance(ds, ToyImages) and ds.image_size == size:
        return ds.pixels(index)
    image = ds.load(index).convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


@torch.no_grad()
def encode_images(
    model: CLIP, ds: LabelledImages, spec: PreprocessSpec | None = None, batch_size: int = 256
) -> torch.Tensor:
    """L2-normalised image embeddings [N, E] of every item of ``ds`` (in order)."""
    spec = spec or preprocess_spec(model)
    was_training = model.training
    model.eval()
    feats = []
    for start in range(0, len(ds), batch_size):
        idx = range(start, min(start + batch_size, len(ds)))
        batch = np.stack([_pixels(ds, i, spec.image_size) for i in idx])
        feats.append(model.encode_image(pixels_to_tensor(batch, spec), normalize=True))
    model.train(was_training)
    return torch.cat(feats) if feats else torch.empty(0)


@torch.no_grad()
def encode_texts(model: CLIP, texts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    """L2-normalised text embeddings [N, E] through the model's own ``encode_text`` (77 tokens)."""
    import open_clip

    from trainer.models import TOY_MODEL_NAME, ensure_toy_model_registered

    ensure_toy_model_registered()
    tokenizer = open_clip.get_tokenizer(TOY_MODEL_NAME)
    was_training = model.training
    model.eval()
    out = [
        model.encode_text(tokenizer(list(texts[s : s + batch_size])), normalize=True)
        for s in range(0, len(texts), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out)


def class_embeddings(
    model: CLIP, class_names: Sequence[str], template: str = ZERO_SHOT_TEMPLATE
) -> torch.Tensor:
    """Zero-shot classifier weights [C, E]: the normalised embedding of ``template.format(name)``."""
    return encode_texts(model, [template.format(n) for n in class_names])


def zero_shot_accuracy(
    model: CLIP,
    ds: LabelledImages,
    template: str = ZERO_SHOT_TEMPLATE,
    image_features: torch.Tensor | None = None,
) -> float:
    """Top-1 of cosine(image, ``template`` of each class name) over ``ds``'s own label space."""
    feats = image_features if image_features is not None else encode_images(model, ds)
    weights = class_embeddings(model, ds.class_names, template)
    preds = (feats @ weights.T).argmax(dim=1)
    return float((preds == torch.tensor(ds.targets)).float().mean())


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_targets: Sequence[int],
    test_features: torch.Tensor,
    test_targets: Sequence[int],
    init_weights: torch.Tensor | None = None,
    steps: int = 300,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    logit_scale: float = 30.0,
    seed: int = 0,
) -> float:
    """A cosine linear classifier on frozen features, trained full-batch with AdamW and cross-entropy.

    ``init_weights`` (e.g. the zero-shot text embeddings) set the starting point, as in LIFT's head init.
    This is the cheap proxy for prompt tuning: it uses the same long-tailed training set and only changes
    how classes are represented.
    """
    gen = torch.Generator().manual_seed(seed)
    num_classes = int(max(max(train_targets), max(test_targets))) + 1
    if init_weights is not None:
        w0 = init_weights.detach().clone()
    else:
        w0 = torch.randn(num_classes, train_features.shape[1], generator=gen) * 0.01
    weight = torch.nn.Parameter(w0)
    opt = torch.optim.AdamW([weight], lr=lr, weight_decay=weight_decay)
    y = torch.tensor(list(train_targets))
    with torch.enable_grad():
        for _ in range(steps):
            logits = logit_scale * train_features @ F.normalize(weight, dim=-1).T
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        preds = (test_features @ F.normalize(weight, dim=-1).T).argmax(1)
    return float((preds == torch.tensor(list(test_targets))).float().mean())


def evaluate_toy_clip(
    model: CLIP,
    seed: int = 0,
    n_max: int = 200,
    test_per_class: int = 25,
    domains: Sequence[str] = ("shifted", "clean"),
    linear_probe: bool = True,
) -> dict[str, Any]:
    """Zero-shot base / novel accuracy on the toy task in each domain, and the linear-probe proxy.

    Returns ``{domain: {"zero_shot_base", "zero_shot_novel", "linear_probe_base", "chance_base",
    "chance_novel"}}``.
    """
    results: dict[str, Any] = {}
    for domain in domains:
        task = toy_task(seed=seed, n_max=n_max, test_per_class=test_per_class, domain=domain)
        assert task.novel_test is not None
        test_feats = encode_images(model, task.test)
        row: dict[str, float] = {
            "zero_shot_base": zero_shot_accuracy(model, task.test, image_features=test_feats),
            "zero_shot_novel": zero_shot_accuracy(model, task.novel_test),
            "chance_base": 1.0 / task.test.num_classes,
            "chance_novel": 1.0 / task.novel_test.num_classes,
        }
        if linear_probe:
            train_feats = encode_images(model, task.train)
            row["linear_probe_base"] = linear_probe_accuracy(
                train_feats,
                task.train.targets,
                test_feats,
                task.test.targets,
                init_weights=class_embeddings(model, task.class_names),
                seed=seed,
            )
        _logger.info("toy task (%s): %s", domain, {k: round(v, 4) for k, v in row.items()})
        results[domain] = row
    return results


def main(argv: list[str] | None = None) -> int:
    """Print the toy CLIP's zero-shot / linear-probe numbers on the toy task as JSON."""
    import argparse
    import json

    from trainer.models import TOY_MODEL_CHECKPOINT, TOY_MODEL_NAME, load_clip

    parser = argparse.ArgumentParser(prog="eval-toy", description="Measure the toy CLIP on the toy task.")
    parser.add_argument("--checkpoint", default=str(TOY_MODEL_CHECKPOINT), help="toy CLIP checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="world seed of the toy task")
    parser.add_argument("--n-max", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=25)
    parser.add_argument("--no-linear-probe", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = load_clip(TOY_MODEL_NAME, pretrained=args.checkpoint).model
    results = evaluate_toy_clip(
        model,
        seed=args.seed,
        n_max=args.n_max,
        test_per_class=args.test_per_class,
        linear_probe=not args.no_linear_probe,
    )
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
