"""Unit tests of the serving building blocks (no server process, no bundle runtime)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from serving.config import ConfigError, Limits, ServeConfig, ServiceSettings
from serving.errors import ServeError, is_error_body, message_from_foreign_body
from serving.images import configure_pil, decode_base64, decode_image
from serving.limits import GuardMiddleware, PartCounter, multipart_boundary
from serving.names import clean_name, clean_template, name_key
from serving.registry import (
    CREATED,
    NEEDS_EMBEDDING,
    UNCHANGED,
    UPDATED,
    NewClass,
    Registry,
    RegistryFullError,
)
from serving.scoring import ClassIndex
from tests.serving_fixtures import png_bomb, png_bytes

# -- config ------------------------------------------------------------------------------------


def test_config_defaults_are_safe() -> None:
    cfg = ServeConfig.from_env({})
    assert cfg.token is None and not cfg.mutations_enabled
    assert cfg.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert cfg.limits == Limits() and cfg.service == ServiceSettings()
    assert cfg.registry_url.startswith("sqlite:///")


def test_config_reads_env_and_rejects_garbage() -> None:
    cfg = ServeConfig.from_env(
        {
            "FLATPROMPT_TOKEN": "s3cret",
            "FLATPROMPT_MAX_BODY_BYTES": "1024",
            "FLATPROMPT_MAX_TAU": "2.5",
            "FLATPROMPT_WORKERS": "2",
            "FLATPROMPT_PROVIDERS": "CPUExecutionProvider",
        }
    )
    assert cfg.mutations_enabled and cfg.limits.max_body_bytes == 1024 and cfg.limits.max_tau == 2.5
    assert cfg.service.workers == 2 and cfg.providers == ("CPUExecutionProvider",)
    with pytest.raises(ConfigError):
        ServeConfig.from_env({"FLATPROMPT_MAX_BODY_BYTES": "lots"})
    with pytest.raises(ConfigError):
        ServeConfig.from_env({"FLATPROMPT_MAX_IMAGES_PER_REQUEST": "0"})
    with pytest.raises(ConfigError):
        ServeConfig.from_env({"FLATPROMPT_PROVIDERS": " , "})


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  snow   leopard ", "snow leopard"),
        ("Cafe\u0301", "Café"),  # NFC
        ("🦒", "🦒"),
        ("👩\u200d🚀 astronaut", "👩\u200d🚀 astronaut"),  # ZWJ sequence kept
        ("東京タワー", "東京タワー"),
    ],
)
def test_clean_name_normalises(raw: str, expected: str) -> None:
    assert clean_name(raw, 128) == expected


@pytest.mark.parametrize(
    "raw", ["", "   ", "a\x00b", "tab\x07", "x" * 129, 42, "\ud800", "abc\u202edcba", "\u2067x"]
)
def test_clean_name_refuses(raw: Any) -> None:
    with pytest.raises(ServeError) as err:
        clean_name(raw, 128)
    assert err.value.status == 400


def test_name_key_ignores_case() -> None:
    assert name_key(clean_name("Snow  Leopard", 64)) == name_key("snow leopard")


def test_templates_need_one_placeholder() -> None:
    assert clean_template(" a photo of a {}. ", 200) == "a photo of a {}."
    for bad in ["no placeholder", "{} and {}", "{0}", "a {}" + "x" * 300]:
        with pytest.raises(ServeError):
            clean_template(bad, 200)


# -- images ------------------------------------------------------------------------------------


def _error(fn: Any, *args: Any) -> ServeError:
    with pytest.raises(ServeError) as err:
        fn(*args)
    return err.value


def test_decode_image_formats_and_modes() -> None:
    configure_pil(50_000_000)
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF"):
        image = decode_image(png_bytes(fmt=fmt), 0, 10_000)
        assert image.mode == "RGB" and image.size == (48, 40)
    buf = io.BytesIO()
    Image.new("RGBA", (5, 5), (1, 2, 3, 0)).save(buf, format="PNG")
    assert decode_image(buf.getvalue(), 0, 100).mode == "RGB"
    buf = io.BytesIO()
    Image.new("P", (5, 5)).save(buf, format="PNG")
    assert decode_image(buf.getvalue(), 0, 100).mode == "RGB"


def test_decode_image_refuses_bad_input() -> None:
    good = png_bytes()
    jpeg = png_bytes(fmt="JPEG", size=(200, 200))
    cases = {
        "empty": b"",
        "text": b"hello, I am not an image",
        "truncated png": good[: len(good) // 2],
        "truncated jpeg": jpeg[: len(jpeg) // 2],
        "corrupt png": good[:40] + b"\x00" * 50 + good[90:],
        "pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    }
    for what, data in cases.items():
        err = _error(decode_image, data, 3, 10_000_000)
        assert err.status == 400 and err.code == "invalid_image", what
        assert "image 3" in err.message


def test_decode_image_refuses_tiff_outside_allow_list() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="TIFF")
    assert _error(decode_image, buf.getvalue(), 0, 1000).code == "invalid_image"


def test_png_bomb_refused_from_header_without_decoding() -> None:
    configure_pil(50_000_000)
    bomb = png_bomb()
    assert len(bomb) < 1_000_000
    started = time.perf_counter()
    err = _error(decode_image, bomb, 0, 50_000_000)
    assert err.status == 413 and err.code == "image_too_large" and err.limit == "image_pixels"
    assert "30000x30000" in err.message or "pixels" in err.message
    assert time.perf_counter() - started < 1.0  # nothing was decompressed


def test_pixel_limit_is_checked_before_decoding() -> None:
    err = _error(decode_image, png_bytes(size=(100, 100)), 0, 9_999)
    assert err.code == "image_too_large"


def test_decode_base64() -> None:
    data = png_bytes()
    text = base64.b64encode(data).decode()
    assert decode_base64(text, 0, 1 << 20) == data
    assert decode_base64("data:image/png;base64," + text, 0, 1 << 20) == data
    assert _error(decode_base64, "not base64!!", 0, 1 << 20).code == "invalid_image"
    assert _error(decode_base64, "", 0, 1 << 20).code == "invalid_image"
    assert _error(decode_base64, "A" * 4000, 0, 100).status == 413


# -- scoring -----------------------------------------------------------------------------------


def _index(registered: int = 0) -> ClassIndex:
    emb = np.eye(4, dtype=np.float32)
    reg = [(f"novel{i}", np.eye(4, dtype=np.float32)[i % 4]) for i in range(registered)]
    return ClassIndex.build(["a", "b", "Crane", "crane"], [1000, 10, 0, 5], emb, reg, version=3)


def test_classify_probabilities_and_kinds() -> None:
    index = _index(registered=1)
    image = np.asarray([[0.9, 0.1, 0.0, 0.0]], np.float32)
    (labels,) = index.classify(image, logit_scale=10.0, logit_bias=None, top_k=3)
    assert [lab["name"] for lab in labels][:2] in (["a", "novel0"], ["novel0", "a"])
    assert {lab["kind"] for lab in labels} >= {"trained", "registered"}
    full = index.classify(image, logit_scale=10.0, logit_bias=None, top_k=100)[0]
    assert len(full) == 5 and abs(sum(float(lab["probability"]) for lab in full) - 1) < 1e-5  # type: ignore[arg-type]


def test_logit_adjustment_moves_mass_to_the_tail() -> None:
    index = _index()
    image = np.asarray([[0.5, 0.5, 0.0, 0.0]], np.float32) / np.sqrt(0.5)
    plain = index.classify(image, logit_scale=10.0, logit_bias=None, top_k=4)[0]
    adjusted = index.classify(image, logit_scale=10.0, logit_bias=None, top_k=4, tau=1.0)[0]
    assert plain[0]["name"] in ("a", "b")
    assert adjusted[0]["name"] == "b"  # count 10 beats count 1000 once priors are removed
    # zero counts are clamped: finite probabilities
    assert all(np.isfinite(float(lab["probability"])) for lab in adjusted)  # type: ignore[arg-type]


def test_registered_classes_get_the_mean_prior() -> None:
    index = _index(registered=1)
    assert index.log_prior[-1] == pytest.approx(np.log(1 / 4))


def test_candidates_subset_and_unknown_names() -> None:
    index = _index(registered=2)
    rows = index.resolve(["B", "crane", "novel1", "b"])
    assert [index.names[r] for r in rows] == [
        "b",
        "Crane",
        "crane",
        "novel1",
    ]  # duplicate trained names both kept
    image = np.asarray([[1.0, 0, 0, 0]], np.float32)
    labels = index.classify(image, logit_scale=10.0, logit_bias=0.5, top_k=10, rows=rows)[0]
    assert {lab["name"] for lab in labels} == {"b", "Crane", "crane", "novel1"}
    with pytest.raises(ServeError) as err:
        index.resolve(["a", "zebra", "okapi"])
    assert err.value.status == 404 and "zebra" in err.value.message and "okapi" in err.value.message


# -- registry ----------------------------------------------------------------------------------


def _vec(seed: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _exercise_registry(reg: Registry) -> None:
    assert reg.version() == 0 and reg.snapshot().classes == ()
    rows = [NewClass("okapi", "Okapi", (), _vec(1)), NewClass("🦒", "🦒", ("a photo of a {}.",), _vec(2))]
    assert reg.upsert(rows, "h1", max_total=10) == [CREATED, CREATED]
    assert reg.version() == 1
    assert reg.upsert(rows, "h1", max_total=10) == [UNCHANGED, UNCHANGED]
    assert reg.version() == 1  # nothing written, version unchanged
    assert reg.upsert([NewClass("okapi", "Okapi", (), None)], "h1", 10) == [UNCHANGED]
    assert reg.upsert([NewClass("zebra", "zebra", (), None)], "h1", 10) == [NEEDS_EMBEDDING]
    assert reg.upsert([NewClass("okapi", "Okapi", ("{} animal",), _vec(3))], "h1", 10) == [UPDATED]
    snap = reg.snapshot()
    assert snap.version == 2 and [c.name for c in snap.classes] == ["Okapi", "🦒"]
    assert snap.classes[0].templates == ("{} animal",)
    np.testing.assert_array_equal(snap.classes[0].embedding, _vec(3))
    with pytest.raises(RegistryFullError):
        reg.upsert([NewClass(f"n{i}", f"n{i}", (), _vec(i)) for i in range(9)], "h1", max_total=10)
    assert reg.count() == 2 and reg.version() == 2  # the refused registration wrote nothing
    assert reg.delete("okapi") and not reg.delete("okapi")
    assert reg.version() == 3 and reg.count() == 1
    # another bundle: rows of h1 get re-embedded once, then nothing is stale
    calls: list[int] = []

    def embed(items: Any) -> np.ndarray:
        calls.append(len(items))
        return np.stack([_vec(99, 4) for _ in items])

    assert reg.reembed_stale("h2", 4, embed) == 1
    assert reg.reembed_stale("h2", 4, embed) == 0
    assert calls == [1]
    snap = reg.snapshot()
    assert snap.classes[0].bundle_hash == "h2" and snap.classes[0].embedding.shape == (4,)


def test_sqlite_registry(tmp_path: Path) -> None:
    reg = Registry.open(f"sqlite:///{tmp_path}/reg.db")
    try:
        _exercise_registry(reg)
    finally:
        reg.close()
    # reopened: persisted
    reg = Registry.open(f"sqlite:///{tmp_path}/reg.db")
    assert reg.count() == 1 and reg.version() == 4
    reg.close()


def test_postgres_registry(postgres: Any) -> None:
    import psycopg

    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE unit_registry")
    url = postgres.url.rsplit("/", 1)[0] + "/unit_registry"
    reg = Registry.open(url)
    try:
        _exercise_registry(reg)
        assert "@" not in reg.describe()
    finally:
        reg.close()


def test_unsupported_registry_url() -> None:
    with pytest.raises(ValueError):
        Registry.open("mysql://localhost/db")


_KILL_MID_REGISTRATION = """
import os, signal, sys
import numpy as np
from serving.registry import NewClass, Registry
reg = Registry.open(sys.argv[1])
def die(cur):
    cur.execute("SELECT 1")  # rows are inserted, the version bump and COMMIT never happen
    os.kill(os.getpid(), signal.SIGKILL)
