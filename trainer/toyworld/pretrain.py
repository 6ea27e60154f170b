"""Contrastive pretraining of the toy CLIP on the clean toy world (``python -m trainer pretrain-toy``).

Recipe: a pool of clean rendered images, a fresh random caption per image per step, symmetric InfoNCE with the
model's learnable ``logit_scale`` (identical captions in a batch count as positives of each other), AdamW with
linear warm-up and cosine decay, everything seeded.

Speed: the text tower is causal, so the output at the end-of-text position does not depend on the padding
after it. Training therefore runs the text transformer on the shortest prefix that holds every caption of
the batch (about 16 of the 77 positions), which gives exactly the same pooled features as the full
``encode_text``. Only the token-embedding rows of the toy vocabulary are trained (a small table that is
written back into ``token_embedding`` at the end), which also keeps AdamW off the 49,408-row matrix.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from trainer.models import (
    TOY_MODEL_CHECKPOINT,
    TOY_MODEL_CONFIG,
    TOY_MODEL_NAME,
    ensure_toy_model_registered,
    preprocess_spec,
    save_compact_clip,
)
from trainer.toyworld.evaluate import evaluate_toy_clip, pixels_to_tensor
from trainer.toyworld.task import all_class_names
from trainer.toyworld.world import COLOURS, SHAPES, Scene, Split, caption, item_rng, render_item, vocabulary

if TYPE_CHECKING:
    from open_clip import CLIP  # untyped package: mypy treats it as Any

_logger = logging.getLogger(__name__)

SOT_ID = 49406
EOT_ID = 49407


def vocabulary_token_ids() -> list[int]:
    """Every token id the toy world can produce (captions, class names, templates, SOT / EOT, padding 0)."""
    import open_clip

    ensure_toy_model_registered()
    tokenizer = open_clip.get_tokenizer(TOY_MODEL_NAME)
    ids = {0, SOT_ID, EOT_ID}
    texts = [*vocabulary(), *all_class_names(), "a photo of a {}.", "X X X X {}."]
    for row in tokenizer(texts):
        ids.update(int(t) for t in row.tolist())
    return sorted(ids)


class CaptionTokens:
    """Tokenises captions with open_clip's tokenizer (cached) and maps ids into the compact table."""

    def __init__(self, used_ids: list[int]) -> None:
        import open_clip

        ensure_toy_model_registered()
        self._tokenizer = open_clip.get_tokenizer(TOY_MODEL_NAME)
        self._cache: dict[str, list[int]] = {}
        self.local = torch.full((EOT_ID + 1,), -1, dtype=torch.long)
        self.local[torch.tensor(used_ids)] = torch.arange(len(used_ids))

    def ids(self, text: str) -> list[int]:
        """SOT, the caption's tokens, EOT (no padding)."""
        cached = self._cache.get(text)
        if cached is None:
            row = self._tokenizer([text])[0].tolist()
            cached = row[: row.index(EOT_ID) + 1]
            self._cache[text] = cached
        return cached

    def batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(local ids [B, L] padded with the local id of token 0, EOT positions [B]); L = longest caption."""
        rows = [self.ids(t) for t in texts]
        length = max(len(r) for r in rows)
        out = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        local = self.local[out]
        if bool((local < 0).any()):
            bad = sorted({int(t) for t in out[local < 0].tolist()})
            raise ValueError(f"caption tokens {bad} are not in the toy vocabulary; extend world.vocabulary()")
        eot = torch.tensor([len(r) - 1 for r in rows])
        return local, eot


def _encode_text_prefix(
    model: CLIP, table: torch.Tensor, local_ids: torch.Tensor, eot: torch.Tensor
) -> torch.Tensor:
    """``model.encode_text`` on a causal prefix of the context, with token rows from ``table``."""
    length = local_ids.shape[1]
    x = F.embedding(local_ids, table) + model.positional_embedding[:length]
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    x = model.transformer(x, attn_mask=mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), eot]
    proj = model.text_projection
    x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return F.normalize(x, dim=-1)


def _multi_positive_infonce(logits: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; image i and caption j are positives when caption j's text equals caption i's."""
    target = (caption_ids[:, None] == caption_ids[None, :]).float()
    target = target / target.sum(dim=1, keepdim=True)
    loss_i = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)


