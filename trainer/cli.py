"""``python -m trainer`` / ``flatprompt-train``: fit, check, evaluate, report, pretrain-toy.

Errors a user can cause end as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping

from trainer.errors import EXIT_USER_ERROR, UserError

_logger = logging.getLogger("trainer")


PROJECT_LOGGERS = ("trainer", "export", "serving", "benchmarks", "__main__")


class ThirdPartyFilter(logging.Filter):
    """Keeps third-party log lines below the project's own level, under their own names.

    open_clip logs through the root logger (``logging.info(...)``), so its lines read ``root``: they are
    renamed after the module that wrote them (``open_clip.factory``). Records of loggers outside
    :data:`PROJECT_LOGGERS` pass only from WARNING up, or all of them at ``--log-level DEBUG``.
    """

    def __init__(self, level: int) -> None:
        super().__init__()
        self.third_party_level = logging.DEBUG if level <= logging.DEBUG else max(level, logging.WARNING)
        self._names: dict[str, str] = {}

    def _module_name(self, pathname: str) -> str:
        if pathname not in self._names:
            name = "root"
            for entry in sorted((p for p in sys.path if p), key=len, reverse=True):
                prefix = os.path.join(os.path.abspath(entry), "")
                if pathname.startswith(prefix) and pathname.endswith(".py"):
                    name = pathname[len(prefix) : -3].replace(os.sep, ".").removesuffix(".__init__")
                    break
            self._names[pathname] = name
        return self._names[pathname]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root" and record.pathname:
            record.name = self._module_name(record.pathname)
        top = record.name.split(".", 1)[0]
        if top in PROJECT_LOGGERS or record.name == "root":
            return True
        return record.levelno >= self.third_party_level


def setup_logging(level: str = "INFO") -> None:
    """The project's log lines at ``level`` (``--log-level``); third-party ones only from WARNING up (all at
    DEBUG), each under its module's name (see :class:`ThirdPartyFilter`)."""
    value = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(
        level=value,
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        datefmt="%H:%M:%S",
    )
    for handler in logging.getLogger().handlers:
        for f in handler.filters:
            if isinstance(f, ThirdPartyFilter):
                handler.removeFilter(f)
        handler.addFilter(ThirdPartyFilter(value))


def _fmt(v: float | None) -> str:
    return "   -  " if v is None else f"{100 * v:6.2f}"


def format_table(rows: dict[str, dict[str, float | None] | None]) -> str:
    """A small accuracy table (percent): one row per setting."""
    cols = ["base_top1", "many", "medium", "few", "novel", "hm"]
    if any(h and "posthoc_top1" in h for h in rows.values()):  # eval.posthoc_tau: the adjusted numbers too
        cols += ["posthoc_top1", "posthoc_many", "posthoc_medium", "posthoc_few"]
    head = f"{'':<12}" + "".join(f"{c:>10}" for c in cols)
    lines = [head]
    for name, h in rows.items():
        if h is None:
            continue
        lines.append(f"{name:<12}" + "".join(f"{_fmt(h.get(c)):>10}" for c in cols))
    return "\n".join(lines)


def _cmd_fit(ns: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.runner import fit

    overrides = list(ns.set or [])
    if ns.out:
        overrides.append(f"train.out_dir={ns.out}")
    cfg = load_config(ns.config, overrides)
    result = fit(cfg, progress=not ns.no_progress, check_args=_check_args(ns.config, ns.set))
    print(f"run: {result.out_dir}")
    print(format_table({"zero-shot": result.zero_shot, "tuned": result.final}))
    return 0


def _check_args(config: str | None, sets: list[str] | None) -> str:
    """The `check` arguments that reproduce a `fit` invocation's config (for messages)."""
    import shlex

    parts = (["-c", config] if config else []) + [a for s in sets or [] for a in ("--set", s)]
    return shlex.join(parts) if parts else "-c CONFIG"


def _cmd_check(ns: argparse.Namespace) -> int:
    from trainer.preflight import run_check, write_json

    report = run_check(
        ns.config,
        ns.set,
        device=ns.device,
        steps=ns.steps,
        warmup=ns.warmup,
        workers=ns.workers,
        progress=not ns.no_progress,
        download=ns.download,
        do_dry_run=ns.dry_run,
        list_classes=ns.list_classes,
        write=lambda line: print(line, flush=True),
    )
    if ns.json:
        write_json(report, ns.json)
    return report.exit_code


def _cmd_evaluate(ns: argparse.Namespace) -> int:
    import torch

    from trainer.checkpoint import load_prompted
    from trainer.config import RunConfig, load_config
    from trainer.data.tasks import task_from_config
    from trainer.distributed import DistInfo, resolve_device
    from trainer.evaluation import evaluate_task, to_jsonable
    from trainer.metrics import ShotThresholds
    from trainer.prompts import PromptedCLIP
    from trainer.training import build_model

    device = resolve_device(ns.device, DistInfo())
    if ns.checkpoint:
        run = load_prompted(ns.checkpoint, device)
        cfg = RunConfig.model_validate(run.config)
        if ns.set:
            cfg = load_config(None, [*_flatten(cfg.model_dump()), *ns.set])
        model = run.model
        from trainer.models import preprocess_spec

        spec = preprocess_spec(model.clip)
        name = "tuned"
        task = task_from_config(cfg.data)
    else:
        cfg = load_config(ns.config, ns.set)
        task = task_from_config(cfg.data)  # the data first: a wrong path fails before any weight is fetched
        tuned, loaded = build_model(cfg, device)
        model = PromptedCLIP(tuned.clip, tuned.tokenizer, n_ctx=0, template=cfg.prompt.template).to(device)
        spec = loaded.preprocess
        name = "zero-shot"
    with torch.no_grad():
        result = evaluate_task(
            model,
            task,
            spec,
            device,
            batch_size=cfg.data.eval_batch_size,
            thresholds=ShotThresholds(cfg.eval.many_above, cfg.eval.few_below),
            progress=not ns.no_progress,
            posthoc_tau=cfg.eval.posthoc_tau,
        )
    h = result.headline()
    print(format_table({name: h}))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(to_jsonable(result.to_dict()), f, indent=2)
    return 0


def _flatten(tree: Mapping[str, object], prefix: str = "") -> list[str]:
    out: list[str] = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten(v, key + "."))
        else:
            out.append(f"{key}={json.dumps(v)}")
    return out


