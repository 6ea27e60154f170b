"""Image-encoder throughput: onnxruntime vs torch eager, side by side in one run.

Exports the image tower of a zero-shot ``PromptedCLIP`` (the graph a bundle ships: ``export.graphs``) for
each model, then times every variant on the same inputs with interleaved repeats (variant order rotates
each repeat, so background load hits all of them alike), and reports medians, images/s and the ratio to
torch eager at the same thread count.

Variants (CPU): torch eager fp32 (``inference_mode``), onnxruntime fp32 at graph optimisation levels
``all``/``extended``/``basic``/``disable``, onnxruntime int8 (``quantize_dynamic`` on the fp32 graph, with
its accuracy cost as cosine similarity to fp32 torch). CUDA, when torch and onnxruntime both have it:
torch fp32 / fp16 and onnxruntime fp32 / fp16 (IO binding on the device, so no host copies are timed).

    python benchmarks/export_speed.py                      # toy + ViT-B-16, batch 1/8/32, CPU (+CUDA)
    python benchmarks/export_speed.py --models toy --repeats 7 --threads 1,2

Random-init weights (no downloads); speed does not depend on the weights, int8 accuracy does a little.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_logger = logging.getLogger("benchmarks.export_speed")
MODELS = {"toy": "flatprompt-toyclip", "vit-b-16": "ViT-B-16"}


@dataclass
class Variant:
    name: str
    run: Callable[[np.ndarray], np.ndarray]
    threads: int
    note: str = ""
    times: dict[int, list[float]] = field(default_factory=dict)


def build_model(name: str) -> Any:
    import open_clip
    import torch

    from trainer.models import ensure_toy_model_registered
    from trainer.prompts import PromptedCLIP

    ensure_toy_model_registered()
    torch.manual_seed(0)
    clip = open_clip.create_model(name, pretrained=None).eval()
    for p in clip.parameters():
        p.requires_grad_(False)
    return PromptedCLIP(clip, open_clip.get_tokenizer(name), n_ctx=0).eval()


def export_image(model: Any, size: int, out: Path) -> tuple[Path, float]:
    import torch

    from export import graphs

    t0 = time.perf_counter()
    graphs.export_tower(graphs.ImageTower(model), torch.randn(2, 3, size, size), "pixels", out / "image.onnx")
    return out / "image.onnx", time.perf_counter() - t0


def quantize(src: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pre = out / "image.pre.onnx"
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    except Exception as e:  # pre-processing is an optimisation only
        _logger.warning("quant_pre_process failed (%s); quantising the raw graph", e)
        pre = src
    dst = out / "image.int8.onnx"
    quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return dst


def transformers_optimized(src: Path, out: Path) -> Path | None:
    """``onnxruntime.transformers.optimizer`` (model_type "vit") on the fp32 graph: extra fusions, or None."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        opt = optimize_model(
            str(src), model_type="vit", num_heads=0, hidden_size=0, opt_level=1, use_gpu=False
        )
        dst = out / "image.fused.onnx"
        opt.save_model_to_file(str(dst))
        fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        _logger.info("transformers optimizer fusions: %s", fused)
        return dst
    except Exception as e:  # optional extra
        _logger.warning("transformers optimizer failed: %s", e)
        return None


