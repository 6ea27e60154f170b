"""Bounded load test of the serving stack on 127.0.0.1, measured side by side in one run.

What one run measures, on the same cores (a markdown report on stdout, the figures as JSON with
``--json``, progress on stderr):

(a) **floor**: a bare BentoML service (``benchmarks/services/floor.py``) that accepts the same multipart
    upload as ``/classify`` and answers at once: what BentoML itself allows here;
(b) **served**: each ``--bundle`` behind ``bentoml serve`` (the shipped in-worker batcher, and with
    ``--prototype distributed`` also the ``bentoml.depends()`` prototype of
    ``benchmarks/services/distributed.py``), at client concurrency 1 / 8 / 32 with 1 and 8 images per
    request: images/s, p50 / p99, refusals, mean image batch per ORT call (from ``/metrics``);
(c) **raw**: the in-process pipeline on the same bundle: decode + preprocess per image (reduced-scale and
    full-resolution JPEG decode), ORT per call at batch 1 and at the batch the server formed;
then the issue's targets as ratios, and (``--names``) one registration of 1,000 names against the raw text
encoder.

The load generator is a small asyncio HTTP/1.1 client over keep-alive sockets with the request bytes
prepared in advance, so it costs little CPU; its own CPU time is measured per level and reported
(``client_cpu``: CPU seconds per wall second, 1.0 = one core) so a reader can see it was not the
bottleneck. Every level has a request count and a time cap, every request a timeout: the run is bounded.

Usage::

    python benchmarks/serve_load.py --bundle bundles/toy --bundle bundles/b16 --threads 2
    python benchmarks/serve_load.py --bundle bundles/toy --prototype distributed --names 0
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from serving.launch import Server

_logger = logging.getLogger("serve_load")
REPO = Path(__file__).resolve().parents[1]
TARGETS = {
    "inworker": "serving.service:FlatPrompt",
    "distributed": "benchmarks.services.distributed:Api",
    "floor": "benchmarks.services.floor:Floor",
}
BOUNDARY = "flatpromptbenchboundary"


# -- inputs -----------------------------------------------------------------------------------------
def make_images(count: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs (smooth gradients + texture + noise): a realistic decode cost."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(count):
        base = rng.uniform(0, 255, 3)
        slope = rng.uniform(-0.3, 0.3, (3, 2))
        img = np.stack([base[c] + slope[c, 0] * xx + slope[c, 1] * yy for c in range(3)], axis=-1)
        img += 40 * np.sin(xx[..., None] / rng.uniform(3, 30)) * np.cos(yy[..., None] / rng.uniform(3, 30))
        img += rng.normal(0, 12, img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def multipart_request(port: int, files: Sequence[bytes], top_k: int = 5) -> bytes:
    """The raw bytes of one ``POST /classify`` with ``files`` as repeated ``images`` parts."""
    parts = []
    for i, data in enumerate(files):
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{i}.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n{top_k}\r\n'.encode())
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    head = (
        f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# -- the load generator -----------------------------------------------------------------------------
async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
    }
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


@dataclass
class Level:
    """One concurrency level's figures."""

    concurrency: int
    images_per_request: int
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    images_per_s: float = 0.0
    requests_per_s: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    mean_batch: float | None = None
    model_calls: int = 0
    client_cpu: float = 0.0


async def _drive(
    port: int, payloads: Sequence[bytes], concurrency: int, requests: int, max_seconds: float, timeout: float
) -> tuple[list[tuple[int, float]], float]:
    results: list[tuple[int, float]] = []
    counter = iter(range(requests))
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        reader = writer = None
        for i in counter:
            if time.perf_counter() > deadline:
                break
            started = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert reader is not None
                writer.write(payloads[i % len(payloads)])
                status = await asyncio.wait_for(_read_response(reader), timeout)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                status = 0
                if writer is not None:
                    writer.close()
                reader = writer = None
            results.append((status, time.perf_counter() - started))
        if writer is not None:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - started


def batch_stats(url: str) -> tuple[float, float]:
    """(items, calls) of the image tower summed over workers: ``flatprompt_batch_size{tower="image"}``, or
    BentoML's ``bentoml_service_adaptive_batch_size`` for the distributed prototype's encoder."""
    text = httpx.get(url + "/metrics", timeout=30).text
    sums = {"ours": [0.0, 0.0], "bentoml": [0.0, 0.0]}
    for family in text_string_to_metric_families(text):
        if family.name == "flatprompt_batch_size":
            key = "ours"
        elif family.name == "bentoml_service_adaptive_batch_size":
            key = "bentoml"
        else:
            continue
        for sample in family.samples:
            if key == "ours" and sample.labels.get("tower") != "image":
                continue
            if sample.name.endswith("_sum"):
                sums[key][0] += sample.value
            elif sample.name.endswith("_count"):
                sums[key][1] += sample.value
    items, calls = sums["ours"] if sums["ours"][1] else sums["bentoml"]
    return items, calls