reg._bump_version = die
rows = [NewClass(f"n{i}", f"n{i}", (), np.ones(8, np.float32) / np.sqrt(8)) for i in range(50)]
reg.upsert(rows, "h", 1000)
"""


def _kill_mid_registration(url: str) -> None:
    reg = Registry.open(url)
    reg.upsert([NewClass("before", "before", (), _vec(0))], "h", 1000)
    reg.close()
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_MID_REGISTRATION, url], capture_output=True, timeout=60
    )
    assert proc.returncode == -9, proc.stderr.decode()
    reg = Registry.open(url)
    try:
        snap = reg.snapshot()
        assert [c.key for c in snap.classes] == ["before"] and snap.version == 1
        assert reg.upsert([NewClass("after", "after", (), _vec(1))], "h", 1000) == [CREATED]
    finally:
        reg.close()


def test_sqlite_killed_mid_registration_leaves_registry_consistent(tmp_path: Path) -> None:
    _kill_mid_registration(f"sqlite:///{tmp_path}/kill.db")


def test_postgres_killed_mid_registration_leaves_registry_consistent(postgres: Any) -> None:
    import psycopg

    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE kill_test")
    _kill_mid_registration(postgres.url.rsplit("/", 1)[0] + "/kill_test")


# -- error bodies ------------------------------------------------------------------------------


def test_foreign_error_bodies_are_summarised() -> None:
    pydantic_body = json.dumps(
        {
            "error": "1 validation error",
            "detail": [{"loc": ["top_k"], "msg": "Input should be an integer", "input": "x"}],
        }
    ).encode()
    assert (
        message_from_foreign_body(pydantic_body, 400) == "invalid request: top_k: Input should be an integer"
    )
    assert message_from_foreign_body(b'[{"error": "boom"}]', 400) == "boom"
    assert message_from_foreign_body(b"Not Found", 404) == "Not Found"
    assert is_error_body(b'{"error": "x", "message": "y"}') and not is_error_body(b'{"error": "x"}')


# -- the ASGI guard ----------------------------------------------------------------------------


def _guard(app: Any, **overrides: Any) -> GuardMiddleware:
    env = {"FLATPROMPT_TOKEN": "tok", "FLATPROMPT_MAX_BODY_BYTES": "100", **overrides}
    return GuardMiddleware(app, config=ServeConfig.from_env(env))


async def _echo_app(scope: Any, receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(5)
    if scope["path"] == "/foreign":
        await send(
            {"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"Bad thing"})
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": json.dumps({"len": len(body)}).encode()})


def _call(
    guard: GuardMiddleware,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    chunks: int = 1,
    disconnect_after_s: float | None = None,
    complete: bool = True,
    unread: list[int] | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Drive the guard like uvicorn: after the body, ``receive`` blocks until the client disconnects.

    ``complete=False``: the last chunk says more is coming and never does (a stalled client).
    ``unread``: gets the number of body chunks the guard (and the app) left unread.
    """
    hdrs = {"content-type": "application/json", **(headers or {})}
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(k.encode(), v.encode()) for k, v in hdrs.items()],
    }
    size = max(1, len(body) // chunks)
    parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    messages = [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1 or not complete}
        for i, p in enumerate(parts)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        if disconnect_after_s is None:
            await asyncio.Event().wait()  # a client that stays connected
        await asyncio.sleep(disconnect_after_s or 0.0)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    if unread is not None:
        unread.append(len(messages))
    if not sent:
        return 0, {}, {}
    start = sent[0]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    response_headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], json.loads(payload), response_headers


