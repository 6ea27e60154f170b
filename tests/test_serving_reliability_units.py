"""Unit tests of issue 17's pieces: deadlines and the registry watcher, the edge middleware, log
filters and rate limits, strict input models."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving import logs
from serving.edge import EdgeMiddleware, set_readiness_probe
from serving.inputs import strict_model
from serving.registry import (
    CREATED,
    NewClass,
    Registry,
    RegistryError,
    RegistryTimeout,
    RegistryWatcher,
    Snapshot,
    call_with_deadline,
)


def _vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(8).astype(np.float32)
    return v / np.linalg.norm(v)


# -- deadlines -----------------------------------------------------------------------------------
def test_call_with_deadline_returns_raises_and_times_out() -> None:
    assert call_with_deadline(lambda: 42, 1.0) == 42
    with pytest.raises(ZeroDivisionError):
        call_with_deadline(lambda: 1 / 0, 1.0)
    started = time.monotonic()
    with pytest.raises(RegistryTimeout):
        call_with_deadline(lambda: time.sleep(2), 0.2)
    assert time.monotonic() - started < 0.5


def test_a_write_abandoned_by_its_caller_never_commits(tmp_path: Path) -> None:
    reg = Registry.open(f"sqlite:///{tmp_path}/r.db")
    original = reg._bump_version

    def slow_bump(cur: Any) -> None:
        time.sleep(0.5)  # the caller's budget runs out here, before COMMIT
        original(cur)

    reg._bump_version = slow_bump  # type: ignore[method-assign]
    with pytest.raises(RegistryTimeout):
        call_with_deadline(lambda: reg.upsert([NewClass("late", "late", (), _vec(0))], "h", 100), 0.2)
    time.sleep(0.8)  # the abandoned thread reached its commit check and rolled back
    reg._bump_version = original  # type: ignore[method-assign]
    assert reg.count() == 0 and reg.version() == 0
    assert call_with_deadline(lambda: reg.upsert([NewClass("ok", "ok", (), _vec(1))], "h", 100), 2.0) == [
        CREATED
    ]
    reg.close()


def test_a_busy_connection_is_waited_for_at_most_the_budget(tmp_path: Path) -> None:
    reg = Registry.open(f"sqlite:///{tmp_path}/r.db")
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with reg._locked():
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    started = time.monotonic()
    with pytest.raises(RegistryTimeout):
        call_with_deadline(reg.version, 0.2)
    assert time.monotonic() - started < 0.5
    release.set()
    holder.join()
    assert call_with_deadline(reg.version, 1.0) == 0
    reg.close()


def test_sqlite_busy_timeout_follows_the_statement_timeout(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "r.db"
    reg = Registry.open(f"sqlite:///{path}", statement_timeout_s=0.3)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    started = time.monotonic()
    with pytest.raises(RegistryError):
        reg.upsert([NewClass("x", "x", (), _vec(0))], "h", 10)
    assert 0.2 < time.monotonic() - started < 2.0
    other.execute("ROLLBACK")
    other.close()
    reg.close()


# -- the watcher ---------------------------------------------------------------------------------
class _FakeRegistry:
    """version()/snapshot() that can be made to hang."""

    statement_timeout_s = 1.0

    def __init__(self) -> None:
        self.v = 1
        self.hang = threading.Event()
        self.thaw = threading.Event()

    def describe(self) -> str:
        return "fake://"

    def _wait(self) -> None:
        if self.hang.is_set():
            self.thaw.wait(10)

    def version(self) -> int:
        self._wait()
        return self.v

    def snapshot(self) -> Snapshot:
        self._wait()
        return Snapshot(self.v, ())

    def close(self) -> None:
        pass


def test_watcher_goes_stale_without_blocking_and_recovers() -> None:
    fake = _FakeRegistry()
    applied: list[int] = []
    states: list[Any] = []
    watcher = RegistryWatcher(
        fake,  # type: ignore[arg-type]
        lambda snap: applied.append(snap.version),
        poll_s=0.05,
        timeout_s=0.2,
        stale_after_s=0.5,
        on_state=states.append,
    )
    watcher.load()
    watcher.start()
    try:
        fake.v = 2
        assert watcher.refresh(1.0) and applied == [1, 2]
        assert watcher.state.up and not watcher.state.stale and watcher.state.version == 2
        fake.hang.set()
        time.sleep(0.8)
        state = watcher.state
        assert not state.up and state.stale and state.staleness_s > 0.5 and state.version == 2
        assert states[-1].up is False
        started = time.monotonic()
        assert watcher.refresh(1.0) is False  # known down: no wait at all
        assert time.monotonic() - started < 0.05
        fake.v = 3
        fake.hang.clear()
        fake.thaw.set()
        deadline = time.monotonic() + 2
        while not watcher.state.up and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watcher.refresh(1.0)
        assert watcher.state.up and watcher.state.version == 3 and applied[-1] == 3
        assert watcher.state.staleness_s < 0.5
    finally:
        fake.thaw.set()
        watcher.close()


# -- edge middleware ---------------------------------------------------------------------------
def _call(app: Any, path: str, method: str = "GET") -> tuple[int, bytes]:
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {"type": "http", "path": path, "method": method, "headers": [], "client": ("10.0.0.1", 1)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, body


async def _ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"\n"})


def test_edge_answers_unknown_paths_and_passes_known_ones() -> None:
    edge = EdgeMiddleware(_ok_app, routes=frozenset({"/classify"}))
    status, body = _call(edge, "/wp-admin/login.php")
    assert status == 404 and json.loads(body)["error"] == "not_found"
    assert _call(edge, "/classify", "POST") == (200, b"\n")
    assert _call(edge, "/metrics") == (200, b"\n")
    assert _call(edge, "/static_content/index.css")[0] in (200, 404)  # only if the file exists
    assert _call(edge, "/static_content/../../etc/passwd")[0] == 404
    assert not edge.is_known("/classify/") and not edge.is_known("/classifyx")


def test_edge_readyz_body() -> None:
    edge = EdgeMiddleware(_ok_app, routes=frozenset())
    set_readiness_probe(lambda: (True, "", {"registry": {"state": "stale", "up": False}}))
    try:
        status, body = _call(edge, "/readyz")
        assert status == 200 and json.loads(body) == {
            "status": "ready",
            "registry": {"state": "stale", "up": False},
        }
    finally:
        set_readiness_probe(None)
    assert _call(edge, "/readyz") == (200, b"\n")  # no probe (before the service started): untouched


# -- logs --------------------------------------------------------------------------------------
def test_rate_limiter() -> None:
    limiter = logs.RateLimiter(window_s=10, burst=2)
    assert [limiter.admit("k", now=t)[0] for t in (0, 1, 2, 3)] == [True, True, False, False]
    assert limiter.admit("other", now=3) == (True, 0)
    assert limiter.admit("k", now=11) == (True, 2)  # a new window says what was suppressed


def test_client_error_and_access_filters() -> None:
    from pydantic import BaseModel, ValidationError

    class M(BaseModel):
        x: int

    try:
        M.model_validate({"x": "no"})
    except ValidationError as exc:
        validation = exc
    record = logging.LogRecord("b", logging.ERROR, __file__, 1, "Exception on %s", ("/x",), None)
    record.exc_info = (ValidationError, validation, None)
    assert logs.ClientErrorFilter().filter(record) is False
    record.exc_info = (RuntimeError, RuntimeError("boom"), None)
    assert logs.ClientErrorFilter().filter(record) is True
    access = logs.AccessLogFilter()

    def line(status: int) -> logging.LogRecord:
        args = ("127.0.0.1:1", "scheme=http,method=POST,path=/classify", f"status={status},type=x", 1.0)
        return logging.LogRecord(
            "bentoml.access", logging.INFO, __file__, 1, "%s (%s) (%s) %.3fms", args, None
        )

    assert access.filter(line(200)) and access.filter(line(500)) and not access.filter(line(404))


def test_json_formatter_is_one_line() -> None:
    record = logging.LogRecord("serving.x", logging.WARNING, __file__, 1, "two\nlines %s", ("ü",), None)
    record.component = "[entry_service:flatprompt:1]"
    try:
        raise ValueError("inner")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    text = logs.JsonFormatter().format(record)
    assert "\n" not in text
    data = json.loads(text)
    assert data["message"] == "two\nlines ü" and data["component"] == "entry_service:flatprompt:1"
    assert data["level"] == "WARNING" and "ValueError: inner" in data["exc_info"]


def test_log_response_levels_and_limits(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="serving.requests")
    kwargs: dict[str, Any] = {"method": "POST", "path": "/x\x1b[31m", "client": "c", "seconds": 0.001}
    for _ in range(10):
        logs.log_response(endpoint="unit", status=400, code="bad_request", message="m", **kwargs)
    logs.log_response(endpoint="unit", status=401, code="unauthorized", message="m", **kwargs)
    logs.log_response(endpoint="unit", status=500, code="internal_error", message="m", **kwargs)
    records = [r for r in caplog.records if r.name == "serving.requests"]
    assert [r.levelno for r in records] == [logging.INFO] * logs.RATE_BURST + [logging.WARNING]
    assert "\x1b" not in records[0].getMessage() and "\\x1b" in records[0].getMessage()


# -- strict inputs -------------------------------------------------------------------------------
def test_strict_model() -> None:
    from pydantic import BaseModel, ValidationError

    class Options(BaseModel):
        top_k: int = 5
        tau: float = 0.0
        ratio: float | None = None
        names: list[str] = []

    strict = strict_model(Options)
    assert strict_model(Options) is strict and issubclass(strict, Options)
    assert strict.model_validate({"top_k": 3, "tau": 1, "ratio": None}).tau == 1.0
    for bad in ({"top_k": True}, {"top_k": 2.0}, {"top_k": "3"}, {"tau": True}, {"ratio": False}, {"x": 1}):
        with pytest.raises(ValidationError):
            strict.model_validate(bad)
    assert Options.model_validate({"top_k": True, "x": 1}).top_k == 1  # the original stays lax
