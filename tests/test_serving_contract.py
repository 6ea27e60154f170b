"""The public contract: the OpenAPI document is valid and complete, and a live server keeps it.

* the document (``serving/openapi.py``) passes ``openapi-spec-validator``, documents every API route with
  its typed models, every error status with the error model, and examples that validate;
* ``/docs.json`` on a live server is that document (with the server's bundle hash in its version);
* ``schemathesis`` generates requests from the document (valid and invalid ones, a bounded number per
  route) with and without the bearer token: no 5xx, no undocumented status, every body and header
  conforms (``tests/contract.py`` does the same for every response of the other serving tests).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.contract import ContractError, check_response, contract_client, document, documented_codes
from tests.serving_fixtures import Server, one_worker_env, png_bytes, start_server

TOKEN = "contract-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
API_ROUTES = ("/classify", "/classify_base64", "/register", "/register_images", "/unregister", "/classes")
MAX_EXAMPLES = 40  # per route, generation mode and token variant


def _schema_of(ref: str) -> dict[str, Any]:
    return document()["components"]["schemas"][ref.rsplit("/", 1)[-1]]


def test_document_validates_and_is_ours() -> None:
    from openapi_spec_validator import validate

    doc = document()
    validate(doc)  # raises on an invalid document
    info = doc["info"]
    assert info["title"] == "flatprompt" and info["version"].endswith("+bundle.000000000000")
    from serving import __version__

    assert info["version"].startswith(__version__ + "+")
    text = str(doc)
    for boilerplate in ("BentoML Team", "Machine Learning Service", "``"):
        assert boilerplate not in text, boilerplate
    # no untyped object (what Swagger renders as {"additionalProp1": {}}): every map says what it holds
    untyped = [m for m in _walk(doc) if m.get("additionalProperties") in ({}, True)]
    assert not untyped, untyped[:3]
    assert set(doc["paths"]) == {*API_ROUTES, "/livez", "/readyz", "/metrics"}  # no internal route


def test_package_version_matches_pyproject() -> None:
    import tomllib

    from serving import __version__

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert __version__ == pyproject["project"]["version"]


@pytest.mark.parametrize("path", API_ROUTES)
def test_every_route_is_typed_and_documents_its_errors(path: str) -> None:
    from jsonschema import Draft202012Validator

    operation = document()["paths"][path]["post"]
    responses = operation["responses"]
    ok = responses["200"]["content"]["application/json"]["schema"]["$ref"]
    assert _schema_of(ok)["properties"], ok  # a typed model, not {"additionalProp1": {}}
    expected = {"200", "400", "413", "415", "429", "500", "504"}
    if path in ("/register", "/unregister"):
        expected |= {"401", "403", "503"}
        assert operation["security"] == [{"bearer": []}]
    assert expected <= set(responses), sorted(responses)
    for status, response in responses.items():
        if status != "200":
            media = response["content"]["application/json"]
            assert media["schema"]["$ref"].endswith("/ErrorBody"), status
            assert media["examples"], status
    # the request example is real: it validates against the request model
    (media,) = operation["requestBody"]["content"].values()
    request = media["schema"]["$ref"]
    validator = Draft202012Validator({"$ref": request, "components": document()["components"]})
    example = media["example"]
    if path in ("/classify", "/register_images"):  # multipart: the files are not in the example
        example = {**example, "images": ["<file>"]}
    assert not list(validator.iter_errors(example)), example
    assert operation["description"] and operation["summary"]


def test_every_example_validates_against_its_schema() -> None:
    from jsonschema import Draft202012Validator

    components = document()["components"]
    checked = 0
    for name, schema in components["schemas"].items():
        validator = Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": components})
        for example in schema.get("examples", []):
            assert not list(validator.iter_errors(example)), (name, example)
            checked += 1
        for prop, sub in schema.get("properties", {}).items():
            prop_validator = Draft202012Validator({**sub, "components": components})
            for example in sub.get("examples", []):
                assert not list(prop_validator.iter_errors(example)), (name, prop, example)
                checked += 1
    for path in API_ROUTES:  # the 200 example of each route validates against its response model
        media = document()["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]
        validator = Draft202012Validator({**media["schema"], "components": components})
        assert not list(validator.iter_errors(media["example"])), path
        checked += 1
    assert checked >= 20, checked


def test_service_apis_are_the_documented_routes() -> None:
    from serving.openapi import ROUTES
    from serving.service import FlatPrompt

    apis: Any = FlatPrompt.apis  # type: ignore[attr-defined]
    assert set(apis) == set(ROUTES)
    for name, api in apis.items():  # the model BentoML validates with is the documented one
        assert set(api.input_spec.model_fields) == set(ROUTES[name].request.model_fields), name


# -- against a live server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("contract")
    env = one_worker_env(
        root,
        TOKEN=TOKEN,
        THREADS="2",
        MAX_BODY_BYTES=str(1024 * 1024),
        MAX_IMAGES_PER_REQUEST="4",
        MAX_REGISTERED_CLASSES="200",
    )
    srv = start_server(root / "run", env)
    yield srv
    srv.stop()


@pytest.mark.server
def test_live_document_and_docs_page(server: Server) -> None:
    import hashlib
    import json

    live = httpx.get(server.url + "/docs.json", timeout=30).json()
    manifest = Path(server.env["FLATPROMPT_BUNDLE"]) / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert live["info"]["version"].endswith("+bundle." + digest[:12])
    expected = copy.deepcopy(document())
    expected["info"]["version"] = live["info"]["version"]
    assert json.dumps(live, sort_keys=True) == json.dumps(expected, sort_keys=True)
    page = httpx.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and "swagger" in page.text.lower()


@pytest.mark.server
def test_documented_examples_work(server: Server) -> None:
    with contract_client(server.url) as http:
        for path in ("/classify_base64", "/register", "/classes", "/unregister"):
            (media,) = document()["paths"][path]["post"]["requestBody"]["content"].values()
            response = http.post(path, json=media["example"], headers=AUTH)
            assert response.status_code == 200, (path, response.text)
        response = http.post("/classify", files=[("images", ("a.png", png_bytes(), "image/png"))])
        assert response.status_code == 200, response.text


@pytest.mark.server
def test_contract_check_catches_a_broken_body(server: Server) -> None:
    """The shared checker fails on a body that breaks its model (here: a tampered 200 body)."""
    response = httpx.post(server.url + "/classes", json={"kind": "trained"}, timeout=30)
    check_response(response)
    body = response.json()
    body["trained"][0]["count"] = "many"
    tampered = httpx.Response(200, json=body, request=response.request)
    with pytest.raises(ContractError, match="count"):
        check_response(tampered)
    with pytest.raises(ContractError, match="documented"):
        check_response(httpx.Response(418, json={}, request=response.request))


def _schemathesis(server: Server, headers: dict[str, str]) -> tuple[list[str], Counter[str]]:
    """Run schemathesis over every operation; return one line per failing case and the statuses seen."""
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    @schemathesis.check
    def documented_error_code(ctx: Any, response: Any, case: Any) -> bool | None:
        """An error's ``error`` code is one the document lists for that route and status."""
        codes = documented_codes(case.method, case.operation.path, response.status_code)
        if codes is None:
            return None
        code = response.json().get("error")
        if code not in codes:
            raise AssertionError(
                f"error code {code!r} is not documented for {response.status_code}: {sorted(codes)}"
            )
        return True

    checks = [
        documented_error_code,
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]
    # invalid input may also be refused by a size/count limit (413): a rejection too
    rejections = [400, 401, 403, 404, 405, 409, 413, 415, 422, 429]
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": rejections}}}
    )
    schema = schemathesis.openapi.from_dict(copy.deepcopy(document()), config=config)
    failures: list[str] = []
    seen: Counter[str] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":  # the probes take no input to get wrong
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:

            @hypothesis.settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                response = case.call_and_validate(
                    base_url=server.url, headers=headers, checks=checks, timeout=30
                )
                seen[f"{case.operation.path} {response.status_code}"] += 1

            try:
                run()
            except (Exception, BaseExceptionGroup) as exc:  # collected and reported together
                failures.append(f"{operation.label} [{mode.value}]: {str(exc).strip()[:1500]}")
    return failures, seen


@pytest.mark.server
@pytest.mark.parametrize("token", [True, False], ids=["with-token", "without-token"])
def test_schemathesis_finds_no_contract_violation(server: Server, token: bool) -> None:
    failures, seen = _schemathesis(server, AUTH if token else {})
    print(sorted(seen.items()))
    assert not failures, "\n\n".join(failures)
    assert seen.total() >= 5 * MAX_EXAMPLES, seen  # the run really sent requests
    for route in API_ROUTES:  # and reached every route past the guard
        assert any(k.startswith(route + " ") for k in seen), (route, seen)
    assert httpx.get(server.url + "/readyz", timeout=30).status_code == 200  # still serving


def _walk(node: object) -> list[dict[str, object]]:
    """Every mapping of a JSON document, depth first."""
    out: list[dict[str, object]] = []
    if isinstance(node, dict):
        out.append(node)
        for value in node.values():
            out.extend(_walk(value))
    elif isinstance(node, list):
        for value in node:
            out.extend(_walk(value))
    return out