def run_level(
    port: int,
    images: Sequence[bytes],
    concurrency: int,
    per_request: int,
    requests: int,
    max_seconds: float,
    metrics: bool = True,
) -> Level:
    """``requests`` classify calls (or ``max_seconds``) at ``concurrency``; warm-up calls are not counted."""
    url = f"http://127.0.0.1:{port}"
    payloads = [
        multipart_request(port, [images[(i + j) % len(images)] for j in range(per_request)])
        for i in range(len(images))
    ]
    asyncio.run(_drive(port, payloads, min(concurrency, 4), min(concurrency, 4), 60, 120))  # warm-up
    items0, calls0 = batch_stats(url) if metrics else (0.0, 0.0)
    cpu0 = time.process_time()
    results, wall = asyncio.run(_drive(port, payloads, concurrency, requests, max_seconds, 300))
    cpu = time.process_time() - cpu0
    items1, calls1 = batch_stats(url) if metrics else (0.0, 0.0)
    ok = np.asarray([lat for status, lat in results if status == 200])
    level = Level(concurrency, per_request, requests=len(results), wall_s=round(wall, 3))
    for status, _ in results:
        level.statuses[str(status)] = level.statuses.get(str(status), 0) + 1
    level.requests_per_s = round(len(ok) / wall, 2)
    level.images_per_s = round(len(ok) * per_request / wall, 2)
    if len(ok):
        level.p50_ms = round(1000 * float(np.percentile(ok, 50)), 1)
        level.p99_ms = round(1000 * float(np.percentile(ok, 99)), 1)
    calls = calls1 - calls0
    level.model_calls = int(calls)
    level.mean_batch = round((items1 - items0) / calls, 2) if calls else None
    level.client_cpu = round(cpu / wall, 3)
    return level


# -- raw in-process pipeline ------------------------------------------------------------------------
def _timed(fn: Callable[[], object], seconds: float, minimum: int = 3) -> float:
    """Mean seconds per call of ``fn`` over about ``seconds`` (after one warm-up call)."""
    fn()
    runs = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or runs < minimum:
        fn()
        runs += 1
    return (time.perf_counter() - started) / runs


def raw_pipeline(
    bundle: Any, images: Sequence[bytes], batches: Sequence[int], seconds: float
) -> dict[str, Any]:
    """Decode + preprocess per image (reduced and full decode) and ORT per call at each batch size."""
    it = iter(range(1 << 30))
    reduced = _timed(lambda: bundle.decode(images[next(it) % len(images)]), seconds / 3)
    full = _timed(lambda: bundle.decode(images[next(it) % len(images)], reduced=False), seconds / 3)
    x1 = bundle.decode(images[0])
    ort = {}
    for b in sorted(set(batches)):
        x = np.stack([x1] * b)
        per_call = _timed(lambda x=x: bundle.embed_images(x), seconds / max(1, len(set(batches))))
        ort[b] = {"ms_per_call": round(1000 * per_call, 3), "images_per_s": round(b / per_call, 1)}
    return {
        "decode_preprocess_ms": {"reduced": round(1000 * reduced, 2), "full": round(1000 * full, 2)},
        "ort": ort,
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
        "ratio": round(served / raw, 2) if raw else None,
    }


# -- orchestration ----------------------------------------------------------------------------------
def launch(target: str, env: dict[str, str], workdir: Path) -> Server:
    """``bentoml serve TARGET`` on a free 127.0.0.1 port (the tests' launcher), ready on ``/readyz``."""
    from serving.launch import start_server

    return start_server(workdir, env, ready_timeout=300, target=TARGETS[target])


