"""Parity checks run at export time: onnxruntime (through the torch-free runtime) against torch.

Every figure is a typed record (:class:`ParityReport` and its parts); ``ParityReport.to_dict()`` is the
manifest's ``parity`` section (the same keys as ever); :func:`check` raises :class:`ParityError` (the
export fails, nothing is written) when one is outside its tolerance.

- graphs: max abs diff of the L2-normalised embeddings at batch sizes 1, 2 and 5 (dynamic-axis bugs show
  up as wrong results at one batch size only), plus the parity image set for the image graph;
- tokenizer: the runtime's ids must equal open_clip's for every class prompt and a set of hard strings;
- preprocessing: the runtime's pixels against open_clip's own eval transform;
- class bank: the stored (torch) class embeddings against the ONNX text graph through the runtime;
- text paths: ``Bundle.embed_texts(names, text_path=...)`` for ``learned`` / ``handwritten`` / ``ensemble``
  against the matching torch path (learned context; the hand-written template without it; their normalised
  mean), and the hand-written graph at batch sizes 1, 2 and 5;
- top-1: the class picked for each parity image by torch and by onnxruntime;
- fp16: measured in a child process (a crash must not take the exporter down): on CUDA when onnxruntime
  has it, else on the CPU provider at ``ORT_ENABLE_EXTENDED`` (``ORT_ENABLE_ALL`` crashes fp16 graphs on the
  CPU provider in onnxruntime 1.32); "not measured on CPU" when no attempt worked.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from serving.runtime.manifest import OMIT, Record

_logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 5)
FP32_TOL = 1e-4
FP16_TOL = 1e-2
TOP1_TIE_MARGIN = 1e-3  # a top-1 flip between logits closer than this (cosine units) is a tie, not a failure
HARD_TEXTS = [
    "a photo of a Cat.",
    "",
    "Crème brûlée &amp; ﬁsh",
    "日本語 emoji 🐱👍🏽",
    "it's   MiXeD\tcase\n123",
    "word " * 90,
]


class ParityError(Exception):
    """onnxruntime's results differ from torch's beyond tolerance: the export is refused."""


# --------------------------------------------------------------------------------------------- records
# The manifest's ``parity`` section (docs/bundle.md) is ``ParityReport.to_dict()``: same keys, same order.


@dataclass(frozen=True)
class MaxDiff(Record):
    """One figure: the max abs diff of two sets of embeddings."""

    max_abs_diff: float


@dataclass(frozen=True)
class GraphParity(Record):
    """A graph against torch at each batch size (``parity_images``: the image graph's parity image set)."""

    max_abs_diff: float
    batch_sizes: list[int]
    per_batch: dict[str, float]
    parity_images: int | None = field(default=None, metadata=OMIT)


@dataclass(frozen=True)
class TokenizerParity(Record):
    texts: int
    mismatches: int
    first_mismatch: str | None


@dataclass(frozen=True)
class PreprocessParity(Record):
    images: int
    max_abs_diff: float


@dataclass(frozen=True)
class ClassBankParity(Record):
    classes: int
    max_abs_diff: float


@dataclass(frozen=True)
class TextPathsParity(Record):
    """``Bundle.embed_texts(names, text_path=p)`` against the torch path ``p`` over ``names`` names."""

    names: int
    learned: MaxDiff
    handwritten: MaxDiff
    ensemble: MaxDiff


@dataclass(frozen=True)
class Top1Parity(Record):
    top1_agreement: float
    images: int
    flips_beyond_tie: int


@dataclass(frozen=True)
class Fp16Parity(Record):
    """``status`` ``measured`` (with provider, level and figure) or ``not measured on CPU`` (with reason)."""

    status: str
    provider: str | None = field(default=None, metadata=OMIT)
    graph_optimization: str | None = field(default=None, metadata=OMIT)
    max_abs_diff: float | None = field(default=None, metadata=OMIT)
    reason: str | None = field(default=None, metadata=OMIT)


@dataclass(frozen=True)
class ParityReport(Record):
    """Every parity figure of one export (the manifest's ``parity`` section)."""

    tolerance: float
    fp16_tolerance: float
    provider: str
    tokenizer: TokenizerParity
    preprocess: PreprocessParity
    image_fp32: GraphParity
    text_fp32: GraphParity
    class_bank_fp32: ClassBankParity
    text_handwritten_fp32: GraphParity | None = field(default=None, metadata=OMIT)  # tuned bundles only
    text_paths: TextPathsParity | None = None
    top1: Top1Parity | None = None
    top1_agreement: float = 0.0
    image_fp16: Fp16Parity | None = field(default=None, metadata=OMIT)  # --fp16 only
    text_fp16: Fp16Parity | None = field(default=None, metadata=OMIT)


# --------------------------------------------------------------------------------------------- inputs


def parity_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """``n`` varied PIL images: toy-world renders (real-looking scenes), shapes, gradients and noise.

    Sizes and modes vary (smaller/larger than ``size``, non-square, L/RGBA/P) so preprocessing is exercised
    too. Deterministic for a given seed.
    """
    rng = np.random.default_rng(seed)
    images: list[Image.Image] = []
    try:
        from trainer.toyworld.world import render_image

        for i in range(max(1, n // 3)):
            side = int(rng.choice([size, size * 2, max(8, size // 2)]))
            images.append(render_image(seed, 2, i, domain="shifted" if i % 2 else "clean", image_size=side))
    except Exception as e:  # the toy world is optional here
        _logger.info("toy-world parity images unavailable (%s); using drawn images only", e)
    while len(images) < n:
        k = len(images)
        w, h = int(rng.integers(8, 3 * size + 8)), int(rng.integers(8, 3 * size + 8))
        kind = k % 4
        if kind == 0:  # shapes on a background
            img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
            draw = ImageDraw.Draw(img)
            for _ in range(3):
                x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
                box = (x0, y0, x0 + int(rng.integers(2, w + 1)), y0 + int(rng.integers(2, h + 1)))
                fill = tuple(int(v) for v in rng.integers(0, 256, 3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        elif kind == 1:  # gradient
            gx = np.linspace(0, 255, w)[None, :, None]
            gy = np.linspace(255, 0, h)[:, None, None]
            arr = np.concatenate([gx + 0 * gy, gy + 0 * gx, (gx + gy) / 2], axis=2)
            img = Image.fromarray(arr.astype(np.uint8), "RGB")
        elif kind == 2:  # noise
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        else:  # checkerboard in another mode
            tile = max(1, min(w, h) // 6)
            yy, xx = np.mgrid[0:h, 0:w]
            arr = (((yy // tile + xx // tile) % 2) * 200 + 30).astype(np.uint8)
            img = Image.fromarray(arr, "L")
        mode = ["RGB", "L", "RGBA", "P"][k % 4] if kind != 3 else "L"
        images.append(img.convert(mode))
    return images[:n]


def random_pixels(n: int, size: int, seed: int) -> np.ndarray:
    """Normalised-pixel-like noise float32 ``[n, 3, size, size]``."""
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def _torch(fn: Any, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return fn(torch.from_numpy(x)).float().cpu().numpy()


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()) if a.size else 0.0


# --------------------------------------------------------------------------------------------- checks


def graph_parity(
    torch_fn: Any, ort_fn: Any, inputs: Sequence[np.ndarray], batch_sizes: Sequence[int]
) -> GraphParity:
    """Max abs diff between ``torch_fn`` and ``ort_fn`` (both ndarray -> [N, E]) over the given inputs."""
    per_batch: dict[str, float] = {}
    worst = 0.0
    for x in inputs:
        d = _max_diff(_torch(torch_fn, x), ort_fn(x))
        key = str(x.shape[0])
        per_batch[key] = max(per_batch.get(key, 0.0), d)
        worst = max(worst, d)
    return GraphParity(
        max_abs_diff=worst, batch_sizes=sorted({int(b) for b in batch_sizes}), per_batch=per_batch
    )


def tokenizer_parity(torch_tokenize: Any, runtime_tokenize: Any, texts: Sequence[str]) -> TokenizerParity:
    """Exact comparison of token ids (open_clip's tokenizer vs the runtime's)."""
    ref = np.asarray(torch_tokenize(list(texts)))
    got = np.asarray(runtime_tokenize(list(texts)))
    bad = [
        t for t, r, g in zip(texts, ref, got, strict=True) if r.shape != g.shape or not np.array_equal(r, g)
    ]
    return TokenizerParity(texts=len(texts), mismatches=len(bad), first_mismatch=bad[0][:80] if bad else None)


def preprocess_parity(runtime_cfg: Any, images: Sequence[Image.Image]) -> PreprocessParity:
    """Runtime preprocessing vs open_clip's ``image_transform`` on ``convert("RGB")``-ed images."""
    from open_clip.transform import image_transform

    from serving.runtime.preprocess import preprocess

    ref_tf = image_transform(
        runtime_cfg.image_size,
        is_train=False,
        mean=runtime_cfg.mean,
        std=runtime_cfg.std,
        resize_mode=runtime_cfg.resize_mode,
        interpolation=runtime_cfg.interpolation,
        fill_color=runtime_cfg.fill_color,
    )
    worst = 0.0
    for img in images:
        ref = ref_tf(img.convert("RGB")).numpy()
        worst = max(worst, _max_diff(ref, preprocess(img, runtime_cfg)))
    return PreprocessParity(images=len(images), max_abs_diff=worst)


def top1_agreement(
    torch_emb: np.ndarray, ort_emb: np.ndarray, bank: np.ndarray, margin: float = TOP1_TIE_MARGIN
) -> Top1Parity:
    """Share of images whose top-1 class is the same under torch and onnxruntime; flips beyond a tie count."""
    if bank.shape[0] == 0 or torch_emb.shape[0] == 0:
        return Top1Parity(top1_agreement=1.0, images=int(torch_emb.shape[0]), flips_beyond_tie=0)
    t_scores = torch_emb @ bank.T
    o_scores = ort_emb @ bank.T
    t_top = t_scores.argmax(1)
    o_top = o_scores.argmax(1)
    agree = float((t_top == o_top).mean())
    rows = np.arange(len(t_top))
    gaps = t_scores[rows, t_top] - t_scores[rows, o_top]
    flips = int(((t_top != o_top) & (gaps > margin)).sum())
    return Top1Parity(top1_agreement=agree, images=len(t_top), flips_beyond_tie=flips)


# --------------------------------------------------------------------------------------------- fp16

_CHILD = r"""
import json, sys
import numpy as np
import onnxruntime as ort
args = json.loads(sys.argv[1])
so = ort.SessionOptions()
so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, args["level"])
so.log_severity_level = 3
sess = ort.InferenceSession(args["model"], so, providers=[args["provider"], "CPUExecutionProvider"])
if sess.get_providers()[0] != args["provider"]:
    sys.exit(3)  # the requested provider is not active: no figure for it
data = np.load(args["inputs"])
out = {k: sess.run(["embeddings"], {args["input_name"]: data[k]})[0] for k in data.files}
np.savez(args["outputs"], **out)
"""


def fp16_parity(
    model_path: Path, input_name: str, inputs: Sequence[np.ndarray], refs: Sequence[np.ndarray], cuda: bool
) -> Fp16Parity:
    """Max abs diff of an fp16 graph against the torch fp32 outputs ``refs``.

    Runs in a child process (an fp16 graph can crash onnxruntime at session creation): on CUDA at
    ``ORT_ENABLE_ALL`` when ``cuda``, else (or if that fails) on the CPU provider at ``ORT_ENABLE_EXTENDED``.
    Returns status ``measured`` with ``provider``, ``graph_optimization`` and ``max_abs_diff``, or
    ``not measured on CPU`` with the ``reason`` when no attempt produced outputs.
    """
    attempts = [("CUDAExecutionProvider", "ORT_ENABLE_ALL")] if cuda else []
    attempts.append(("CPUExecutionProvider", "ORT_ENABLE_EXTENDED"))
    reasons: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fp16-parity-") as tmp:
        in_path, out_path = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        arrays: dict[str, np.ndarray] = {f"x{i}": x for i, x in enumerate(inputs)}
        np.savez(in_path, **arrays)  # type: ignore[arg-type]  # numpy's stub reads **kwds as allow_pickle
        for provider, level in attempts:
            out_path.unlink(missing_ok=True)
            args = {
                "model": str(model_path),
                "input_name": input_name,
                "inputs": str(in_path),
                "outputs": str(out_path),
                "provider": provider,
                "level": level,
            }
            try:
                proc = subprocess.run(
                    [sys.executable, "-c", _CHILD, json.dumps(args)],
                    capture_output=True,
                    timeout=600,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                reasons.append(f"{provider}: timed out")
                continue
            if proc.returncode != 0 or not out_path.is_file():
                tail = proc.stderr.decode(errors="replace")[-200:].strip()
                reasons.append(f"{provider}: child exited with {proc.returncode} {tail}".strip())
                continue
            out = np.load(out_path)
            worst = max(_max_diff(r, out[f"x{i}"]) for i, r in enumerate(refs))
            return Fp16Parity(
                status="measured",
                provider=provider,
                graph_optimization=level.removeprefix("ORT_ENABLE_").lower(),
                max_abs_diff=worst,
            )
    _logger.warning("fp16 parity of %s not measured: %s", model_path.name, "; ".join(reasons))
    return Fp16Parity(status="not measured on CPU", reason="; ".join(reasons))


def text_path_parity(
    model: Any, bundle: Any, names: Sequence[str], handwritten_template: str
) -> TextPathsParity:
    """Max abs diff of ``bundle.embed_texts(names, text_path=p)`` against the torch path ``p`` for each of
    learned / handwritten / ensemble (``model`` a ``PromptedCLIP``)."""
    with torch.no_grad():
        learned = model.encode_names(list(names)).float()
        hand = model.encode_template(list(names), handwritten_template).float()
        ensemble = torch.nn.functional.normalize(learned + hand, dim=-1)
    refs = {"learned": learned.numpy(), "handwritten": hand.numpy(), "ensemble": ensemble.numpy()}
    diffs = {
        p: MaxDiff(_max_diff(ref, bundle.embed_texts(list(names), text_path=p))) for p, ref in refs.items()
    }
    return TextPathsParity(names=len(names), **diffs)


# --------------------------------------------------------------------------------------------- verdict


def check(parity: ParityReport, tol: float = FP32_TOL, fp16_tol: float = FP16_TOL) -> None:
    """Raise :class:`ParityError` listing every figure outside tolerance."""
    problems: list[str] = []
    required: dict[str, GraphParity | ClassBankParity] = {
        "image_fp32": parity.image_fp32,
        "text_fp32": parity.text_fp32,
        "class_bank_fp32": parity.class_bank_fp32,
    }
    for key, figure in required.items():
        d = figure.max_abs_diff
        if d is None or not np.isfinite(d) or d > tol:
            problems.append(f"{key} max abs diff {d} > {tol}")
    optional: dict[str, GraphParity | MaxDiff | None] = {
        "text_handwritten_fp32": parity.text_handwritten_fp32
    }
    if parity.text_paths is not None:
        paths = parity.text_paths
        optional.update(
            {
                "text_paths.learned": paths.learned,
                "text_paths.handwritten": paths.handwritten,
                "text_paths.ensemble": paths.ensemble,
            }
        )
    for key, entry in optional.items():
        d = entry.max_abs_diff if entry else 0.0
        if d is None or not np.isfinite(d) or d > tol:
            problems.append(f"{key} max abs diff {d} > {tol}")
    tok = parity.tokenizer
    if tok.mismatches:
        problems.append(
            f"tokenizer ids differ from open_clip's for {tok.mismatches} texts (first: {tok.first_mismatch!r})"
        )
    pre = parity.preprocess.max_abs_diff
    if pre is None or pre > 1e-6:
        problems.append(f"preprocessing max abs diff {pre} > 1e-6 against open_clip's transform")
    top1 = parity.top1
    if top1 is None or top1.flips_beyond_tie:
        problems.append(
            f"top-1 class differs on {top1 and top1.flips_beyond_tie} images (agreement {top1 and top1.top1_agreement})"
        )
    for key, fp16 in (("image_fp16", parity.image_fp16), ("text_fp16", parity.text_fp16)):
        if (
            fp16
            and fp16.status == "measured"
            and not (fp16.max_abs_diff is not None and fp16.max_abs_diff <= fp16_tol)
        ):
            problems.append(f"{key} max abs diff {fp16.max_abs_diff} > {fp16_tol}")
    if problems:
        raise ParityError("onnxruntime does not match torch: " + "; ".join(problems))