def _render_pool(
    seed: int, split: Split, size: int, image_size: int, progress: bool
) -> tuple[np.ndarray, list[Scene]]:
    pixels = np.empty((size, image_size, image_size, 3), dtype=np.uint8)
    scenes: list[Scene] = []
    for i in tqdm(range(size), desc=f"render {split.name.lower()}", disable=not progress, mininterval=2):
        pixels[i], scene = render_item(seed, split, i, "clean", image_size=image_size)
        scenes.append(scene)
    return pixels, scenes


@torch.no_grad()
def clean_retrieval(
    model: CLIP,
    pixels: np.ndarray,
    scenes: list[Scene],
    seed: int,
    chunk: int = 256,
) -> dict[str, float]:
    """Clean-domain metrics on held-out images: in-batch retrieval top-1 and 64-way zero-shot.

    Retrieval is done in chunks of ``chunk`` image-caption pairs (one random caption each); a retrieved
    caption (image) counts as correct when its text equals the true caption's text.
    """
    from trainer.toyworld.evaluate import encode_texts

    spec = preprocess_spec(model)
    rng = item_rng(seed, Split.CAPTION, 1 << 30)
    texts = [caption(s, rng) for s in scenes]
    img = torch.cat(
        [
            model.encode_image(pixels_to_tensor(pixels[s : s + 512], spec), normalize=True)
            for s in range(0, len(pixels), 512)
        ]
    )
    txt = encode_texts(model, texts)
    i2t, t2i, n = 0.0, 0.0, 0
    for s in range(0, len(texts) - chunk + 1, chunk):
        sim = img[s : s + chunk] @ txt[s : s + chunk].T
        same = np.array(texts[s : s + chunk])
        eq = torch.from_numpy(same[:, None] == same[None, :])
        i2t += float(eq[torch.arange(chunk), sim.argmax(1)].float().sum())
        t2i += float(eq[sim.argmax(0), torch.arange(chunk)].float().sum())
        n += chunk
    return {
        "retrieval_i2t_top1": i2t / max(n, 1),
        "retrieval_t2i_top1": t2i / max(n, 1),
        "retrieval_chunk": float(chunk),
        **zero_shot_64way(model, img, scenes),
    }


