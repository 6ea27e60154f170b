"""Bounded load test of the serving stack on 127.0.0.1: served throughput and latency vs raw ONNX Runtime.

What it measures (one JSON document on stdout, progress on stderr):

1. ``/classify`` at client concurrency 1, 8, 32 (``--concurrency``): requests/s, p50/p99 latency, how
   many were refused (429/503), and the mean image batch per ORT call (from the server's
   ``flatprompt_batch_size{tower="image"}`` histogram, counted around each level);
2. raw ORT image throughput in this process at the same batch size (``Bundle.embed_images``), so
   ``served / raw`` is the fraction of model throughput left after HTTP, multipart, decoding,
   preprocessing, the registry check and adaptive batching;
3. registering ``--names`` (1,000) novel names in one request vs ``Bundle.embed_texts`` on them.

Usage::

    python benchmarks/serve_load.py --bundle bundles/toy                 # starts and stops its own server
    python benchmarks/serve_load.py --url http://127.0.0.1:3000 --token T --bundle bundles/toy

The client runs on the same machine: on a small CPU box it competes with the server for cores, so
read absolute numbers as lower bounds and compare ratios. Every request has a timeout and every level
a fixed request count, so the run is bounded.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import logging
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from tests.serving_fixtures import Server

_logger = logging.getLogger("serve_load")
REPO = Path(__file__).resolve().parents[1]


def _images(count: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """Noise JPEGs (realistic decode cost: no long runs for the entropy coder)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _image_batch_stats(url: str) -> tuple[float, float]:
    """(items, calls) of ``flatprompt_batch_size{tower="image"}`` summed over workers."""
    text = httpx.get(url + "/metrics", timeout=30).text
    items = calls = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "flatprompt_batch_size":
            continue
        for sample in family.samples:
            if sample.labels.get("tower") != "image":
                continue
            if sample.name.endswith("_sum"):
                items += sample.value
            elif sample.name.endswith("_count"):
                calls += sample.value
    return items, calls


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_level(
    url: str, images: list[bytes], concurrency: int, requests: int, per_request: int
) -> dict[str, Any]:
    """``requests`` classify calls with ``concurrency`` client threads (one keep-alive client each)."""
    local = threading.local()

    def one(i: int) -> tuple[int, float]:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=url, timeout=120)
        files = [
            ("images", (f"{i}-{j}.jpg", images[(i + j) % len(images)], "image/jpeg"))
            for j in range(per_request)
        ]
        started = time.perf_counter()
        try:
            status = client.post("/classify", files=files, data={"top_k": "5"}).status_code
        except httpx.HTTPError:
            status = 0
        return status, time.perf_counter() - started

    for i in range(min(concurrency, 4)):  # warm-up, not counted
        one(i)
    items0, calls0 = _image_batch_stats(url)
    started = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    items1, calls1 = _image_batch_stats(url)
    ok = [lat for status, lat in results if status == 200]
    statuses: dict[str, int] = {}
    for status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    calls = calls1 - calls0
    return {
        "concurrency": concurrency,
        "requests": requests,
        "images_per_request": per_request,
        "statuses": statuses,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 2),
        "images_per_s": round(len(ok) * per_request / wall, 2),
        "p50_ms": round(1000 * _percentile(ok, 50), 1),
        "p99_ms": round(1000 * _percentile(ok, 99), 1),
        "mean_batch": round((items1 - items0) / calls, 2) if calls else None,
        "ort_calls": int(calls),
    }


def raw_image_throughput(bundle: Any, image: bytes, batch: int, seconds: float = 3.0) -> dict[str, Any]:
    """Images/s of ``Bundle.embed_images`` alone at ``batch`` (preprocessing excluded, like the batch call)."""
    pixels = bundle.preprocess(Image.open(io.BytesIO(image)).convert("RGB"))
    x = np.stack([pixels] * batch)
    bundle.embed_images(x)  # warm-up
    runs = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or runs < 3:
        bundle.embed_images(x)
        runs += 1
    elapsed = time.perf_counter() - started
    decode_started = time.perf_counter()
    for _ in range(20):
        bundle.preprocess(Image.open(io.BytesIO(image)).convert("RGB"))
    decode_ms = (time.perf_counter() - decode_started) / 20 * 1000
    return {
        "batch": batch,
        "images_per_s": round(runs * batch / elapsed, 2),
        "ms_per_call": round(1000 * elapsed / runs, 2),
        "decode_preprocess_ms_per_image": round(decode_ms, 2),
    }