def test_guard_body_limit_by_header_and_by_stream() -> None:
    guard = _guard(_echo_app)
    assert _call(guard, "/classes", b"x" * 100, {"content-length": "100"})[0] == 200
    status, body, _ = _call(guard, "/classes", b"x" * 101, {"content-length": "101"})
    assert status == 413 and body["error"] == "payload_too_large"
    status, body, _ = _call(guard, "/classes", b"x" * 500, chunks=10)  # chunked: no Content-Length
    assert status == 413 and body["error"] == "payload_too_large"
    assert _call(guard, "/classes", b"", {"content-length": "abc"})[0] == 400


def test_guard_auth() -> None:
    guard = _guard(_echo_app)
    status, body, headers = _call(guard, "/register", b"{}")
    assert (
        status == 401 and body["error"] == "unauthorized" and headers["www-authenticate"].startswith("Bearer")
    )
    assert _call(guard, "/register", b"{}", {"authorization": "Bearer nope"})[0] == 401
    assert _call(guard, "/register", b"{}", {"authorization": "Basic tok"})[0] == 401
    assert _call(guard, "/unregister", b"{}", {"authorization": "Bearer tok"})[0] == 200
    open_guard = GuardMiddleware(_echo_app, config=ServeConfig.from_env({}))
    status, body, _ = _call(open_guard, "/register", b"{}", {"authorization": "Bearer anything"})
    assert status == 403 and body["error"] == "mutations_disabled" and "FLATPROMPT_TOKEN" in body["message"]