def ort_variant(
    path: Path, name: str, threads: int, level: str, provider: str = "CPUExecutionProvider"
) -> Variant:
    import onnxruntime as ort

    from serving.runtime.bundle import session_options

    opts = session_options(intra_op_threads=threads, graph_optimization=level)
    sess = ort.InferenceSession(str(path), opts, providers=[provider])
    if provider != "CPUExecutionProvider" and sess.get_providers()[0] != provider:
        raise RuntimeError(f"{provider} not active for {path.name}: {sess.get_providers()}")
    if provider == "CUDAExecutionProvider":

        def run_cuda(x: np.ndarray) -> np.ndarray:
            binding = sess.io_binding()
            binding.bind_ortvalue_input("pixels", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
            binding.bind_output("embeddings", "cuda")
            sess.run_with_iobinding(binding)
            return np.asarray(binding.copy_outputs_to_cpu()[0])

        return Variant(name, run_cuda, threads, f"{provider}, io binding")
    return Variant(name, lambda x: sess.run(["embeddings"], {"pixels": x})[0], threads, f"opt={level}")


def torch_variant(model: Any, threads: int, device: str = "cpu", half: bool = False) -> Variant:
    import torch

    tower = model.to(device)
    if half:
        tower = tower.half()

    def run(x: np.ndarray) -> np.ndarray:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            t = torch.from_numpy(x).to(device)
            out = tower.encode_image(t.half() if half else t)
            if device == "cuda":
                torch.cuda.synchronize()
            return out.float().cpu().numpy()

    label = f"torch eager {'fp16' if half else 'fp32'}" + (" cuda" if device == "cuda" else "")
    return Variant(label, run, threads, "inference_mode")


def time_variants(variants: list[Variant], batches: list[int], repeats: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, 3, size, size)).astype(np.float32)
        for v in variants:  # warm-up (allocations, kernel selection)
            v.run(x)
        for r in range(repeats):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                t0 = time.perf_counter()
                v.run(x)
                v.times.setdefault(b, []).append(time.perf_counter() - t0)


