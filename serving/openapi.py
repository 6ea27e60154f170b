"""The service's OpenAPI 3.1 document (``/docs.json``, rendered by the Swagger UI page at ``/``).

BentoML 1.4 derives the request and 200 bodies from the API signatures, but has no public way to set the
document's title, version or contact, nor to declare error responses: it lists its own generic 400 / 404 /
500 with a body shape the service never sends, and its description is BentoML's boilerplate (the open
feature request is bentoml/BentoML#2975). So the document is built here from the same pydantic models
the endpoints are declared with (``@bentoml.api(input_spec=...)`` and the return annotations, all in
:mod:`serving.schemas`), and :class:`DocsMiddleware` (added with BentoML's public
``Service.add_asgi_middleware``) answers ``GET /docs.json`` with it. What stays BentoML's: the routes
themselves, request parsing and validation, and the HTML page.

Every status a route can answer is listed with :class:`serving.schemas.ErrorBody` and the error codes
behind it; ``tests/test_serving_contract.py`` checks the document (``openapi-spec-validator``) and the
live server against it (``schemathesis``).
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from serving import __version__
from serving.examples import RESPONSE_EXAMPLES
from serving.schemas import (
    ClassesRequest,
    ClassesResponse,
    ClassifyBase64Request,
    ClassifyRequest,
    ClassifyResponse,
    ErrorBody,
    RegisterImagesRequest,
    RegisterRequest,
    RegisterResponse,
    UnregisterRequest,
    UnregisterResponse,
)

OPENAPI_VERSION = "3.1.0"
DOCS_PATH = "/docs.json"
REF = "#/components/schemas/{model}"
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]

DESCRIPTION = """\
Image classification with a prompt-learned CLIP model on ONNX Runtime: the bundle's trained classes plus
class names registered at run time (stored in the registry database, visible to every worker).

* **Classify**: `POST /classify` (multipart image files) or `POST /classify_base64` (JSON); top-k labels
  per image with `kind` (`trained` or `registered`) and probability.
* **Registry**: `POST /register` and `POST /unregister` need `Authorization: Bearer <FLATPROMPT_TOKEN>`
  (without a configured token they answer 403); `POST /classes` lists the classes.
* **Errors**: every 4xx/5xx body is `{"error": code, "message": text}`; `error` is a stable code, listed
  per status below. 429 and 503 `overloaded` carry `Retry-After`.
* **Limits** (`FLATPROMPT_MAX_*`): body bytes, images per request, pixels per image, names, templates,
  candidates, `top_k`, `tau`; each violation answers 4xx and is counted in
  `flatprompt_limit_violations_total{limit}` on `/metrics`.