def registration(url: str, token: str, bundle: Any, count: int) -> dict[str, Any]:
    """One register call with ``count`` fresh names vs the raw text encoder on the same names."""
    tag = secrets.token_hex(3)
    names = [f"bench {tag} class {i}" for i in range(count)]
    started = time.perf_counter()
    response = httpx.post(
        url + "/register", json={"names": names}, headers={"Authorization": f"Bearer {token}"}, timeout=600
    )
    served = time.perf_counter() - started
    bundle.embed_texts(names[:8])  # warm-up
    started = time.perf_counter()
    bundle.embed_texts(names, None, 256)
    raw = time.perf_counter() - started
    return {
        "names": count,
        "status": response.status_code,
        "served_s": round(served, 3),
        "raw_text_encoder_s": round(raw, 3),
        "overhead_ratio": round(served / raw, 2) if raw else None,
    }


def start_server(
    bundle: Path, workers: int, threads: int, token: str, workdir: Path, timeout_s: float
) -> Server:
    """``bentoml serve`` on a free 127.0.0.1 port (the tests' launcher), ready once ``/readyz`` answers."""
    from tests.serving_fixtures import start_server as launch

    env = {
        "FLATPROMPT_BUNDLE": str(bundle),
        "FLATPROMPT_REGISTRY_URL": f"sqlite:///{workdir}/registry.db",
        "FLATPROMPT_TOKEN": token,
        "FLATPROMPT_WORKERS": str(workers),
        "FLATPROMPT_THREADS": str(threads),
        "FLATPROMPT_MAX_IN_FLIGHT": "256",
        "FLATPROMPT_REQUEST_TIMEOUT_S": str(timeout_s),
        "OMP_NUM_THREADS": str(threads),
    }
    return launch(workdir, env, ready_timeout=300)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a JSON report on stdout."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--bundle", required=True, help="bundle directory (raw ORT baseline; served when no --url)"
    )
    p.add_argument("--url", help="an already running server (default: start one on 127.0.0.1)")
    p.add_argument("--token", help="bearer token of --url (a started server gets a random one)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--concurrency", default="1,8,32", help="comma list of client concurrency levels")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--image-size", default="640x480", help="WxH of the generated JPEGs")
    p.add_argument("--names", type=int, default=1000, help="names in the registration test (0 = skip)")
    p.add_argument("--providers", default="CUDAExecutionProvider,CPUExecutionProvider")
    p.add_argument("--workdir", help="keep the started server's log and registry here (default: a temp dir)")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=900.0,
        help="FLATPROMPT_REQUEST_TIMEOUT_S of a started server",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    sys.path.insert(0, str(REPO))
    from serving.runtime.bundle import Bundle

    if not (Path(args.bundle) / "manifest.json").is_file():
        p.error(
            f"--bundle {args.bundle} is not a model bundle (no manifest.json): run `python -m export` first"
        )
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    images = _images(8, (width, height))
    token = args.token or secrets.token_urlsafe(16)
    server = None
    tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            _logger.info("starting a server (%d workers x %d threads)", args.workers, args.threads)
            workdir = Path(args.workdir or tmp.name)
            workdir.mkdir(parents=True, exist_ok=True)
            server = start_server(
                Path(args.bundle), args.workers, args.threads, token, workdir, args.request_timeout
            )
            url = server.url
        levels = []
        for c in (int(v) for v in args.concurrency.split(",")):
            _logger.info("concurrency %d: %d requests", c, args.requests)
            levels.append(run_level(url, images, c, args.requests, args.images_per_request))
            _logger.info("%s", levels[-1])
        bundle = Bundle.load(
            args.bundle,
            providers=args.providers.split(","),
            intra_op_threads=max(1, (os.cpu_count() or 1) // args.workers),
        )
        batches = sorted({1, *(max(1, round(level["mean_batch"] or 1)) for level in levels)})
        raw = [raw_image_throughput(bundle, images[0], b) for b in batches]
        reg = registration(url, token, bundle, args.names) if args.names else None
        report = {
            "bundle": str(args.bundle),
            "model": bundle.manifest.get("model", {}).get("name"),
            "provider": bundle.provider,
            "precision": bundle.precision,
            "cpu_count": os.cpu_count(),
            "server": {"workers": args.workers, "threads": args.threads, "url": url},
            "image_size": args.image_size,
            "levels": levels,
            "raw_ort": raw,
            "served_vs_raw": [
                {
                    "concurrency": level["concurrency"],
                    "batch": max(1, round(level["mean_batch"] or 1)),
                    "ratio": round(
                        level["images_per_s"]
                        / next(
                            r["images_per_s"]
                            for r in raw
                            if r["batch"] == max(1, round(level["mean_batch"] or 1))
                        ),
                        3,
                    ),
                }
                for level in levels
            ],
            "registration": reg,
        }
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    finally:
        if server is not None:
            server.stop(timeout=60)
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