def server_env(bundle: Path | None, args: argparse.Namespace, token: str, workdir: Path) -> dict[str, str]:
    env = {
        "FLATPROMPT_REGISTRY_URL": f"sqlite:///{workdir}/registry.db",
        "FLATPROMPT_TOKEN": token,
        "FLATPROMPT_WORKERS": str(args.workers),
        "FLATPROMPT_THREADS": str(args.threads),
        "FLATPROMPT_MAX_IN_FLIGHT": "256",
        "FLATPROMPT_MAX_QUEUE_ITEMS": "1024",
        "FLATPROMPT_REQUEST_TIMEOUT_S": "900",
        "FLATPROMPT_ORT_THREADS": str(args.ort_threads),
        "FLATPROMPT_PROVIDERS": args.providers,
        "OMP_NUM_THREADS": str(args.ort_threads),
    }
    if args.require_provider:
        env["FLATPROMPT_REQUIRE_PROVIDER"] = args.require_provider
    if args.max_queue_delay_ms is not None:
        env["FLATPROMPT_MAX_QUEUE_DELAY_MS"] = str(args.max_queue_delay_ms)
    if bundle is not None:
        env["FLATPROMPT_BUNDLE"] = str(bundle.resolve())
    return env


def measure(
    name: str,
    target: str,
    bundle: Path | None,
    args: argparse.Namespace,
    images: Sequence[bytes],
    token: str,
    workdir: Path,
) -> list[Level]:
    """All levels of one server: each concurrency with 1 and with ``--batch-images`` images per request."""
    _logger.info("%s: starting %s", name, TARGETS[target])
    server = launch(target, server_env(bundle, args, token, workdir / name), workdir / name)
    try:
        levels = []
        for per_request in args.images_per_request:
            for c in args.concurrency:
                count = max(args.min_requests, args.requests // per_request)
                level = run_level(
                    server.port, images, c, per_request, count, args.max_seconds, metrics=target != "floor"
                )
                _logger.info("%s %s", name, asdict(level))
                levels.append(level)
        return levels
    finally:
        server.stop(timeout=60)


def _find(levels: Sequence[Level], c: int, per: int) -> Level | None:
    return next((lv for lv in levels if lv.concurrency == c and lv.images_per_request == per), None)


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each as a measured ratio or bound against its goal."""
    out: list[dict[str, Any]] = []
    floor = report["servers"].get("floor", {}).get("levels", [])
    for key, entry in report["servers"].items():
        if key == "floor" or not entry.get("levels"):
            continue
        levels = entry["levels"]
        raw = report["raw"].get(entry["bundle"], {})
        c32, c1 = _find(levels, 32, 1), _find(levels, 1, 1)
        f32, f1 = _find(floor, 32, 1), _find(floor, 1, 1)
        if c32 and f32 and f32.requests_per_s:
            out.append(
                {
                    "server": key,
                    "target": "images/s at c32 / floor req/s at c32 >= 0.7",
                    "value": round(c32.images_per_s / f32.requests_per_s, 3),
                    "met": c32.images_per_s / f32.requests_per_s >= 0.7,
                }
            )
        if c32 and c32.mean_batch is not None:
            out.append(
                {
                    "server": key,
                    "target": "mean batch at c32 >= 8",
                    "value": c32.mean_batch,
                    "met": c32.mean_batch >= 8,
                }
            )
        if c32 and raw:
            b = max(1, round(c32.mean_batch or 1))
            ort = raw["ort"].get(b) or raw["ort"][min(raw["ort"], key=lambda k: abs(k - b))]
            ratio = c32.images_per_s / ort["images_per_s"]
            out.append(
                {
                    "server": key,
                    "target": f"served / raw ORT at c32 (batch {b}) >= 0.9",
                    "value": round(ratio, 3),
                    "met": ratio >= 0.9,
                }
            )
        if c1 and f1 and raw:
            bound = f1.p50_ms + raw["decode_preprocess_ms"]["reduced"] + raw["ort"][1]["ms_per_call"] + 3.0
            out.append(
                {
                    "server": key,
                    "target": "p50 at c1 <= floor p50 + decode + model + 3 ms",
                    "value": f"{c1.p50_ms} <= {bound:.1f}",
                    "met": c1.p50_ms <= bound,
                }
            )
    return out


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables."""
    lines = [
        f"cpu_count {report['cpu_count']}, server {report['workers']} worker(s) x {report['threads']} threads, "
        f"ORT threads {report['ort_threads']}, images {report['image_size']} JPEG",
        "",
        "| server | images/req | concurrency | images/s | req/s | p50 ms | p99 ms | mean batch | statuses | client CPU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, entry in report["servers"].items():
        for lv in entry["levels"]:
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(lv.statuses.items()))
            lines.append(
                f"| {key} | {lv.images_per_request} | {lv.concurrency} | {lv.images_per_s} | {lv.requests_per_s} | "
                f"{lv.p50_ms} | {lv.p99_ms} | {lv.mean_batch if lv.mean_batch is not None else '-'} | {statuses} | "
                f"{lv.client_cpu} |"
            )
    lines += [
        "",
        "| bundle | decode+preprocess ms (reduced / full) | ORT ms per call by batch |",
        "| --- | --- | --- |",
    ]
    for bundle, raw in report["raw"].items():
        ort = ", ".join(
            f"b{b}: {v['ms_per_call']} ({v['images_per_s']} img/s)" for b, v in raw["ort"].items()
        )
        d = raw["decode_preprocess_ms"]
        lines.append(f"| {bundle} | {d['reduced']} / {d['full']} | {ort} |")
    lines += ["", "| server | target | measured | met |", "| --- | --- | --- | --- |"]
    for t in report["targets"]:
        lines.append(f"| {t['server']} | {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |")
    if report.get("registration"):
        lines += ["", f"registration: {json.dumps(report['registration'])}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the markdown report (and write ``--json``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--bundle", action="append", required=True, help="bundle directory (repeatable)")
    p.add_argument("--prototype", choices=["inworker", "distributed", "both"], default="inworker")
    p.add_argument("--no-floor", action="store_true", help="skip the bare-BentoML floor")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=4, help="decode threads per worker (FLATPROMPT_THREADS)")
    p.add_argument("--ort-threads", type=int, default=0, help="ORT intra-op threads; 0 = cores / workers")
    p.add_argument("--max-queue-delay-ms", type=float, default=None)
    p.add_argument("--concurrency", default="1,8,32", help="comma list of client concurrency levels")
    p.add_argument("--images-per-request", default="1,8", help="comma list")
    p.add_argument("--requests", type=int, default=128, help="images per level (requests = this / images)")
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=30.0, help="time cap per level")
    p.add_argument("--raw-seconds", type=float, default=3.0)
    p.add_argument("--image-size", default="640x480", help="WxH of the generated JPEGs")
    p.add_argument("--names", type=int, default=0, help="names in the registration test (0 = skip)")
    p.add_argument("--providers", default="CUDAExecutionProvider,CPUExecutionProvider")
    p.add_argument(
        "--require-provider", help="e.g. CUDAExecutionProvider: the server is not ready without it"
    )
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--workdir", help="keep the servers' logs and registries here (default: a temp dir)")
    args = p.parse_args(argv)
    args.concurrency = [int(v) for v in args.concurrency.split(",")]
    args.images_per_request = [int(v) for v in args.images_per_request.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    sys.path.insert(0, str(REPO))
    from serving.runtime.bundle import Bundle

    bundles = [Path(b) for b in args.bundle]
    for b in bundles:
        if not (b / "manifest.json").is_file():
            p.error(f"--bundle {b} is not a model bundle (no manifest.json): run `python -m export` first")
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    images = make_images(8, (width, height))
    token = secrets.token_urlsafe(16)
    cores = os.cpu_count() or 1
    ort_threads = args.ort_threads or max(1, cores // args.workers)
    args.ort_threads = ort_threads
    report: dict[str, Any] = {
        "cpu_count": cores,
        "workers": args.workers,
        "threads": args.threads,
        "ort_threads": ort_threads,
        "image_size": args.image_size,
        "servers": {},
        "raw": {},
    }
    protos = ["inworker", "distributed"] if args.prototype == "both" else [args.prototype]
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        workdir = Path(args.workdir or tmp)
        if not args.no_floor:
            levels = measure("floor", "floor", None, args, images, token, workdir)
            report["servers"]["floor"] = {"bundle": None, "levels": levels}
        for bundle in bundles:
            batches = {1}
            for proto in protos:
                key = f"{bundle.name}:{proto}"
                levels = measure(key.replace(":", "-"), proto, bundle, args, images, token, workdir)
                report["servers"][key] = {"bundle": str(bundle), "levels": levels}
                batches |= {max(1, round(lv.mean_batch or 1)) for lv in levels}
            loaded = Bundle.load(bundle, providers=args.providers.split(","), intra_op_threads=ort_threads)
            report["raw"][str(bundle)] = raw_pipeline(loaded, images, sorted(batches), args.raw_seconds)
            report["raw"][str(bundle)]["provider"] = loaded.provider
            if args.names and "inworker" in protos:
                server = launch("inworker", server_env(bundle, args, token, workdir / "reg"), workdir / "reg")
                try:
                    report.setdefault("registration", {})[str(bundle)] = registration(
                        server.url, token, loaded, args.names
                    )
                finally:
                    server.stop(timeout=60)
    report["targets"] = targets(report)
    sys.stdout.write(markdown(report))
    if args.json:
        serialisable = json.loads(json.dumps(report, default=lambda o: asdict(o)))
        Path(args.json).write_text(json.dumps(serialisable, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
