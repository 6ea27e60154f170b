"""CUDA library preload for onnxruntime-gpu without torch (serving/runtime/gpu.py), with the loader mocked:
it runs before the first session, reports what is loaded from where, and names what is missing; a required
provider that is not active keeps /readyz at 503 with the reason in the body and the log."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx
import onnxruntime as ort
import pytest

from serving.runtime import bundle as bundle_module
from serving.runtime.bundle import Bundle
from serving.runtime.gpu import REQUIRED_LIBRARIES, cuda_versions, loaded_libraries, preload_gpu_libraries
from tests.serving_fixtures import make_bundle, start_server

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
FAKE_LIBS = {name: f"/venv/site-packages/nvidia/x/lib/{name}.so.12" for name in REQUIRED_LIBRARIES}


def test_maps_parsing_finds_each_library_once() -> None:
    maps = [
        "7f00-7f01 r-xp 0 08:01 1 /venv/nvidia/cuda_runtime/lib/libcudart.so.12",
        "7f01-7f02 r--p 0 08:01 1 /venv/nvidia/cuda_runtime/lib/libcudart.so.12",
        "7f02-7f03 r-xp 0 08:01 2 /venv/nvidia/cudnn/lib/libcudnn.so.9",
        "7f03-7f04 r-xp 0 08:01 3 /venv/nvidia/cudnn/lib/libcudnn_graph.so.9",  # a cuDNN sub-library
        "7f04-7f05 r-xp 0 08:01 4 /venv/nvidia/cublas/lib/libcublasLt.so.12",
        "7f05-7f06 rw-p 0 00:00 0",
    ]
    assert loaded_libraries(maps) == {
        "libcudart": "/venv/nvidia/cuda_runtime/lib/libcudart.so.12",
        "libcudnn": "/venv/nvidia/cudnn/lib/libcudnn.so.9",
        "libcublasLt": "/venv/nvidia/cublas/lib/libcublasLt.so.12",
    }


def test_cpu_build_does_not_preload() -> None:
    calls: list[dict[str, Any]] = []
    report = preload_gpu_libraries(preload=lambda **kw: calls.append(kw), available=lambda: [CPU])
    assert report.status == "cpu_build" and report.ok and not calls


def test_preload_reports_loaded_and_missing_libraries(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="serving.runtime.gpu")
    calls: list[dict[str, Any]] = []
    report = preload_gpu_libraries(
        preload=lambda **kw: calls.append(kw), available=lambda: [CUDA, CPU], maps=lambda: dict(FAKE_LIBS)
    )
    assert calls == [{"cuda": True, "cudnn": True, "msvc": False, "directory": None}]
    assert report.status == "loaded" and report.ok and report.reason() == ""
    assert "libcudnn.so.12 from /venv/site-packages/nvidia/x/lib" in caplog.text

    partial = {k: v for k, v in FAKE_LIBS.items() if k not in ("libcudnn", "libcublasLt")}
    caplog.clear()
    report = preload_gpu_libraries(
        preload=lambda **kw: None, available=lambda: [CUDA, CPU], maps=lambda: partial
    )
    assert report.status == "incomplete" and not report.ok
    assert report.missing == ("libcublasLt", "libcudnn")
    assert "libcublasLt, libcudnn" in report.reason() and "onnxruntime-gpu[cuda,cudnn]" in report.reason()
    assert "CUDA libraries not found" in caplog.text


def test_preload_failure_is_reported_not_raised() -> None:
    def broken(**_: Any) -> None:
        raise OSError("libcudnn.so.9: cannot open shared object file")

    report = preload_gpu_libraries(preload=broken, available=lambda: [CUDA, CPU], maps=dict)
    assert report.status == "incomplete" and set(report.missing) == set(REQUIRED_LIBRARIES)


def test_versions_without_gpu_libraries_come_from_the_build() -> None:
    versions = cuda_versions({})
    assert versions["source"] in ("build", "none")
    if "CUDAExecutionProvider" not in ort.get_available_providers():  # the CPU wheel names no CUDA
        assert versions["cuda"] == "" and versions["cudnn"] == ""


def test_bundle_load_preloads_before_the_first_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With onnxruntime-gpu installed (simulated: CUDA listed as available), the preload precedes every
    InferenceSession; with CUDA not requested it never runs."""
    path = make_bundle(tmp_path / "b")
    events: list[str] = []
    real_session = bundle_module._session

    def fake_preload(**kwargs: Any) -> None:
        events.append("preload")

    def recording_session(*args: Any, **kwargs: Any) -> Any:
        events.append("session")
        return real_session(args[0], [CPU], *args[2:], **kwargs)  # the CPU wheel cannot start CUDA

    monkeypatch.setattr(ort, "preload_dlls", fake_preload, raising=False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(bundle_module, "_session", recording_session)
    loaded = Bundle.load(path, providers=[CUDA, CPU])
    assert events[0] == "preload" and events.count("preload") == 1 and events.count("session") >= 2
    assert loaded.gpu.status in ("loaded", "incomplete") and loaded.provider == CPU
    assert loaded.cuda == {"cuda": "", "cudnn": ""}  # not on CUDA: no versions claimed

    events.clear()
    Bundle.load(path, providers=[CPU])
    assert "preload" not in events


@pytest.mark.server
def test_required_provider_missing_keeps_readyz_503_with_reason(tmp_path: Path) -> None:
    env = {
        "FLATPROMPT_BUNDLE": str(make_bundle(tmp_path / "b")),
        "FLATPROMPT_REGISTRY_URL": f"sqlite:///{tmp_path}/r.db",
        "FLATPROMPT_REQUIRE_PROVIDER": CUDA,
    }
    server = start_server(tmp_path / "s", env, wait_ready=False)
    try:
        body: dict[str, Any] = {}
        for _ in range(240):  # bounded: up to ~60 s for the worker to load
            try:
                r = httpx.get(server.url + "/readyz", timeout=2)
            except httpx.HTTPError:
                r = None
            if r is not None and r.headers.get("content-type", "").startswith("application/json"):
                body = r.json()
                assert r.status_code == 503
                break
            assert server.proc.poll() is None, server.log()
            time.sleep(0.25)
        assert body.get("error") == "not_ready", server.log()
        assert "FLATPROMPT_REQUIRE_PROVIDER=CUDAExecutionProvider" in body["message"]
        assert "FLATPROMPT_REQUIRE_PROVIDER=none" in body["message"]  # the way out is named
        assert "the service stays unready" in server.log()
        r = httpx.post(server.url + "/classes", json={}, timeout=10)
        assert r.status_code in (200, 503)  # a listing may answer; classification must not run on CPU
    finally:
        server.stop(timeout=10)

    ok = start_server(tmp_path / "s2", {**env, "FLATPROMPT_REQUIRE_PROVIDER": "none"})
    try:
        assert httpx.get(ok.url + "/readyz", timeout=5).status_code == 200
    finally:
        ok.stop(timeout=10)
