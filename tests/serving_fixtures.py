"""Helpers for the serving tests: a synthetic bundle and a real ``bentoml serve`` process.

The synthetic bundle follows ``docs/bundle.md`` with tiny ONNX graphs built by ``onnx.helper``:

* image tower: ``pixels [N,3,S,S]`` -> per-channel mean ``[N,3]`` -> MatMul ``[3,E]`` -> L2 normalise;
  the trained classes are colours whose class embedding is the image embedding of a plain image of
  that colour, so a red picture classifies as ``red``;
* text tower: ``token_ids [N,L]`` -> Gather (ids mod 4096) -> masked sum over tokens -> L2 normalise
  (distinct names get distinct embeddings; there is no learned context).

``tokenizer.json`` comes from ``export.tokenizer`` (open_clip's own BPE vocabulary, built offline).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

_logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 200, 40),
    "blue": (30, 40, 220),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
    "yellow": (240, 230, 30),
}
COUNTS = (1000, 300, 100, 30, 10, 3)  # long-tailed training counts, in COLOURS order
IMAGE_SIZE = 32
EMBED_DIM = 16
CONTEXT_LENGTH = 77
TEXT_VOCAB = 4096


def _normalised_colour(rgb: tuple[int, int, int]) -> np.ndarray:
    return (np.asarray(rgb, np.float64) / 255.0 - np.asarray(MEAN)) / np.asarray(STD)


def _image_graph(weights: np.ndarray, path: Path, image_size: int = IMAGE_SIZE) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMean", ["pixels"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w_img"], ["proj"]),
        helper.make_node("ReduceL2", ["proj"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["safe_norm"]),
        helper.make_node("Div", ["proj", "safe_norm"], ["embeddings"]),
    ]
    graph = helper.make_graph(
        nodes,
        "synthetic_image_encoder",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", EMBED_DIM])],
        [
            numpy_helper.from_array(weights.astype(np.float32), "w_img"),
            numpy_helper.from_array(np.float32(1e-12), "eps"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="flatprompt-tests"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _text_graph(table: np.ndarray, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Mod", ["token_ids", "vocab"], ["ids_mod"]),
        helper.make_node("Gather", ["table", "ids_mod"], ["tok"], axis=0),  # [N, L, E]
        helper.make_node("Equal", ["token_ids", "zero"], ["is_pad"]),
        helper.make_node("Not", ["is_pad"], ["keep"]),
        helper.make_node("Cast", ["keep"], ["keep_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["keep_f", "axis2"], ["mask"]),  # [N, L, 1]
        helper.make_node("Mul", ["tok", "mask"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),  # [N, E]
        helper.make_node("ReduceL2", ["summed"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["safe_norm"]),
        helper.make_node("Div", ["summed", "safe_norm"], ["embeddings"]),
    ]
    inits = [
        numpy_helper.from_array(table.astype(np.float32), "table"),
        numpy_helper.from_array(np.int64(TEXT_VOCAB), "vocab"),
        numpy_helper.from_array(np.int64(0), "zero"),
        numpy_helper.from_array(np.asarray([2], np.int64), "axis2"),
        numpy_helper.from_array(np.asarray([1], np.int64), "axis1"),
        numpy_helper.from_array(np.float32(1e-12), "eps"),
    ]
    graph = helper.make_graph(
        nodes,
        "synthetic_text_encoder",
        [helper.make_tensor_value_info("token_ids", TensorProto.INT64, ["batch", CONTEXT_LENGTH])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", EMBED_DIM])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="flatprompt-tests"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _tokenizer_json(target: Path) -> dict[str, object]:
    """Copy a cached ``tokenizer.json`` built by ``export.tokenizer`` (about 1 s to build once)."""
    from export.tokenizer import tokenizer_manifest, write_tokenizer_json

    cache = Path(os.environ.get("FLATPROMPT_TEST_CACHE", "/tmp/flatprompt-test-cache"))
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / "tokenizer.json"
    if not cached.is_file():
        tmp = cache / f"tokenizer.{os.getpid()}.tmp"
        write_tokenizer_json(tmp)
        tmp.replace(cached)
    shutil.copyfile(cached, target)
    return dict(tokenizer_manifest(CONTEXT_LENGTH))


def make_bundle(out: Path, seed: int = 0, logit_scale: float = 100.0, image_size: int = IMAGE_SIZE) -> Path:
    """Write a complete, valid synthetic bundle into ``out`` (created) and return it.

    Different ``seed`` values give different weights, hence a different bundle hash; ``image_size`` is the
    model input side (the graph's mean pooling works at any size).
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w_img = rng.standard_normal((3, EMBED_DIM))
    table = rng.standard_normal((TEXT_VOCAB, EMBED_DIM))
    _image_graph(w_img, out / "image_encoder.onnx", image_size)
    _text_graph(table, out / "text_encoder.onnx")
    classes = np.stack([_normalised_colour(rgb) @ w_img for rgb in COLOURS.values()])
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    np.save(out / "class_embeddings.npy", classes.astype(np.float32))
    (out / "classes.json").write_text(
        json.dumps({"names": list(COLOURS), "counts": list(COUNTS)}), encoding="utf-8"
    )
    tokenizer = _tokenizer_json(out / "tokenizer.json")
    files = [
        "image_encoder.onnx",
        "text_encoder.onnx",
        "class_embeddings.npy",
        "classes.json",
        "tokenizer.json",
    ]
    manifest = {
        "format_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "name": "synthetic-test",
            "pretrained": None,
            "open_clip_version": None,
            "checkpoint_sha256": None,
        },
        "source": {"kind": "zero_shot", "checkpoint": None, "checkpoint_sha256": None},
        "onnx": {"opset": 17, "onnx_version": _onnx_version(), "torch_version": None},
        "logit_scale": float(logit_scale),
        "logit_bias": None,
        "embed_dim": EMBED_DIM,
        "context_length": CONTEXT_LENGTH,
        "prompt": {"template": "a photo of a {}.", "n_ctx": 0, "placeholder": "X"},
        "tokenizer": tokenizer,
        "preprocess": {
            "image_size": image_size,
            "resize_mode": "shortest",
            "interpolation": "bicubic",
            "crop": "center",
            "mean": list(MEAN),
            "std": list(STD),
            "convert": "RGB",
            "exif_transpose": False,
        },
        "parity": {},
        "files": {
            name: {
                "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest(),
                "bytes": (out / name).stat().st_size,
            }
            for name in files
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out


def _onnx_version() -> str:
    import onnx

    return str(onnx.__version__)


def png_bytes(
    rgb: tuple[int, int, int] = (220, 20, 20), size: tuple[int, int] = (48, 40), fmt: str = "PNG"
) -> bytes:
    """A plain-colour image file."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format=fmt)
    return buf.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 1-bit PNG of ``width x height`` pixels compressed to a few hundred KB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def one_worker_env(root: Path, **settings: str) -> dict[str, str]:
    """``FLATPROMPT_*`` settings of a one-worker CPU server over a fresh synthetic bundle and SQLite registry
    in ``root``; ``settings`` (``TOKEN="..."``) add or override ``FLATPROMPT_<NAME>`` variables."""
    env = {
        "FLATPROMPT_BUNDLE": str(make_bundle(root / "bundle")),
        "FLATPROMPT_REGISTRY_URL": f"sqlite:///{root}/registry.db",
        "FLATPROMPT_PROVIDERS": "CPUExecutionProvider",
        "FLATPROMPT_WORKERS": "1",
    }
    env.update({f"FLATPROMPT_{name}": value for name, value in settings.items()})
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running ``bentoml serve`` process group started by the tests."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self, tail: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-tail:]
        return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server's PID, wait, then SIGKILL its process group if it is still there."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _logger.warning("server %d ignored SIGTERM for %.0f s; killing it", self.proc.pid, timeout)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group we created with start_new_session
            self.proc.wait(timeout=10)
        # workers of a killed arbiter could linger in the group: end them too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


def start_server(
    workdir: Path,
    env: dict[str, str],
    *,
    port: int | None = None,
    ready_timeout: float = 120.0,
    wait_ready: bool = True,
    target: str = "serving.service:FlatPrompt",
) -> Server:
    """Start ``bentoml serve TARGET`` (default the service) on 127.0.0.1 and wait for ``/readyz``.

    ``env`` holds the ``FLATPROMPT_*`` settings; ``BENTOML_HOME`` defaults to ``workdir/bentoml``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FLATPROMPT_")}
    full_env.update(
        {
            "BENTOML_HOME": str(workdir / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "True",
            "BENTOML_DISABLE_GPU_ALLOCATION": "1",
            "TMPDIR": str(workdir),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    full_env.update(env)
    log_path = workdir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bentoml",
                "serve",
                target,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=REPO,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(proc=proc, port=port, log_path=log_path, env=full_env)
    if wait_ready:
        try:
            wait_until_ready(server, ready_timeout)
        except BaseException:
            server.stop(timeout=10)
            raise
    return server


def wait_until_ready(server: Server, timeout: float) -> None:
    """Poll ``/readyz`` until 200, the process exits, or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{server.log()}")


def wait_for_workers(server: Server, count: int, timeout: float = 120.0) -> set[str]:
    """Until ``count`` distinct workers have answered (``/readyz`` is answered by whichever worker is up
    first; a slower one may still be warming up). Bursts of 8 concurrent fresh connections, so a busy
    worker leaves the next connection to another. Returns the worker ids seen."""
    import concurrent.futures as cf

    def one(_: int) -> str | None:
        with contextlib.suppress(httpx.HTTPError), httpx.Client(base_url=server.url, timeout=10) as c:
            return c.post("/classes", json={}).headers.get("x-flatprompt-worker")
        return None

    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    with cf.ThreadPoolExecutor(8) as pool:
        while time.monotonic() < deadline:
            seen.update(w for w in pool.map(one, range(8)) if w is not None)
            if len(seen) >= count:
                return seen
            time.sleep(0.25)
    raise TimeoutError(f"only workers {sorted(seen)} answered within {timeout:.0f} s:\n{server.log()}")


@contextlib.contextmanager
def running_server(workdir: Path, env: dict[str, str], **kwargs: object) -> Iterator[Server]:
    """Context manager around :func:`start_server` that always stops the server."""
    server = start_server(workdir, env, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


# -- PostgreSQL started by the tests (initdb in a temp dir, random port, 127.0.0.1 only) -----------
def postgres_binaries() -> dict[str, str] | None:
    """Paths of initdb/pg_ctl/postgres, or None when PostgreSQL is not installed."""
    found = {}
    for name in ("initdb", "pg_ctl", "postgres"):
        path = shutil.which(name)
        if path is None:
            for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
                path = str(candidate)
                break
        if path is None:
            return None
        found[name] = path
    return found


@dataclass
class Postgres:
    """A throw-away PostgreSQL cluster; ``url`` connects as the superuser without a password."""

    datadir: Path
    port: int
    user: str
    binaries: dict[str, str]

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        """Stop the cluster (immediate mode) and delete its directory."""
        _as_pg_user(
            [self.binaries["pg_ctl"], "-D", str(self.datadir), "-m", "immediate", "-w", "-t", "30", "stop"],
            check=False,
        )
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


def _as_pg_user(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
    # PostgreSQL refuses to run as root: drop to the "postgres" system user when we are root.
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, check=check, capture_output=True, timeout=120)


def start_postgres() -> Postgres:
    """initdb + start a cluster listening on 127.0.0.1 only, on a free port, in a fresh temp dir.

    The directory is made with ``tempfile.mkdtemp`` directly under the temp root (not under pytest's
    0700 tmp tree) because, when the tests run as root, PostgreSQL runs as the ``postgres`` user.
    """
    binaries = postgres_binaries()
    if binaries is None:
        raise FileNotFoundError(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: run scripts/test.sh as root "
            "(it installs them), or apt-get install postgresql"
        )
    workdir = Path(tempfile.mkdtemp(prefix="flatprompt-pg-"))
    datadir = workdir / "pgdata"
    user = "flatprompt"
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
    _as_pg_user(
        [binaries["initdb"], "-D", str(datadir), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync"]
    )
    port = free_port()
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={workdir} -c fsync=off"
    _as_pg_user(
        [
            binaries["pg_ctl"],
            "-D",
            str(datadir),
            "-l",
            str(workdir / "postgres.log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        ]
    )
    return Postgres(datadir=datadir, port=port, user=user, binaries=binaries)
