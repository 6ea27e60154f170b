"""How well `python -m trainer check`'s dry run projects a real run: projected vs measured, side by side.

For each toy recipe: the dry run's projected epoch (and whole-run) time, then a real 1-epoch `fit` of the
same config, whose epoch time is the `seconds` of its metrics.jsonl line (training only, as the projection)
and whose run time is the wall time of `fit` (zero-shot evaluation, the epoch and its evaluation). The
goal is a ratio within 2x. Runs alternate (check, fit, check) so machine noise hits both; the projection
shown is the mean of the two checks.

    python benchmarks/preflight_projection.py                          # toy_sgd and toy_gcsam on CPU
    python benchmarks/preflight_projection.py --recipes toy_gnm_drw --steps 10 --device cuda
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from trainer.cli import setup_logging
from trainer.config import load_config
from trainer.preflight import format_seconds, run_check
from trainer.runner import fit

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def project(recipe: Path, sets: list[str], steps: int, device: str | None) -> tuple[float, float]:
    report = run_check(str(recipe), sets, steps=steps, device=device, progress=False, write=lambda _: None)
    if report.dry_run is None:
        raise SystemExit(f"{recipe.name}: the check failed: {[s.faults for s in report.sections]}")
    return report.dry_run.epoch_seconds, report.dry_run.run_seconds


def measure(recipe: Path, sets: list[str], out: Path) -> tuple[float, float]:
    cfg = load_config(recipe, [*sets, f"train.out_dir={out}", "train.resume=false"])
    t0 = time.perf_counter()
    fit(cfg, progress=False)
    wall = time.perf_counter() - t0
    epoch = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["seconds"]
    return float(epoch), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["toy_sgd", "toy_gcsam"])
    ap.add_argument("--steps", type=int, default=8, help="timed dry-run steps")
    ap.add_argument("--device", default=None, help="default: the recipe's train.device (auto)")
    args = ap.parse_args()
    setup_logging("WARNING")
    sets = ["train.epochs=1"] + ([f"train.device={args.device}"] if args.device else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            recipe = RECIPES / f"{name}.yaml"
            e1, r1 = project(recipe, sets, args.steps, args.device)
            epoch, wall = measure(recipe, sets, Path(tmp) / name)
            e2, r2 = project(recipe, sets, args.steps, args.device)
            rows.append((name, (e1 + e2) / 2, epoch, (r1 + r2) / 2, wall))
    print(
        f"{'recipe':<14}{'projected epoch':>17}{'measured epoch':>16}{'ratio':>8}"
        f"{'projected run':>15}{'measured run':>14}{'ratio':>8}"
    )
    for name, pe, me, pr, mr in rows:
        print(
            f"{name:<14}{format_seconds(pe):>17}{format_seconds(me):>16}{pe / me:>8.2f}"
            f"{format_seconds(pr):>15}{format_seconds(mr):>14}{pr / mr:>8.2f}"
        )
    worst = max(max(pe / me, me / pe) for _, pe, me, _, _ in rows)
    print(f"worst epoch ratio {worst:.2f}x ({'within' if worst <= 2 else 'outside'} the 2x goal)")


if __name__ == "__main__":
    main()