This document's version is the package version, then the first 12 hex digits of the loaded bundle's
manifest sha256. Operator guide: `docs/serving.md` in the repository.
"""


@dataclass(frozen=True)
class Route:
    """One API route: its models, tag, and the error codes behind each non-200 status it answers."""

    request: type[BaseModel]
    response: type[BaseModel]
    tag: str
    summary: str
    errors: Mapping[int, tuple[str, ...]]
    media_type: str = "application/json"
    protected: bool = False
    files: tuple[str, ...] = ()  # multipart fields that are file parts


# Statuses every API route can answer (the guard in serving/limits.py and BentoML's request validation).
COMMON_ERRORS: dict[int, tuple[str, ...]] = {
    400: ("bad_request",),
    413: ("payload_too_large",),
    415: ("unsupported_media_type",),
    429: ("overloaded",),
    500: ("internal_error",),
    504: ("timeout",),
}
AUTH_ERRORS: dict[int, tuple[str, ...]] = {401: ("unauthorized",), 403: ("mutations_disabled",)}
_CLASSIFY_ERRORS: dict[int, tuple[str, ...]] = {
    400: ("no_images", "invalid_image", "invalid_top_k", "invalid_tau", "invalid_candidates", "invalid_name"),
    404: ("unknown_class",),
    413: ("too_many_images", "image_too_large", "too_many_candidates", "name_too_long"),
    503: ("overloaded", "not_ready", "shutting_down"),
}

ROUTES: dict[str, Route] = {
    "classify": Route(
        ClassifyRequest,
        ClassifyResponse,
        "classification",
        "Classify image files (multipart)",
        _CLASSIFY_ERRORS,
        media_type="multipart/form-data",
        files=("images",),
    ),
    "classify_base64": Route(
        ClassifyBase64Request,
        ClassifyResponse,
        "classification",
        "Classify base64 images (JSON)",
        _CLASSIFY_ERRORS,
    ),
    "register": Route(
        RegisterRequest,
        RegisterResponse,
        "registry",
        "Register class names",
        {
            400: (
                "no_names",
                "invalid_name",
                "name_too_long",
                "invalid_template",
                "template_too_long",
                "invalid_examples",
                "invalid_image",
                "no_images",
                "invalid_text_weight",
                "invalid_text_path",
            ),
            409: ("registry_full", "conflict", "trained_class"),
            413: (
                "too_many_names",
                "too_many_templates",
                "too_many_examples",
                "example_too_large",
                "image_too_large",
            ),
            503: ("registry_unavailable",),
        },
        protected=True,
    ),
    "register_images": Route(
        RegisterImagesRequest,
        RegisterResponse,
        "registry",
        "Register a class from example images (multipart)",
        {
            400: (
                "no_images",
                "invalid_image",
                "invalid_name",
                "name_too_long",
                "invalid_template",
                "template_too_long",
                "invalid_text_weight",
                "invalid_text_path",
            ),
            409: ("registry_full", "conflict", "trained_class"),
            413: ("too_many_examples", "example_too_large", "image_too_large", "too_many_templates"),
            503: ("registry_unavailable",),
        },
        media_type="multipart/form-data",
        files=("images",),
        protected=True,
    ),
    "unregister": Route(
        UnregisterRequest,
        UnregisterResponse,
        "registry",
        "Delete a registered class",
        {
            400: ("invalid_name", "name_too_long"),
            404: ("unknown_class",),
            409: ("trained_class",),
            503: ("registry_unavailable",),
        },
        protected=True,
    ),
    "classes": Route(ClassesRequest, ClassesResponse, "registry", "List the classes", {}),
}

# One real message per code (as the service words them, with the default limits), for the examples.
ERROR_MESSAGES = {
    "bad_request": "invalid request: top_k: Input should be a valid integer",
    "payload_too_large": "request body of 40000000 bytes exceeds the limit of 33554432 bytes",
    "unsupported_media_type": "/classify takes multipart/form-data (got application/json); "
    "send base64 JSON to /classify_base64",
    "overloaded": "more than 64 requests in flight in this worker; retry later",
    "internal_error": "unexpected server error; see the server log",
    "timeout": "no response within 30 s",
    "unauthorized": "missing or invalid bearer token",
    "mutations_disabled": "registering and deleting classes is disabled: the server has no "
    "FLATPROMPT_TOKEN configured",
    "no_images": "send at least one image",
    "invalid_image": "image 1: not a decodable image (cannot identify image file)",
    "invalid_top_k": "top_k must be between 1 and 100",
    "invalid_tau": "tau must be between 0 and 10",
    "invalid_candidates": "candidates, when given, must name at least one class",
    "invalid_name": "class name is empty",
    "unknown_class": "'grey hexagon' is not a registered class",
    "too_many_images": "17 images, the limit is 16 per request",
    "image_too_large": "image 1: 30000x30000 = 900000000 pixels exceeds the limit of 50000000 pixels",
    "too_many_candidates": "20001 candidates, the limit is 20000",
    "name_too_long": "class name has 130 characters, the limit is 128",
    "not_ready": "model runs on CPUExecutionProvider, CUDAExecutionProvider required",
    "shutting_down": "the worker is shutting down; retry",
    "no_names": "send at least one name",
    "invalid_template": "template 'a photo' must contain exactly one '{}'",
    "template_too_long": "template has 210 characters, the limit is 200",
    "registry_full": "registry holds 9999 classes, adding 2 exceeds the limit of 10000",
    "conflict": "the registry kept changing during registration; retry",
    "too_many_names": "1001 names, the limit is 1000 per registration",
    "too_many_templates": "17 templates, the limit is 16",
    "registry_unavailable": "the class registry is unavailable; retry later",
    "trained_class": "'red circle' is a trained class; only registered classes can be deleted",
    "invalid_examples": "examples for 'okapi', which is not among the names",
    "invalid_text_weight": "text_weight must be between 0 and 1 (or null: automatic)",
    "invalid_text_path": "text_path 'handwritten' is not available with this bundle (it offers ['learned']); "
    "re-export it with the current `python -m export` for the hand-written paths",
    "too_many_examples": "17 examples for 'okapi', the limit is 16 per class",
    "example_too_large": "example image 0 has 5000000 bytes, the limit is 4194304",
}

STATUS_TEXT = {
    400: "Malformed request or invalid value",
    401: "Missing or wrong bearer token",
    403: "Mutations disabled: the server has no FLATPROMPT_TOKEN",
    404: "Unknown class",
    409: "Conflict with the registry's state",
    413: "A size or count limit was exceeded",
    415: "Wrong Content-Type for this route",
    429: "Too many requests in flight in this worker; retry after Retry-After seconds",
    500: "Unexpected server error (see the server log)",
    503: "Temporarily unavailable; retry later",
    504: "No response within FLATPROMPT_REQUEST_TIMEOUT_S",
}
RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}
}
WWW_AUTHENTICATE = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer challenge"}}

PROBES: dict[str, dict[str, Any]] = {
    "/livez": {
        "summary": "Liveness probe",
        "description": "200 while the process serves HTTP (Kubernetes `livenessProbe`).",
        "responses": {"200": {"description": "alive"}},
    },
    "/readyz": {
        "summary": "Readiness probe",
        "description": "200 once the bundle is loaded on the required execution provider and both towers "
        "ran a warm-up batch; 503 before that (Kubernetes `readinessProbe`).",
        "responses": {"200": {"description": "ready"}, "503": {"description": "not ready (yet)"}},
    },
    "/metrics": {
        "summary": "Prometheus metrics",
        "description": "Prometheus text exposition: BentoML's `bentoml_service_*` and the service's "
        "`flatprompt_*` series (`docs/serving.md`, `deploy/prometheus/`).",
        "responses": {
            "200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}
        },
    },
}


def markdown_doc(doc: str | None) -> str:
    """A docstring as Markdown: dedented, RST double backticks turned into single ones."""
    return re.sub(r"``([^`]+)``", r"`\1`", inspect.cleandoc(doc or ""))


def component_schemas() -> dict[str, Any]:
    """JSON schemas of every request, response and error model, keyed by model name."""
    requests = {r.request: None for r in ROUTES.values()}
    responses = {r.response: None for r in ROUTES.values()} | {ErrorBody: None}
    _, top = models_json_schema(
        [(m, "validation") for m in requests] + [(m, "serialization") for m in responses], ref_template=REF
    )
    schemas: dict[str, Any] = _markdown_descriptions(dict(top.get("$defs", {})))
    for route in ROUTES.values():
        if route.files:  # file parts: binary strings, not pydantic's "path" strings
            props = schemas[route.request.__name__]["properties"]
            for name in route.files:
                props[name]["items"] = {"type": "string", "format": "binary"}
                props[name]["minItems"] = 1
    return schemas


def _markdown_descriptions(node: Any) -> Any:
    """Model docstrings become schema descriptions: render them as Markdown too."""
    if isinstance(node, dict):
        return {
            k: markdown_doc(v) if k == "description" and isinstance(v, str) else _markdown_descriptions(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_markdown_descriptions(v) for v in node]
    return node


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _error_response(status: int, codes: tuple[str, ...]) -> dict[str, Any]:
    listed = ", ".join(f"`{c}`" for c in codes)
    out: dict[str, Any] = {
        "description": f"{STATUS_TEXT.get(status, 'Error')}. Codes: {listed}",
        "content": {
            "application/json": {
                "schema": _ref(ErrorBody),
                "examples": {
                    code: {"value": {"error": code, "message": ERROR_MESSAGES[code]}} for code in codes
                },
            }
        },
    }
    if status == 429 or "overloaded" in codes:
        out["headers"] = RETRY_AFTER
    if status == 401:
        out["headers"] = WWW_AUTHENTICATE
    return out


def _request_example(route: Route) -> dict[str, Any]:
    """The request example: the first example of each field that has no ``None`` default (an optional
    subset such as ``candidates`` depends on the bundle; its own example stays on the field). File parts
    are left to the user."""
    example: dict[str, Any] = {}
    for name, info in route.request.model_fields.items():
        if name not in route.files and info.examples and (info.is_required() or info.default is not None):
            example[name] = info.examples[0]
    return example


def _operation(name: str, route: Route, doc: str | None) -> dict[str, Any]:
    errors: dict[int, tuple[str, ...]] = {}
    for table in (COMMON_ERRORS, AUTH_ERRORS if route.protected else {}, route.errors):
        for status, codes in table.items():
            errors[status] = tuple(dict.fromkeys(errors.get(status, ()) + codes))
    media: dict[str, Any] = {"schema": _ref(route.request), "example": _request_example(route)}
    if route.files:
        media["encoding"] = {
            f: {"contentType": "application/json"} for f in route.request.model_fields if f not in route.files
        }
        media["encoding"].update({f: {"contentType": "image/*"} for f in route.files})
    operation: dict[str, Any] = {
        "operationId": name,
        "summary": route.summary,
        "description": markdown_doc(doc),
        "tags": [route.tag],
        "requestBody": {"required": True, "content": {route.media_type: media}},
        "responses": {
            "200": {
                "description": "OK",
                "content": {
                    "application/json": {
                        "schema": _ref(route.response),
                        "example": RESPONSE_EXAMPLES[route.response.__name__],
                    }
                },
            },
            **{str(s): _error_response(s, c) for s, c in sorted(errors.items())},
        },
    }
    if route.protected:
        operation["security"] = [{"bearer": []}]
    return operation


def openapi_document(api_docs: Mapping[str, str | None], *, bundle_hash: str) -> dict[str, Any]:
    """The whole document. ``api_docs``: the service's API names and their docstrings.

    Raises ``ValueError`` when the service's APIs and :data:`ROUTES` differ, so that a new endpoint
    cannot ship undocumented.
    """
    if set(api_docs) != set(ROUTES):
        raise ValueError(
            f"serving/openapi.py ROUTES {sorted(ROUTES)} != the service's APIs {sorted(api_docs)}"
        )
    paths: dict[str, Any] = {f"/{n}": {"post": _operation(n, r, api_docs[n])} for n, r in ROUTES.items()}
    for path, probe in PROBES.items():
        paths[path] = {"get": {"operationId": path.strip("/"), "tags": ["operations"], **probe}}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "flatprompt",
            "version": f"{__version__}+bundle.{bundle_hash[:12]}",
            "summary": "Prompt-learned CLIP image classification with run-time class registration",
            # BentoML's page hides info.title (its CSS expects a Markdown heading in the description)
            "description": "# flatprompt\n\n" + DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "classification", "description": "Top-k labels for images"},
            {"name": "registry", "description": "Classes registered at run time"},
            {"name": "operations", "description": "Probes and metrics"},
        ],
        "paths": paths,
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "FLATPROMPT_TOKEN"}
            },
        },
    }


class DocsMiddleware:
    """Answers ``GET /docs.json`` with :func:`openapi_document` (built once, on first request).

    ``document`` is called lazily inside the worker (it reads the bundle's hash from the environment's
    configuration); everything else goes to the wrapped app.
    """

    def __init__(self, app: ASGIApp, document: Callable[[], dict[str, Any]]) -> None:
        self.app = app
        self._document = document
        self._body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") != DOCS_PATH or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        if self._body is None:
            self._body = json.dumps(self._document(), ensure_ascii=False).encode("utf-8")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self._body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self._body})
