"""``python -m export`` / ``flatprompt-export``: export a model bundle (``docs/bundle.md``).

Examples::

    python -m export --checkpoint runs/toy/checkpoint.pt --out bundles/toy
    python -m export --zero-shot --model ViT-B-16 --pretrained weights.safetensors --classes names.txt \\
        --template "a photo of a {}." --out bundles/vitb16 --fp16
    python -m export --toy --out bundles/toy-zs --to-bentoml flatprompt

Exit codes: 0 written; 2 bad input (one line on stderr: missing/corrupt checkpoint, a checkpoint of another
model than ``--model``, unsupported tower or pooling, existing ``--out`` without ``--force``...); 1 the export
ran but failed its parity checks or the runtime could not load it (nothing is written in either case).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from trainer.errors import EXIT_USER_ERROR, UserError

_logger = logging.getLogger("export")
EXIT_EXPORT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    from export.graphs import DEFAULT_OPSET, EXPORTERS
    from export.parity import FP16_TOL, FP32_TOL
    from trainer.prompts import ZERO_SHOT_TEMPLATE

    p = argparse.ArgumentParser(
        prog="flatprompt-export",
        description="Export a prompt-tuned or zero-shot open_clip classifier as an ONNX model bundle.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training checkpoint (RUN/checkpoint.pt or the run directory)")
    src.add_argument("--zero-shot", action="store_true", help="hand-written template over --classes")
    src.add_argument("--toy", action="store_true", help="zero-shot export of the embedded toy CLIP")
    p.add_argument("--model", help="open_clip model name (with --checkpoint: must match the checkpoint's)")
    p.add_argument("--pretrained", help="hub tag or local weights file (with --checkpoint: must match)")
    p.add_argument("--model-config", help="open_clip model JSON to register (its stem is the model name)")
    p.add_argument(
        "--classes", help="text file, one class name per line (zero-shot; --toy defaults to the toy world's)"
    )
    p.add_argument(
        "--template", help=f"zero-shot prompt template with '{{}}' (default: {ZERO_SHOT_TEMPLATE!r})"
    )
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--fp16", action="store_true", help="also write fp16 graphs (used only on CUDA)")
    p.add_argument(
        "--default-text-path",
        choices=["auto", "learned", "handwritten", "ensemble"],
        default="auto",
        help="how /register embeds new names by default; auto: measured on the novel classes for a toy-world "
        "run, else learned",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    p.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="auto",
        help="torch ONNX exporter (default: dynamo, TorchScript fallback)",
    )
    p.add_argument(
        "--tol",
        type=float,
        default=FP32_TOL,
        help="fp32 parity tolerance, max abs diff (default %(default)s)",
    )
    p.add_argument(
        "--fp16-tol", type=float, default=FP16_TOL, help="fp16 parity tolerance (default %(default)s)"
    )
    p.add_argument(
        "--parity-images",
        type=int,
        default=12,
        help="synthetic images for the top-1 check (default %(default)s)",
    )
    p.add_argument(
        "--to-bentoml", metavar="NAME", help="also save the bundle into the local BentoML model store"
    )
    p.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    return p


def _source(ns: argparse.Namespace) -> object:
    from export import sources
    from trainer.prompts import ZERO_SHOT_TEMPLATE

    if ns.checkpoint:
        if ns.model_config:
            from trainer.models import register_model_config

            register_model_config(ns.model_config)
        if ns.classes or ns.template:
            raise UserError(
                "--classes/--template are only for --zero-shot/--toy: a checkpoint carries its own classes and prompt"
            )
        return sources.from_checkpoint(ns.checkpoint, expect_model=ns.model, expect_pretrained=ns.pretrained)
    names = sources.read_class_file(ns.classes) if ns.classes else None
    template = ns.template or ZERO_SHOT_TEMPLATE
    if ns.toy:
        if ns.model or ns.pretrained or ns.model_config:
            raise UserError("--toy uses the embedded toy CLIP: drop --model/--pretrained/--model-config")
        return sources.toy(names, template)
    if not ns.model:
        raise UserError(
            "--zero-shot needs --model NAME (an open_clip model name, or the stem of --model-config)"
        )
    if names is None:
        raise UserError("--zero-shot needs --classes names.txt (one class name per line)")
    if ns.pretrained is None:
        _logger.warning("--pretrained not given: exporting a RANDOMLY INITIALISED %s", ns.model)
    return sources.zero_shot(ns.model, ns.pretrained, names, template, ns.model_config)


def _setup_logging(level_name: str) -> None:
    """Log to stderr at ``level_name`` for our packages; open_clip's root-logger chatter stays at WARNING.

    Left alone when logging is already configured (the CLI embedded in tests or another program).
    """
    root = logging.getLogger()
    if root.handlers:
        return
    level = getattr(logging, level_name.upper(), logging.INFO)
    logging.basicConfig(
        level=max(level, logging.WARNING) if level > logging.DEBUG else level,
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in ("export", "serving", "trainer"):
        logging.getLogger(name).setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Run the exporter; returns the exit code (0 ok, 1 export failed its checks, 2 bad input)."""
    ns = build_parser().parse_args(argv)
    _setup_logging(str(ns.log_level))
    from export.builder import ExportError, ExportOptions, export_bundle

    try:
        source = _source(ns)
        options = ExportOptions(
            opset=ns.opset,
            fp16=ns.fp16,
            exporter=ns.exporter,
            force=ns.force,
            tol=ns.tol,
            fp16_tol=ns.fp16_tol,
            parity_images=ns.parity_images,
            default_text_path=ns.default_text_path,
        )
        result = export_bundle(source, ns.out, options)  # type: ignore[arg-type]
        tag = None
        if ns.to_bentoml:
            from export.bentoml_store import save_to_bentoml

            tag = save_to_bentoml(result.path, ns.to_bentoml)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ExportError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return EXIT_EXPORT_FAILED
    par = result.manifest.parity
    print(f"bundle: {result.path}")
    print(
        "parity: "
        + json.dumps(
            {
                "image_fp32": par["image_fp32"]["max_abs_diff"],
                "text_fp32": par["text_fp32"]["max_abs_diff"],
                "class_bank_fp32": par["class_bank_fp32"]["max_abs_diff"],
                "top1_agreement": par["top1_agreement"],
                **{
                    k: par[k].get("max_abs_diff", par[k].get("status"))
                    for k in ("image_fp16", "text_fp16")
                    if k in par
                },
            }
        )
    )
    if tag:
        print(f"bentoml: {tag}")
    return 0