@torch.no_grad()
def zero_shot_64way(model: CLIP, image_features: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """64-way colour-shape zero-shot accuracy, and how often the colour / the shape alone is right."""
    from trainer.toyworld.evaluate import class_embeddings

    names = [f"{c} {s}" for s in SHAPES for c in COLOURS]
    labels = torch.tensor([names.index(f"{s.colour} {s.shape}") for s in scenes])
    preds = (image_features @ class_embeddings(model, names).T).argmax(1)
    nc = len(COLOURS)
    return {
        "zero_shot_64way": float((preds == labels).float().mean()),
        "zero_shot_colour": float((preds % nc == labels % nc).float().mean()),
        "zero_shot_shape": float((preds // nc == labels // nc).float().mean()),
    }


def _quick_eval(
    model: CLIP, table: torch.Tensor, used_ids: list[int], pixels: np.ndarray, scenes: list[Scene]
) -> str:
    """Write the trained rows back, then the 64-way clean zero-shot on up to 512 held-out images."""
    with torch.no_grad():
        model.token_embedding.weight[torch.tensor(used_ids)] = table.detach()
        model.eval()
        n = min(512, len(scenes))
        feats = model.encode_image(pixels_to_tensor(pixels[:n], preprocess_spec(model)), normalize=True)
        res = zero_shot_64way(model, feats, scenes[:n])
        model.train()
    return " ".join(f"{k.removeprefix('zero_shot_')} {v:.3f}" for k, v in res.items())


def _loadavg() -> float | None:
    """1-minute load average (provenance: was the machine shared?), None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _optimizer(
    model: torch.nn.Module,
    table: torch.nn.Parameter,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    steps: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (decay on matrices only; none on gains, biases, embeddings, ``logit_scale`` and the token table),
    linear warm-up for ``warmup_steps`` then cosine to 0 at ``steps``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or name == "logit_scale":
            no_decay.append(p)
        else:
            decay.append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": [*no_decay, table], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    def lr_lambda(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    return optimizer, scheduler


def _train_loop(
    model: Any,
    table: torch.nn.Parameter,
    tokens: CaptionTokens,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    images: torch.Tensor,
    scenes: Any,
    *,
    seed: int,
    steps: int,
    batch_size: int,
    eval_every: int,
    progress: bool,
    quick_eval: Callable[[], str],
) -> tuple[list[float], float]:
    """``steps`` contrastive steps over the rendered pool (reshuffled each pass, a fresh caption per draw):
    the per-step losses and the seconds it took."""
    order_rng = np.random.default_rng([seed, 7919])
    pool_size = len(images)
    order = order_rng.permutation(pool_size)
    cursor = 0
    max_scale = math.log(100.0)
    losses: list[float] = []
    t_train = time.perf_counter()
    bar = tqdm(range(steps), desc="pretrain toy CLIP", disable=not progress, mininterval=2)
    for step in bar:
        if cursor + batch_size > pool_size:
            order = order_rng.permutation(pool_size)
            cursor = 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        rng = item_rng(seed, Split.CAPTION, step)
        texts = [caption(scenes[i], rng) for i in idx]
        local_ids, eot = tokens.batch(texts)
        caption_ids = torch.tensor(np.unique(np.array(texts), return_inverse=True)[1])

        img_f = model.encode_image(images[torch.from_numpy(idx)], normalize=True)
        txt_f = _encode_text_prefix(model, table, local_ids, eot)
        logits = model.logit_scale.exp() * img_f @ txt_f.T
        loss = _multi_positive_infonce(logits, caption_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_scale)
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(
                loss=f"{np.mean(losses[-50:]):.3f}", scale=f"{float(model.logit_scale.exp()):.1f}"
            )
        if step % 250 == 0 or step == steps - 1:
            _logger.info(
                "step %d/%d loss %.4f logit_scale %.1f lr %.2e",
                step + 1,
                steps,
                np.mean(losses[-50:]),
                float(model.logit_scale.exp()),
                scheduler.get_last_lr()[0],
            )
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            _logger.info(
                "step %d clean zero-shot: %s",
                step + 1,
                quick_eval(),
            )
    train_s = time.perf_counter() - t_train
    return losses, train_s


def _metadata(
    model: Any,
    losses: list[float],
    clean: dict[str, float],
    *,
    recipe: Mapping[str, object],
    seconds: tuple[float, float, float, float],
    load_start: float | None,
) -> dict[str, object]:
    """What the compact checkpoint records of its pretraining (plain JSON types: the file must load with
    ``weights_only``): the recipe, versions, machine, times (render, train, wall, CPU) and clean metrics."""
    import open_clip

    render_s, train_s, wall_s, cpu_s = seconds
    meta: dict[str, object] = {
        "recipe": {
            **recipe,
            "domain": "clean",
            "loss": "symmetric multi-positive InfoNCE, learnable logit_scale (max 100)",
        },
        "model": TOY_MODEL_NAME,
        "config": json.loads(TOY_MODEL_CONFIG.read_text()),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "render_s": round(render_s, 1),
        "train_s": round(train_s, 1),
        "final_loss": float(np.mean(losses[-50:])),
        "logit_scale": float(model.logit_scale.exp()),
        "clean_eval": clean,
        "vocabulary": vocabulary(),
    }
    meta["wall_time_s"] = round(wall_s, 1)
    meta["cpu_time_s"] = round(cpu_s, 1)  # all threads of this process
    meta["cpu_count"] = os.cpu_count()
    meta["loadavg_1min_start_end"] = [load_start, _loadavg()]
    return json.loads(json.dumps(meta, default=str))  # plain types only: the file must load with weights_only


def _fresh_model() -> tuple[Any, list[int], torch.nn.Parameter]:
    """The toy CLIP at random init (in training mode), the token ids of the world's vocabulary, and their
    embedding rows as the trained table (the full embedding stays frozen)."""
    import open_clip

    ensure_toy_model_registered()
    model = open_clip.create_model(TOY_MODEL_NAME, pretrained=None)
    model.train()
    used_ids = vocabulary_token_ids()
    model.token_embedding.weight.requires_grad_(False)
    table = torch.nn.Parameter(model.token_embedding.weight.detach()[torch.tensor(used_ids)].clone())
    return model, used_ids, table


def _save(model: Any, out: Path, used_ids: list[int], meta: dict[str, object]) -> dict[str, object]:
    """Save the compact checkpoint; where it went and its size."""
    out.parent.mkdir(parents=True, exist_ok=True)
    save_compact_clip(model, out, used_ids, meta)
    _logger.info("saved %s (%.2f MB)", out, out.stat().st_size / 1e6)
    return {"checkpoint": str(out), "checkpoint_bytes": out.stat().st_size}


def _finish(
    model: Any, table: torch.nn.Parameter, used_ids: list[int], eval_pixels: Any, eval_scenes: Any, seed: int
) -> dict[str, float]:
    """Write the trained token table into the embedding, switch to eval mode and measure clean retrieval."""
    with torch.no_grad():
        model.token_embedding.weight[torch.tensor(used_ids)] = table.detach()
    model.eval()
    clean = clean_retrieval(model, eval_pixels, eval_scenes, seed)
    _logger.info("clean held-out: %s", {k: round(v, 4) for k, v in clean.items()})
    return clean


def pretrain(
    out: Path | None = TOY_MODEL_CHECKPOINT,
    seed: int = 0,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    warmup_steps: int = 100,
    pool_size: int = 40_000,
    eval_size: int = 2048,
    threads: int | None = None,
    evaluate_downstream: bool = True,
    eval_every: int = 500,
    progress: bool = True,
) -> dict[str, object]:
    """Pretrain the toy CLIP on the clean world, save it in the compact format and return its metrics.

    Args:
        out: where to write the compact checkpoint (None: do not save).
        seed: seeds torch, the rendered pool, batch order and captions.
        steps, batch_size: optimizer steps, and image-caption pairs per step.
        lr, weight_decay, warmup_steps: AdamW (see :func:`_optimizer`).
        pool_size: clean images rendered once and reused; each gets a fresh caption every time it is drawn.
        eval_size: held-out clean images for the retrieval / 64-way zero-shot metrics.
        threads, progress: ``torch.set_num_threads`` (None: torch's default); tqdm bars.
        evaluate_downstream: also measure zero-shot and the linear probe on the toy task (both domains).
        eval_every: log the clean 64-way zero-shot accuracy on 512 held-out images every this many steps
            (0: never).

    Returns:
        The checkpoint's metadata (:func:`_metadata`: ``recipe``, ``clean_eval``, times, ...), plus
        ``checkpoint`` / ``checkpoint_bytes`` when saved and ``downstream`` when evaluated.
    """
    t0, cpu0, load_start = time.perf_counter(), time.process_time(), _loadavg()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model, used_ids, table = _fresh_model()
    spec = preprocess_spec(model)
    image_size, tokens = spec.image_size, CaptionTokens(used_ids)
    pixels, scenes = _render_pool(seed, Split.PRETRAIN, pool_size, image_size, progress)
    eval_pixels, eval_scenes = _render_pool(seed, Split.PRETRAIN_EVAL, eval_size, image_size, progress)
    images = pixels_to_tensor(pixels, spec)  # [N, 3, S, S] float32
    del pixels
    render_s = time.perf_counter() - t0
    _logger.info("rendered %d + %d clean images in %.1f s", pool_size, eval_size, render_s)
    optimizer, scheduler = _optimizer(model, table, lr, weight_decay, warmup_steps, steps)
    losses, train_s = _train_loop(
        model,
        table,
        tokens,
        optimizer,
        scheduler,
        images,
        scenes,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        eval_every=eval_every,
        progress=progress,
        quick_eval=lambda: _quick_eval(model, table, used_ids, eval_pixels, eval_scenes),
    )
    clean = _finish(model, table, used_ids, eval_pixels, eval_scenes, seed)
    meta = _metadata(
        model,
        losses,
        clean,
        recipe=dict(seed=seed, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay)
        | dict(warmup_steps=warmup_steps, pool_size=pool_size),
        seconds=(render_s, train_s, time.perf_counter() - t0, time.process_time() - cpu0),
        load_start=load_start,
    )
    metrics = dict(meta) if out is None else {**meta, **_save(model, Path(out), used_ids, meta)}
    if evaluate_downstream:  # not stored in the checkpoint: it depends on the downstream domain, not on it
        metrics["downstream"] = evaluate_toy_clip(model, seed=seed)
        metrics["wall_time_with_downstream_s"] = round(time.perf_counter() - t0, 1)
    return metrics
