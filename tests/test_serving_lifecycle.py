"""Serving lifecycle against real servers: model-store loading, restarts, bundle changes, two services on
one PostgreSQL, mutations refused without a token, SIGTERM draining an in-flight request, a bundle
written by ``python -m export``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.contract import checked
from tests.serving_fixtures import (
    REPO,
    Postgres,
    Server,
    make_bundle,
    png_bytes,
    running_server,
    start_server,
)

pytestmark = pytest.mark.server

TOKEN = "lifecycle-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RED = (220, 20, 20)


def _register(url: str, names: list[str], token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return checked(httpx.post(url + "/register", json={"names": names}, headers=headers, timeout=60))


def _classify(url: str, candidates: list[str] | None = None) -> httpx.Response:
    data = {"candidates": json.dumps(candidates)} if candidates is not None else {}
    files = [("images", ("red.png", png_bytes(RED), "image/png"))]
    return checked(httpx.post(url + "/classify", files=files, data=data, timeout=60))


def _registered(url: str) -> set[str]:
    body = checked(httpx.post(url + "/classes", json={"kind": "registered"}, timeout=60)).json()
    return {c["name"] for c in body["registered"]}


def test_model_store_restart_and_bundle_change(tmp_path: Path) -> None:
    home = tmp_path / "bentoml"
    bundle_a = make_bundle(tmp_path / "bundle-a", seed=0)
    bundle_b = make_bundle(tmp_path / "bundle-b", seed=1)
    imported = subprocess.run(
        [sys.executable, "-m", "serving.model_store", str(bundle_a)],
        env={**os.environ, "BENTOML_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("flatprompt:")
    db = tmp_path / "registry.db"
    env = {
        "BENTOML_HOME": str(home),
        "FLATPROMPT_MODEL_TAG": "flatprompt:latest",
        "FLATPROMPT_REGISTRY_URL": f"sqlite:///{db}",
        "FLATPROMPT_TOKEN": TOKEN,
    }
    names = ["okapi", "🦒 giraffe"]
    with running_server(tmp_path / "run1", env) as server:  # bundle A from the model store
        assert _register(server.url, names).status_code == 200
        assert _classify(server.url, ["okapi"]).json()["results"][0]["labels"][0]["name"] == "okapi"
    with running_server(tmp_path / "run2", env) as server:  # restart: same bundle, same registry
        assert set(names) <= _registered(server.url)
        assert _classify(server.url, names).status_code == 200
    hash_b = hashlib.sha256((bundle_b / "manifest.json").read_bytes()).hexdigest()
    with running_server(tmp_path / "run3", {**env, "FLATPROMPT_BUNDLE": str(bundle_b)}) as server:
        assert set(names) <= _registered(server.url)
        response = _classify(server.url, names)
        assert response.status_code == 200
        assert response.json()["bundle"] == hash_b[:16]
    with sqlite3.connect(db) as conn:
        hashes = {row[0] for row in conn.execute("SELECT bundle_hash FROM flatprompt_classes")}
    assert hashes == {hash_b}  # re-embedded with the new bundle at start


# -- two services on one PostgreSQL ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_services(
    postgres: Postgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    root = tmp_path_factory.mktemp("pg-services")
    bundle = make_bundle(root / "bundle")
    common = {"FLATPROMPT_BUNDLE": str(bundle), "FLATPROMPT_REGISTRY_URL": postgres.url}
    a = start_server(root / "a", {**common, "FLATPROMPT_TOKEN": TOKEN})
    try:
        b = start_server(root / "b", common)  # no token: read-only replica
    except BaseException:
        a.stop()
        raise
    yield a, b
    b.stop()
    a.stop()


def test_two_services_share_one_postgres(pg_services: tuple[Server, Server]) -> None:
    a, b = pg_services
    for i in range(5):
        name = f"pg-class-{i}-{uuid.uuid4().hex[:6]}"
        assert _register(a.url, [name]).status_code == 200
        response = _classify(b.url, [name])  # the other service, right after the response
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["labels"][0]["name"] == name
    deleted = checked(httpx.post(a.url + "/unregister", json={"name": name}, headers=AUTH, timeout=60))
    assert deleted.status_code == 200
    gone = _classify(a.url, [name])  # the service that deleted it: at once
    assert gone.status_code == 404 and gone.json()["error"] == "unknown_class"
    # the other one within a poll interval of its registry watcher (FLATPROMPT_REGISTRY_POLL_S, 0.5 s)
    started = time.monotonic()
    while (gone := _classify(b.url, [name])).status_code == 200 and time.monotonic() - started < 5:
        time.sleep(0.05)
    assert gone.status_code == 404 and gone.json()["error"] == "unknown_class"
    assert time.monotonic() - started < 1.5


def test_mutations_refused_without_a_token(pg_services: tuple[Server, Server]) -> None:
    _, b = pg_services
    for token in (None, TOKEN, "anything"):
        response = _register(b.url, ["should-not-exist"], token=token)
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "mutations_disabled"
    response = checked(httpx.post(b.url + "/unregister", json={"name": "x"}, headers=AUTH, timeout=60))
    assert response.status_code == 403
    assert "should-not-exist" not in _registered(b.url)


def test_sigterm_drains_an_in_flight_request(pg_services: tuple[Server, Server]) -> None:
    """Send half a request, SIGTERM the server, send the rest: the answer is still a 200."""
    _, b = pg_services  # last test of the module: this stops service b
    image = png_bytes(RED)
    boundary = "flatpromptboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="red.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", b.port), timeout=60) as sock:
        sock.sendall(head + body[:100])
        time.sleep(0.5)  # the request is being read by a worker
        b.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert b.proc.poll() is None  # still draining
        sock.sendall(body[100:])
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    status_line, _, rest = response.partition(b"\r\n")
    assert b" 200 " in status_line, response[:500]
    payload = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert payload["results"][0]["labels"][0]["name"] == "red"
    assert b.proc.wait(timeout=60) is not None  # then it exits
    with pytest.raises(httpx.HTTPError):
        httpx.get(b.url + "/livez", timeout=2)


# -- a bundle written by the real exporter ------------------------------------------------------


@pytest.mark.slow
def test_real_exporter_bundle(tmp_path: Path) -> None:
    """A bundle from ``python -m export --toy`` (the committed toy CLIP, zero-shot) served end to end."""
    out = tmp_path / "exported"
    args = ["--toy"]
    export = subprocess.run(
        [sys.executable, "-m", "export", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert export.returncode == 0, export.stderr[-2000:]
    classes: Any = json.loads((out / "classes.json").read_text())["names"]
    env = {
        "FLATPROMPT_BUNDLE": str(out),
        "FLATPROMPT_REGISTRY_URL": f"sqlite:///{tmp_path}/exported.db",
        "FLATPROMPT_TOKEN": TOKEN,
    }
    with running_server(tmp_path / "run", env) as server:
        response = _classify(server.url)
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["labels"][0]["name"] in classes
        registered = httpx.post(
            server.url + "/register",
            json={"names": ["novel thing"], "templates": ["a photo of a {}.", "a picture of a {}."]},
            headers=AUTH,
            timeout=60,
        )
        assert registered.status_code == 200, registered.text
        response = _classify(server.url, ["novel thing", classes[0]])
        assert response.status_code == 200
        assert {lab["kind"] for lab in response.json()["results"][0]["labels"]} == {"registered", "trained"}
