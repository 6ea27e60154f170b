"""Command-line entry points of the toy world: ``pretrain-toy`` (``python -m trainer pretrain-toy`` or
``python -m trainer.toyworld.pretrain``) and ``eval-toy`` (``python -m trainer.toyworld.evaluate``).

Both print their result as JSON on stdout; progress and details go through ``logging``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from trainer.models import TOY_MODEL_CHECKPOINT, TOY_MODEL_NAME, load_clip
from trainer.toyworld.evaluate import evaluate_toy_clip
from trainer.toyworld.pretrain import pretrain


def pretrain_main(argv: list[str] | None = None) -> int:
    """``pretrain-toy``: rebuild ``trainer/assets/toyclip.pt`` (or ``--out``) and print its metrics as JSON."""
    parser = argparse.ArgumentParser(
        prog="pretrain-toy",
        description="Contrastively pretrain the embedded toy CLIP on the clean toy world.",
    )
    parser.add_argument("--out", type=Path, default=TOY_MODEL_CHECKPOINT, help="compact checkpoint to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--pool-size", type=int, default=40_000)
    parser.add_argument("--eval-every", type=int, default=500, help="log clean zero-shot every N steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-downstream", action="store_true", help="skip the toy-task evaluation")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = pretrain(
        out=args.out,
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        pool_size=args.pool_size,
        threads=args.threads,
        evaluate_downstream=not args.no_downstream,
        eval_every=args.eval_every,
        progress=not args.no_progress,
    )
    metrics.pop("vocabulary", None)
    print(json.dumps(metrics, indent=2))
    return 0


def evaluate_main(argv: list[str] | None = None) -> int:
    """Print the toy CLIP's zero-shot / linear-probe numbers on the toy task as JSON."""
    parser = argparse.ArgumentParser(prog="eval-toy", description="Measure the toy CLIP on the toy task.")
    parser.add_argument("--checkpoint", default=str(TOY_MODEL_CHECKPOINT), help="toy CLIP checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="world seed of the toy task")
    parser.add_argument("--n-max", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=25)
    parser.add_argument("--no-tuning", action="store_true", help="zero-shot only (skip the tuning proxies)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = load_clip(TOY_MODEL_NAME, pretrained=args.checkpoint).model
    results = evaluate_toy_clip(
        model,
        seed=args.seed,
        n_max=args.n_max,
        test_per_class=args.test_per_class,
        tuning_proxies=not args.no_tuning,
    )
    print(json.dumps(results, indent=2))
    return 0
