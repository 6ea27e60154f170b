"""Custom Prometheus metrics, created lazily inside the worker process.

BentoML runs workers in prometheus_client's multiprocess mode; a metric object created before the
worker has set ``PROMETHEUS_MULTIPROC_DIR`` is invisible on ``/metrics`` (bentoml#5056), so nothing
here is created at import time: :func:`get_metrics` builds the set on first use. Names follow the
Prometheus conventions (one ``flatprompt_`` prefix, base units, ``_total`` counters) and labels have
small fixed value sets (no class names, no request content).

Exposed (next to BentoML's ``bentoml_service_*`` built-ins):

* ``flatprompt_requests_total{endpoint, outcome}``
* ``flatprompt_request_duration_seconds{endpoint, outcome}`` (histogram, end to end in the worker: from
  the request's arrival at the outermost middleware to the last byte of its answer; probes excluded)
* ``flatprompt_limit_violations_total{limit}``
* ``flatprompt_model_latency_seconds{tower}`` (histogram, ``tower`` = image | text)
* ``flatprompt_batch_size{tower}`` (histogram of items per model call)
* ``flatprompt_queue_wait_seconds{tower}`` (histogram: how long the oldest item of a batch waited)
* ``flatprompt_queue_depth{tower}`` (gauge: items queued or being decoded, summed over live workers)
* ``flatprompt_image_bytes`` (histogram of uploaded image sizes)
* ``flatprompt_registered_classes`` (gauge, max over live workers)
* ``flatprompt_registry_reloads_total``, ``flatprompt_registry_errors_total``
* ``flatprompt_registry_up`` (gauge, min over live workers: 0 when any worker's last registry check
  failed) and ``flatprompt_registry_staleness_seconds`` (gauge, max over live workers: seconds since
  the classes in use were last confirmed current; at most about the poll interval while it answers)
* ``flatprompt_model_info{bundle_hash, model, provider, precision, cuda, cudnn}`` (gauge, always 1;
  ``cuda`` / ``cudnn``: the versions in use, empty off CUDA)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

# Seconds. Sub-millisecond buckets first: on the CPU toy bundle 44 % of image-tower calls and most
# refusals (401/404/413 answered by the middleware, 30-100 us) fall below 1 ms, and a GPU runs a small
# batch of a ViT-B/16 in well under 1 ms. The top buckets cover the 30 s request deadline.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
IMAGE_BYTES_BUCKETS = tuple(float(1024 * 4**i) for i in range(9))  # 1 KiB .. 64 MiB

ENDPOINTS = frozenset({"classify", "classify_base64", "register", "register_images", "unregister", "classes"})
OUTCOMES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "bad_request",
    429: "overloaded",
    503: "unavailable",
    504: "timeout",
}


def outcome_for_status(status: int) -> str:
    """Map an HTTP status to the small fixed ``outcome`` label set."""
    if status < 400:
        return "ok"
    return OUTCOMES.get(status, "client_error" if status < 500 else "error")


def endpoint_label(path: str) -> str:
    """Bound the ``endpoint`` label: known API routes by name, everything else ``other``."""
    name = path.strip("/").split("/", 1)[0]
    return name if name in ENDPOINTS else "other"


def batch_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to (and including) the next power of two above ``max_batch_size``."""
    buckets = [1.0]
    while buckets[-1] < max_batch_size:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


@dataclass
class Metrics:
    """The service's custom metric objects (see the module docstring)."""

    requests: Any
    request_duration: Any
    limit_violations: Any
    model_latency: Any
    batch_size: Any
    queue_wait: Any
    queue_depth: Any
    image_bytes: Any
    registered_classes: Any
    registry_reloads: Any
    registry_errors: Any
    registry_up: Any
    registry_staleness: Any
    model_info: Any


_lock = threading.Lock()
_metrics: Metrics | None = None


def get_metrics(max_batch_size: int = 32) -> Metrics:
    """Create the metrics on first call (inside the worker), then return the same objects."""
    global _metrics
    if _metrics is not None:
        return _metrics
    with _lock:
        if _metrics is None:
            from prometheus_client import Counter, Gauge, Histogram

            _metrics = Metrics(
                requests=Counter(
                    "flatprompt_requests_total",
                    "API requests by endpoint and outcome.",
                    ["endpoint", "outcome"],
                ),
                request_duration=Histogram(
                    "flatprompt_request_duration_seconds",
                    "End-to-end duration of API requests in the worker, by endpoint and outcome.",
                    ["endpoint", "outcome"],
                    buckets=LATENCY_BUCKETS,
                ),
                limit_violations=Counter(
                    "flatprompt_limit_violations_total",
                    "Requests refused because they violated an input limit or were malformed.",
                    ["limit"],
                ),
                model_latency=Histogram(
                    "flatprompt_model_latency_seconds",
                    "Wall time of one ONNX Runtime call, per tower.",
                    ["tower"],
                    buckets=LATENCY_BUCKETS,
                ),
                batch_size=Histogram(
                    "flatprompt_batch_size",
                    "Items (images or prompts) per ONNX Runtime call, per tower.",
                    ["tower"],
                    buckets=batch_buckets(max(max_batch_size, 64)),
                ),
                queue_wait=Histogram(
                    "flatprompt_queue_wait_seconds",
                    "Time the oldest item of a batch waited in the batcher's queue, per tower.",
                    ["tower"],
                    buckets=LATENCY_BUCKETS,
                ),
                queue_depth=Gauge(
                    "flatprompt_queue_depth",
                    "Items queued for a model call or announced (being decoded), per tower.",
                    ["tower"],
                    multiprocess_mode="livesum",
                ),
                image_bytes=Histogram(
                    "flatprompt_image_bytes",
                    "Size of each uploaded image file in bytes.",
                    buckets=IMAGE_BYTES_BUCKETS,
                ),
                registered_classes=Gauge(
                    "flatprompt_registered_classes",
                    "Registered (novel) classes in the registry, as last seen by the workers.",
                    multiprocess_mode="livemax",
                ),
                registry_reloads=Counter(
                    "flatprompt_registry_reloads_total",
                    "Times a worker reloaded the registry because its version changed.",
                ),
                registry_errors=Counter(
                    "flatprompt_registry_errors_total",
                    "Failed registry checks and writes (classification then uses the last loaded classes).",
                ),
                registry_up=Gauge(
                    "flatprompt_registry_up",
                    "1 when the last registry check of every live worker answered, else 0.",
                    multiprocess_mode="livemin",
                ),
                registry_staleness=Gauge(
                    "flatprompt_registry_staleness_seconds",
                    "Seconds since the registered classes in use were last confirmed current (max over workers).",
                    multiprocess_mode="livemax",
                ),
                model_info=Gauge(
                    "flatprompt_model_info",
                    "The loaded model bundle; the value is always 1.",
                    ["bundle_hash", "model", "provider", "precision", "cuda", "cudnn"],
                    multiprocess_mode="livemax",
                ),
            )
    return _metrics
