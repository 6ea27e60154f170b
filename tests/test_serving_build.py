"""``bentoml build`` from bentofile.yaml, offline, into a temporary BENTOML_HOME; the exported Bento holds the
model, the service source and requirements naming onnxruntime-gpu (never plain onnxruntime); the pinned GPU
stacks resolve against the package index without torch; the container refuses a CPU fallback by default."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.serving_fixtures import REPO, make_bundle


def _run(args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_bentofile_is_the_only_build_config() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    assert "[tool.bentoml" not in pyproject
    config = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    assert config["service"] == "serving.service:FlatPrompt"
    packages = _requirements(REPO / config["python"]["requirements_txt"])
    assert [p for p in packages if p.startswith("onnxruntime-gpu")] == ["onnxruntime-gpu[cuda,cudnn]==1.26.0"]
    assert not any(re.match(r"onnxruntime(?!-gpu)\b", p) for p in packages)
    assert "bentoml.images" not in (REPO / "serving" / "service.py").read_text()
    envs = {e["name"]: e["value"] for e in config["envs"]}
    assert envs["FLATPROMPT_REQUIRE_PROVIDER"] == "CUDAExecutionProvider"


def _requirements(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


@pytest.mark.parametrize(("name", "cuda_major"), [("bento-cuda12.txt", "12"), ("bento-cuda13.txt", "13")])
def test_pinned_gpu_stack_resolves_without_torch(tmp_path: Path, name: str, cuda_major: str) -> None:
    """What the container installs: the pinned onnxruntime-gpu, CUDA / cuDNN wheels of one major, no torch."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "--target",
            str(tmp_path / "t"),
            "-r",
            str(REPO / "requirements" / name),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    resolved = {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    assert "torch" not in resolved and "onnxruntime" not in resolved, sorted(resolved)
    runtime = [n for n in resolved if n.startswith("nvidia-cuda-runtime")]
    cudnn = [n for n in resolved if n.startswith("nvidia-cudnn")]
    assert runtime and cudnn, sorted(resolved)
    assert all(resolved[n].split(".")[0] == cuda_major for n in runtime), {n: resolved[n] for n in runtime}
    assert all(resolved[n].split(".")[0] == "9" for n in cudnn), {n: resolved[n] for n in cudnn}


def test_bentoml_build_offline(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        # no network: any attempt to reach an index fails fast instead of hanging
        "PIP_NO_INDEX": "1",
        "UV_OFFLINE": "1",
    }
    bundle = make_bundle(tmp_path / "bundle")
    model_tag = _run([sys.executable, "-m", "serving.model_store", str(bundle)], env).strip()
    assert model_tag.startswith("flatprompt:")
    out = _run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], env)
    bento_tag = out.strip().splitlines()[-1].removeprefix("__tag__:")
    assert bento_tag.startswith("flatprompt:")

    archive = tmp_path / "flatprompt.bento"
    _run([sys.executable, "-m", "bentoml", "export", bento_tag, str(archive)], env)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        model_dir = f"./models/flatprompt/{model_tag.split(':')[1]}"
        for required in ("manifest.json", "image_encoder.onnx", "text_encoder.onnx", "tokenizer.json"):
            assert f"{model_dir}/{required}" in names, required
        assert "./src/serving/service.py" in names and "./src/serving/runtime/bundle.py" in names
        assert not any("tests/" in n or n.endswith(".pyc") for n in names)
        member = tar.extractfile("./env/python/requirements.txt")
        assert member is not None
        requirements = member.read().decode().splitlines()
        member = tar.extractfile("./bento.yaml")
        assert member is not None
        bento = yaml.safe_load(member.read())
    assert any(line.startswith("onnxruntime-gpu") for line in requirements)
    assert not any(re.match(r"onnxruntime(?!-gpu)\b", line) for line in requirements)
    assert bento["service"] == "serving.service:FlatPrompt"
    assert {e["name"]: e["value"] for e in bento["envs"]}[
        "FLATPROMPT_REQUIRE_PROVIDER"
    ] == "CUDAExecutionProvider"
    assert "requirements/bento-cuda12.txt" not in requirements  # the file's lines, not a reference to it
    assert [m["tag"] for m in bento["models"]] == [model_tag]
