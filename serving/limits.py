"""The ASGI guard in front of every API route: size limit, auth, media types, admission, deadline,
and the single error schema.

BentoML 1.4 has no request-size limit, answers errors in several shapes (``{"error", "detail"}``
for validation errors, ``[{"error"}]`` for raised exceptions, plain text for unknown routes) and
checks no credentials. :class:`GuardMiddleware` closes those gaps, in this order:

1. probes and ``/metrics`` pass straight through (only their error bodies are normalised);
2. ``/register`` and ``/unregister`` need ``Authorization: Bearer <FLATPROMPT_TOKEN>``, compared
   with :func:`hmac.compare_digest`; with no token configured they answer 403 (never open);
3. media type per route (multipart for ``/classify``, JSON elsewhere), else 415;
4. ``Content-Length`` above the limit answers 413 before the body is read; bodies without a length
   (chunked) are counted while streamed and cut at the limit, also answering 413;
5. while the body streams in: a gap of more than ``body_timeout_s`` between two chunks (a stalled
   client, or a ``Content-Length`` larger than the body sent) answers 408 and frees the slot, long
   before the request deadline; a multipart body with more parts than ``/classify`` can take
   (``max_images_per_request`` plus its few form fields) answers 413 ``too_many_images`` before the
   parts past the limit are parsed, the rest of the body being read and discarded (bounded by the body
   limit) so that the client gets the answer instead of a connection reset;
6. a path with a trailing slash answers 404 in the error schema (Starlette would redirect it with an
   empty 307);
7. at most ``max_in_flight`` API requests per worker, 429 with ``Retry-After`` beyond
   (BentoML's own ``max_concurrency`` is not used: its 429 would bypass this schema);
8. a per-request deadline answering 504 when no response started in time;
9. every 4xx/5xx body that is not already ``{"error": code, "message": text}`` is rewritten to it,
   and every 4xx/5xx goes out as ``application/json``; a 503 without ``Retry-After`` gets one
   (:data:`RETRY_AFTER_503`). uvicorn's own 400s for malformed HTTP, sent before any app runs, are
   answered in the same schema by :func:`harden_protocol_errors`.

Each refusal increments ``flatprompt_limit_violations_total{limit}`` and every API request
``flatprompt_requests_total{endpoint, outcome}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from serving.config import ServeConfig
from serving.errors import code_for_status, error_body, is_error_body, message_from_foreign_body
from serving.metrics import endpoint_label, get_metrics, outcome_for_status

_logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PASSTHROUGH_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
PROTECTED_PATHS = frozenset({"/register", "/register_images", "/unregister"})
MULTIPART_PATHS = frozenset({"/classify", "/register_images"})
JSON_PATHS = frozenset({"/classify_base64", "/register", "/unregister", "/classes"})
WORKER_HEADER = "x-flatprompt-worker"  # BentoML worker index that answered (debugging, tests)


def _worker_id() -> str:
    try:
        from bentoml import server_context

        index = server_context.worker_index
    except ImportError:  # pragma: no cover - bentoml is always there when serving
        index = None
    return str(index if index is not None else 0)


def harden_multipart_parsing() -> bool:
    """Patch two gaps of BentoML 1.4's multipart parser (``_bentoml_impl.serde.MultipartSerde``).

    1. A *text* value in a file field is treated as a URL and downloaded (``ensure_file``): a
       server-side request to any public host, with no size limit, before our code runs. We refuse
       text values instead (400).
    2. Malformed multipart bodies and unexpected binary fields raise ``UnicodeDecodeError``,
       Starlette's ``HTTPException`` or ``ValueError``, which BentoML answers with 500. We turn them
       into ``BadInput`` (400), and so does a form field nested too deeply for ``json.loads``
       (``RecursionError``, e.g. ``candidates=[[[[...``). Our own :class:`BodyRefused` and pydantic
       errors pass unchanged.

    Returns False (and logs) when the private hooks are not where BentoML 1.4 has them.
    """
    try:
        from _bentoml_impl import serde
        from bentoml.exceptions import BadInput, BentoMLException
        from pydantic import ValidationError
        from starlette.datastructures import UploadFile
        from starlette.exceptions import HTTPException
    except ImportError:
        _logger.warning("cannot harden BentoML's multipart parser: private module moved")
        return False
    cls: Any = serde.MultipartSerde
    if not hasattr(cls, "ensure_file") or not hasattr(cls, "parse_request"):
        _logger.warning("cannot harden BentoML's multipart parser: its methods are gone")
        return False
    if getattr(cls, "_flatprompt_hardened", False):
        return True
    original_parse = cls.parse_request

    async def ensure_file(obj: object) -> UploadFile:
        if isinstance(obj, UploadFile):
            return obj
        raise BadInput("file fields take uploaded files; URLs and text values are not fetched")

    async def parse_request(self: Any, request: Any, model: Any) -> Any:
        try:
            return await original_parse(self, request, model)
        except (BentoMLException, BodyRefused, ValidationError):
            raise  # BentoML answers these itself (400), BodyRefused is answered by the guard
        except RecursionError:
            raise BadInput("malformed multipart body: a form field is nested too deeply") from None
        except (UnicodeDecodeError, HTTPException, ValueError, KeyError) as exc:
            detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
            raise BadInput(f"malformed multipart body: {str(detail)[:200]}") from None

    cls.ensure_file = staticmethod(ensure_file)
    cls.parse_request = parse_request
    cls._flatprompt_hardened = True
    return True


RETRY_AFTER_503 = "2"  # seconds, on every 503 that does not say otherwise (registry down, shutting down)
MULTIPART_FIELD_PARTS = 8  # parts of a /classify body besides the images (top_k, candidates, tau; slack)


def harden_protocol_errors() -> bool:
    """Answer uvicorn's own 400s (malformed HTTP: bad ``Content-Length``, bad chunk sizes, oversized
    or broken header lines, garbage request lines) in the error schema, as ``application/json``.

    uvicorn (0.55 here) writes those as ``text/plain`` before any ASGI app runs, so :class:`GuardMiddleware`
    never sees them. Patches ``send_400_response`` of the h11 (and, when installed, httptools)
    protocol; returns False (and logs) when the method is not there.
    """
    patched = False
    with contextlib.suppress(ImportError):
        import h11
        from uvicorn.protocols.http import h11_impl

        patched |= _patch_400(h11_impl.H11Protocol, _h11_send_400(h11))
    with contextlib.suppress(ImportError):
        from uvicorn.protocols.http import httptools_impl

        patched |= _patch_400(httptools_impl.HttpToolsProtocol, _raw_send_400)
    if not patched:
        _logger.warning("cannot answer uvicorn's protocol errors in the error schema: method moved")
    return patched


def _protocol_error_body(msg: str) -> bytes:
    return error_body("bad_request", f"malformed HTTP request: {msg}")


def _patch_400(cls: Any, method: Callable[[Any, str], None]) -> bool:
    if not hasattr(cls, "send_400_response"):
        return False
    if not getattr(cls, "_flatprompt_hardened", False):
        cls.send_400_response = method
        cls._flatprompt_hardened = True
    return True


def _h11_send_400(h11: Any) -> Callable[[Any, str], None]:
    def send_400_response(self: Any, msg: str) -> None:
        body = _protocol_error_body(msg)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    return send_400_response


def _raw_send_400(self: Any, msg: str) -> None:
    body = _protocol_error_body(msg)
    head = (
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    self.transport.write(head.encode("ascii") + body)
    self.transport.close()


class BodyRefused(Exception):
    """Raised from ``receive`` when the body being streamed is refused; the guard answers it.

    ``drain``: read and discard the rest of the body before answering (the client is still sending,
    and a connection closed on unread data resets before the client reads the answer).
    """

    status, code, limit, drain = 400, "bad_request", "body", False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BodyTooLarge(BodyRefused):
    """A streamed body passed ``max_body_bytes``."""

    status, code, limit = 413, "payload_too_large", "body_bytes"


class BodyTimeout(BodyRefused):
    """No chunk of the body arrived within ``body_timeout_s``."""

    status, code, limit = 408, "request_timeout", "body_timeout"


class TooManyParts(BodyRefused):
    """A multipart body has more parts than the endpoint can take."""

    status, code, limit, drain = 413, "too_many_images", "images_per_request", True


class TooManyExampleParts(TooManyParts):
    """A ``/register_images`` body has more parts than a class can hold examples."""

    code, limit = "too_many_examples", "examples_per_class"


class PartCounter:
    """Counts the parts of a multipart body while it streams, across chunk boundaries.

    A part starts at each delimiter ``CRLF--boundary`` (RFC 2046; the first one may open the body
    without the CRLF); the closing delimiter ``--boundary--`` is counted too, so ``parts`` can be one
    above the number of parts once the body is complete.
    """

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._tail = b"\r\n"  # as if a CRLF preceded the body
        self.parts = 0

    def feed(self, chunk: bytes) -> int:
        """Add one chunk; return the number of delimiters seen so far."""
        data = self._tail + chunk
        self.parts += data.count(self._delimiter)
        keep = len(self._delimiter) - 1  # shorter than a delimiter: never counted twice
        self._tail = data[-keep:] if len(data) > keep else data
        return self.parts


def multipart_boundary(content_type: str) -> bytes | None:
    """The ``boundary`` parameter of a ``multipart/form-data`` content type, or None."""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            value = value.strip().strip('"')
            return value.encode("latin-1") if value else None
    return None


class _State:
    """Per-request bookkeeping shared by the wrapped ``receive``/``send``."""

    def __init__(self) -> None:
        self.received = 0
        self.refused: BodyRefused | None = None  # the body was cut: the guard answers for the app
        self.started = False  # a response start message went out (to the client)
        self.status = 0
        self.body_done = asyncio.Event()  # the app has read the whole request body
        self.disconnected = False  # the client went away before the response was complete
        self.path = ""


class GuardMiddleware:
    """See the module docstring. ``config`` defaults to :meth:`ServeConfig.from_env` (in the worker)."""

    def __init__(self, app: ASGIApp, config: ServeConfig | None = None) -> None:
        self.app = app
        self.config = config or ServeConfig.from_env()
        limits, settings = self.config.limits, self.config.service
        self.max_body_bytes = limits.max_body_bytes
        self.max_in_flight = settings.max_in_flight
        self.timeout_s = settings.request_timeout_s
        self.body_timeout_s = settings.body_timeout_s
        # most parts a multipart body of each route can need: its files plus a few form fields
        self.max_parts = {
            "/classify": limits.max_images_per_request + MULTIPART_FIELD_PARTS,
            "/register_images": limits.max_examples_per_class + MULTIPART_FIELD_PARTS,
        }
        self.in_flight = 0
        self._token = self.config.token.encode("utf-8") if self.config.token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if path in PASSTHROUGH_PATHS:
            await self.app(scope, receive, self._normalising_send(send, _State(), scope, count=False))
            return
        endpoint = endpoint_label(path)
        headers = _headers(scope)
        state = _State()
        refusal = self._check_request(scope, path, headers)
        if refusal is not None:
            status, code, message, limit, extra = refusal
            if limit:
                get_metrics().limit_violations.labels(limit=limit).inc()
            get_metrics().requests.labels(endpoint=endpoint, outcome=outcome_for_status(status)).inc()
            await _send_error(send, status, code, message, extra)
            return
        if self.in_flight >= self.max_in_flight:
            get_metrics().limit_violations.labels(limit="in_flight").inc()
            get_metrics().requests.labels(endpoint=endpoint, outcome="overloaded").inc()
            await _send_error(
                send,
                429,
                "overloaded",
                f"more than {self.max_in_flight} requests in flight in this worker; retry later",
                {"retry-after": "1"},
            )
            return
        self.in_flight += 1
        try:
            state.path = path
            counter = None
            if path in MULTIPART_PATHS:
                boundary = multipart_boundary(headers.get("content-type", ""))
                counter = PartCounter(boundary) if boundary else None
            await self._run_with_deadline(
                scope, self._counting_receive(receive, state, counter), receive, send, state
            )
        finally:
            self.in_flight -= 1

    # -- checks --------------------------------------------------------------------------------
    def _check_request(
        self, scope: Scope, path: str, headers: dict[str, str]
    ) -> tuple[int, str, str, str | None, dict[str, str]] | None:
        """Return ``(status, code, message, limit, headers)`` to refuse the request, else None."""
        if len(path) > 1 and path.endswith("/"):
            return (
                404,
                "not_found",
                "unknown path: routes take no trailing slash",
                None,
                {},
            )
        if path in PROTECTED_PATHS:
            if self._token is None:
                return (
                    403,
                    "mutations_disabled",
                    "registering and deleting classes is disabled: the server has no FLATPROMPT_TOKEN configured",
                    "auth",
                    {},
                )
            auth = headers.get("authorization", "")
            scheme, _, credential = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                credential.strip().encode("utf-8"), self._token
            ):
                return (
                    401,
                    "unauthorized",
                    "missing or invalid bearer token",
                    "auth",
                    {"www-authenticate": 'Bearer realm="flatprompt"'},
                )
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if path in MULTIPART_PATHS and scope.get("method") == "POST" and media != "multipart/form-data":
            return (
                415,
                "unsupported_media_type",
                f"{path} takes multipart/form-data (got {media or 'no content type'}); "
                + (
                    "send base64 JSON to /classify_base64"
                    if path == "/classify"
                    else "or base64 examples to /register"
                ),
                "media_type",
                {},
            )
        if path in JSON_PATHS and scope.get("method") == "POST" and media not in ("", "application/json"):
            return (
                415,
                "unsupported_media_type",
                f"{path} takes application/json (got {media})",
                "media_type",
                {},
            )
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return 400, "bad_request", "invalid Content-Length header", "body_bytes", {}
            if int(length) > self.max_body_bytes:
                return (
                    413,
                    "payload_too_large",
                    f"request body of {int(length)} bytes exceeds the limit of {self.max_body_bytes} bytes",
                    "body_bytes",
                    {},
                )
        return None

    def _counting_receive(self, receive: Receive, state: _State, counter: PartCounter | None) -> Receive:
        """``receive`` that counts body bytes (and multipart parts) and times out stalled bodies."""

        async def wrapped() -> Message:
            if state.refused is not None:  # the app reads again after a refusal: nothing more for it
                raise state.refused
            if state.body_done.is_set():
                return await receive()  # after the body: http.disconnect, no deadline of ours
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except TimeoutError:
                raise self._refuse(
                    state,
                    BodyTimeout(
                        f"the request body stalled: nothing received for {self.body_timeout_s:g} s "
                        f"after {state.received} bytes (is Content-Length larger than the body sent?)"
                    ),
                ) from None
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                state.received += len(chunk)
                if state.received > self.max_body_bytes:
                    raise self._refuse(
                        state, BodyTooLarge(f"request body exceeds the limit of {self.max_body_bytes} bytes")
                    )
                most = self.max_parts.get(state.path, self.max_parts["/classify"])
                if counter is not None and counter.feed(chunk) > most + 1:
                    files = most - MULTIPART_FIELD_PARTS
                    refusal = (
                        TooManyExampleParts(
                            f"multipart body with more than {most} parts: at most {files} examples per class"
                        )
                        if state.path == "/register_images"
                        else TooManyParts(
                            f"multipart body with more than {most} parts: at most {files} images per request"
                        )
                    )
                    raise self._refuse(state, refusal)
                if not message.get("more_body", False):
                    state.body_done.set()
            return message

        return wrapped

    @staticmethod
    def _refuse(state: _State, refusal: BodyRefused) -> BodyRefused:
        state.refused = refusal
        return refusal

    async def _drain(self, receive: Receive, state: _State) -> None:
        """Read and discard the rest of a refused body, within the body limit and the body timeout."""
        with contextlib.suppress(TimeoutError):
            while state.received <= self.max_body_bytes:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
                if message["type"] != "http.request":
                    return
                state.received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return

    # -- running the app -----------------------------------------------------------------------
    async def _run_with_deadline(
        self, scope: Scope, receive: Receive, raw_receive: Receive, send: Send, state: _State
    ) -> None:
        loop = asyncio.get_running_loop()
        started = loop.create_future()
        out = self._normalising_send(send, state, scope, count=True)

        async def first_send(message: Message) -> None:
            if not started.done():
                started.set_result(None)
            await out(message)

        task = asyncio.ensure_future(self._run_app(scope, receive, raw_receive, first_send, state, send))
        watcher = asyncio.ensure_future(self._watch_disconnect(raw_receive, state, task))
        try:
            await self._await_app(task, started, send, state, scope)
        finally:
            watcher.cancel()

    async def _watch_disconnect(self, receive: Receive, state: _State, task: asyncio.Future[None]) -> None:
        """Cancel the app when the client disconnects after sending its body (frees its queue slot)."""
        await state.body_done.wait()
        while not task.done():
            message = await receive()
            if message["type"] == "http.disconnect":
                if not task.done() and not state.started:
                    state.disconnected = True
                    get_metrics().requests.labels(
                        endpoint=endpoint_label(state.path), outcome="cancelled"
                    ).inc()
                    task.cancel()
                return

    async def _await_app(
        self,
        task: asyncio.Future[None],
        started: asyncio.Future[None],
        send: Send,
        state: _State,
        scope: Scope,
    ) -> None:
        done, _ = await asyncio.wait(
            {task, started}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            if not state.started and not state.disconnected:
                _logger.warning("request to %s timed out after %.1f s", scope.get("path"), self.timeout_s)
                await self._final_error(
                    send, state, scope, 504, "timeout", f"no response within {self.timeout_s:g} s"
                )
            return
        if not started.done():
            started.cancel()
        if state.disconnected:  # cancelled by _watch_disconnect: nobody to answer
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return
        await task

    async def _run_app(
        self, scope: Scope, receive: Receive, raw_receive: Receive, send: Send, state: _State, raw_send: Send
    ) -> None:
        try:
            await self.app(scope, receive, send)
        except BodyRefused:
            pass
        except Exception:
            if state.refused is None:
                _logger.exception("unhandled error in %s", scope.get("path"))
                if not state.started:
                    await self._final_error(
                        raw_send,
                        state,
                        scope,
                        500,
                        "internal_error",
                        "unexpected server error; see the server log",
                    )
                return
        refused = state.refused
        if refused is not None and not state.started:
            get_metrics().limit_violations.labels(limit=refused.limit).inc()
            if refused.drain:
                await self._drain(raw_receive, state)
            await self._final_error(raw_send, state, scope, refused.status, refused.code, refused.message)

    async def _final_error(
        self, send: Send, state: _State, scope: Scope, status: int, code: str, message: str
    ) -> None:
        """Send an error response straight to the client (bypassing the rewriting wrapper), counted."""
        body = error_body(code, message)
        await self._emit_start(send, state, scope, _start(status, {"content-length": str(len(body))}), True)
        await send({"type": "http.response.body", "body": body})

    def _normalising_send(self, send: Send, state: _State, scope: Scope, count: bool) -> Send:
        """Wrap ``send``: rewrite non-schema error bodies, turn errors after a cut body into 413, count."""
        held: dict[str, Any] = {}

        async def wrapped(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                status = int(message["status"])
                if state.refused is not None:
                    held["drop"] = True  # the app's answer to a cut body is replaced by the refusal
                    return
                if status >= 400:
                    held["start"] = message
                    held["body"] = bytearray()
                    return
                await self._emit_start(send, state, scope, message, count)
                return
            if kind == "http.response.body":
                if held.get("drop"):
                    if not message.get("more_body", False):
                        held.clear()
                    return
                if "start" in held:
                    held["body"].extend(message.get("body", b""))
                    if message.get("more_body", False):
                        return
                    start, body = held.pop("start"), bytes(held.pop("body"))
                    status = int(start["status"])
                    if not is_error_body(body):
                        if status == 400:
                            get_metrics().limit_violations.labels(limit="malformed_request").inc()
                        body = error_body(code_for_status(status), message_from_foreign_body(body, status))
                        start = _start(status, _keep_headers(start))
                    start = dict(start)
                    start["headers"] = [
                        (k, v)
                        for k, v in start.get("headers", [])
                        if k.lower() not in (b"content-length", b"content-type")
                    ] + [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
                    if status == 503 and not any(k.lower() == b"retry-after" for k, _ in start["headers"]):
                        start["headers"].append((b"retry-after", RETRY_AFTER_503.encode()))
                    await self._emit_start(send, state, scope, start, count)
                    await send({"type": "http.response.body", "body": body})
                    return
            await send(message)

        return wrapped

    async def _emit_start(
        self, send: Send, state: _State, scope: Scope, message: Message, count: bool
    ) -> None:
        state.started = True
        state.status = int(message["status"])
        if count:
            get_metrics().requests.labels(
                endpoint=endpoint_label(scope.get("path", "")), outcome=outcome_for_status(state.status)
            ).inc()
            message = dict(message)
            message["headers"] = [
                *message.get("headers", []),
                (WORKER_HEADER.encode(), _worker_id().encode()),
            ]
        await send(message)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _keep_headers(start: Message) -> dict[str, str]:
    keep = {}
    for k, v in start.get("headers", []):
        name = k.decode("latin-1").lower()
        if name not in ("content-length", "content-type"):
            keep[name] = v.decode("latin-1")
    return keep


def _start(status: int, headers: dict[str, str]) -> Message:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw.append((b"content-type", b"application/json"))
    return {"type": "http.response.start", "status": status, "headers": raw}


async def _send_error(send: Send, status: int, code: str, message: str, headers: dict[str, str]) -> None:
    body = error_body(code, message)
    start = _start(status, {**headers, "content-length": str(len(body))})
    await send(start)
    await send({"type": "http.response.body", "body": body})
