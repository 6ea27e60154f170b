"""End-to-end tests against a real ``bentoml serve`` (2 workers, SQLite registry, synthetic bundle).

One server is shared by the whole module; tests that change the registry use names of their own.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.contract import contract_client
from tests.serving_fixtures import Server, make_bundle, png_bomb, png_bytes, start_server, wait_for_workers

pytestmark = pytest.mark.server

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RED, BLUE, GREEN = (220, 20, 20), (30, 40, 220), (20, 200, 40)
MAX_BODY = 2 * 1024 * 1024
MAX_IMAGES = 4
MAX_NAMES = 100
MAX_REGISTERED = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serving")
    bundle = make_bundle(root / "bundle")
    env = {
        "FLATPROMPT_BUNDLE": str(bundle),
        "FLATPROMPT_REGISTRY_URL": f"sqlite:///{root}/registry.db",
        "FLATPROMPT_TOKEN": TOKEN,
        "FLATPROMPT_PROVIDERS": "CUDAExecutionProvider,CPUExecutionProvider",
        "FLATPROMPT_WORKERS": "2",
        "FLATPROMPT_THREADS": "2",
        "FLATPROMPT_MAX_BODY_BYTES": str(MAX_BODY),
        "FLATPROMPT_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
        "FLATPROMPT_MAX_NAMES_PER_REGISTRATION": str(MAX_NAMES),
        "FLATPROMPT_MAX_REGISTERED_CLASSES": str(MAX_REGISTERED),
        "FLATPROMPT_MAX_NAME_LENGTH": "64",
        "FLATPROMPT_BODY_TIMEOUT_S": "1",
    }
    srv = start_server(root / "run", env)
    wait_for_workers(srv, 2)  # the tests below rely on both workers serving
    yield srv
    srv.stop()


@pytest.fixture()
def http(server: Server) -> Iterator[httpx.Client]:
    with contract_client(server.url) as client:
        yield client


def _classify(http: httpx.Client, *images: bytes, **fields: Any) -> httpx.Response:
    files = [("images", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    data = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
    return http.post("/classify", files=files, data=data)


def _error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "message"}, body
    assert isinstance(body["message"], str) and body["message"]
    if code is not None:
        assert body["error"] == code, body
    return body


# -- happy paths -------------------------------------------------------------------------------


def test_probes(http: httpx.Client) -> None:
    assert http.get("/livez").status_code == 200
    assert http.get("/readyz").status_code == 200


def test_classify_multipart_orders_results_per_image(http: httpx.Client) -> None:
    response = _classify(http, png_bytes(RED), png_bytes(BLUE, size=(300, 120)), png_bytes(GREEN), top_k=3)
    assert response.status_code == 200, response.text
    body = response.json()
    tops = [r["labels"][0] for r in body["results"]]
    assert [t["name"] for t in tops] == ["red", "blue", "green"]
    assert all(t["kind"] == "trained" for t in tops)
    for result in body["results"]:
        probs = [label["probability"] for label in result["labels"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert body["bundle"] and isinstance(body["registry_version"], int)


def test_classify_base64_and_data_url(http: httpx.Client) -> None:
    plain = base64.b64encode(png_bytes(BLUE)).decode()
    url = "data:image/jpeg;base64," + base64.b64encode(png_bytes(RED, fmt="JPEG")).decode()
    response = http.post("/classify_base64", json={"images": [plain, url], "top_k": 1})
    assert response.status_code == 200, response.text
    assert [r["labels"][0]["name"] for r in response.json()["results"]] == ["blue", "red"]


def test_upload_content_type_is_not_trusted(http: httpx.Client) -> None:
    files = [("images", ("photo.txt", png_bytes(RED), "text/plain"))]
    response = http.post("/classify", files=files)
    assert response.status_code == 200 and response.json()["results"][0]["labels"][0]["name"] == "red"


def test_logit_adjustment_and_candidates(http: httpx.Client) -> None:
    plain = _classify(http, png_bytes(RED), top_k=6).json()["results"][0]["labels"]
    adjusted = _classify(http, png_bytes(RED), top_k=6, tau=1.0).json()["results"][0]["labels"]
    p = {lab["name"]: lab["probability"] for lab in plain}
    q = {lab["name"]: lab["probability"] for lab in adjusted}
    assert q["yellow"] > p["yellow"]  # tail class (count 3) gains against the head class red (1000)
    subset = _classify(http, png_bytes(RED), candidates=["Blue", "green"], top_k=5).json()["results"][0][
        "labels"
    ]
    assert {lab["name"] for lab in subset} == {"blue", "green"}


def test_sync_http_client(server: Server, tmp_path: Path) -> None:
    import bentoml

    image = tmp_path / "red.png"
    image.write_bytes(png_bytes(RED))
    with bentoml.SyncHTTPClient(server.url, server_ready_timeout=30) as client:
        out = client.classify(images=[image], top_k=2)
        assert out["results"][0]["labels"][0]["name"] == "red"
        out = client.classify_base64(images=[base64.b64encode(image.read_bytes()).decode()], top_k=1)
        assert out["results"][0]["labels"][0]["name"] == "red"
        listing = client.classes(kind="trained")
        assert [c["name"] for c in listing["trained"]][:2] == ["red", "green"]
    with bentoml.SyncHTTPClient(server.url, token=TOKEN, server_ready_timeout=30) as client:
        out = client.register(names=["client example"])
        assert out["classes"][0]["status"] in ("created", "unchanged")
        assert client.unregister(name="client example")["deleted"] == "client example"


# -- registry ----------------------------------------------------------------------------------


def test_register_list_classify_delete(http: httpx.Client) -> None:
    names = ["okapi", "Snow  Leopard", "🦒", "東京タワー", "👩\u200d🚀 astronaut", "Red"]
    _error(http.post("/register", json={"names": names}), 401, "unauthorized")
    _error(http.post("/register", json={"names": names}, headers={"Authorization": "Bearer wrong"}), 401)
    response = http.post("/register", json={"names": names}, headers=AUTH)
    assert response.status_code == 200, response.text
    statuses = {c["name"]: c["status"] for c in response.json()["classes"]}
    assert statuses == {
        "okapi": "created",
        "Snow Leopard": "created",
        "🦒": "created",
        "東京タワー": "created",
        "👩\u200d🚀 astronaut": "created",
        "Red": "trained",
    }
    again = http.post("/register", json={"names": ["OKAPI", "snow leopard"]}, headers=AUTH).json()
    assert [c["status"] for c in again["classes"]] == ["unchanged", "unchanged"]
    templated = http.post(
        "/register",
        json={"names": ["okapi"], "templates": ["a photo of a {}.", "a blurry photo of a {}."]},
        headers=AUTH,
    ).json()
    assert templated["classes"][0]["status"] == "updated"

    listing = http.post("/classes", json={"kind": "registered"}).json()
    registered = {c["name"]: c for c in listing["registered"]}
    assert {"okapi", "Snow Leopard", "🦒", "東京タワー"} <= set(registered)
    assert registered["okapi"]["templates"] == ["a photo of a {}.", "a blurry photo of a {}."]

    labels = _classify(http, png_bytes(RED), candidates=["okapi", "🦒"]).json()["results"][0]["labels"]
    assert {lab["name"] for lab in labels} == {"okapi", "🦒"} and all(
        lab["kind"] == "registered" for lab in labels
    )
    everything = _classify(http, png_bytes(RED), top_k=100).json()["results"][0]["labels"]
    assert {"okapi", "red"} <= {lab["name"] for lab in everything}

    _error(http.post("/unregister", json={"name": "red"}, headers=AUTH), 409, "trained_class")
    assert http.post("/unregister", json={"name": "OKAPI"}, headers=AUTH).json()["deleted"] == "OKAPI"
    _error(http.post("/unregister", json={"name": "okapi"}, headers=AUTH), 404, "unknown_class")
    _error(_classify(http, png_bytes(RED), candidates=["okapi"]), 404, "unknown_class")


def test_registration_is_visible_on_every_worker_at_once(server: Server) -> None:
    workers: set[str] = set()

    def classify_fresh(name: str) -> str:
        with contract_client(server.url) as c:  # a fresh connection: any worker
            response = _classify(c, png_bytes(RED), candidates=[name])
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["labels"][0]["name"] == name
        return response.headers["x-flatprompt-worker"]

    for i in range(6):
        name = f"visible-{i}"
        with contract_client(server.url) as c:
            assert c.post("/register", json={"names": [name]}, headers=AUTH).status_code == 200
        # 8 at once right after the registration: while one worker is busy the other must accept, so both
        # answer (sequential connections can all land on the same idle worker)
        with cf.ThreadPoolExecutor(8) as pool:
            workers.update(pool.map(classify_fresh, [name] * 8))
    assert len(workers) == 2, workers


def test_registration_racing_classification(server: Server) -> None:
    errors: list[str] = []
    stop = threading.Event()

    def classify_loop() -> None:
        with contract_client(server.url) as c:
            while not stop.is_set():
                response = _classify(c, png_bytes(GREEN), top_k=100)
                if response.status_code != 200:
                    errors.append(response.text)

    def register_then_use(i: int) -> None:
        name = f"race-{i}"
        with contract_client(server.url) as c:
            response = c.post("/register", json={"names": [name, f"race-extra-{i}"]}, headers=AUTH)
            if response.status_code != 200:
                errors.append(response.text)
                return
        with contract_client(server.url) as c:  # new connection, any worker
            response = _classify(c, png_bytes(RED), candidates=[name])
            if response.status_code != 200 or response.json()["results"][0]["labels"][0]["name"] != name:
                errors.append(f"{name}: {response.status_code} {response.text}")

    with cf.ThreadPoolExecutor(8) as pool:
        loops = [pool.submit(classify_loop) for _ in range(2)]
        list(pool.map(register_then_use, range(8)))
        stop.set()
        for f in loops:
            f.result()
    assert not errors, errors[:3]


def test_registry_cap(http: httpx.Client) -> None:
    names = [f"cap-{i}" for i in range(MAX_REGISTERED + 1)]
    _error(http.post("/register", json={"names": names}, headers=AUTH), 409, "registry_full")
    listing = http.post("/classes", json={"kind": "registered"}).json()
    assert not any(c["name"].startswith("cap-") for c in listing["registered"])  # all or nothing


# -- bad input: every case answers 4xx with the schema, and the server stays up -----------------


def test_bad_uploads(http: httpx.Client) -> None:
    good = png_bytes(RED, size=(200, 200))
    jpeg = png_bytes(RED, size=(200, 200), fmt="JPEG")
    cases = {
        "zero bytes": b"",
        "truncated png": good[: len(good) // 2],
        "truncated jpeg": jpeg[: len(jpeg) // 3],
        "corrupt": good[:60] + os.urandom(200) + good[260:],
        "not an image": b"#!/bin/sh\necho hello\n",
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    }
    for what, data in cases.items():
        body = _error(_classify(http, png_bytes(RED), data), 400, "invalid_image")
        assert "image 1" in body["message"], what


def test_decompression_bomb(http: httpx.Client) -> None:
    bomb = png_bomb(30000, 30000)
    body = _error(_classify(http, bomb), 413, "image_too_large")
    assert "900000000 pixels" in body["message"]
    encoded = base64.b64encode(bomb).decode()
    _error(http.post("/classify_base64", json={"images": [encoded]}), 413, "image_too_large")


def test_oversized_bodies(http: httpx.Client) -> None:
    big = os.urandom(MAX_BODY + 1)
    _error(_classify(http, big), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streamed
        for _ in range(5):
            yield b"x" * (MAX_BODY // 2)

    response = http.post("/classify_base64", content=chunks(), headers={"content-type": "application/json"})
    _error(response, 413, "payload_too_large")


def test_wrong_content_types_and_malformed_json(http: httpx.Client) -> None:
    _error(http.post("/classify", json={"images": []}), 415, "unsupported_media_type")
    _error(http.post("/classify_base64", content=b"images=1", headers={"content-type": "text/plain"}), 415)
    _error(http.post("/register", content=b"{}", headers={**AUTH, "content-type": "application/xml"}), 415)
    _error(
        http.post("/classify_base64", content=b'{"images": [', headers={"content-type": "application/json"}),
        400,
    )
    _error(http.post("/classify_base64", json={"images": "not-a-list"}), 400)
    _error(http.post("/classify_base64", json={"images": ["@@@"]}), 400, "invalid_image")
    _error(http.post("/classify_base64", json={}), 400)
    _error(http.post("/classify", files=[("other", ("a.png", png_bytes(), "image/png"))]), 400)
    _error(
        http.post("/register", content=b"[1, 2", headers={**AUTH, "content-type": "application/json"}), 400
    )


def test_file_fields_never_fetch_urls(http: httpx.Client) -> None:
    response = http.post(
        "/classify", files=[("x", ("", b"", "text/plain"))], data={"images": "http://example.com/a.png"}
    )
    _error(response, 400)


def test_parameter_limits(http: httpx.Client) -> None:
    _error(_classify(http, *[png_bytes()] * (MAX_IMAGES + 1)), 413, "too_many_images")
    _error(_classify(http, png_bytes(), top_k=0), 400, "invalid_top_k")
    _error(_classify(http, png_bytes(), tau=-1), 400, "invalid_tau")
    _error(_classify(http, png_bytes(), candidates=[]), 400, "invalid_candidates")
    _error(_classify(http, png_bytes(), candidates=["red", "no-such-class"]), 404, "unknown_class")
    _error(_classify(http, png_bytes(), candidates=[""]), 400, "invalid_name")
    _error(http.post("/classify_base64", json={"images": []}), 400, "no_images")


def test_bad_names(http: httpx.Client) -> None:
    _error(http.post("/register", json={"names": []}, headers=AUTH), 400, "no_names")
    _error(http.post("/register", json={"names": ["  "]}, headers=AUTH), 400, "invalid_name")
    _error(http.post("/register", json={"names": ["x" * 65]}, headers=AUTH), 400, "name_too_long")
    _error(http.post("/register", json={"names": ["bell\x07"]}, headers=AUTH), 400, "invalid_name")
    _error(http.post("/register", json={"names": [f"n{i}" for i in range(MAX_NAMES + 1)]}, headers=AUTH), 413)
    _error(http.post("/register", json={"names": ["a"], "templates": ["no slot"]}, headers=AUTH), 400)
    _error(http.post("/register", json={"names": [1, 2]}, headers=AUTH), 400)
    _error(http.post("/unregister", json={"name": ""}, headers=AUTH), 400, "invalid_name")


def test_unknown_routes_and_methods(http: httpx.Client) -> None:
    _error(http.get("/nope"), 404)
    _error(http.get("/classify"), 405)
    _error(http.post("/encode_images", json={"pixels": []}), 404)  # no internal route any more


def test_deeply_nested_form_field_is_a_400(http: httpx.Client) -> None:
    for depth in (40, 5000):
        response = _classify(http, png_bytes(), candidates="[" * depth + "]" * depth)
        body = _error(response, 400, "bad_request")
        assert response.headers["content-type"] == "application/json", body
    _error(_classify(http, png_bytes(), candidates="[" * 100_000), 400, "bad_request")


def test_trailing_slash_is_a_404_in_the_schema(http: httpx.Client) -> None:
    for path in ("/classify/", "/register/", "/classes/"):
        response = http.post(path, json={})
        _error(response, 404, "not_found")
        assert response.headers["content-type"] == "application/json"


def test_ten_thousand_image_parts_answer_413(http: httpx.Client) -> None:
    one = (
        b'--bnd\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + png_bytes(size=(4, 4)) + b"\r\n"
    )
    body = one * 10_000 + b"--bnd--\r\n"
    assert len(body) < MAX_BODY
    response = http.post(
        "/classify", content=body, headers={"content-type": "multipart/form-data; boundary=bnd"}
    )
    _error(response, 413, "too_many_images")
    assert response.headers["content-type"] == "application/json"


def test_body_shorter_than_content_length_answers_408(server: Server) -> None:
    import socket
    import time

    request = (
        b"POST /classify_base64 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n" + b'{"images": ["'
    )
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(request)  # 13 of the 1000 bytes promised, then silence
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    elapsed = time.monotonic() - started
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"content-type: application/json" in head.lower()
    assert json.loads(payload)["error"] == "request_timeout"
    assert elapsed < 10  # the body timeout (1 s here), not the 30 s request deadline


def test_malformed_http_is_answered_in_the_schema(server: Server) -> None:
    import socket

    for request in (
        b"POST /classes HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n{}",
        b"POST /classes HTTP/1.1\r\nHost: x\r\nbroken header\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    ):
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(65536):  # uvicorn closes after its 400
                answer += chunk
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), answer
        assert json.loads(payload)["error"] == "bad_request"


def test_errors_are_json_whatever_the_malformed_multipart(http: httpx.Client) -> None:
    bodies = [
        (b"garbage", "multipart/form-data; boundary=xx"),
        (
            b"--xx\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--xx--\r\n",
            "multipart/form-data; boundary=xx",
        ),
        (b"--xx\r\n\r\n", "multipart/form-data"),
        (
            b'--xx\r\nContent-Disposition: form-data; name="images"\r\n\r\nabc\r\n--xx--\r\n',
            "multipart/form-data; boundary=xx",
        ),
        (
            b'--xx\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n\xff\xfe\r\n--xx--\r\n',
            "multipart/form-data; boundary=xx",
        ),
        (b"--xx--\r\n", "multipart/form-data; boundary=xx"),
    ]
    for content, media in bodies:
        response = http.post("/classify", content=content, headers={"content-type": media})
        assert 400 <= response.status_code < 500, (content, response.text)
        assert response.headers["content-type"] == "application/json", (content, response.headers)
        _error(response, response.status_code)


def test_metrics_pass_promtool(http: httpx.Client) -> None:
    _classify(http, png_bytes(RED), png_bytes(BLUE))  # make sure every family has samples
    text = http.get("/metrics").text
    for name in (
        "flatprompt_requests_total",
        "flatprompt_limit_violations_total",
        "flatprompt_model_latency_seconds_bucket",
        "flatprompt_batch_size_bucket",
        "flatprompt_image_bytes_bucket",
        "flatprompt_registered_classes",
        "flatprompt_model_info",
        "flatprompt_queue_wait_seconds_bucket",
        "flatprompt_queue_depth",
        "bentoml_service_request_total",
    ):
        assert name in text, name
    assert 'outcome="too_large"' in text and 'limit="image_pixels"' in text
    assert 'provider="CPUExecutionProvider"' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool not found: run scripts/test.sh as root (it installs it), or apt-get install prometheus"
        )
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert not result.stdout.strip() and not result.stderr.strip(), (result.stdout + result.stderr).decode()


def test_still_serving_after_abuse(http: httpx.Client) -> None:
    assert http.get("/readyz").status_code == 200
    response = _classify(http, png_bytes(GREEN), top_k=1)
    assert response.status_code == 200 and response.json()["results"][0]["labels"][0]["name"] == "green"
