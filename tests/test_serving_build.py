"""``bentoml build`` from bentofile.yaml, offline, into a temporary BENTOML_HOME; the exported Bento holds the
model, the service source and requirements naming onnxruntime-gpu (never plain onnxruntime)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

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
    packages = config["python"]["packages"]
    assert any(p.startswith("onnxruntime-gpu") for p in packages)
    assert not any(re.match(r"onnxruntime(?!-gpu)\b", p) for p in packages)
    assert "bentoml.images" not in (REPO / "serving" / "service.py").read_text()


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
    assert [m["tag"] for m in bento["models"]] == [model_tag]
