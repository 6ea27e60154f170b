"""The optimizer x re-weighting x KgCoOp table on the toy world, over several seeds.

Runs ``python -m trainer fit`` (in-process) for every optimizer in ``--optimizers``, every re-weighting in
``--reweights`` and every KgCoOp weight in ``--kg-weights`` (``loss.kg_weight``; 0 = off), for every seed,
then prints a Markdown table of mean +- std (percent). Runs that already finished are reused (their
``summary.json``), so the script can be resumed; the rendered toy world is built once per process.

``--protocol longtail`` (default): the demo's long-tailed task (CoOp M 4 + deep VPT 4); columns overall /
many / medium / few / novel / HM.

``--protocol base2novel``: the base-to-novel protocol of CoCoOp / KgCoOp / GCSCoOp on the toy world: CoOp
text context only (M 4 from "a photo of a", no visual prompts), 16 shots per base class (30 classes,
balanced), the 34 novel classes tested against their own names; columns base / novel / HM (sample top-1).

    python benchmarks/toy_table.py --out runs/table --seeds 0 1 2
    python benchmarks/toy_table.py --protocol base2novel --out runs/b2n --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from trainer.cli import setup_logging
from trainer.config import DataConfig, load_config
from trainer.data import tasks
from trainer.data.base import TaskData
from trainer.data.checks import DataFault
from trainer.runner import fit

COLUMNS = {
    "longtail": ("base_top1", "many", "medium", "few", "novel", "hm"),
    "base2novel": ("base_top1", "novel", "hm"),
}
# the base-to-novel protocol: CoOp text context only, 16 shots per base class, balanced
PROTOCOL_OVERRIDES = {
    "longtail": [],
    "base2novel": [
        "data.n_max=16",
        "data.imbalance=1",
        "prompt.n_ctx=4",
        "prompt.ctx_init=a photo of a",
        "prompt.vpt_length=0",
    ],
}


def _cached_task_builder() -> None:
    """Render each toy world once per process: fit builds its task anew for every run (same pixels)."""
    build = tasks.task_from_config
    cache: dict[str, TaskData] = {}

    def cached(data: DataConfig, problems: list[DataFault] | None = None) -> TaskData:
        key = data.model_dump_json()
        if key not in cache:
            cache[key] = build(data, problems)
        return cache[key]

    tasks.task_from_config = cached  # type: ignore[assignment]


def run_name(opt: str, rw: str, kg: float, seed: int) -> str:
    """The run folder of one setting (kg 0 keeps the name runs had before the KgCoOp column existed)."""
    return f"{opt}-{rw}-s{seed}" if kg == 0 else f"{opt}-{rw}-kg{kg:g}-s{seed}"


def run_all(
    out: Path,
    optimizers: list[str],
    reweights: list[str],
    seeds: list[int],
    extra: list[str],
    budget_s: float,
    kg_weights: tuple[float, ...] = (0.0,),
) -> dict:
    """Run (or reuse) every setting, seed-major, until ``budget_s`` seconds have passed."""
    results: dict[tuple[str, str, float], list[dict[str, float | None]]] = {}
    zero_shot: list[dict[str, float | None]] = []
    start = time.time()
    settings = [(o, r, k) for o in optimizers for k in kg_weights for r in reweights]
    # seed-major order: a table cut short by the budget still has every setting at the first seeds
    for seed, (opt, rw, kg) in [(s, x) for s in seeds for x in settings]:
        run_dir = out / run_name(opt, rw, kg, seed)
        summary = run_dir / "summary.json"
        if not summary.exists():
            if time.time() - start > budget_s:
                continue
            overrides = [f"optim.name={opt}", f"reweight.name={rw}", f"train.seed={seed}"]
            overrides += [f"loss.kg_weight={kg}"] if kg else []
            overrides += [f"train.out_dir={run_dir}", "train.resume=false", *extra]
            t0 = time.time()
            fit(load_config(None, overrides), progress=False)
            logging.getLogger("toy_table").info("%s: %.0f s", run_dir.name, time.time() - t0)
        data = json.loads(summary.read_text())
        results.setdefault((opt, rw, kg), []).append(data["final"])
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


def markdown(table: dict, n_seeds: int, columns: tuple[str, ...] = COLUMNS["longtail"]) -> str:
    lines = [
        "| optimizer | reweight | kg_weight | seeds | " + " | ".join(columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    for z in table["zero_shot"][:1]:  # zero-shot does not depend on the seed
        lines.append("| zero-shot | - | - | - | " + " | ".join(_cell([z.get(c)]) for c in columns) + " |")
    for (opt, rw, kg), finals in table["runs"].items():
        cells = " | ".join(_cell([f.get(c) for f in finals]) for c in columns)
        lines.append(f"| {opt} | {rw} | {kg:g} | {len(finals)} | {cells} |")
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
    parser.add_argument("--protocol", choices=sorted(COLUMNS), default="longtail")
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "sam", "gnm", "gcsam"])
    parser.add_argument("--reweights", nargs="+", default=None, help="longtail: none drw; base2novel: none")
    parser.add_argument(
        "--kg-weights",
        nargs="+",
        type=float,
        default=None,
        help="loss.kg_weight values (longtail: 0; base2novel: 0 8)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for every run")
    parser.add_argument("--budget-min", type=float, default=float("inf"), help="start no new run after this")
    ns = parser.parse_args(argv)
    setup_logging("WARNING")
    logging.getLogger("trainer").setLevel(logging.INFO)
    logging.getLogger("toy_table").setLevel(logging.INFO)
    reweights = ns.reweights or (["none", "drw"] if ns.protocol == "longtail" else ["none"])
    kg_weights = tuple(ns.kg_weights or ([0.0] if ns.protocol == "longtail" else [0.0, 8.0]))
    _cached_task_builder()
    extra = PROTOCOL_OVERRIDES[ns.protocol] + ns.set
    table = run_all(Path(ns.out), ns.optimizers, reweights, ns.seeds, extra, 60 * ns.budget_min, kg_weights)
    text = markdown(table, len(ns.seeds), COLUMNS[ns.protocol])
    Path(ns.out, "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
