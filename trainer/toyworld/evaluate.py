"""Measuring the toy CLIP: zero-shot accuracy and two cheap stand-ins for prompt tuning.

These numbers are what makes the toy world *mean* something: zero-shot must be clearly above chance on the
shifted downstream task (base and novel), and training on the long-tailed base set must clearly beat it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainer import clip_adapter as ca
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


def _log_prior(train_targets: Sequence[int], num_classes: int) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(list(train_targets)), minlength=num_classes).float()
    return (counts.clamp_min(1) / counts.sum()).log()


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_targets: Sequence[int],
    test_features: torch.Tensor,
    test_targets: Sequence[int],
    init_weights: torch.Tensor,
    logit_adjust: float = 1.0,
    steps: int = 300,
    lr: float = 3e-3,
    logit_scale: float = 30.0,
) -> float:
    """A cosine classifier on frozen image features, initialised from ``init_weights`` (the zero-shot text
    embeddings, as LIFT initialises its head) and trained full-batch with AdamW.

    ``logit_adjust`` = tau of the logit-adjusted loss (Menon et al. 2021): the log class prior of the
    training counts is added to the training logits only, so the long tail does not bias the test-time
    argmax. 0 gives plain cross-entropy. Deterministic (full batch, fixed init).
    """
    num_classes = init_weights.shape[0]
    weight = torch.nn.Parameter(init_weights.detach().clone())
    opt = torch.optim.AdamW([weight], lr=lr, weight_decay=0.0)
    y = torch.tensor(list(train_targets))
    prior = logit_adjust * _log_prior(train_targets, num_classes)
    with torch.enable_grad():
        for _ in range(steps):
            logits = logit_scale * train_features @ F.normalize(weight, dim=-1).T + prior
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        preds = (test_features @ F.normalize(weight, dim=-1).T).argmax(1)
    return float((preds == torch.tensor(list(test_targets))).float().mean())


def _prompted_image_features(model: CLIP, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """``encode_image`` with deep visual prompts ``prompts`` [depth, Lp, D] (VPT replace semantics)."""
    return F.normalize(ca.encode_image_prompted(model, images, list(prompts.unbind(0))), dim=-1)


def prompt_tuning_proxy_accuracy(
    model: CLIP,
    train: LabelledImages,
    test: LabelledImages,
    init_weights: torch.Tensor,
    logit_adjust: float = 1.0,
    num_prompts: int = 4,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 3e-3,
    logit_scale: float = 30.0,
    seed: int = 0,
    novel: tuple[LabelledImages, torch.Tensor] | None = None,
) -> dict[str, float]:
    """A small stand-in for prompt tuning: deep visual prompts plus a cosine head initialised from the
    zero-shot text embeddings, trained with the logit-adjusted loss (AdamW, cosine schedule), CLIP frozen.

    Only for measuring the toy CLIP while it is pretrained (the real prompt learner is
    :class:`trainer.prompts.PromptedCLIP`); the prompted forward is the adapter's.

    Returns ``{"base": accuracy on test}`` plus, when ``novel = (novel_test, its zero-shot text embeddings)``
    is given, ``"novel"``: the learned visual prompts applied to novel images, classified by the untouched
    zero-shot embeddings of the novel names (the head cannot transfer; the prompts can).
    """
    spec = preprocess_spec(model)
    x_train = pixels_to_tensor(
        np.stack([_pixels(train, i, spec.image_size) for i in range(len(train))]), spec
    )
    y_train = torch.tensor(train.targets)
    gen = torch.Generator().manual_seed(seed)
    width, depth = ca.vision_width(model), ca.vision_layers(model)
    prompts = torch.nn.Parameter(torch.randn(depth, num_prompts, width, generator=gen) * 0.02)
    weight = torch.nn.Parameter(init_weights.detach().clone())
    opt = torch.optim.AdamW([prompts, weight], lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    prior = logit_adjust * _log_prior(train.targets, init_weights.shape[0])
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():
            for _ in range(epochs):
                order = torch.randperm(len(train), generator=gen)
                for start in range(0, len(train), batch_size):
                    idx = order[start : start + batch_size]
                    feats = _prompted_image_features(model, x_train[idx], prompts)
                    logits = logit_scale * feats @ F.normalize(weight, dim=-1).T + prior
                    loss = F.cross_entropy(logits, y_train[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
        result = {"base": _prompted_accuracy(model, test, prompts, F.normalize(weight.detach(), dim=-1))}
        if novel is not None:
            result["novel"] = _prompted_accuracy(model, novel[0], prompts, novel[1])
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return result


@torch.no_grad()
def _prompted_accuracy(
    model: CLIP, ds: LabelledImages, prompts: torch.Tensor, class_weights: torch.Tensor
) -> float:
    spec = preprocess_spec(model)
    preds = []
    for start in range(0, len(ds), 256):
        batch = np.stack([_pixels(ds, i, spec.image_size) for i in range(start, min(start + 256, len(ds)))])
        feats = _prompted_image_features(model, pixels_to_tensor(batch, spec), prompts)
        preds.append((feats @ class_weights.T).argmax(1))
    return float((torch.cat(preds) == torch.tensor(ds.targets)).float().mean())


def evaluate_toy_clip(
    model: CLIP,
    seed: int = 0,
    n_max: int = 200,
    test_per_class: int = 25,
    domains: Sequence[str] = ("shifted", "clean"),
    tuning_proxies: bool = True,
) -> dict[str, dict[str, float]]:
    """Zero-shot base / novel accuracy on the toy task in each domain, and the tuning proxies on base.

    Returns ``{domain: {...}}`` with ``zero_shot_base``, ``zero_shot_novel``, ``chance_base``,
    ``chance_novel`` and, with ``tuning_proxies``: ``linear_probe_base`` (logit-adjusted linear probe),
    ``linear_probe_ce_base`` (plain cross-entropy) and ``vpt_probe_base`` (deep visual prompts + head,
    logit-adjusted), all trained on the long-tailed training set and tested on the balanced base test set;
    ``vpt_probe_novel``: those visual prompts with the zero-shot embeddings of the novel names.
    """
    results: dict[str, dict[str, float]] = {}
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
        if tuning_proxies:
            train_feats = encode_images(model, task.train)
            init = class_embeddings(model, task.class_names)
            args = (train_feats, task.train.targets, test_feats, task.test.targets, init)
            row["linear_probe_base"] = linear_probe_accuracy(*args, logit_adjust=1.0)
            row["linear_probe_ce_base"] = linear_probe_accuracy(*args, logit_adjust=0.0)
            novel_init = class_embeddings(model, task.novel_test.class_names)
            vpt = prompt_tuning_proxy_accuracy(
                model, task.train, task.test, init, seed=seed, novel=(task.novel_test, novel_init)
            )
            row["vpt_probe_base"] = vpt["base"]
            row["vpt_probe_novel"] = vpt["novel"]
        _logger.info("toy task (%s): %s", domain, {k: round(v, 4) for k, v in row.items()})
        results[domain] = row
    return results
