"""Reliability scenarios of issue 17 as plain functions over a running server (base URL, callables).

Each function measures and returns figures; it asserts nothing. ``tests/test_serving_reliability.py``
calls them against servers and a PostgreSQL it starts and checks the figures; the chaos harness
(``benchmarks/chaos.py``) can call them to print the same figures. Only ``httpx`` and the standard
library are needed; starting servers and databases is the caller's business.

* :func:`registry_freeze`: load during a frozen registry database (``freeze``/``thaw`` callables, e.g.
  :func:`sigstop_tree` on the PostgreSQL postmaster): classification statuses and p99 while frozen,
  ``/register`` statuses, latency and ``Retry-After``, ``/readyz`` and the registry gauges while
  frozen, and how long after the thaw the registry is current again;
* :func:`random_paths`: requests to random paths, and the series count of every ``/metrics`` family
  before and after;
* :func:`kill_arbiter`: ``kill -9`` of the ``bentoml serve`` process alone: the workers left, whether
  the port is free, and the time a restart on the same port takes to be ready;
* :func:`log_report`: ERROR lines, tracebacks and size of a server log (after fuzzing).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import random
import re
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from serving.launch import descendants  # one /proc walker for the launcher and the scenarios

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count", "_created", "_total")


# -- helpers -----------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def metric_series(base_url: str, timeout: float = 30.0) -> dict[str, int]:
    """Number of samples (series) per metric family on ``/metrics`` (``_bucket``/``_sum``/``_count``
    samples of a histogram count towards its family)."""
    text = httpx.get(base_url + "/metrics", timeout=timeout).text
    families: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            families[name] = name
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        sample = re.split(r"[{ ]", line, maxsplit=1)[0]
        family = sample
        for suffix in HISTOGRAM_SUFFIXES:
            if sample.endswith(suffix) and sample[: -len(suffix)] in families:
                family = sample[: -len(suffix)]
                break
        counts[family] += 1
    return dict(counts)


def metric_value(base_url: str, name: str, timeout: float = 10.0) -> float | None:
    """The value of an unlabelled sample ``name`` on ``/metrics`` (None when absent)."""
    for line in httpx.get(base_url + "/metrics", timeout=timeout).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(" ", 1)[1])
    return None


def sigstop_tree(pid: int) -> Callable[[], None]:
    """SIGSTOP ``pid`` and all its descendants (a hung host: connections are not refused, they hang);
    returns the thaw (SIGCONT to the same processes, idempotent)."""
    frozen: list[int] = []
    for target in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(target, signal.SIGSTOP)
            frozen.append(target)

    def thaw() -> None:
        for target in frozen:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(target, signal.SIGCONT)

    return thaw


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` (a bind with SO_REUSEADDR succeeds)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def readiness(base_url: str, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """``/readyz`` status and JSON body (``{}`` when not JSON or unreachable: status 0)."""
    try:
        response = httpx.get(base_url + "/readyz", timeout=timeout)
    except httpx.HTTPError:
        return 0, {}
    try:
        body = response.json()
    except ValueError:
        body = {}
    return response.status_code, body if isinstance(body, dict) else {}


# -- registry freeze ---------------------------------------------------------------------------------
def registry_freeze(
    base_url: str,
    token: str,
    freeze: Callable[[], Callable[[], None]],
    *,
    image: bytes,
    seconds: float = 30.0,
    concurrency: int = 4,
    candidates: Sequence[str] | None = None,
    current_timeout: float = 10.0,
) -> dict[str, Any]:
    """Classify and register while the registry database is frozen, then thaw it.

    ``freeze()`` freezes the database and returns the thaw. ``image``: a picture of a trained class
    (classified without candidates, or among ``candidates``: e.g. a registered class and trained ones).
    Returns the figures: ``classify`` (statuses, p50/p99/max seconds while frozen), ``register``
    (statuses, max seconds, Retry-After seen, the names it tried), ``readyz``/``gauges`` sampled while
    frozen, ``current_after_thaw_s`` (first time after the thaw that ``/readyz`` says ``current`` and a
    registration answers 200), ``all_workers_current_after_thaw_s`` (first time after the thaw that
    the gauges, aggregated over all workers, say up and fresh; ``gauges_after`` their values then) and
    ``register_after_thaw`` (its status).
    """
    auth = {"Authorization": f"Bearer {token}"}
    data = {"candidates": json.dumps(list(candidates))} if candidates else {}
    stop = threading.Event()
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def classify_loop() -> None:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    status = client.post(
                        "/classify", files=[("images", ("x.png", image, "image/png"))], data=data
                    ).status_code
                except httpx.HTTPError:
                    status = 0
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    statuses[status] += 1

    with cf.ThreadPoolExecutor(concurrency + 1) as pool:
        loops = [pool.submit(classify_loop) for _ in range(concurrency)]
        time.sleep(0.5)  # warm, before the freeze
        with lock:
            latencies.clear()
            statuses.clear()
        thaw = freeze()
        frozen_at = time.monotonic()
        register: list[dict[str, Any]] = []
        readyz: list[tuple[int, dict[str, Any]]] = []
        gauges: list[dict[str, float | None]] = []
        try:
            with httpx.Client(base_url=base_url, timeout=60) as client:
                while time.monotonic() - frozen_at < seconds:
                    name = f"frozen-{uuid.uuid4().hex[:8]}"
                    t0 = time.perf_counter()
                    response = client.post("/register", json={"names": [name]}, headers=auth)
                    register.append(
                        {
                            "name": name,
                            "status": response.status_code,
                            "seconds": time.perf_counter() - t0,
                            "retry_after": response.headers.get("retry-after"),
                            "error": _error_code(response),
                        }
                    )
                    if time.monotonic() - frozen_at > min(3.0, seconds / 2) and not readyz:
                        readyz.append(readiness(base_url))
                        gauges.append(
                            {
                                "up": metric_value(base_url, "flatprompt_registry_up"),
                                "staleness": metric_value(base_url, "flatprompt_registry_staleness_seconds"),
                            }
                        )
                    time.sleep(0.2)
                with lock:
                    during = list(latencies)
                    during_statuses = dict(statuses)
        finally:
            thaw()
        thawed_at = time.monotonic()
        current_after: float | None = None
        after_status = 0
        while time.monotonic() - thawed_at < current_timeout:
            status, body = readiness(base_url, timeout=2)
            if status == 200 and body.get("registry", {}).get("state") == "current":
                response = httpx.post(
                    base_url + "/register",
                    json={"names": [f"thawed-{uuid.uuid4().hex[:8]}"]},
                    headers=auth,
                    timeout=10,
                )
                after_status = response.status_code
                if after_status == 200:
                    current_after = time.monotonic() - thawed_at
                    break
            time.sleep(0.05)
        # /readyz and the registration above reach one worker; the gauges aggregate all of them (up:
        # min, staleness: max), so a worker whose check was waiting out its deadline at the thaw shows
        # here one poll later. Poll until every worker is current, and say how long that took.
        all_current: float | None = None
        while True:
            gauges_after = {
                "up": metric_value(base_url, "flatprompt_registry_up"),
                "staleness": metric_value(base_url, "flatprompt_registry_staleness_seconds"),
            }
            staleness = gauges_after["staleness"]
            if gauges_after["up"] == 1.0 and staleness is not None and staleness < 2.0:
                all_current = time.monotonic() - thawed_at
                break
            if time.monotonic() - thawed_at >= current_timeout:
                break
            time.sleep(0.05)
        stop.set()
        for loop in loops:
            loop.result()
    return {
        "classify": {
            "statuses": during_statuses,
            "count": len(during),
            "p50_s": percentile(during, 50),
            "p99_s": percentile(during, 99),
            "max_s": max(during) if during else float("nan"),
        },
        "register": {
            "statuses": dict(Counter(r["status"] for r in register)),
            "errors": dict(Counter(r["error"] for r in register)),
            "p50_s": percentile([r["seconds"] for r in register], 50),
            "max_s": max((r["seconds"] for r in register), default=float("nan")),
            "with_retry_after": sum(1 for r in register if r["retry_after"]),
            "names": [r["name"] for r in register],
        },
        "readyz": readyz,
        "gauges_frozen": gauges,
        "gauges_after": gauges_after,
        "current_after_thaw_s": current_after,
        "all_workers_current_after_thaw_s": all_current,
        "register_after_thaw": after_status,
    }


def _error_code(response: httpx.Response) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        code = response.json().get("error")
        return code if isinstance(code, str) else None
    return None


# -- random paths ------------------------------------------------------------------------------------
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-_.~"


def random_paths(base_url: str, count: int = 1000, seed: int = 0) -> dict[str, Any]:
    """``count`` GET/POST requests to random paths; statuses and per-family ``/metrics`` series counts.

    Returns ``statuses``, ``before``/``after`` (series per family) and ``grown`` (families whose count
    changed, with the change)."""
    rng = random.Random(seed)
    before = metric_series(base_url)
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for _ in range(count):
            depth = rng.randint(1, 3)
            path = "".join(
                "/" + "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 24))) for _ in range(depth)
            )
            method = rng.choice(["GET", "POST"])
            statuses[client.request(method, path, json={} if method == "POST" else None).status_code] += 1
    after = metric_series(base_url)
    grown = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    return {
        "statuses": dict(statuses),
        "before": before,
        "after": after,
        "grown": {k: v for k, v in grown.items() if v},
    }


# -- arbiter kill ------------------------------------------------------------------------------------
def kill_arbiter(
    arbiter_pid: int,
    port: int,
    restart: Callable[[], Any],
    *,
    base_url: str | None = None,
    gone_timeout: float = 10.0,
    ready_timeout: float = 30.0,
) -> dict[str, Any]:
    """``kill -9`` of the arbiter alone, then a restart on the same port.

    ``restart()`` starts a new server on ``port`` without waiting and returns it. Returns
    ``workers`` (pids under the arbiter before), ``left`` (still alive ``gone_s`` later), ``gone_s`` (time
    until no worker is left and the port is free; None if not within ``gone_timeout``), ``restart``
    (the new server) and ``ready_s`` (from the kill to ``/readyz`` 200 on the new server; None if not
    within ``ready_timeout``)."""
    url = base_url or f"http://127.0.0.1:{port}"
    workers = descendants(arbiter_pid)
    killed_at = time.monotonic()
    os.kill(arbiter_pid, signal.SIGKILL)
    gone_s: float | None = None
    while time.monotonic() - killed_at < gone_timeout:
        if not any(alive(p) for p in workers) and port_free(port):
            gone_s = time.monotonic() - killed_at
            break
        time.sleep(0.02)
    left = [p for p in workers if alive(p)]
    new = restart()
    ready_s: float | None = None
    while time.monotonic() - killed_at < ready_timeout:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                ready_s = time.monotonic() - killed_at
                break
        time.sleep(0.05)
    return {"workers": workers, "left": left, "gone_s": gone_s, "restart": new, "ready_s": ready_s}


# -- logs ----------------------------------------------------------------------------------------------
def log_report(text: str) -> dict[str, Any]:
    """ERROR lines, tracebacks, bytes and lines of a server log (text or JSON lines)."""
    lines = text.splitlines()
    errors = [
        line for line in lines if "[ERROR]" in line or '"level": "ERROR"' in line or '"level":"ERROR"' in line
    ]
    return {
        "bytes": len(text.encode("utf-8", "replace")),
        "lines": len(lines),
        "error_lines": len(errors),
        "tracebacks": text.count("Traceback (most recent call last)"),
        "first_errors": errors[:3],
    }
