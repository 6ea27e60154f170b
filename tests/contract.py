"""The documented contract, checked on real responses: every test client of the serving tests calls this.

:func:`check_response` looks the request's route up in the service's OpenAPI document
(``serving/openapi.py``, built here without a server) and asserts that the status is documented for it
that the JSON body validates against the documented schema (JSON Schema 2020-12, as OpenAPI 3.1
uses) and that an error's ``error`` code is one the document lists for that status. Routes the document does not list (unknown paths, ``/docs.json`` itself) must still answer errors
with the error model. :func:`contract_client` is an ``httpx.Client`` that runs the check on every
response it receives.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import httpx
from jsonschema import Draft202012Validator


class ContractError(AssertionError):
    """A response that breaks the documented contract."""


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document of the service (the bundle hash is a placeholder; nothing else depends on it)."""
    from serving.openapi import openapi_document
    from serving.service import FlatPrompt  # imports bentoml: only when a server test runs

    apis: Any = FlatPrompt.apis  # type: ignore[attr-defined]
    return openapi_document({n: a.func.__doc__ for n, a in apis.items()}, bundle_hash="0" * 64)


@functools.cache
def _validator(ref: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": ref, "components": document()["components"]})


def response_schema(method: str, path: str, status: int) -> dict[str, Any] | None:
    """The documented JSON schema of this response, or None when the route documents no JSON body.

    Raises :class:`ContractError` when the route is documented but the status is not.
    """
    operation = document()["paths"].get(path, {}).get(method.lower())
    if operation is None:
        if status >= 400:
            return {"$ref": "#/components/schemas/ErrorBody"}
        return None
    documented = operation["responses"]
    if str(status) not in documented:
        raise ContractError(f"{method} {path} answered {status}, documented: {sorted(documented)}")
    content = documented[str(status)].get("content", {})
    return content.get("application/json", {}).get("schema")


def documented_codes(method: str, path: str, status: int) -> set[str] | None:
    """The error codes documented for this status of this route (the examples' keys), None if unlisted."""
    operation = document()["paths"].get(path, {}).get(method.lower())
    if operation is None or status < 400:
        return None
    media = operation["responses"].get(str(status), {}).get("content", {}).get("application/json", {})
    return set(media.get("examples", {})) or None


def check_response(response: httpx.Response) -> None:
    """Assert that ``response`` is one the document promises for its request (see the module docstring)."""
    request = response.request
    schema = response_schema(request.method, request.url.path, response.status_code)
    if schema is None:
        return
    response.read()
    media = response.headers.get("content-type", "").split(";")[0].strip()
    if media != "application/json":
        raise ContractError(f"{request.method} {request.url.path}: {response.status_code} with {media!r}")
    body = json.loads(response.content)
    errors = sorted(_validator(schema["$ref"]).iter_errors(body), key=lambda e: list(e.path))
    if errors:
        where = "/".join(str(p) for p in errors[0].path) or "(body)"
        raise ContractError(
            f"{request.method} {request.url.path} {response.status_code}: body breaks "
            f"{schema['$ref'].rsplit('/', 1)[-1]} at {where}: {errors[0].message}"
        )
    codes = documented_codes(request.method, request.url.path, response.status_code)
    if codes is not None and body["error"] not in codes:
        raise ContractError(
            f"{request.method} {request.url.path} {response.status_code}: error code {body['error']!r} "
            f"is not documented for this status ({sorted(codes)})"
        )


def checked(response: httpx.Response) -> httpx.Response:
    """:func:`check_response`, returning the response (for one-line use around ``httpx.post``)."""
    check_response(response)
    return response


def contract_client(base_url: str, timeout: float = 60.0, **kwargs: Any) -> httpx.Client:
    """An ``httpx.Client`` whose every response is checked with :func:`check_response`."""
    return httpx.Client(
        base_url=base_url, timeout=timeout, event_hooks={"response": [check_response]}, **kwargs
    )