def test_guard_media_types() -> None:
    guard = _guard(_echo_app)
    status, body, _ = _call(guard, "/classify", b"{}")
    assert status == 415 and "classify_base64" in body["message"]
    assert _call(guard, "/classes", b"{}", {"content-type": "text/plain"})[0] == 415
    assert _call(guard, "/classify", b"", {"content-type": "multipart/form-data; boundary=x"})[0] == 200


def test_guard_cancels_the_app_when_the_client_disconnects() -> None:
    events: list[str] = []

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        events.append("finished")

    guard = _guard(slow_app, FLATPROMPT_REQUEST_TIMEOUT_S="10")
    started = time.perf_counter()
    status, _, _ = _call(guard, "/classes", b"{}", disconnect_after_s=0.05)
    assert status == 0 and events == ["cancelled"]  # nothing sent to a gone client, app stopped
    assert time.perf_counter() - started < 2
    # a client that stays connected gets its answer (the watcher does not cancel finished work)
    assert _call(_guard(_echo_app), "/classes", b"{}", disconnect_after_s=None)[0] == 200


def test_guard_rewrites_foreign_errors_and_times_out() -> None:
    guard = _guard(_echo_app, FLATPROMPT_REQUEST_TIMEOUT_S="0.2")
    status, body, _ = _call(guard, "/foreign")
    assert status == 400 and body == {"error": "bad_request", "message": "Bad thing"}
    status, body, _ = _call(guard, "/slow")
    assert status == 504 and body["error"] == "timeout"


