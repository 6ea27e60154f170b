"""Logging of the serving process: the project's loggers visible under ``bentoml serve``, one line per
client error (rate-limited), tracebacks only for server errors, optional JSON lines.

Under ``bentoml serve`` the worker's logging is configured by BentoML (``configure_server_logging``):
its ``bentoml`` loggers print at INFO, everything else (the root logger) only from WARNING, so the
service's own INFO lines (startup summary, re-embedding, the registry coming back) were invisible.
:func:`configure` (called when :mod:`serving.service` is imported, i.e. after BentoML configured
logging in the worker) sets the ``serving`` loggers to ``FLATPROMPT_LOG_LEVEL`` (default INFO); their
records go through BentoML's handler, in BentoML's format.

``FLATPROMPT_LOG_FORMAT=json`` switches that handler (and so every line of the worker: BentoML's,
uvicorn's, ours) to one JSON object per line: ``time``, ``level``, ``logger``, ``component``
(BentoML's ``entry_service:flatprompt:1``), ``message``, ``exc_info`` (the traceback, when there is
one) and BentoML's ``trace_id``/``span_id`` when tracing is on.

Client errors (4xx) are the client's business, not an incident: BentoML logs every validation error
with ``[ERROR]`` and a full traceback, and its access log adds a line per request, so a fuzzer
(or any client) could fill the disk (26 MB in 7 minutes). Here:

* BentoML's tracebacks of client errors (pydantic ``ValidationError``, ``BentoMLException`` below 500)
  are dropped (:class:`ClientErrorFilter`), and so are its access-log lines of 4xx answers
  (:class:`AccessLogFilter`): :class:`serving.edge.EdgeMiddleware` logs each 4xx once instead, at INFO
  (WARNING for 401/403/429), with the error code and message, through :func:`log_response`;
* those lines, and uvicorn's "Invalid HTTP request received." warnings, are rate-limited per kind
  (``RATE_BURST`` lines per ``RATE_WINDOW_S`` per key, e.g. per endpoint + status + error code); the
  next line of a key after a quiet spell says how many were suppressed;
* server errors keep their traceback, logged once where the exception was caught (500), and 503/504
  answers get one WARNING line, rate-limited the same way.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

LEVEL_ENV = "FLATPROMPT_LOG_LEVEL"
FORMAT_ENV = "FLATPROMPT_LOG_FORMAT"
RATE_WINDOW_S = 60.0
RATE_BURST = 3
RATE_MAX_KEYS = 512

PROJECT_LOGGER = "serving"
BENTOML_EXCEPTION_LOGGER = "bentoml._internal.server.http_app"  # log_exception() of BentoML 1.4
BENTOML_ACCESS_LOGGER = "bentoml.access"
UVICORN_LOGGER = "uvicorn.error"

_responses = logging.getLogger("serving.requests")


class RateLimiter:
    """At most ``burst`` admissions per key per ``window_s``; counts what it refuses. Thread-safe."""

    def __init__(
        self, window_s: float = RATE_WINDOW_S, burst: int = RATE_BURST, max_keys: int = RATE_MAX_KEYS
    ) -> None:
        self.window_s, self.burst, self.max_keys = window_s, burst, max_keys
        self._lock = threading.Lock()
        self._keys: OrderedDict[Any, list[float]] = (
            OrderedDict()
        )  # key -> [window start, admitted, suppressed]

    def admit(self, key: Any, now: float | None = None) -> tuple[bool, int]:
        """``(log it?, lines suppressed for this key since the last admitted one)``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            entry = self._keys.get(key)
            if entry is None:
                if len(self._keys) >= self.max_keys:
                    self._keys.popitem(last=False)
                entry = self._keys[key] = [now, 0.0, 0.0]
            else:
                self._keys.move_to_end(key)
            if now - entry[0] >= self.window_s:
                entry[0], entry[1] = now, 0.0
            if entry[1] < self.burst:
                entry[1] += 1
                suppressed, entry[2] = int(entry[2]), 0.0
                return True, suppressed
            entry[2] += 1
            return False, 0


_limiter = RateLimiter()


def limiter() -> RateLimiter:
    """The process-wide limiter of client-error lines."""
    return _limiter


def log_limited(logger: logging.Logger, level: int, key: Any, msg: str, *args: Any) -> bool:
    """Log ``msg % args`` unless ``key`` is over its rate; True when logged."""
    if not logger.isEnabledFor(level):
        return False
    admitted, suppressed = _limiter.admit((logger.name, key))
    if not admitted:
        return False
    if suppressed:
        msg += " (%d similar lines suppressed)"
        args = (*args, suppressed)
    logger.log(level, msg, *args)
    return True