def _cmd_pretrain_toy(ns: argparse.Namespace, rest: list[str]) -> int:
    from trainer.toyworld.cli import pretrain_main

    return pretrain_main(rest)


def _cmd_report(ns: argparse.Namespace) -> int:
    from trainer.distributed import DistInfo, resolve_device
    from trainer.report import build_report, default_out_dir

    out = ns.out or default_out_dir(ns.runs)
    result = build_report(
        ns.runs,
        out,
        landscape=ns.landscape,
        landscape_images=ns.landscape_images,
        landscape_directions=ns.landscape_directions,
        landscape_points=ns.landscape_points,
        seed=ns.seed,
        device=str(resolve_device(ns.device, DistInfo())),
    )
    print(f"report: {result.html}")
    for lsc in result.landscapes:
        print(f"  {lsc.label:<24} L(theta) {lsc.center_loss:.4f}  sharpness {lsc.sharpness:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    parser.add_argument("--log-level", default=None, help="INFO by default (WARNING for check)")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="train prompts (default: the embedded toy world)")
    fit.add_argument("-c", "--config", help="YAML run config (see recipes/)")
    fit.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. optim.name=gnm")
    fit.add_argument("--out", help="run directory (train.out_dir)")
    fit.add_argument("--no-progress", action="store_true")

    chk = sub.add_parser(
        "check",
        help="preflight: config, data (every image decoded), weights, a timed dry run; trains nothing",
        description="Check a run config without training: the resolved config, the data (classes, counts, "
        "long-tail profile, a full decode of every image file), where the weights come from and whether the "
        "model loads, and a few timed optimizer steps with projected epoch and run times. Exit status 0 when "
        "everything passed, 1 otherwise.",
    )
    chk.add_argument("-c", "--config", help="YAML run config (see recipes/)")
    chk.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. data.root=/data/x")
    chk.add_argument("--device", help="where to dry-run (default: train.device)")
    chk.add_argument("--steps", type=int, default=5, help="timed optimizer steps of the dry run (default 5)")
    chk.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    chk.add_argument("--workers", type=int, help="processes decoding images (default: every available core)")
    chk.add_argument(
        "--no-dry-run", dest="dry_run", action="store_false", help="skip the timed optimizer steps"
    )
    chk.add_argument(
        "--no-download",
        dest="download",
        action="store_false",
        help="do not download weights that are not cached (their size is still reported)",
    )
    chk.add_argument("--list-classes", action="store_true", help="one line per class: train / test counts")
    chk.add_argument("--json", help="also write the report here as JSON")
    chk.add_argument("--no-progress", action="store_true")

    ev = sub.add_parser("evaluate", help="evaluate a checkpoint, or the zero-shot model of a config")
    ev.add_argument("--checkpoint", help="RUN_DIR/checkpoint.pt (omit for zero-shot)")
    ev.add_argument("-c", "--config", help="YAML run config (zero-shot only)")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", help="write the full evaluation here")
    ev.add_argument("--no-progress", action="store_true")

    rep = sub.add_parser("report", help="plots and an HTML page from run directories")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders written by `fit`")
    rep.add_argument("--out", help="output folder (default: RUN_DIR/report)")
    rep.add_argument("--landscape", action=argparse.BooleanOptionalAction, default=True)
    rep.add_argument("--landscape-images", type=int, default=256, help="training images scanned")
    rep.add_argument("--landscape-directions", type=int, default=3, help="random directions averaged")
    rep.add_argument("--landscape-points", type=int, default=21, help="odd number of alphas in [-1, 1]")
    rep.add_argument("--seed", type=int, default=0, help="seed of the image subset and the directions")
    rep.add_argument("--device", default="auto")

    sub.add_parser(
        "pretrain-toy", help="pretrain the toy CLIP on the toy world (see --help of it)", add_help=False
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    setup_logging(ns.log_level or ("WARNING" if ns.command == "check" else "INFO"))
    try:
        if ns.command == "pretrain-toy":
            return _cmd_pretrain_toy(ns, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if ns.command == "fit":
            return _cmd_fit(ns)
        if ns.command == "check":
            return _cmd_check(ns)
        if ns.command == "evaluate":
            return _cmd_evaluate(ns)
        if ns.command == "report":
            return _cmd_report(ns)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    parser.error(f"unknown command {ns.command}")
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
