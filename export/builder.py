"""Write a complete, verified bundle directory (``docs/bundle.md``) from an :class:`ExportSource`.

Everything is written into a hidden temporary directory next to ``out`` and renamed into place at the end,
after the parity checks passed and the torch-free runtime loaded the result with checksums verified. Any
failure (or Ctrl-C) removes the temporary directory: no partial bundle is ever left at ``out``. An
existing bundle at ``out`` is only replaced with ``force=True`` (and only if it looks like a bundle).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from export import graphs, parity, text_paths
from export.sources import ExportSource
from export.tokenizer import tokenizer_info, write_pretokenizer_json, write_tokenizer_json
from serving.runtime import bundle as rt
from serving.runtime.manifest import (
    ClassesInfo,
    ClassList,
    GraphEntry,
    JSONObject,
    Manifest,
    ModelIdentity,
    OnnxInfo,
    PromptInfo,
    SourceInfo,
    TensorSpec,
)
from serving.runtime.preprocess import PreprocessConfig
from trainer.errors import UserError
from trainer.prompts import ZERO_SHOT_TEMPLATE, PromptedCLIP

_logger = logging.getLogger(__name__)

TEXT_BATCH = 256
_EXTRA_TEXTS = ["a brand new class", "Ünïcödé 名前 🐾", "x"]


@dataclass
class ExportOptions:
    """Knobs of :func:`export_bundle` (the CLI's flags)."""

    opset: int = graphs.DEFAULT_OPSET
    fp16: bool = False
    exporter: str = "auto"
    force: bool = False
    tol: float = parity.FP32_TOL
    fp16_tol: float = parity.FP16_TOL
    batch_sizes: tuple[int, ...] = parity.BATCH_SIZES
    parity_images: int = 12
    seed: int = 0
    exif_transpose: bool = False  # recorded in the manifest; False = open_clip's and the trainer's behaviour
    default_text_path: str = (
        "auto"  # /register's default text path; auto = measured on a toy run (text_paths.py)
    )


@dataclass
class ExportResult:
    path: Path
    manifest: Manifest
    timings: dict[str, float] = field(default_factory=dict)


class ExportError(Exception):
    """The export ran but its result is not acceptable (parity, runtime load); nothing was written."""


def preprocess_config(source: ExportSource, exif_transpose: bool = False) -> PreprocessConfig:
    """The runtime preprocessing config of the source model (open_clip's ``preprocess_cfg``)."""
    spec = source.preprocess
    cfg = getattr(source.model.clip.visual, "preprocess_cfg", None) or {}
    return PreprocessConfig(
        image_size=int(spec.image_size),
        mean=tuple(float(v) for v in spec.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in spec.std),  # type: ignore[arg-type]
        interpolation=str(spec.interpolation),
        resize_mode=str(spec.resize_mode),
        fill_color=int(cfg.get("fill_color", 0) or 0),
        exif_transpose=exif_transpose,
    )


def _prepare_target(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(
                f"{out} already exists: choose another --out or pass --force to replace the bundle"
            )
        if not out.is_dir() or (any(out.iterdir()) and not (out / rt.MANIFEST).is_file()):
            raise UserError(
                f"{out} exists and is not a bundle directory: refusing to replace it even with --force; "
                "choose another --out"
            )
    out.parent.mkdir(parents=True, exist_ok=True)


def _swap_into_place(tmp: Path, out: Path) -> None:
    old: Path | None = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _encode_names_torch(model: PromptedCLIP, names: list[str]) -> np.ndarray:
    outs = []
    with torch.no_grad():
        for i in range(0, len(names), TEXT_BATCH):
            outs.append(model.encode_names(names[i : i + TEXT_BATCH]).float().cpu().numpy())
    return np.ascontiguousarray(np.concatenate(outs), dtype=np.float32)


def handwritten_template(source: ExportSource) -> str:
    """The hand-written prompt of the ``handwritten`` text path: a zero-shot model's own template, else the
    run's ``prompt.template`` (``"a photo of a {}."`` when the checkpoint does not record one)."""
    if source.model.n_ctx == 0:
        return source.model.template
    tpl = source.handwritten_template or ZERO_SHOT_TEMPLATE
    if "{}" not in tpl:
        raise UserError(f"the hand-written template {tpl!r} has no '{{}}' for the class name")
    return tpl


def _text_graph_entry(fp32: str, fp16: str | None, context_length: int, embed_dim: int) -> GraphEntry:
    return GraphEntry(
        fp32=fp32,
        fp16=fp16,
        input=TensorSpec(name=rt.TEXT_INPUT, dtype="int64", shape=["N", context_length]),
        output=TensorSpec(name=rt.OUTPUT, dtype="float32", shape=["N", embed_dim], l2_normalised=True),
    )


def _base_manifest(
    source: ExportSource,
    options: ExportOptions,
    pre: PreprocessConfig,
    context_length: int,
    embed_dim: int,
    exporter: str | dict[str, str],
    graph_info: dict[str, JSONObject],
) -> Manifest:
    """The manifest before parity (``parity`` empty, ``files`` filled in by :func:`_write_manifest`)."""
    import onnx
    import onnxruntime
    import open_clip

    model = source.model
    ident = source.identity
    graph_entries: dict[str, GraphEntry] = {
        "image_encoder": GraphEntry(
            fp32=rt.IMAGE_ENCODER,
            fp16=rt.IMAGE_ENCODER_FP16 if options.fp16 else None,
            input=TensorSpec(
                name=rt.IMAGE_INPUT, dtype="float32", shape=["N", 3, pre.image_size, pre.image_size]
            ),
            output=TensorSpec(name=rt.OUTPUT, dtype="float32", shape=["N", embed_dim], l2_normalised=True),
        ),
        "text_encoder": _text_graph_entry(
            rt.TEXT_ENCODER, rt.TEXT_ENCODER_FP16 if options.fp16 else None, context_length, embed_dim
        ),
    }
    if model.n_ctx > 0:  # the frozen text tower without the learned context: the "handwritten" text path
        graph_entries["text_encoder_handwritten"] = _text_graph_entry(
            rt.TEXT_ENCODER_HANDWRITTEN, None, context_length, embed_dim
        )
    vpt_length = int(getattr(model, "vpt_length", 0))
    return Manifest(
        format_version=rt.FORMAT_VERSION,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        model=ModelIdentity(
            name=ident.name,
            pretrained=ident.pretrained,
            config_path=ident.config_path,
            open_clip_version=open_clip.__version__,
            weights_sha256=ident.weights_sha256,
            checkpoint_sha256=source.checkpoint_sha256,
            # the towers' MLP activation, baked into the graphs ("quick_gelu" for OpenAI weights); None for
            # a checkpoint written before flatprompt recorded it
            activation=ident.activation,
        ),
        source=SourceInfo(
            kind=source.kind,
            checkpoint=source.checkpoint,
            checkpoint_sha256=source.checkpoint_sha256,
            extra=dict(source.extra),
        ),
        onnx=OnnxInfo(
            opset=options.opset,
            exporter=exporter,
            onnx_version=onnx.__version__,
            onnxruntime_version=onnxruntime.__version__,
            torch_version=torch.__version__,
            graphs=graph_info,
        ),
        logit_scale=float(model.logit_scale),
        logit_bias=None if model.logit_bias is None else float(model.logit_bias),
        embed_dim=embed_dim,
        context_length=context_length,
        prompt=PromptInfo(
            template=model.template,
            n_ctx=int(model.n_ctx),
            placeholder="X",
            vpt_length=vpt_length,
            vpt_deep=bool(getattr(model, "vpt_deep", False)) and vpt_length > 0,
            # the "handwritten" text path: this template through the frozen tower without the learned context
            handwritten_template=handwritten_template(source),
        ),
        tokenizer=tokenizer_info(context_length, rt.TOKENIZER, rt.PRETOKENIZER),
        preprocess=pre.to_manifest(),
        classes=ClassesInfo(count=len(source.class_names), file=rt.CLASSES, embeddings=rt.CLASS_EMBEDDINGS),
        graphs=graph_entries,
        parity={},
        files={},
    )


def _write_manifest(tmp: Path, manifest: Manifest) -> Manifest:
    """``manifest`` with ``files`` listing every file in ``tmp``, written there; returns it."""
    files = {f.name: rt.file_entry(f) for f in sorted(tmp.iterdir()) if f.is_file() and f.name != rt.MANIFEST}
    manifest = replace(manifest, files=files)
    manifest.write(tmp)
    return manifest


def _cuda_in_ort() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _measure(
    source: ExportSource,
    bundle: rt.Bundle,
    bank: np.ndarray,
    pre: PreprocessConfig,
    options: ExportOptions,
    tmp: Path,
) -> parity.ParityReport:
    """All parity figures (see :mod:`export.parity`)."""
    model = source.model
    size = pre.image_size
    names = source.class_names

    prompts = [model.template.format(n) for n in names[:512]]
    tokenizer = parity.tokenizer_parity(model.tokenizer, bundle.tokenize, prompts + parity.HARD_TEXTS)

    images = parity.parity_images(options.parity_images, size, options.seed)
    preprocess = parity.preprocess_parity(pre, images)

    img_inputs = [parity.random_pixels(b, size, options.seed + b) for b in options.batch_sizes]
    img_inputs.append(bundle.preprocess_batch(images))
    image_fp32 = replace(
        parity.graph_parity(model.encode_image, bundle.embed_images, img_inputs, options.batch_sizes),
        parity_images=len(images),
    )

    pool = names + _EXTRA_TEXTS
    txt_inputs = []
    for k, b in enumerate(options.batch_sizes):
        picked = [pool[(k * 7 + j) % len(pool)] for j in range(b)]
        txt_inputs.append(model.tokenize(picked).numpy())
    text_fp32 = parity.graph_parity(
        model.encode_token_ids, bundle.embed_token_ids, txt_inputs, options.batch_sizes
    )

    ort_bank = bundle.embed_texts(names)
    class_bank = parity.ClassBankParity(classes=len(names), max_abs_diff=float(np.abs(ort_bank - bank).max()))

    hand_tpl = handwritten_template(source)
    text_handwritten = None
    if model.n_ctx > 0:
        hand_inputs = [
            model.tokenizer([hand_tpl.format(n) for n in (pool * b)[:b]]).numpy() for b in options.batch_sizes
        ]
        text_handwritten = parity.graph_parity(
            lambda t: model.encode_token_ids(t, learned=False),
            lambda x: bundle.embed_token_ids(x, text_path="handwritten"),
            hand_inputs,
            options.batch_sizes,
        )
    paths = parity.text_path_parity(model, bundle, pool, hand_tpl)

    with torch.no_grad():
        torch_img = model.encode_image(torch.from_numpy(img_inputs[-1])).float().numpy()
    ort_img = bundle.embed_images(img_inputs[-1])
    top1 = parity.top1_agreement(torch_img, ort_img, bank)

    image_fp16 = text_fp16 = None
    if options.fp16:
        cuda = _cuda_in_ort()
        with torch.no_grad():
            img_refs = [model.encode_image(torch.from_numpy(x)).float().numpy() for x in img_inputs]
            txt_refs = [model.encode_token_ids(torch.from_numpy(x)).float().numpy() for x in txt_inputs]
        image_fp16 = parity.fp16_parity(
            tmp / rt.IMAGE_ENCODER_FP16, rt.IMAGE_INPUT, img_inputs, img_refs, cuda
        )
        text_fp16 = parity.fp16_parity(tmp / rt.TEXT_ENCODER_FP16, rt.TEXT_INPUT, txt_inputs, txt_refs, cuda)
    return parity.ParityReport(
        tolerance=options.tol,
        fp16_tolerance=options.fp16_tol,
        provider=bundle.provider,
        tokenizer=tokenizer,
        preprocess=preprocess,
        image_fp32=image_fp32,
        text_fp32=text_fp32,
        class_bank_fp32=class_bank,
        text_handwritten_fp32=text_handwritten,
        text_paths=paths,
        top1=top1,
        top1_agreement=top1.top1_agreement,
        image_fp16=image_fp16,
        text_fp16=text_fp16,
    )


def export_bundle(
    source: ExportSource, out: str | os.PathLike[str], options: ExportOptions | None = None
) -> ExportResult:
    """Export ``source`` into the bundle directory ``out``; see the module docstring for the guarantees.

    Raises:
        UserError: bad input (existing ``out`` without ``force``, bad opset/exporter, unsupported model).
        ExportError: parity outside tolerance, or the runtime cannot load the result.
    """
    import time

    opts = options or ExportOptions()
    if not opts.batch_sizes or min(opts.batch_sizes) < 1:
        raise UserError(f"parity batch sizes must be >= 1, got {opts.batch_sizes}")
    target = Path(out).expanduser().absolute()
    _prepare_target(target, opts.force)
    tmp = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        model = source.model.cpu().float().eval()
        source.model = model
        pre = preprocess_config(source, opts.exif_transpose)
        context_length = int(model.clip.context_length)
        probe = model.tokenize(source.class_names[:2])
        if probe.shape[1] != context_length:
            raise UserError(
                f"the model's tokenizer gives {probe.shape[1]} tokens but its context length is {context_length}"
            )
        with torch.no_grad():
            embed_dim = int(model.encode_token_ids(probe).shape[1])

        example_img = torch.randn(
            2, 3, pre.image_size, pre.image_size, generator=torch.Generator().manual_seed(0)
        )
        example_txt = model.tokenize((source.class_names * 2)[:2])
        kind_img = graphs.export_tower(
            graphs.ImageTower(model),
            example_img,
            rt.IMAGE_INPUT,
            tmp / rt.IMAGE_ENCODER,
            opts.opset,
            opts.exporter,
        )
        kind_txt = graphs.export_tower(
            graphs.TextTower(model),
            example_txt,
            rt.TEXT_INPUT,
            tmp / rt.TEXT_ENCODER,
            opts.opset,
            opts.exporter,
        )
        info = {
            "image_encoder": graphs.check_graph(tmp / rt.IMAGE_ENCODER),
            "text_encoder": graphs.check_graph(tmp / rt.TEXT_ENCODER),
        }
        if model.n_ctx > 0:
            hand = handwritten_template(source)
            graphs.export_tower(
                graphs.TextTower(model, learned=False),
                model.tokenizer([hand.format(n) for n in (source.class_names * 2)[:2]]),
                rt.TEXT_INPUT,
                tmp / rt.TEXT_ENCODER_HANDWRITTEN,
                opts.opset,
                kind_txt,  # the exporter that worked for the learned graph
            )
            info["text_encoder_handwritten"] = graphs.check_graph(tmp / rt.TEXT_ENCODER_HANDWRITTEN)
        timings["onnx_export_s"] = time.perf_counter() - t0

        write_tokenizer_json(tmp / rt.TOKENIZER)
        write_pretokenizer_json(tmp / rt.PRETOKENIZER)
        bank = _encode_names_torch(model, source.class_names)
        np.save(tmp / rt.CLASS_EMBEDDINGS, bank)
        ClassList(names=list(source.class_names), counts=list(source.class_counts)).write(tmp / rt.CLASSES)
        if opts.fp16:
            graphs.convert_fp16(tmp / rt.IMAGE_ENCODER, tmp / rt.IMAGE_ENCODER_FP16)
            graphs.convert_fp16(tmp / rt.TEXT_ENCODER, tmp / rt.TEXT_ENCODER_FP16)

        exporter = kind_img if kind_img == kind_txt else {"image_encoder": kind_img, "text_encoder": kind_txt}
        manifest = _write_manifest(
            tmp, _base_manifest(source, opts, pre, context_length, embed_dim, exporter, info)
        )

        t1 = time.perf_counter()
        try:
            bundle = rt.Bundle.load(tmp, providers=[rt.CPU], verify=False, precision="fp32")
        except rt.BundleError as e:
            raise ExportError(f"the exported bundle does not load in the runtime: {e}") from e
        report = _measure(source, bundle, bank, pre, opts, tmp)
        timings["parity_s"] = time.perf_counter() - t1
        kind, seed = source.extra.get("data_kind"), source.extra.get("data_seed", 0)
        try:
            choice = text_paths.choose_default(
                bundle,
                kind if isinstance(kind, str) else None,
                seed if isinstance(seed, int) else 0,
                opts.default_text_path,
            )
        except ValueError as e:
            raise UserError(str(e)) from e
        del bundle
        parity.check(report, opts.tol, opts.fp16_tol)
        prompt = replace(
            manifest.prompt,
            default_text_path=choice.default_text_path,
            default_text_path_source=choice.default_text_path_source,
            text_path_novel_top1=choice.text_path_novel_top1,
        )
        manifest = _write_manifest(tmp, replace(manifest, prompt=prompt, parity=report.to_dict()))
        try:
            rt.Bundle.load(tmp, providers=[rt.CPU], verify=True, precision="fp32")
        except rt.BundleError as e:
            raise ExportError(f"the finished bundle does not verify: {e}") from e
        _fsync_dir(tmp)
        _swap_into_place(tmp, target)
    except (parity.ParityError, graphs.GraphExportError) as e:
        raise ExportError(str(e)) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    timings["total_s"] = time.perf_counter() - t0
    _logger.info("bundle written to %s in %.1f s", target, timings["total_s"])
    return ExportResult(path=target, manifest=manifest, timings=timings)
