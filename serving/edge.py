"""The outermost ASGI middleware of the worker: unknown routes answered before BentoML sees them, the
end-to-end request histogram, one log line per client error, and the readiness body.

Why outermost: BentoML's own middlewares (metrics, OpenTelemetry, access log) label by the raw URL
path. Its request metrics (``bentoml_service_request_total``, ``..._duration_seconds`` with its
buckets, ``..._in_progress``) got new series for every made-up path, so any unauthenticated client
could grow the scrape without bound. BentoML 1.4 has no setting for it (its metrics configuration
has ``namespace`` and duration buckets only; ``logging.access.skip_paths`` affects the access log and
the last-request timestamp), and middlewares added with ``add_asgi_middleware`` run *inside* those
middlewares. :func:`install_edge_middleware` therefore puts :class:`EdgeMiddleware` first in the
list BentoML builds its Starlette app from (``ServiceAppFactory.middlewares``, a private hook, patched
once; if it moved, the middleware is added the public way and a warning says the paths are not folded).

:class:`EdgeMiddleware`:

1. answers a path that is no route of the service with 404 in the error schema (``not_found``),
   counted under ``endpoint="other"``; known routes are the API routes, the probes, ``/metrics``, the
   docs page (``/``, ``/docs.json``, ``/schema.json``) and files that exist under BentoML's static
   directories. The series of ``endpoint="other"`` exist from the first request on, so random paths
   change no series count at all;
2. observes ``flatprompt_request_duration_seconds{endpoint, outcome}`` for every API request (probes
   and ``/metrics`` excluded): from arrival here to the last body byte, so BentoML's middlewares, the
   guard and the handler are all inside;
3. logs one line per 4xx and 503/504 answer through :func:`serving.logs.log_response` (rate-limited;
   the error code and message are read from the error body, which is small);
4. gives ``/readyz`` a JSON body: ``{"status": "ready", "registry": {"state": "current"|"stale",
   "up", "version", "staleness_seconds"}}``, or on 503 the error schema with the reason. A stale
   registry does not fail readiness unless ``FLATPROMPT_REGISTRY_MAX_STALENESS_S`` is set (see
   ``docs/serving.md``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.errors import error_body
from serving.limits import PASSTHROUGH_PATHS, ASGIApp, Message, Receive, Scope, Send
from serving.logs import log_response
from serving.metrics import ENDPOINTS, endpoint_label, get_metrics, outcome_for_status

_logger = logging.getLogger(__name__)

PROBE_PATHS = PASSTHROUGH_PATHS
DOCS_PATHS = frozenset({"/", "/docs.json", "/schema.json"})
DEFAULT_API_ROUTES = frozenset(f"/{name}" for name in ENDPOINTS)  # outside a worker: the metrics' route list
UNKNOWN_ENDPOINT = "other"
NOT_FOUND_MESSAGE = "no such route (the API is described at /docs.json)"
ERROR_PEEK_BYTES = 4096

# (is the worker ready, why not, details for the body); set by the service instance
ReadinessProbe = Callable[[], tuple[bool, str, dict[str, Any]]]
_readiness: dict[str, ReadinessProbe] = {}


def set_readiness_probe(probe: ReadinessProbe | None) -> None:
    """Register the callable whose answer fills the ``/readyz`` body (None: remove it)."""
    if probe is None:
        _readiness.pop("probe", None)
    else:
        _readiness["probe"] = probe


def _static_dirs() -> list[tuple[str, Path]]:
    dirs: list[tuple[str, Path]] = []
    try:
        from bentoml._internal import server as legacy_server

        dirs.append(("/static_content/", Path(legacy_server.__file__).parent / "static_content"))
    except ImportError:  # pragma: no cover
        pass
    try:
        from _bentoml_impl import server as new_server

        dirs.append(("/assets/", Path(new_server.__file__).parent / "assets"))
    except ImportError:  # pragma: no cover
        pass
    return [(prefix, d.resolve()) for prefix, d in dirs if d.is_dir()]


def _api_routes() -> frozenset[str]:
    try:
        from bentoml import server_context

        routes = frozenset(server_context.service_routes or ())
    except (ImportError, AttributeError):  # pragma: no cover - outside a BentoML worker
        routes = frozenset()
    return routes or DEFAULT_API_ROUTES


class EdgeMiddleware:
    """See the module docstring. ``routes``: the API routes (default: the worker's, from BentoML)."""

    def __init__(self, app: ASGIApp, routes: frozenset[str] | None = None) -> None:
        self.app = app
        self._routes = routes
        self._static: list[tuple[str, Path]] | None = None
        self._primed = False

    @property
    def routes(self) -> frozenset[str]:
        if self._routes is None:
            self._routes = _api_routes()
        return self._routes

    def is_known(self, path: str) -> bool:
        """True for a route of the service (or an existing static file of the docs page)."""
        if path in self.routes or path in PROBE_PATHS or path in DOCS_PATHS:
            return True
        if self._static is None:
            self._static = _static_dirs()
        for prefix, directory in self._static:
            if path.startswith(prefix):
                target = (directory / path[len(prefix) :]).resolve()
                return target.is_file() and directory in target.parents
        return False

    def _prime(self) -> None:
        """Create the ``endpoint="other"`` series up front, so a first unknown path adds none."""
        metrics = get_metrics()
        metrics.requests.labels(endpoint=UNKNOWN_ENDPOINT, outcome="not_found")
        metrics.request_duration.labels(endpoint=UNKNOWN_ENDPOINT, outcome="not_found")
        self._primed = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._primed:
            self._prime()
        started = time.perf_counter()
        path: str = scope.get("path", "")
        if not self.is_known(path):
            body = error_body("not_found", NOT_FOUND_MESSAGE)
            await send(
                {
                    "type": "http.response.start",
                    "status": 404,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(body)),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            metrics = get_metrics()
            metrics.requests.labels(endpoint=UNKNOWN_ENDPOINT, outcome="not_found").inc()
            self._finish(
                scope, path, UNKNOWN_ENDPOINT, 404, b"", started, body_known=("not_found", NOT_FOUND_MESSAGE)
            )
            return
        probe = path in PROBE_PATHS
        state: dict[str, Any] = {"status": 0, "peek": bytearray()}
        out = self._readyz_send(send) if path == "/readyz" else send

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = int(message["status"])
            elif message["type"] == "http.response.body" and state["status"] >= 400:
                room = ERROR_PEEK_BYTES - len(state["peek"])
                if room > 0:
                    state["peek"].extend(message.get("body", b"")[:room])
            await out(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            if not probe:
                self._finish(
                    scope, path, endpoint_label(path), state["status"], bytes(state["peek"]), started
                )

    def _finish(
        self,
        scope: Scope,
        path: str,
        endpoint: str,
        status: int,
        peek: bytes,
        started: float,
        body_known: tuple[str, str] | None = None,
    ) -> None:
        seconds = time.perf_counter() - started
        outcome = outcome_for_status(status) if status else "cancelled"
        get_metrics().request_duration.labels(endpoint=endpoint, outcome=outcome).observe(seconds)
        if status >= 400:
            code, message = body_known or _error_fields(peek)
            client = scope.get("client")
            log_response(
                method=str(scope.get("method", "")),
                path=path,
                endpoint=endpoint,
                status=status,
                code=code,
                message=message,
                client=str(client[0]) if client else None,
                seconds=seconds,
            )

    def _readyz_send(self, send: Send) -> Send:
        """Replace the body of ``/readyz`` with the readiness details (JSON)."""
        held: dict[str, Any] = {}

        async def wrapped(message: Message) -> None:
            probe = _readiness.get("probe")
            if probe is None:
                await send(message)
                return
            if message["type"] == "http.response.start":
                held["status"] = int(message["status"])
                return
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                status = held.get("status", 200)
                try:
                    _, reason, details = probe()
                except Exception:  # the probe must answer whatever happens
                    _logger.exception("readiness details failed")
                    reason, details = "", {}
                if status == 200:
                    body = json.dumps({"status": "ready", **details}).encode()
                else:
                    body = error_body("not_ready", reason or "the service is not ready")
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(body)),
                            (b"cache-control", b"no-store"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        return wrapped


def _error_fields(peek: bytes) -> tuple[str | None, str | None]:
    try:
        data = json.loads(peek)
    except (ValueError, UnicodeDecodeError):
        return None, None
    if isinstance(data, dict):
        code, message = data.get("error"), data.get("message")
        return (code if isinstance(code, str) else None, message if isinstance(message, str) else None)
    return None, None


def install_edge_middleware(service: Any = None) -> bool:
    """Put :class:`EdgeMiddleware` outermost in every BentoML app built in this process (idempotent).

    Returns False when BentoML's private hook moved; then, with ``service``, the middleware is added
    through ``add_asgi_middleware`` (inside BentoML's own middlewares: unknown paths still get 404 in
    the schema, but BentoML's metrics label them before that).
    """
    try:
        from _bentoml_impl.server.app import ServiceAppFactory
        from starlette.middleware import Middleware
    except ImportError:
        ServiceAppFactory = None
    prop = getattr(ServiceAppFactory, "middlewares", None) if ServiceAppFactory is not None else None
    if isinstance(prop, property) and prop.fget is not None:
        if getattr(prop.fget, "_flatprompt_edge", False):
            return True
        original = prop.fget

        def middlewares(self: Any) -> list[Any]:
            return [Middleware(EdgeMiddleware), *original(self)]

        middlewares._flatprompt_edge = True  # type: ignore[attr-defined]
        ServiceAppFactory.middlewares = property(middlewares)
        return True
    _logger.warning(
        "cannot put the edge middleware before BentoML's (private hook moved): "
        "unknown paths are not folded in BentoML's metrics"
    )
    if service is not None:
        service.add_asgi_middleware(EdgeMiddleware)
    return False