def test_guard_stalled_body_answers_408_before_the_deadline() -> None:
    guard = _guard(_echo_app, FLATPROMPT_BODY_TIMEOUT_S="0.2", FLATPROMPT_REQUEST_TIMEOUT_S="30")
    started = time.perf_counter()
    # Content-Length promises 50 bytes, 10 arrive, then nothing
    status, body, headers = _call(guard, "/classes", b"x" * 10, {"content-length": "50"}, complete=False)
    assert status == 408 and body["error"] == "request_timeout" and "10 bytes" in body["message"]
    assert headers["content-type"] == "application/json"
    assert time.perf_counter() - started < 2 and guard.in_flight == 0  # the slot is free again
    # a body that keeps coming (chunks within the timeout) is not cut
    assert _call(guard, "/classes", b"x" * 50, chunks=5)[0] == 200


def _multipart(parts: int, boundary: str = "b0undary") -> tuple[bytes, dict[str, str]]:
    one = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + b"\x89PNG" * 8
        + b"\r\n"
    )
    body = one * parts + f"--{boundary}--\r\n".encode()
    return body, {"content-type": f'multipart/form-data; boundary="{boundary}"'}


def test_guard_counts_multipart_parts_while_streaming() -> None:
    guard = _guard(_echo_app, FLATPROMPT_MAX_BODY_BYTES="50000000", FLATPROMPT_MAX_IMAGES_PER_REQUEST="4")
    body, headers = _multipart(10_000)
    unread: list[int] = []
    status, answer, response_headers = _call(guard, "/classify", body, headers, chunks=1000, unread=unread)
    assert status == 413 and answer["error"] == "too_many_images" and "4 images" in answer["message"]
    assert response_headers["content-type"] == "application/json"
    assert unread == [0]  # the rest was read and discarded: the client gets the answer, not a reset
    # parts may straddle chunk boundaries: at the limit (4 images + the form fields) the body passes
    body, headers = _multipart(4 + 8)
    assert _call(guard, "/classify", body, headers, chunks=97)[0] == 200
    body, headers = _multipart(4 + 9)
    assert _call(guard, "/classify", body, headers, chunks=97)[0] == 413