def _printable(text: str, limit: int = 200) -> str:
    """A client-supplied string made safe for one log line (no control characters, bounded)."""
    out = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text[:limit])
    return out + ("..." if len(text) > limit else "")


def log_response(
    *,
    method: str,
    path: str,
    endpoint: str,
    status: int,
    code: str | None,
    message: str | None,
    client: str | None,
    seconds: float,
) -> bool:
    """One line for a 4xx (INFO; WARNING for 401/403/429) or 503/504 (WARNING) answer, rate-limited
    per ``(endpoint, status, code)``. Other statuses are not logged here (500s are logged with their
    traceback where they were caught; successes are in BentoML's access log)."""
    if 400 <= status < 500:
        level = logging.WARNING if status in (401, 403, 429) else logging.INFO
    elif status in (503, 504):
        level = logging.WARNING
    else:
        return False
    return log_limited(
        _responses,
        level,
        (endpoint, status, code),
        "%s %s -> %d %s: %s (client %s, %.1f ms)",
        method,
        _printable(path, 120),
        status,
        code or "-",
        _printable(message or ""),
        client or "-",
        seconds * 1000.0,
    )


class ClientErrorFilter(logging.Filter):
    """Drops BentoML's ``log_exception`` records of client errors (the edge middleware logs one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not is_client_error(exc)


def is_client_error(exc: BaseException) -> bool:
    """True for exceptions BentoML answers with a 4xx."""
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover - pydantic is a dependency
        ValidationError = ()  # type: ignore[assignment,misc]
    if isinstance(exc, ValidationError):
        return True
    code = getattr(getattr(exc, "error_code", None), "value", None)
    return isinstance(code, int) and 400 <= code < 500


class AccessLogFilter(logging.Filter):
    """Drops BentoML access-log lines of 4xx answers (the edge middleware logs them, rate-limited)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        response = next((a for a in args if isinstance(a, str) and a.startswith("status=")), None)
        return not (response is not None and response[len("status=") : len("status=") + 1] == "4")


class RateLimitFilter(logging.Filter):
    """Rate-limits records per message template (uvicorn's protocol warnings under fuzzing)."""

    def __init__(self, min_level: int = logging.WARNING) -> None:
        super().__init__()
        self.min_level = min_level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level or record.levelno >= logging.ERROR:
            return True
        admitted, suppressed = _limiter.admit((record.name, str(record.msg)))
        if admitted and suppressed:
            record.msg = f"{record.msg} (%d similar lines suppressed)"
            record.args = (*(record.args if isinstance(record.args, tuple) else ()), suppressed)
        return admitted


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        component = getattr(record, "component", None)
        if component:
            out["component"] = str(component).strip("[]")
        out["message"] = record.getMessage()
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        trace = getattr(record, "trace_msg", "")
        if trace:
            out["trace"] = str(trace).strip().strip("()")
        return json.dumps(out, ensure_ascii=False, default=str)


_configured: dict[str, Any] = {}


def configure(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Apply the settings above to this process's logging (idempotent); returns what it did."""
    env = os.environ if environ is None else environ
    level_name = (env.get(LEVEL_ENV) or "INFO").strip().upper()
    level = logging.getLevelName(level_name)
    if not isinstance(level, int):
        level = logging.INFO
    fmt = (env.get(FORMAT_ENV) or "text").strip().lower()
    project = logging.getLogger(PROJECT_LOGGER)
    project.setLevel(level)
    if not logging.getLogger().handlers and not project.handlers:
        project.addHandler(logging.StreamHandler())  # outside bentoml serve (scripts, tests)
    _add_filter(logging.getLogger(BENTOML_EXCEPTION_LOGGER), ClientErrorFilter)
    _add_filter(logging.getLogger(BENTOML_ACCESS_LOGGER), AccessLogFilter)
    _add_filter(logging.getLogger(UVICORN_LOGGER), RateLimitFilter)
    handlers = 0
    if fmt == "json":
        formatter = JsonFormatter()
        seen: set[int] = set()
        for name in (None, "bentoml", UVICORN_LOGGER, "circus", PROJECT_LOGGER):
            for handler in logging.getLogger(name).handlers:
                if id(handler) not in seen:
                    seen.add(id(handler))
                    handler.setFormatter(formatter)
        handlers = len(seen)
    _configured.update(level=logging.getLevelName(level), format=fmt, json_handlers=handlers)
    return dict(_configured)


def _add_filter(logger: logging.Logger, cls: type[logging.Filter]) -> None:
    if not any(isinstance(f, cls) for f in logger.filters):
        logger.addFilter(cls())
