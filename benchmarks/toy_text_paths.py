"""Novel-class accuracy of finished toy runs per text path: how a name unseen in training is best embedded.

For every run directory (``python benchmarks/toy_table.py`` output), loads ``checkpoint.pt`` and scores the
toy world's 34 novel classes (sample top-1, in-process torch, the run's own images and visual prompts) with
the class names embedded three ways, as a bundle's ``text_path`` does:

- ``learned``: through the learned context (what the run's summary reports);
- ``handwritten``: ``prompt.template`` through the frozen text tower, without the learned context;
- ``ensemble``: the normalised mean of the two.

Runs are grouped by setting (the folder name without its ``-s<seed>`` suffix); mean +- std over seeds.

    python benchmarks/toy_text_paths.py runs/table-kg/*-s? runs/b2n/*-s?
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from trainer.checkpoint import load_prompted
from trainer.config import RunConfig
from trainer.data.base import Transformed
from trainer.data.tasks import task_from_config as build_task
from trainer.models import preprocess_spec
from trainer.transforms import build_transform

PATHS = ("learned", "handwritten", "ensemble")


@torch.no_grad()
def novel_accuracy(run_dir: Path) -> dict[str, float]:
    """Novel sample top-1 of one run for each text path."""
    run = load_prompted(run_dir / "checkpoint.pt")
    cfg = RunConfig.model_validate(run.config)
    task = build_task(cfg.data)
    assert task.novel_test is not None, f"{run_dir}: the task has no novel classes"
    model = run.model
    names = task.novel_test.class_names
    learned = model.encode_names(names)
    hand = model.encode_template(names, cfg.prompt.template)
    banks = {
        "learned": learned,
        "handwritten": hand,
        "ensemble": torch.nn.functional.normalize(learned + hand, dim=-1),
    }
    loader = DataLoader(
        Transformed(task.novel_test, build_transform(preprocess_spec(model.clip), train=False)),
        batch_size=256,
    )
    correct = dict.fromkeys(PATHS, 0)
    total = 0
    for images, labels in loader:
        feats = model.encode_image(images)
        for path, bank in banks.items():
            correct[path] += int(((feats @ bank.t()).argmax(1) == labels).sum())
        total += len(labels)
    return {p: correct[p] / total for p in PATHS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path)
    ns = parser.parse_args(argv)
    groups: dict[str, list[dict[str, float]]] = {}
    for run_dir in ns.runs:
        if not (run_dir / "checkpoint.pt").is_file():
            continue
        stem = re.sub(r"-s\d+$", "", run_dir.name)
        setting = f"{run_dir.parent.name}/{stem}"
        groups.setdefault(setting, []).append(novel_accuracy(run_dir))
    print("| setting | seeds | novel: learned | novel: handwritten | novel: ensemble |")
    print("|---|---|---|---|---|")
    for setting, rows in groups.items():
        cells = []
        for p in PATHS:
            vals = [100 * r[p] for r in rows]
            sd = f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else ""
            cells.append(f"{statistics.mean(vals):.1f}{sd}")
        print(f"| {setting} | {len(rows)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
