"""The operator kit under ``deploy/``: Prometheus rules (promtool, and a real Prometheus scraping a live
service), the Grafana dashboard over the recorded series, and the Kubernetes manifests (schemas).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.serving_fixtures import Server, free_port, one_worker_env, png_bytes, start_server

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "flatprompt-dashboard.json"
MANIFESTS = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.30.0"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found: run scripts/test.sh as root (it installs it), or apt-get install prometheus"
        )
    return path


def _recorded() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


# -- Prometheus rules ------------------------------------------------------------------------------


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = _tool("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", "rules_test.yml"],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """A mutated rule (error-ratio threshold 0.5 instead of 0.05) fails the unit tests."""
    promtool = _tool("promtool")
    rules = RULES.read_text().replace(
        "flatprompt:request_errors:ratio_rate5m > 0.05", "flatprompt:request_errors:ratio_rate5m > 0.5"
    )
    assert rules != RULES.read_text()
    (tmp_path / "rules.yml").write_text(rules)
    shutil.copy(RULES.parent / "rules_test.yml", tmp_path)
    unit = subprocess.run(
        [promtool, "test", "rules", "rules_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unit.returncode != 0 and "FlatpromptHighErrorRatio" in unit.stdout + unit.stderr


def test_dashboard_uses_recorded_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "flatprompt"
    recorded = _recorded()
    used = {name for expr in _dashboard_exprs() for name in re.findall(r"flatprompt:[a-z0-9_:]+", expr)}
    assert used and used <= recorded, used - recorded
    assert len(used) >= len(recorded) - 1, recorded - used  # nearly every recorded series is on a panel
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]


# -- Kubernetes ------------------------------------------------------------------------------------


def _manifests() -> dict[str, list[dict[str, Any]]]:
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(MANIFESTS.glob("*.yaml"))
        if path.name != "kustomization.yaml"
    }


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    import kubernetes_validate

    manifests = _manifests()
    assert {"deployment.yaml", "service.yaml", "hpa.yaml", "secret.example.yaml"} <= set(manifests)
    for docs in manifests.values():
        for doc in docs:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on an invalid one
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == set(manifests) - {"secret.example.yaml"}

    (deployment,) = manifests["deployment.yaml"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert set(secrets) == {"FLATPROMPT_TOKEN", "FLATPROMPT_REGISTRY_URL"}
    assert all(ref["name"] == "flatprompt" for ref in secrets.values())
    (hpa,) = manifests["hpa.yaml"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "flatprompt_queue_depth"

    broken = copy.deepcopy(deployment)  # the validator is strict enough to catch a typo
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/livez"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# -- a real Prometheus scraping a live service -----------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("deploy")
    srv = start_server(root / "run", one_worker_env(root))
    yield srv
    srv.stop()


@contextlib.contextmanager
def _prometheus(workdir: Path, target: str) -> Iterator[str]:
    """Prometheus on 127.0.0.1 scraping ``target`` every second, with the rules evaluated every second."""
    binary = _tool("prometheus")
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    (workdir / "rules.yml").write_text(yaml.safe_dump(rules))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [{"job_name": "flatprompt", "static_configs": [{"targets": [target]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(workdir / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited: {(workdir / 'prometheus.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.25)
        else:
            pytest.fail(f"prometheus not ready: {(workdir / 'prometheus.log').read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    body = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


@pytest.mark.server
def test_prometheus_records_the_service(service: Server, tmp_path: Path) -> None:
    with (
        _prometheus(tmp_path, f"127.0.0.1:{service.port}") as prom,
        httpx.Client(base_url=service.url) as http,
    ):
        files = [
            ("images", ("a.png", png_bytes(), "image/png")),
            ("images", ("b.png", png_bytes(), "image/png")),
        ]
        deadline = time.monotonic() + 60
        found: dict[str, list[dict[str, Any]]] = {}
        while time.monotonic() < deadline:
            assert http.post("/classify", files=files, timeout=30).status_code == 200
            http.post("/classes", json={})
            found = {
                expr: _query(prom, expr)
                for expr in (
                    'flatprompt:requests:rate5m{endpoint="classify",outcome="ok"}',
                    'flatprompt:batch_size:mean_rate5m{tower="image"}',
                )
            }
            if all(found.values()):
                break
            time.sleep(0.5)
        assert all(found.values()), f"no recorded data within 60 s: {found}"
        rate = found['flatprompt:requests:rate5m{endpoint="classify",outcome="ok"}'][0]
        assert float(rate["value"][1]) > 0
        mean = float(found['flatprompt:batch_size:mean_rate5m{tower="image"}'][0]["value"][1])
        assert 1 <= mean <= 2  # two images per request, one worker: batches of 1 or 2
        assert _query(prom, 'up{job="flatprompt"} == 1')
        for expr in _dashboard_exprs():  # every panel's query is accepted by a real Prometheus
            _query(prom, expr)
