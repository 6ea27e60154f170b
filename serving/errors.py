"""The one error schema of the service: every 4xx/5xx body is ``{"error": code, "message": text}``.

``code`` is a short stable snake_case identifier clients can branch on; ``message`` is for humans.
Endpoints raise :class:`ServeError`; the service turns it into a JSON response, and
:mod:`serving.limits` rewrites every other error body (BentoML's validation errors, 404s of unknown
routes, overload answers) into the same shape.
"""

from __future__ import annotations

import json
from typing import Any

# Default code for an HTTP status when the error did not come from our own code.
STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "overloaded",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


class ServeError(Exception):
    """An error answered to the client with the service's error schema.

    Args:
        status: HTTP status code (4xx for the client's fault, 5xx for ours).
        code: stable machine-readable code, e.g. ``"invalid_image"``.
        message: human-readable explanation; never contains secrets or stack traces.
        limit: name of the violated limit (a metric label), when the error is a limit violation.
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        limit: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.limit = limit
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": self.code, "message": self.message}

    def __repr__(self) -> str:
        return f"ServeError({self.status}, {self.code!r}, {self.message!r})"


def error_body(code: str, message: str) -> bytes:
    """Encode an error body (UTF-8 JSON, non-ASCII kept readable)."""
    return json.dumps({"error": code, "message": message}, ensure_ascii=False).encode("utf-8")


def code_for_status(status: int) -> str:
    """The default error code of an HTTP status."""
    if status in STATUS_CODES:
        return STATUS_CODES[status]
    return "client_error" if status < 500 else "internal_error"


def is_error_body(payload: bytes) -> bool:
    """True when ``payload`` already follows the schema (a JSON object with string error + message)."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return False
    return (
        isinstance(data, dict) and isinstance(data.get("error"), str) and isinstance(data.get("message"), str)
    )


def message_from_foreign_body(payload: bytes, status: int) -> str:
    """Best-effort human message from an error body produced outside our code (BentoML, Starlette).

    Handles ``{"error": str, "detail": [pydantic errors]}``, ``[{"error": str}]``,
    ``{"detail": str}`` and plain text. Input values are never echoed (pydantic's ``input`` is
    dropped), so the message cannot reflect request content back.
    """
    text = payload.decode("utf-8", "replace").strip()
    try:
        data: Any = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    if isinstance(data, dict):
        detail = data.get("detail")
        if isinstance(detail, list) and detail:
            parts = []
            for item in detail[:5]:
                if isinstance(item, dict):
                    loc = ".".join(str(x) for x in item.get("loc", ()))
                    msg = (
                        "unknown field"
                        if item.get("type") == "extra_forbidden"
                        else item.get("msg", "invalid")
                    )
                    parts.append(f"{loc}: {msg}" if loc else str(msg))
            return "invalid request: " + "; ".join(parts)
        for key in ("error", "detail", "message"):
            if isinstance(data.get(key), str) and data[key]:
                return str(data[key])
    if text and len(text) <= 300 and data is None:
        return text
    return f"HTTP {status}"
