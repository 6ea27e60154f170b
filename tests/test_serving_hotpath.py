"""The request path under load, against a real ``bentoml serve`` of a 336-px bundle: the largest allowed
request succeeds, a full batcher queue answers 503 at once, a client that disconnects frees its slot,
and concurrent requests share ORT calls."""

from __future__ import annotations

import concurrent.futures as cf
import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.contract import check_response
from tests.serving_fixtures import Server, make_bundle, start_server

IMAGE_SIZE = 336
MAX_BODY = 32 * 1024 * 1024
MAX_IMAGES = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("hotpath")
    bundle = make_bundle(root / "bundle", image_size=IMAGE_SIZE)
    env = {
        "FLATPROMPT_BUNDLE": str(bundle),
        "FLATPROMPT_REGISTRY_URL": f"sqlite:///{root}/registry.db",
        "FLATPROMPT_MAX_BATCH_SIZE": str(MAX_IMAGES),
        "FLATPROMPT_MAX_QUEUE_ITEMS": str(MAX_IMAGES),  # one full request fills the queue
        "FLATPROMPT_MAX_QUEUE_DELAY_MS": "50",
        "FLATPROMPT_THREADS": "2",
    }
    srv = start_server(root / "run", env)
    yield srv
    srv.stop()


def _jpeg(size: tuple[int, int], seed: int, quality: int = 95) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=quality
    )
    return buf.getvalue()


def _slow_png(seed: int) -> bytes:
    """A 4000x3000 gradient PNG: about 100 KB on the wire, slow to inflate and resize."""
    x = np.linspace(0, 255, 4000, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, 3000, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([x + 0 * y, y + 0 * x, (x + y + seed) / 2], axis=2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_the_largest_allowed_request_succeeds(server: Server) -> None:
    # 16 noise JPEGs (the most images a request may carry) filling the 32 MiB body limit
    images = [_jpeg((1600, 1200), seed) for seed in range(MAX_IMAGES)]
    per_image = len(images[0])
    scale = (0.93 * MAX_BODY / MAX_IMAGES / per_image) ** 0.5
    images = [_jpeg((int(1600 * scale), int(1200 * scale)), seed) for seed in range(MAX_IMAGES)]
    total = sum(len(i) for i in images)
    assert 0.85 * MAX_BODY < total < MAX_BODY
    files = [("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    response = httpx.post(server.url + "/classify", files=files, timeout=120)
    check_response(response)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == MAX_IMAGES


def test_a_full_queue_answers_503_at_once_not_a_timeout(server: Server) -> None:
    body = [("images", (f"{i}.jpg", _jpeg((1024, 768), i), "image/jpeg")) for i in range(MAX_IMAGES)]

    def one(_: int) -> tuple[int, float, str | None, dict[str, str]]:
        started = time.perf_counter()
        r = httpx.post(server.url + "/classify", files=body, timeout=60)
        check_response(r)  # the 503 is a documented status with the error model and Retry-After
        payload = r.json()
        return r.status_code, time.perf_counter() - started, payload.get("error"), dict(r.headers)

    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(12)))
    statuses = [s for s, _, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for status, seconds, error, headers in results:
        if status == 503:
            assert error == "overloaded" and headers["retry-after"] == "1"
            assert headers["content-type"] == "application/json"
            assert seconds < 5  # refused on arrival, not after waiting for the queue
    assert _metric(server.url, "flatprompt_limit_violations_total", limit="queue_items") >= 1


def test_a_client_that_disconnects_frees_its_queue_slot(server: Server) -> None:
    cancelled_before = _metric(
        server.url, "flatprompt_requests_total", endpoint="classify", outcome="cancelled"
    )
    parts = [_slow_png(i) for i in range(MAX_IMAGES)]  # small files, seconds of decoding in all
    boundary = "hotpathboundary"
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n".encode()
            + data
            + b"\r\n"
            for i, data in enumerate(parts)
        )
        + f"--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body)
        time.sleep(0.5)  # the server is decoding: the request holds the whole queue
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        cancelled = _metric(server.url, "flatprompt_requests_total", endpoint="classify", outcome="cancelled")
        if cancelled > cancelled_before and _metric(server.url, "flatprompt_queue_depth", tower="image") == 0:
            break
        time.sleep(0.2)
    assert cancelled > cancelled_before
    assert _metric(server.url, "flatprompt_queue_depth", tower="image") == 0
    # the slot is free: a full-size request is admitted again
    files = [("images", (f"{i}.jpg", _jpeg((400, 300), i), "image/jpeg")) for i in range(MAX_IMAGES)]
    assert httpx.post(server.url + "/classify", files=files, timeout=60).status_code == 200


def test_concurrent_requests_share_image_encoder_calls(server: Server) -> None:
    before_items = _metric(server.url, "flatprompt_batch_size_sum", tower="image")
    before_calls = _metric(server.url, "flatprompt_batch_size_count", tower="image")
    image = _jpeg((640, 480), 7)

    def one(_: int) -> int:
        return httpx.post(
            server.url + "/classify", files=[("images", ("a.jpg", image, "image/jpeg"))], timeout=60
        ).status_code

    with cf.ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(one, range(48)))
    assert statuses.count(200) == 48
    items = _metric(server.url, "flatprompt_batch_size_sum", tower="image") - before_items
    calls = _metric(server.url, "flatprompt_batch_size_count", tower="image") - before_calls
    assert items == 48
    # without batching every image is its own call (48); a loaded machine admits requests more slowly, so
    # the bound leaves room: at least a third fewer calls than images
    assert calls <= 32, f"{calls} ORT calls for 48 images: batches did not form"


def test_classify_through_the_batcher_matches_the_bundle(server: Server, tmp_path: Path) -> None:
    from serving.runtime.bundle import Bundle

    bundle = Bundle.load(Path(server.env["FLATPROMPT_BUNDLE"]), providers=["CPUExecutionProvider"])
    image = Image.new("RGB", (700, 500), (220, 20, 20))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    response = httpx.post(
        server.url + "/classify", files=[("images", ("r.jpg", buf.getvalue(), "image/jpeg"))], timeout=60
    )
    check_response(response)
    assert response.status_code == 200
    top = response.json()["results"][0]["labels"][0]
    expected = bundle.logits(bundle.embed_images(bundle.decode(buf.getvalue())[None]))[0]
    assert top["name"] == bundle.class_names[int(np.argmax(expected))] == "red"
