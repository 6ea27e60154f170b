"""The optimizer x re-weighting table on the toy world's long-tailed task, over several seeds.

Runs ``python -m trainer fit`` (in-process) for every optimizer in ``--optimizers``, with and without DRW,
for every seed, then prints a Markdown table of mean +- std of overall / many / medium / few / novel / HM
(percent). Runs that already finished are reused (their ``summary.json``), so the script can be resumed.

    python benchmarks/toy_table.py --out runs/table --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from trainer.cli import setup_logging
from trainer.config import load_config
from trainer.runner import fit

COLUMNS = ("base_top1", "many", "medium", "few", "novel", "hm")


def run_all(
    out: Path,
    optimizers: list[str],
    reweights: list[str],
    seeds: list[int],
    extra: list[str],
    budget_s: float,
) -> dict:
    """Run (or reuse) every setting, seed-major, until ``budget_s`` seconds have passed."""
    results: dict[tuple[str, str], list[dict[str, float | None]]] = {}
    zero_shot: list[dict[str, float | None]] = []
    start = time.time()
    # seed-major order: a table cut short by the budget still has every setting at the first seeds
    for seed, opt, rw in [(s, o, r) for s in seeds for o in optimizers for r in reweights]:
        run_dir = out / f"{opt}-{rw}-s{seed}"
        summary = run_dir / "summary.json"
        if not summary.exists():
            if time.time() - start > budget_s:
                continue
            overrides = [f"optim.name={opt}", f"reweight.name={rw}", f"train.seed={seed}"]
            overrides += [f"train.out_dir={run_dir}", "train.resume=false", *extra]
            fit(load_config(None, overrides), progress=False)
        data = json.loads(summary.read_text())
        results.setdefault((opt, rw), []).append(data["final"])
        if data.get("zero_shot") and not zero_shot:
            zero_shot.append(data["zero_shot"])
    return {"runs": results, "zero_shot": zero_shot}


def _cell(values: list[float | None]) -> str:
    vals = [100 * v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def markdown(table: dict, n_seeds: int) -> str:
    lines = [
        "| optimizer | reweight | seeds | " + " | ".join(COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for z in table["zero_shot"][:1]:  # zero-shot does not depend on the seed
        lines.append("| zero-shot | - | - | " + " | ".join(_cell([z.get(c)]) for c in COLUMNS) + " |")
    for (opt, rw), finals in table["runs"].items():
        cells = " | ".join(_cell([f.get(c) for f in finals]) for c in COLUMNS)
        lines.append(f"| {opt} | {rw} | {len(finals)} | {cells} |")
    lines.append(
        f"\nmean ± std over the seeds run (of {n_seeds} asked), percent; "
        "base_top1 = overall accuracy on the balanced base test set"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/table")
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "sam", "gnm", "gcsam"])
    parser.add_argument("--reweights", nargs="+", default=["none", "drw"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for every run")
    parser.add_argument("--budget-min", type=float, default=float("inf"), help="start no new run after this")
    ns = parser.parse_args(argv)
    setup_logging("WARNING")
    logging.getLogger("trainer").setLevel(logging.INFO)
    table = run_all(Path(ns.out), ns.optimizers, ns.reweights, ns.seeds, ns.set, 60 * ns.budget_min)
    text = markdown(table, len(ns.seeds))
    Path(ns.out, "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
