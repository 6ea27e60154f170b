"""Time per training step of sgd / sam / gnm / gcsam, measured side by side in one run.

The optimizers are interleaved (one step of each, round-robin, repeated) so machine noise hits them all
alike; the table gives medians and ratios to sgd (and gcsam / sam). Also: optimizer state bytes and, on
CUDA, the peak memory of a step.

    python benchmarks/optim_cost.py                      # toy CLIP on CPU (+ ViT-B-16 deep VPT on CUDA)
    python benchmarks/optim_cost.py --model ViT-B-16     # force the large model (slow on CPU)
"""

from __future__ import annotations

import argparse
import statistics
import time

import open_clip
import torch

from trainer.config import OptimConfig, ReweightConfig
from trainer.engine import autocast_factory, train_step
from trainer.models import load_clip, load_toy_clip
from trainer.optim import build_optimizer
from trainer.prompts import PromptedCLIP
from trainer.reweight import build_loss

OPTIMIZERS = ("sgd", "sam", "gnm", "gcsam")


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    states = [opt.state]
    base = getattr(opt, "base_optimizer", None)
    if base is not None:
        states.append(base.state)
    for state in states:
        for entry in state.values():
            for v in entry.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
    return total


def bench(model_name: str, device: torch.device, batch: int, classes: int, vpt: int, repeats: int) -> None:
    torch.manual_seed(0)
    loaded = load_toy_clip(device) if model_name == "toy" else load_clip(model_name, None, None, device)
    tokenizer = open_clip.get_tokenizer(loaded.identity.name)
    size = loaded.preprocess.image_size
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    names = [f"class {i}" for i in range(classes)]
    precision = "bf16" if device.type == "cuda" else "fp32"
    autocast = autocast_factory(device, precision)
    runs = {}
    for name in OPTIMIZERS:
        torch.manual_seed(0)
        m = PromptedCLIP(loaded.model, tokenizer, n_ctx=4, ctx_init=None, vpt_length=vpt, vpt_deep=True).to(
            device
        )
        m.set_class_names(names)
        opt = build_optimizer(
            [p for p in m.parameters() if p.requires_grad],
            OptimConfig(name=name, lr=1e-3, weight_decay=0.0),
            seed=0,
        )
        runs[name] = (m, opt)
    loss_fn = build_loss(ReweightConfig(), [1] * classes, start_epoch=0).to(device)
    times: dict[str, list[float]] = {n: [] for n in OPTIMIZERS}
    peaks: dict[str, int] = {}

    def one(name: str) -> float:
        m, opt = runs[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        train_step(m, [(images, labels)], loss_fn, opt, autocast=autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
        return time.perf_counter() - t0

    for name in OPTIMIZERS:  # warm-up
        one(name)
    for _ in range(repeats):
        for name in OPTIMIZERS:
            times[name].append(one(name))
    med = {n: statistics.median(t) for n, t in times.items()}
    n_params = sum(p.numel() for p in runs["sgd"][0].parameters() if p.requires_grad)
    print(
        f"\n{model_name} on {device} ({precision}), batch {batch}, {classes} classes, deep VPT Lp={vpt}, "
        f"{n_params} trainable params, {repeats} interleaved repeats"
    )
    print(f"{'optimizer':<10}{'median ms':>11}{'/ sgd':>8}{'state KiB':>11}{'peak MiB':>10}")
    for n in OPTIMIZERS:
        peak = f"{peaks[n] / 2**20:10.1f}" if n in peaks else f"{'-':>10}"
        print(
            f"{n:<10}{1000 * med[n]:11.1f}{med[n] / med['sgd']:8.2f}{_state_bytes(runs[n][1]) / 1024:11.1f}{peak}"
        )
    print(
        f"gnm / sgd = {med['gnm'] / med['sgd']:.3f}   gcsam / sam = {med['gcsam'] / med['sam']:.3f}   "
        f"sam / sgd = {med['sam'] / med['sgd']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="toy (default) or an open_clip name (random init)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=None)
    ns = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cpu = torch.device("cpu")
    if ns.model in (None, "toy"):
        bench("toy", cpu, ns.batch or 32, 32, 4, ns.repeats)
    if ns.model not in (None, "toy"):
        dev = torch.device("cuda") if torch.cuda.is_available() else cpu
        bench(ns.model, dev, ns.batch or (64 if dev.type == "cuda" else 8), 100, 10, ns.repeats)
    elif torch.cuda.is_available():
        bench("ViT-B-16", torch.device("cuda"), ns.batch or 64, 100, 10, ns.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