def cosine_to(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    a = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    b = got / np.linalg.norm(got, axis=1, keepdims=True)
    cos = (a * b).sum(1)
    return float(cos.min()), float(cos.mean())


def table(model: str, variants: list[Variant], batches: list[int], baseline: str) -> list[str]:
    lines = [
        "| model | batch | variant | threads | median ms | img/s | x torch eager | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = next(v for v in variants if v.name == baseline)
    for b in batches:
        bmed = statistics.median(base.times[b])
        for v in variants:
            if b not in v.times:
                continue
            med = statistics.median(v.times[b])
            lines.append(
                f"| {model} | {b} | {v.name} | {v.threads} | {1000 * med:.1f} | {b / med:.1f} | "
                f"{bmed / med:.2f} | {v.note} |"
            )
    return lines


def bench_model(key: str, ns: argparse.Namespace, out: Path) -> list[str]:
    import onnxruntime as ort
    import torch

    from export.graphs import convert_fp16

    name = MODELS[key]
    model = build_model(name)
    size = int(
        model.clip.visual.image_size[0]
        if isinstance(model.clip.visual.image_size, tuple)
        else model.clip.visual.image_size
    )
    work = out / key
    work.mkdir(parents=True, exist_ok=True)
    fp32, export_s = export_image(model, size, work)
    t0 = time.perf_counter()
    int8 = quantize(fp32, work)
    quant_s = time.perf_counter() - t0
    lines = [
        f"### {key} ({name}, {sum(p.numel() for p in model.clip.visual.parameters()) / 1e6:.1f} M vision params, "
        f"input {size}px): export {export_s:.1f} s, int8 quantisation {quant_s:.1f} s, "
        f"fp32 {fp32.stat().st_size / 1e6:.1f} MB, int8 {int8.stat().st_size / 1e6:.1f} MB",
        "",
    ]
    batches = [b for b in ns.batches if not (key == "vit-b-16" and b > ns.max_vit_batch)]
    repeats = max(ns.repeats, 20) if key == "toy" else ns.repeats  # the toy model is cheap: more repeats

    # accuracy of the int8 graph (and of the fp32 graph) against torch fp32
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 3, size, size)).astype(np.float32)
    with torch.inference_mode():
        ref = model.encode_image(torch.from_numpy(x)).numpy()
    acc = {}
    for label, path in (("ort fp32", fp32), ("ort int8", int8)):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(["embeddings"], {"pixels": x})[0]
        acc[label] = (float(np.abs(got - ref).max()), *cosine_to(ref, got))
    lines += ["| graph | max abs diff vs torch fp32 | min cosine | mean cosine |", "|---|---|---|---|"]
    lines += [f"| {k} | {d:.2e} | {cmin:.5f} | {cmean:.5f} |" for k, (d, cmin, cmean) in acc.items()]
    lines.append("")

    # main comparison: every batch size, the configured thread counts
    for threads in ns.threads:
        variants = [
            torch_variant(model, threads),
            ort_variant(fp32, "ort fp32", threads, "all"),
            ort_variant(int8, "ort int8 dynamic", threads, "all"),
        ]
        time_variants(variants, batches, repeats, size)
        lines += [*table(key, variants, batches, "torch eager fp32"), ""]
        _logger.info("%s threads=%d done", key, threads)

    # graph optimisation levels at one batch size
    b = ns.sweep_batch
    threads = max(ns.threads)
    variants = [torch_variant(model, threads)] + [
        ort_variant(fp32, f"ort fp32 opt={lvl}", threads, lvl)
        for lvl in ("disable", "basic", "extended", "all")
    ]
    fused = transformers_optimized(fp32, work)
    if fused is not None:
        variants.append(ort_variant(fused, "ort fp32 +transformers optimizer", threads, "all"))
    time_variants(variants, [b], repeats, size)
    lines += [f"graph optimisation levels, batch {b}, {threads} threads:", ""]
    lines += [*table(key, variants, [b], "torch eager fp32"), ""]

    if ns.cuda and torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        fp16 = work / "image.fp16.onnx"
        convert_fp16(fp32, fp16)
        variants = [
            torch_variant(build_model(name), 1, "cuda"),
            torch_variant(build_model(name), 1, "cuda", half=True),
            ort_variant(fp32, "ort fp32 cuda", 1, "all", "CUDAExecutionProvider"),
            ort_variant(fp16, "ort fp16 cuda", 1, "all", "CUDAExecutionProvider"),
        ]
        gpu_batches = sorted(set(ns.batches) | {32})
        time_variants(variants, gpu_batches, max(ns.repeats, 10), size)
        lines += ["CUDA:", "", *table(key, variants, gpu_batches, "torch eager fp32 cuda"), ""]
        got16 = variants[3].run(x)
        lines.append(
            f"ort fp16 cuda vs torch fp32 cpu: max abs diff {np.abs(got16 - ref).max():.2e}, "
            f"min cosine {cosine_to(ref, got16)[0]:.5f}"
        )
    elif ns.cuda:
        lines.append("CUDA: not available here (torch.cuda / onnxruntime CUDAExecutionProvider); skipped")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="toy,vit-b-16", help="comma list of: " + ", ".join(MODELS))
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--threads", default="", help="comma list of intra-op thread counts (default: cpu count)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sweep-batch", type=int, default=8)
    p.add_argument("--max-vit-batch", type=int, default=32)
    p.add_argument("--no-cuda", dest="cuda", action="store_false")
    p.add_argument("--out", help="work directory for the ONNX files (default: a temp dir)")
    ns = p.parse_args(argv)
    ns.batches = [int(b) for b in ns.batches.split(",") if b]
    ns.threads = [int(t) for t in ns.threads.split(",") if t] or [os.cpu_count() or 1]
    # onnxruntime.quantization and open_clip log chatter on the root logger: keep it at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s | %(message)s", datefmt="%H:%M:%S")
    _logger.setLevel(logging.INFO)

    import onnxruntime as ort
    import torch

    header = [
        f"torch {torch.__version__} (intra-op threads set per variant), onnxruntime {ort.__version__}, "
        f"{os.cpu_count()} CPUs, repeats {ns.repeats} (toy: at least 20; interleaved, median), "
        f"load average at start {os.getloadavg()[0]:.2f}",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="export-speed-") as tmp:
        out = Path(ns.out) if ns.out else Path(tmp)
        lines = header
        for key in [m.strip() for m in ns.models.split(",") if m.strip()]:
            if key not in MODELS:
                p.error(f"unknown model {key!r}: use {', '.join(MODELS)}")
            lines += bench_model(key, ns, out)
            lines.append(f"(load average after {key}: {os.getloadavg()[0]:.2f})")
            print("\n".join(lines), flush=True)
            lines = []
    return 0


if __name__ == "__main__":
    sys.exit(main())
