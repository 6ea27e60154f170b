"""Registration by example images, measured in-process on the toy world's novel classes (issue 11).

For each novel class, K example images (drawn from the toy world's *training* split of that class, so never a
test image) are embedded by the bundle's image encoder; the class prototype is the normalised blend
``normalize(w * text + (1 - w) * normalize(mean(image embeddings)))``. The novel test set (25 images per
class) is then classified over all trained + novel classes (as the service scores a registered class) and
over the novel classes alone. ``w = 1`` is name-only registration; K = 0 is name-only too.

    python benchmarks/register_examples.py --bundle bundles/toy-tuned --seeds 0 1 2          # in-process
    python benchmarks/register_examples.py --bundle bundles/toy-tuned --seeds 0 1 2 --http   # served

Prints a Markdown table: mean +- std over the seeds (different example draws) of novel accuracy (percent).
With ``--http`` the same is measured end to end: a server on 127.0.0.1 (started and stopped here),
classes registered through ``/register`` (names, and base64 examples with the service's default weight),
the novel test images classified through ``/classify`` (16 per request), top-1 over every class served.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from serving.prototypes import auto_text_weight, blend_prototype
from serving.runtime.bundle import Bundle
from trainer.toyworld.task import ToyImages, novel_class_names
from trainer.toyworld.world import Split

_logger = logging.getLogger("register_examples")


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def embed(bundle: Bundle, images: ToyImages) -> np.ndarray:
    pixels = np.stack([bundle.preprocess(images.load(i)) for i in range(len(images))])
    return bundle.embed_images(pixels)


def blend(text: np.ndarray, examples: np.ndarray | None, weight: float) -> np.ndarray:
    """The prototype of one class, as the service computes it (``serving.service.blend_prototype``)."""
    if examples is None or len(examples) == 0:
        return text
    return blend_prototype(text, examples, weight)


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def accuracy(logits: np.ndarray, targets: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == targets).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="bundles/toy")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument(
        "--weights",
        nargs="+",
        default=["auto", "0.75", "0.5", "0.25", "0"],
        help="text weights; auto = the service's default 1 / (1 + sqrt(K))",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--test-per-class", type=int, default=25)
    p.add_argument("--http", action="store_true", help="measure through a served bundle instead")
    p.add_argument("--text-paths", nargs="*", default=[], help="with --http: also name-only per text path")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.http:
        return served(args)
    bundle = Bundle.load(args.bundle, providers=["CPUExecutionProvider"])
    names = novel_class_names()
    text = bundle.embed_texts(names)
    test = ToyImages(names, [args.test_per_class] * len(names), Split.NOVEL_TEST, 0)
    test_emb = embed(bundle, test)
    targets = np.asarray(test.targets)
    trained = bundle.class_embeddings
    n_trained = len(trained)
    scale = bundle.logit_scale
    rows: dict[tuple[int, float], list[tuple[float, float]]] = {}
    for seed in args.seeds:
        for k in args.shots:
            # example draw: world seed 1000 + seed, training split, first k ordinals per class
            examples = ToyImages(names, [k] * len(names), Split.TRAIN, 1000 + seed)
            ex_emb = embed(bundle, examples)
            ex_targets = np.asarray(examples.targets)
            for w_arg in args.weights:
                w = auto_text_weight(k) if w_arg == "auto" else float(w_arg)
                protos = np.stack([blend(text[c], ex_emb[ex_targets == c], w) for c in range(len(names))])
                all_logits = scale * test_emb @ np.concatenate([trained, protos]).T
                novel_logits = scale * test_emb @ protos.T
                rows.setdefault((k, w_arg), []).append(
                    (accuracy(all_logits, targets + n_trained), accuracy(novel_logits, targets))
                )
        _logger.info("seed %d done", seed)
    name_only = scale * test_emb @ text.T
    name_only_all = scale * test_emb @ np.concatenate([trained, text]).T
    print(
        f"bundle {args.bundle} ({bundle.manifest.model.name or '?'}, n_ctx {bundle.n_ctx}); "
        f"{len(names)} novel classes x {args.test_per_class} test images; seeds {args.seeds}\n"
    )
    print("| K examples | text weight w | novel acc, all classes | novel acc, novel only |")
    print("| --- | --- | --- | --- |")
    print(
        f"| 0 (name only) | 1 | {100 * accuracy(name_only_all, targets + n_trained):.1f} | "
        f"{100 * accuracy(name_only, targets):.1f} |"
    )
    for (k, w), vals in rows.items():
        a = [100 * v[0] for v in vals]
        b = [100 * v[1] for v in vals]
        label = f"auto ({auto_text_weight(k):.2f})" if w == "auto" else w
        print(
            f"| {k} | {label} | {statistics.mean(a):.1f} ± {_sd(a):.1f} | {statistics.mean(b):.1f} ± {_sd(b):.1f} |"
        )
    return 0


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def classify(client: Any, images: list[bytes], names: list[str], targets: list[int]) -> float:
    """Top-1 of the served /classify over ``images`` (16 per request)."""
    correct = 0
    for start in range(0, len(images), 16):
        idx = range(start, min(start + 16, len(images)))
        files = [("images", (f"{j}.png", images[j], "image/png")) for j in idx]
        r = client.post("/classify", files=files, data={"top_k": "1"})
        r.raise_for_status()
        for j, res in zip(idx, r.json()["results"], strict=True):
            correct += res["labels"][0]["name"] == names[targets[j]]
    return correct / len(images)


def served(args: argparse.Namespace) -> int:
    """The same measurement through HTTP: register over /register, classify over /classify."""
    import tempfile

    import httpx

    from serving.launch import start_server

    names = novel_class_names()
    test = ToyImages(names, [args.test_per_class] * len(names), Split.NOVEL_TEST, 0)
    test_png = [_png(test.load(i)) for i in range(len(test))]
    token = "bench-token"
    auth = {"Authorization": f"Bearer {token}"}
    results: dict[int, list[float]] = {}
    by_path: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "FLATPROMPT_BUNDLE": str(Path(args.bundle).resolve()),
            "FLATPROMPT_REGISTRY_URL": f"sqlite:///{tmp}/registry.db",
            "FLATPROMPT_TOKEN": token,
            "FLATPROMPT_REQUEST_TIMEOUT_S": "300",
        }
        server = start_server(Path(tmp) / "server", env)
        try:
            client = httpx.Client(base_url=server.url, timeout=300)
            for path in args.text_paths:  # name-only registration through each text path
                client.post(
                    "/register", json={"names": names, "text_path": path}, headers=auth
                ).raise_for_status()
                by_path[path] = classify(client, test_png, names, test.targets)
                for n in names:
                    client.post("/unregister", json={"name": n}, headers=auth).raise_for_status()
            for seed in args.seeds:
                for k in [0, *args.shots]:
                    body: dict[str, object] = {"names": names}
                    if k:
                        examples = ToyImages(names, [k] * len(names), Split.TRAIN, 1000 + seed)
                        per: dict[str, list[str]] = {n: [] for n in names}
                        for i in range(len(examples)):
                            data = base64.b64encode(_png(examples.load(i))).decode()
                            per[names[examples.targets[i]]].append(data)
                        body["examples"] = per
                    r = client.post("/register", json=body, headers=auth)
                    r.raise_for_status()
                    results.setdefault(k, []).append(classify(client, test_png, names, test.targets))
                    for n in names:  # start the next setting from nothing
                        client.post("/unregister", json={"name": n}, headers=auth).raise_for_status()
                    if k == 0 and seed != args.seeds[0]:
                        results[0].pop()  # name-only does not depend on the draw: measured once
                _logger.info("seed %d done", seed)
        finally:
            server.stop(timeout=10)
    print(
        f"served {args.bundle} over HTTP; {len(names)} novel classes x {args.test_per_class} test images; "
        f"top-1 over every served class (trained + registered); seeds {args.seeds}\n"
    )
    if by_path:
        print("| name-only registration, text_path | novel top-1 (served) |")
        print("| --- | --- |")
        for path, acc in by_path.items():
            print(f"| {path} | {100 * acc:.1f} |")
        print()
    print("| registration (the bundle's default text path) | novel top-1 (served) |")
    print("| --- | --- |")
    for k, vals in results.items():
        label = "name only" if k == 0 else f"name + {k} examples (w = {auto_text_weight(k):.2f})"
        acc = [100 * v for v in vals]
        print(f"| {label} | {statistics.mean(acc):.1f} ± {_sd(acc):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