def test_part_counter_across_chunks() -> None:
    body, _ = _multipart(37, "xyz")
    for size in (1, 2, 5, 7, 64, len(body)):
        counter = PartCounter(b"xyz")
        for i in range(0, len(body), size):
            counter.feed(body[i : i + size])
        assert counter.parts == 38  # 37 parts + the closing delimiter
    assert multipart_boundary('multipart/form-data; charset=x; boundary="a b"') == b"a b"
    assert multipart_boundary("multipart/form-data") is None


def test_guard_trailing_slash_and_error_media_type() -> None:
    async def schema_as_text(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"error": "x", "message": "y"}'})

    guard = _guard(_echo_app)
    for path in ("/classify/", "/register/", "/readyz/", "/classes//"):
        status, body, headers = _call(guard, path, b"{}")
        assert status == 404 and body["error"] == "not_found" and "trailing slash" in body["message"]
        assert headers["content-type"] == "application/json"
    status, body, headers = _call(_guard(schema_as_text), "/classes", b"{}")
    assert status == 400 and body == {"error": "x", "message": "y"}
    assert headers["content-type"] == "application/json"


def test_guard_adds_retry_after_to_every_503() -> None:
    async def unavailable(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        extra = [(b"retry-after", b"7")] if scope["path"] == "/register" else []
        start = {"type": "http.response.start", "status": 503, "headers": extra}
        await send(start)
        await send(
            {"type": "http.response.body", "body": b'{"error": "registry_unavailable", "message": "m"}'}
        )

    guard = _guard(unavailable)
    assert _call(guard, "/classes", b"{}")[2]["retry-after"] == "2"
    assert _call(guard, "/register", b"{}", {"authorization": "Bearer tok"})[2]["retry-after"] == "7"


def test_guard_admission_control() -> None:
    guard = _guard(_echo_app, FLATPROMPT_MAX_IN_FLIGHT="1")
    guard.in_flight = 1  # one request already running in this worker
    status, body, headers = _call(guard, "/classes", b"{}")
    assert status == 429 and body["error"] == "overloaded" and headers["retry-after"] == "1"
    assert _call(guard, "/readyz")[0] == 200  # probes are never refused


# -- the import rule ---------------------------------------------------------------------------

FORBIDDEN = {"torch", "open_clip", "torchvision", "trainer", "export"}


def test_serving_never_imports_torch_or_training_code() -> None:
    import ast

    root = Path(__file__).resolve().parents[1] / "serving"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in FORBIDDEN, f"{path}: imports {module}"
    code = (
        "import sys, serving.service; bad = {m.split('.')[0] for m in sys.modules} & %r; print(sorted(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code % FORBIDDEN], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
