"""Reliability figures of the service, measured against real ``bentoml serve`` processes on 127.0.0.1.

Sections (``--only`` picks some; each starts and stops what it needs, every loop is bounded):

* ``abuse``: a corpus of hostile requests (files, multipart structure, headers, JSON shapes, numbers,
  names, templates, auth, paths) sent over raw sockets; counts of 4xx / 5xx / hangs / resets /
  errors not in the schema, and ``/readyz`` + a good classification after each one;
* ``slow``: 50 clients trickling upload bytes while good classifications run; good p99 against a quiet
  baseline;
* ``crash``: ``kill -9`` of the whole server group at a random moment during registrations, ``--kills``
  times per registry (SQLite, and PostgreSQL when its binaries are installed): acknowledged
  registrations lost, integrity / consistency checks, half-written batches;
* ``shutdown``: SIGTERM with 16 classifications in flight: completed, failed, time to exit;
* ``outage``: PostgreSQL stopped during a load run and started again: classification availability,
  registrations answered 503 + ``Retry-After`` during the outage and 200 after, acknowledged ones lost;
* ``freeze``: PostgreSQL frozen (SIGSTOP) during a load run: what classifications and registrations get;
* ``paths``: 1,000 random paths: answers, and the number of ``/metrics`` series they leave behind;
* ``logs``: bytes of server log written per hostile request;
* ``arbiter``: ``kill -9`` of the arbiter alone: workers left running, time until a new server is ready
  on the same port;
* ``soak``: ``--minutes`` at concurrency 32 of mixed classify / register / unregister: non-2xx by
  status, p50 / p99, RSS of every server process at start and end.

Usage::

    python benchmarks/chaos.py                                  # everything, 10-minute soak
    python benchmarks/chaos.py --only abuse,slow --json out.json
    python benchmarks/chaos.py --minutes 2 --kills 20 --bundle bundles/toy

The default bundle is the synthetic one of :mod:`export.synthetic` (tiny graphs: the figures are about the
service, not the model); ``--bundle`` serves a real one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import random
import signal
import socket
import sqlite3
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.scenarios.reliability import sigstop_tree  # noqa: E402
from export.synthetic import png_bomb, png_bytes  # noqa: E402
from serving.launch import (  # noqa: E402
    Postgres,
    Server,
    postgres_binaries,
    start_postgres,
    start_server,
)

_logger = logging.getLogger("chaos")
TOKEN = "chaos-token-0123456789"
BOUNDARY = "chaosboundary7f3a"
HOST = "127.0.0.1"


# -- results ----------------------------------------------------------------------------------------
@dataclass
class Row:
    """One measured figure: ``goal`` is the target in words, ``met`` None when there is no target."""

    measure: str
    value: Any
    goal: str = ""
    met: bool | None = None


@dataclass
class Section:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, measure: str, value: Any, goal: str = "", met: bool | None = None) -> None:
        self.rows.append(Row(measure, value, goal, met))


@dataclass
class Context:
    """What every scenario gets: the options, a scratch directory, the bundle."""

    args: argparse.Namespace
    workdir: Path
    bundle: Path
    rng: random.Random

    def server(self, name: str, registry_url: str | None = None, **env: str) -> Server:
        """A fresh ``bentoml serve`` (1 worker unless ``--workers``) with its own directory."""
        run = self.workdir / name
        run.mkdir(parents=True, exist_ok=True)
        base = {
            "FLATPROMPT_BUNDLE": str(self.bundle),
            "FLATPROMPT_REGISTRY_URL": registry_url or f"sqlite:///{run}/registry.db",
            "FLATPROMPT_TOKEN": TOKEN,
            "FLATPROMPT_PROVIDERS": "CPUExecutionProvider",
            "FLATPROMPT_WORKERS": str(self.args.workers),
            "FLATPROMPT_THREADS": "2",
            "FLATPROMPT_ORT_THREADS": "1",
        }
        base.update(env)
        return start_server(run, base, ready_timeout=300)


# -- a raw HTTP/1.1 client (sockets: malformed requests, early answers, resets) --------------------
def http_request(
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    content_length: bool = True,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    hdrs = dict(headers or {})
    if content_length and not any(k.lower() in ("content-length", "transfer-encoding") for k in hdrs):
        hdrs["Content-Length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def multipart(
    files: Sequence[bytes] = (),
    fields: dict[str, str] | None = None,
    file_field: str = "images",
    boundary: str = BOUNDARY,
) -> tuple[bytes, str]:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{i}.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(files)
    ]
    for key, value in (fields or {}).items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'.encode()
            + value.encode("utf-8", "surrogateescape")
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def classify_request(files: Sequence[bytes], **fields: str) -> bytes:
    body, media = multipart(files, fields)
    return http_request("POST", "/classify", body, {"Content-Type": media})


def json_request(path: str, payload: Any, auth: bool = False, raw: bytes | None = None) -> bytes:
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = f"Bearer {TOKEN}"
    body = raw if raw is not None else json.dumps(payload).encode()
    return http_request("POST", path, body, headers)


@dataclass
class Answer:
    status: int | None  # None: no complete answer
    outcome: str  # "answered", "hang", "reset"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    return status, headers


def exchange(port: int, raw: bytes | Callable[[socket.socket], None], timeout: float) -> Answer:
    """Send one request (bytes, or a function writing to the socket) while reading the answer.

    The sender runs in a thread so an answer sent before the body is complete is still read, as a
    client reading while it writes would.
    """
    started = time.monotonic()
    try:
        sock = socket.create_connection((HOST, port), timeout=5)
    except OSError:
        return Answer(None, "reset", seconds=time.monotonic() - started)

    def send() -> None:
        with contextlib.suppress(OSError):
            if callable(raw):
                raw(sock)
            else:
                sock.sendall(raw)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    data = b""
    deadline = started + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Answer(None, "hang", seconds=time.monotonic() - started)
            sock.settimeout(min(remaining, 1.0))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep and head.split(b" ", 2)[1:2] == [b"100"]:
                data = rest  # 100 Continue: the answer follows
                continue
            if sep:
                status, headers = _parse_head(head)
                length = int(headers.get("content-length", "0") or 0)
                if len(rest) >= length or (not chunk and "content-length" not in headers):
                    return Answer(status, "answered", headers, rest[:length], time.monotonic() - started)
            if not chunk:
                return Answer(None, "reset", seconds=time.monotonic() - started)
    finally:
        with contextlib.suppress(OSError):
            sock.close()


def good_image(seed: int = 0) -> bytes:
    rgb = ((seed * 67) % 256, (seed * 131 + 40) % 256, (seed * 29 + 90) % 256)
    return png_bytes(rgb, size=(64, 48))


# -- the abuse corpus -------------------------------------------------------------------------------
@dataclass
class Probe:
    category: str
    name: str
    request: bytes | Callable[[socket.socket], None]
    expect: str = "4xx"  # "4xx", "2xx" (hostile-looking but valid) or "any" (2xx or 4xx)


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + crc


def _image(mode: str, fmt: str, size: tuple[int, int] = (40, 30), **save: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt, **save)
    return buf.getvalue()


def _gif_animated() -> bytes:
    from PIL import Image

    frames = [Image.new("P", (20, 20), i) for i in range(5)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _jpeg_huge_header() -> bytes:
    data = bytearray(_image("RGB", "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def _trickle(raw: bytes, stop_after: int, delay: float) -> Callable[[socket.socket], None]:
    def write(sock: socket.socket) -> None:
        sock.sendall(raw[:stop_after])
        time.sleep(delay)

    return write


def abuse_corpus(max_body: int, trained: str) -> list[Probe]:
    """At least 150 hostile requests; each expects a 4xx in the error schema unless marked."""
    good = good_image()
    corpus: list[Probe] = []

    def add(category: str, name: str, request: bytes | Callable[[socket.socket], None], expect: str = "4xx"):
        corpus.append(Probe(category, name, request, expect))

    # files
    files: list[tuple[str, bytes, str]] = [
        ("empty file", b"", "4xx"),
        ("text file", b"hello, I am not an image\n" * 10, "4xx"),
        ("truncated PNG", good[: len(good) // 2], "4xx"),
        ("truncated JPEG", _image("RGB", "JPEG")[:200], "4xx"),
        ("PNG bomb 30000x30000", png_bomb(), "4xx"),
        ("PNG header 100000x100000, no data", _png_header(100_000, 100_000), "4xx"),
        ("PNG header 0x0", _png_header(0, 0), "4xx"),
        ("PNG header only 64x64", _png_header(64, 64), "4xx"),
        ("JPEG header 65000x65000", _jpeg_huge_header(), "4xx"),
        ("TIFF (not allowed)", _image("RGB", "TIFF"), "4xx"),
        ("ICO (not allowed)", _image("RGB", "ICO", (32, 32)), "4xx"),
        ("PDF magic", b"%PDF-1.7\n" + os.urandom(2000), "4xx"),
        ("SVG", b'<svg xmlns="http://www.w3.org/2000/svg" width="1e9" height="1e9"></svg>', "4xx"),
        ("random bytes 64 KiB", random.Random(1).randbytes(65536), "4xx"),
        ("PNG magic + garbage", b"\x89PNG\r\n\x1a\n" + random.Random(2).randbytes(4000), "4xx"),
        ("GIF magic + garbage", b"GIF89a" + random.Random(3).randbytes(4000), "4xx"),
        ("BMP magic + garbage", b"BM" + random.Random(4).randbytes(4000), "4xx"),
        ("WebP truncated", _image("RGB", "WEBP")[:40], "4xx"),
        ("gzip of a PNG", zlib.compress(good), "4xx"),
        ("zip magic", b"PK\x03\x04" + random.Random(5).randbytes(1000), "4xx"),
        ("CMYK JPEG (valid)", _image("CMYK", "JPEG"), "2xx"),
        ("16-bit greyscale PNG (valid)", _image("I;16", "PNG"), "2xx"),
        ("palette PNG with transparency (valid)", _image("P", "PNG", transparency=0), "2xx"),
        ("RGBA WebP (valid)", _image("RGBA", "WEBP"), "2xx"),
        ("animated GIF (valid)", _gif_animated(), "2xx"),
        ("1x20000 PNG (valid)", png_bytes(size=(1, 20000)), "2xx"),
        ("1-bit BMP (valid)", _image("1", "BMP"), "2xx"),
        ("PNG named .exe, text/plain (valid)", good, "2xx"),
    ]
    for name, data, expect in files:
        add("files", name, classify_request([data]), expect)
    add("files", "good + bomb in one request", classify_request([good, png_bomb()]))

    # multipart structure
    body, media = multipart([good])
    add(
        "multipart",
        "no boundary parameter",
        http_request("POST", "/classify", body, {"Content-Type": "multipart/form-data"}),
    )
    add(
        "multipart",
        "wrong boundary",
        http_request("POST", "/classify", body, {"Content-Type": "multipart/form-data; boundary=nope"}),
    )
    add(
        "multipart",
        "no closing delimiter",
        http_request("POST", "/classify", body[: -len(BOUNDARY) - 6], {"Content-Type": media}),
    )
    add(
        "multipart",
        "garbage body",
        http_request("POST", "/classify", b"\x00\xff" * 500, {"Content-Type": media}),
    )
    add("multipart", "empty body", http_request("POST", "/classify", b"", {"Content-Type": media}))
    add(
        "multipart",
        "only the closing delimiter",
        http_request("POST", "/classify", f"--{BOUNDARY}--\r\n".encode(), {"Content-Type": media}),
    )
    add("multipart", "no image parts", classify_request([], top_k="3"))
    add("multipart", "10,000 image parts", classify_request([png_bytes(size=(4, 4))] * 10_000))
    add("multipart", "17 images (limit 16)", classify_request([good] * 17))
    add("multipart", "1,000 top_k fields", http_request("POST", "/classify", *_many_fields(good, 1000)))
    add(
        "multipart",
        "image as a text value (URL)",
        http_request("POST", "/classify", *_text_image("http://169.254.169.254/latest/meta-data/")),
    )
    add(
        "multipart",
        "image as a text value (file:)",
        http_request("POST", "/classify", *_text_image("file:///etc/passwd")),
    )
    add(
        "multipart",
        "part without a name",
        http_request(
            "POST", "/classify", *_raw_part(b'Content-Disposition: form-data; filename="a.png"', good)
        ),
    )
    add(
        "multipart",
        "part without Content-Disposition",
        http_request("POST", "/classify", *_raw_part(b"Content-Type: image/png", good)),
    )
    add(
        "multipart",
        "part header 100 KB",
        http_request("POST", "/classify", *_raw_part(b"X-Pad: " + b"a" * 100_000, good)),
    )
    add(
        "multipart",
        "part headers never end",
        http_request(
            "POST",
            "/classify",
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"'.encode() + b"a" * 5000,
            {"Content-Type": media},
        ),
    )
    add("multipart", "boundary of 300 characters", http_request("POST", "/classify", *_long_boundary(good)))
    add(
        "multipart",
        "non-UTF-8 field name",
        http_request(
            "POST", "/classify", *_raw_part(b'Content-Disposition: form-data; name="\xff\xfe"', b"3")
        ),
    )
    add("multipart", "non-UTF-8 top_k value", classify_request([good], top_k="\udcff\udcfe"))
    for depth in (40, 1000, 100_000):
        add(
            "multipart",
            f"candidates nested {depth} deep",
            classify_request([good], candidates="[" * depth + "]" * depth),
        )
    add("multipart", "candidates 100,000 unclosed [", classify_request([good], candidates="[" * 100_000))
    add("multipart", "candidates not JSON", classify_request([good], candidates="red, green"))
    add("multipart", "candidates a JSON object", classify_request([good], candidates='{"red": 1}'))
    add(
        "multipart",
        "candidates 2 MB field",
        classify_request([good], candidates=json.dumps(["n" * 100] * 20_000)),
    )
    add("multipart", "unknown field", classify_request([good], evil="1"), "any")
    add("multipart", "field named like a file field twice", classify_request([good, good], top_k="1"), "2xx")

    # headers
    one = classify_request([good])
    head, _, payload = one.partition(b"\r\n\r\n")
    add(
        "headers",
        "Content-Length larger than the body",
        head.replace(
            f"Content-Length: {len(payload)}".encode(), f"Content-Length: {len(payload) + 5000}".encode()
        )
        + b"\r\n\r\n"
        + payload,
    )
    add(
        "headers",
        "Content-Length smaller than the body",
        head.replace(f"Content-Length: {len(payload)}".encode(), b"Content-Length: 10")
        + b"\r\n\r\n"
        + payload,
    )
    add(
        "headers",
        "negative Content-Length",
        head.replace(f"Content-Length: {len(payload)}".encode(), b"Content-Length: -5")
        + b"\r\n\r\n"
        + payload,
    )
    add(
        "headers",
        "non-numeric Content-Length",
        head.replace(f"Content-Length: {len(payload)}".encode(), b"Content-Length: 12abc")
        + b"\r\n\r\n"
        + payload,
    )
    add(
        "headers",
        "two different Content-Length",
        head + f"\r\nContent-Length: {len(payload) + 1}".encode() + b"\r\n\r\n" + payload,
    )
    add(
        "headers",
        "Content-Length 40 MB, nothing sent",
        _trickle(
            http_request(
                "POST", "/classify", b"", {"Content-Type": media, "Content-Length": str(40 * 2**20)}
            ),
            10**9,
            1.0,
        ),
    )
    add(
        "headers",
        "body over the limit (Content-Length)",
        http_request("POST", "/classify_base64", b"x" * (max_body + 1), {"Content-Type": "application/json"}),
    )
    add("headers", "chunked body over the limit", _chunked_request(max_body + 65536))
    add(
        "headers",
        "chunked with a bad chunk size",
        http_request(
            "POST",
            "/classify_base64",
            b"zz\r\nabc\r\n0\r\n\r\n",
            {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        ),
    )
    add(
        "headers",
        "chunked and Content-Length",
        http_request(
            "POST",
            "/classify_base64",
            b"5\r\n{}{}{\r\n0\r\n\r\n",
            {"Content-Type": "application/json", "Transfer-Encoding": "chunked", "Content-Length": "3"},
        ),
    )
    add("headers", "header of 100 KB", http_request("GET", "/classes", b"", {"X-Big": "a" * 100_000}))
    add(
        "headers",
        "1,000 headers",
        http_request(
            "POST",
            "/classes",
            b"{}",
            {**{f"X-H{i}": "v" for i in range(1000)}, "Content-Type": "application/json"},
        ),
        "any",
    )
    add(
        "headers",
        "no Host header",
        b"POST /classes HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        "any",
    )
    add(
        "headers",
        "HTTP/1.0",
        b"POST /classes HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        "2xx",
    )
    add("headers", "HTTP/2.0 request line", b"POST /classes HTTP/2.0\r\nContent-Length: 2\r\n\r\n{}", "any")
    add("headers", "garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100)
    add("headers", "header without colon", b"POST /classes HTTP/1.1\r\nHost: x\r\nbroken header\r\n\r\n")
    add(
        "headers",
        "Expect: 100-continue",
        http_request(
            "POST", "/classes", b"{}", {"Content-Type": "application/json", "Expect": "100-continue"}
        ),
        "2xx",
    )
    add("headers", "JSON to the multipart route", json_request("/classify", {"images": []}))
    add(
        "headers",
        "multipart to a JSON route",
        http_request("POST", "/classify_base64", body, {"Content-Type": media}),
    )
    add(
        "headers",
        "text/plain to a JSON route",
        http_request("POST", "/classes", b"{}", {"Content-Type": "text/plain"}),
    )
    add(
        "headers",
        "content type with odd parameters",
        http_request("POST", "/classes", b"{}", {"Content-Type": 'application/json; charset=utf-7; x="\\"'}),
        "any",
    )
    add(
        "headers",
        "stalled after the headers",
        _trickle(
            http_request("POST", "/classify", b"", {"Content-Type": media, "Content-Length": "5000"}),
            10**9,
            8.0,
        ),
    )

    # JSON shapes (classify_base64, classes, register)
    b64 = base64.b64encode(good).decode()
    shapes: list[tuple[str, str, bytes | None, Any]] = [
        ("truncated JSON", "/classify_base64", b'{"images": ["', None),
        (
            "JSON nested 100,000 deep",
            "/classify_base64",
            b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            None,
        ),
        (
            "JSON object nested 5,000 deep",
            "/classes",
            b'{"kind": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001,
            None,
        ),
        ("JSON array root", "/classify_base64", None, [b64]),
        ("JSON string root", "/classify_base64", None, "images"),
        ("JSON null root", "/classify_base64", None, None),
        ("images null", "/classify_base64", None, {"images": None}),
        ("images a dict", "/classify_base64", None, {"images": {"0": b64}}),
        ("images of numbers", "/classify_base64", None, {"images": [1, 2, 3]}),
        ("images empty list", "/classify_base64", None, {"images": []}),
        ("images bad base64", "/classify_base64", None, {"images": ["@@@@"]}),
        (
            "images base64 of text",
            "/classify_base64",
            None,
            {"images": [base64.b64encode(b"hello").decode()]},
        ),
        (
            "images data URL text/html of a PNG (valid: sniffed)",
            "/classify_base64",
            None,
            {"images": ["data:text/html;base64," + b64]},
        ),
        ("images 1,000 strings", "/classify_base64", None, {"images": [b64] * 1000}),
        ("duplicate keys", "/classify_base64", b'{"images": ["x"], "images": 5}', None),
        ("invalid UTF-8", "/classify_base64", b'{"images": ["\xff\xfe"]}', None),
        ("lone surrogate escape", "/register", b'{"names": ["\\ud800"]}', None),
        ("NaN literal", "/classify_base64", f'{{"images": ["{b64}"], "tau": NaN}}'.encode(), None),
        ("BOM before JSON", "/classes", b"\xef\xbb\xbf{}", None),
        ("classes kind unknown", "/classes", None, {"kind": "secret"}),
        ("classes kind a list", "/classes", None, {"kind": ["all"]}),
        ("extra unknown keys", "/classes", None, {"kind": "all", "__proto__": {"x": 1}}),
        ("register names a string", "/register", None, {"names": "okapi"}),
        ("register names of dicts", "/register", None, {"names": [{"$ne": 1}]}),
        ("unregister name a list", "/unregister", None, {"name": ["a", "b"]}),
    ]
    for name, path, raw, payload in shapes:
        auth = path in ("/register", "/unregister")
        expect = "any" if name == "extra unknown keys" else "2xx" if "(valid" in name else "4xx"
        add("json", name, json_request(path, payload, auth=auth, raw=raw), expect)

    # numbers
    numbers = [
        ("top_k", "0"),
        ("top_k", "-1"),
        ("top_k", "101"),
        ("top_k", "1e9"),
        ("top_k", "1.5"),
        ("top_k", "true"),
        ("top_k", "[1]"),
        ("top_k", "99999999999999999999999"),
        ("top_k", "0x10"),
        ("tau", "-0.1"),
        ("tau", "1e308"),
        ("tau", "NaN"),
        ("tau", "Infinity"),
        ("tau", "-Infinity"),
        ("tau", '"1"'),
        ("tau", "1e-400"),
    ]
    for key, value in numbers:
        # true -> 1 and "1" -> 1.0 are pydantic's lax coercions: "strict" counts them apart
        expect = "2xx" if value == "1e-400" else "strict" if value in ("true", '"1"') else "4xx"
        add("numbers", f"{key}={value[:24]}", classify_request([good], **{key: value}), expect)
    add("numbers", "base64 top_k 1e308", json_request("/classify_base64", {"images": [b64], "top_k": 1e308}))
    add("numbers", "base64 tau -1", json_request("/classify_base64", {"images": [b64], "tau": -1}))

    # names
    names: list[tuple[str, Any, str]] = [
        ("empty name", [""], "4xx"),
        ("whitespace name", ["   \t\n"], "4xx"),
        ("10,000-character name", ["x" * 10_000], "4xx"),
        ("control characters", ["bell\x07\x1b[31m"], "4xx"),
        ("NUL byte", ["a\x00b"], "4xx"),
        ("right-to-left override", ["abc\u202edcba"], "4xx"),
        ("private-use character", ["\ue000"], "4xx"),
        ("1,001 names", [f"n{i}" for i in range(1001)], "4xx"),
        ("numbers as names", [1, 2], "4xx"),
        ("null name", [None], "4xx"),
        ("emoji ZWJ sequence (valid)", ["👩\u200d🚀 chaos"], "2xx"),
        ("SQL in a name (valid, stored as text)", ["chaos'); DROP TABLE flatprompt_classes;--"], "2xx"),
        ("path traversal name (valid)", ["../../chaos/etc/passwd"], "2xx"),
        ("trained class name (valid: 'trained')", [trained], "2xx"),
        ("HTML in a name (valid)", ["<script>chaos()</script>"], "2xx"),
    ]
    for name, value, expect in names:
        add("names", name, json_request("/register", {"names": value}, auth=True), expect)
    add("names", "unregister a trained class", json_request("/unregister", {"name": trained}, auth=True))
    add(
        "names",
        "unregister an unknown class",
        json_request("/unregister", {"name": "never-registered"}, auth=True),
    )
    add("names", "candidates name unknown", classify_request([good], candidates='["no-such-class"]'))
    add("names", "candidates with control characters", classify_request([good], candidates='["a\\u0007"]'))

    # templates
    templates = [
        ("no placeholder", ["a photo"]),
        ("two placeholders", ["{} and {}"]),
        ("positional field", ["{0}"]),
        ("attribute access", ["{}{0.__class__}"]),
        ("format spec bomb", ["{}{:>999999999}"]),
        ("manual + automatic", ["{0:>99999999}{}"]),
        ("17 templates", [f"photo {i} of a {{}}" for i in range(17)]),
        ("10,000-character template", ["a" * 10_000 + "{}"]),
        ("template a number", [5]),
        ("control characters", ["\x1b[2J{}"]),
    ]
    for name, tpl in templates:
        add(
            "templates",
            name,
            json_request("/register", {"names": ["chaos-tpl"], "templates": tpl}, auth=True),
        )
    add(
        "templates",
        "escaped braces (valid)",
        json_request("/register", {"names": ["chaos-tpl"], "templates": ["{{}} {}"]}, auth=True),
        "any",
    )

    # auth
    reg = json.dumps({"names": ["chaos-auth"]}).encode()
    auth_cases = [
        ("no Authorization", {}),
        ("wrong token", {"Authorization": "Bearer wrong"}),
        ("Bearer without token", {"Authorization": "Bearer"}),
        ("token without scheme", {"Authorization": TOKEN}),
        ("Basic scheme", {"Authorization": "Basic " + base64.b64encode(f"x:{TOKEN}".encode()).decode()}),
        ("token prefix", {"Authorization": f"Bearer {TOKEN[:-1]}"}),
        ("token plus suffix", {"Authorization": f"Bearer {TOKEN}x"}),
        ("100 KB token", {"Authorization": "Bearer " + "a" * 100_000}),
        ("non-ASCII token", {"Authorization": "Bearer tok\u00e9n"}),
        ("token in a cookie", {"Cookie": f"token={TOKEN}"}),
    ]
    for name, hdrs in auth_cases:
        add(
            "auth", name, http_request("POST", "/register", reg, {"Content-Type": "application/json", **hdrs})
        )
    for path in (
        "/%72egister",
        "/register/",
        "//register",
        "/REGISTER",
        "/register;x=1",
        "/register%00",
        "/./register",
        "/classify/../register",
        "/unregister?x=1",
    ):
        add(
            "auth",
            f"path trick {path}",
            http_request("POST", path, reg, {"Content-Type": "application/json"}),
        )
    add(
        "auth",
        "token in the query string",
        http_request("POST", f"/register?token={TOKEN}", reg, {"Content-Type": "application/json"}),
    )

    # paths and methods
    for method, path, expect in [
        ("POST", "/classify/", "4xx"),
        ("POST", "/classes/", "4xx"),
        ("GET", "/readyz/", "4xx"),
        ("GET", "/nope", "4xx"),
        ("GET", "/" + "a" * 8000, "4xx"),
        ("GET", "/%", "4xx"),
        ("GET", "/%00", "4xx"),
        ("GET", "/classify", "4xx"),
        ("PUT", "/classify", "4xx"),
        ("DELETE", "/register", "4xx"),
        ("PATCH", "/classes", "4xx"),
        ("TRACE", "/", "4xx"),
        ("BREW", "/classes", "4xx"),
        ("GET", "/../../etc/passwd", "4xx"),
        ("GET", "/static/../../etc/passwd", "4xx"),
        ("GET", "*", "4xx"),
        ("GET", "http://evil.example/readyz", "any"),
        ("OPTIONS", "/classify", "4xx"),
        ("GET", "/metrics/../register", "4xx"),
        ("GET", "/classes?kind=all&kind=trained", "4xx"),
    ]:
        add(
            "paths",
            f"{method} {path[:40]}",
            http_request(
                method,
                path,
                b"" if method in ("GET", "TRACE") else b"{}",
                {"Content-Type": "application/json"},
            ),
            expect,
        )
    return corpus


def _many_fields(image: bytes, count: int) -> tuple[bytes, dict[str, str]]:
    body, media = multipart([image], {f"top_k{i}" if i else "top_k": "1" for i in range(count)})
    body = body.replace(b'name="top_k', b'name="top_k"; x="')  # every field named top_k
    return body, {"Content-Type": media}


def _text_image(value: str) -> tuple[bytes, dict[str, str]]:
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"\r\n\r\n{value}\r\n--{BOUNDARY}--\r\n'
    ).encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def _raw_part(part_headers: bytes, data: bytes) -> tuple[bytes, dict[str, str]]:
    body = (
        f"--{BOUNDARY}\r\n".encode() + part_headers + b"\r\n\r\n" + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def _long_boundary(image: bytes) -> tuple[bytes, dict[str, str]]:
    body, media = multipart([image], boundary="b" * 300)
    return body, {"Content-Type": media}


def _chunked_request(total: int) -> Callable[[socket.socket], None]:
    def write(sock: socket.socket) -> None:
        sock.sendall(
            http_request(
                "POST",
                "/classify_base64",
                b"",
                {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                content_length=False,
            )
        )
        chunk = b"x" * 65536
        sent = 0
        while sent < total:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
        sock.sendall(b"0\r\n\r\n")

    return write


def _schema_ok(answer: Answer) -> bool:
    if answer.status is None or answer.status < 400:
        return True
    try:
        body = json.loads(answer.body)
    except ValueError:
        return False
    media = answer.headers.get("content-type", "").split(";")[0].strip()
    return media == "application/json" and isinstance(body, dict) and set(body) == {"error", "message"}


def _healthy(port: int) -> bool:
    ready = exchange(port, http_request("GET", "/readyz"), 15)
    good = exchange(port, classify_request([good_image(1)], top_k="1"), 30)
    return ready.status == 200 and good.status == 200


def scenario_abuse(ctx: Context) -> Section:
    section = Section("abuse", "Abuse corpus")
    max_body = 4 * 1024 * 1024
    server = ctx.server("abuse", FLATPROMPT_MAX_BODY_BYTES=str(max_body), FLATPROMPT_REQUEST_TIMEOUT_S="10")
    hang_s = 25.0  # above the request deadline (10 s) and the body timeout (5 s)
    try:
        trained = json.loads((ctx.bundle / "classes.json").read_text())["names"][0]
        corpus = abuse_corpus(max_body, trained)
        log0 = server.log_path.stat().st_size
        results: list[dict[str, Any]] = []
        for probe in corpus:
            answer = exchange(server.port, probe.request, hang_s)
            healthy = _healthy(server.port)
            status = answer.status
            klass = answer.outcome if status is None else f"{status // 100}xx"
            expected = klass == probe.expect or (
                probe.expect in ("any", "strict") and klass in ("2xx", "4xx")
            )
            results.append(
                {
                    "category": probe.category,
                    "request": probe.name,
                    "status": status,
                    "outcome": answer.outcome,
                    "expected": probe.expect,
                    "as_expected": expected,
                    "schema_ok": _schema_ok(answer),
                    "content_type": answer.headers.get("content-type"),
                    "error": _error_code(answer),
                    "seconds": round(answer.seconds, 2),
                    "healthy_after": healthy,
                }
            )
        log_bytes = server.log_path.stat().st_size - log0
    finally:
        server.stop()
    counts = Counter(r["outcome"] if r["status"] is None else f"{r['status'] // 100}xx" for r in results)
    by_category = Counter(r["category"] for r in results)
    unexpected = [r for r in results if not r["as_expected"]]
    bad_schema = [r for r in results if not r["schema_ok"]]
    unhealthy = [r for r in results if not r["healthy_after"]]
    section.add(
        "hostile requests",
        f"{len(results)} ({', '.join(f'{k} {v}' for k, v in sorted(by_category.items()))})",
        ">= 150",
        len(results) >= 150,
    )
    section.add("answers", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    section.add("5xx", counts.get("5xx", 0), "0", counts.get("5xx", 0) == 0)
    section.add("hangs (no answer in 25 s)", counts.get("hang", 0), "0", counts.get("hang", 0) == 0)
    section.add("connection resets", counts.get("reset", 0), "0", counts.get("reset", 0) == 0)
    section.add("answers other than expected", len(unexpected), "0", not unexpected)
    lax = [r["request"] for r in results if r["expected"] == "strict" and r["status"] and r["status"] < 300]
    section.add('lax coercions accepted (top_k=true, tau="1")', len(lax))
    section.add("errors not JSON in the schema", len(bad_schema), "0", not bad_schema)
    section.add("/readyz + a good request fail after one", len(unhealthy), "0", not unhealthy)
    section.add("server log per hostile request", f"{log_bytes / max(1, len(results)) / 1024:.1f} KiB")
    section.details = {
        "unexpected": unexpected,
        "bad_schema": bad_schema,
        "unhealthy": unhealthy,
        "log_bytes": log_bytes,
        "results": results,
    }
    return section


def _error_code(answer: Answer) -> str | None:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return str(json.loads(answer.body).get("error"))
    return None


# -- asyncio load (slow clients, shutdown, outage, soak) ---------------------------------------------
class AsyncClient:
    """One keep-alive connection per coroutine; raw HTTP/1.1, light on the client CPU."""

    def __init__(self, port: int, timeout: float) -> None:
        self.port, self.timeout = port, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, raw: bytes) -> tuple[int, dict[str, str], bytes, float]:
        """(status, headers, body, seconds); status 0 on a connection error, -1 on a timeout."""
        started = time.perf_counter()
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
            assert self.reader is not None
            self.writer.write(raw)
            status, headers, body = await asyncio.wait_for(self._read(self.reader), self.timeout)
            if headers.get("connection", "").lower() == "close":
                self.close()
            return status, headers, body, time.perf_counter() - started
        except TimeoutError:
            self.close()
            return -1, {}, b"", time.perf_counter() - started
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            self.close()
            return 0, {}, b"", time.perf_counter() - started

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
        status, headers = _parse_head((await reader.readuntil(b"\r\n\r\n"))[:-4])
        body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
        return status, headers, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Tally:
    """Statuses and latencies of one kind of request."""

    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def record(self, status: int, seconds: float, started: float = 0.0) -> None:
        self.statuses[{0: "reset", -1: "timeout"}.get(status, str(status))] += 1
        if 200 <= status < 300:
            self.latencies.append(seconds)

    def percentile(self, q: float) -> float | None:
        return round(1000 * float(np.percentile(self.latencies, q)), 1) if self.latencies else None

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return sum(v for k, v in self.statuses.items() if k.startswith("2"))

    def summary(self) -> dict[str, Any]:
        return {"statuses": dict(self.statuses), "p50_ms": self.percentile(50), "p99_ms": self.percentile(99)}


def _statuses(tally: Tally) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(tally.statuses.items())) or "none"


async def classify_loop(
    port: int, tally: Tally, stop: asyncio.Event, payloads: Sequence[bytes], pause: float = 0.0
) -> None:
    client = AsyncClient(port, 60)
    i = 0
    while not stop.is_set():
        started = time.monotonic()
        status, _, _, seconds = await client.send(payloads[i % len(payloads)])
        tally.record(status, seconds, started)
        i += 1
        if pause:
            await asyncio.sleep(pause)
    client.close()


def classify_payloads(count: int = 8, images: int = 1) -> list[bytes]:
    return [classify_request([good_image(i + j) for j in range(images)], top_k="3") for i in range(count)]


async def trickler(
    port: int, stop: asyncio.Event, outcomes: Counter[str], rate_s: float, byte_count: int
) -> None:
    """Upload a classify body a few bytes at a time (gaps below the body timeout), over and over."""
    noise = np.random.default_rng(7).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(noise).save(buf, format="PNG")  # ~27 KB: longer than any run at 64 B/s
    raw = classify_request([buf.getvalue()])
    head, _, body = raw.partition(b"\r\n\r\n")
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            outcomes["connect_failed"] += 1
            await asyncio.sleep(0.5)
            continue
        writer.write(head + b"\r\n\r\n")
        sent = 0
        answered = None
        with contextlib.suppress(OSError):
            while sent < len(body) and not stop.is_set():
                writer.write(body[sent : sent + byte_count])
                await writer.drain()
                sent += byte_count
                try:
                    status_line = await asyncio.wait_for(reader.readline(), rate_s)
                except TimeoutError:
                    continue
                answered = status_line.split()[1].decode() if status_line else "closed"
                break
        outcomes[answered or ("unfinished" if stop.is_set() else "completed")] += 1
        writer.close()


def scenario_slow(ctx: Context) -> Section:
    section = Section("slow", "Slow clients")
    server = ctx.server("slow")
    seconds = ctx.args.slow_seconds
    payloads = classify_payloads()

    async def run(trickle: int) -> tuple[Tally, Counter[str]]:
        stop = asyncio.Event()
        tally = Tally()
        outcomes: Counter[str] = Counter()
        tricklers = [
            asyncio.ensure_future(trickler(server.port, stop, outcomes, 1.0, 64)) for _ in range(trickle)
        ]
        if trickle:
            await asyncio.sleep(2.0)  # all of them connected and trickling
        good = [
            asyncio.ensure_future(classify_loop(server.port, tally, stop, payloads, pause=0.05))
            for _ in range(4)
        ]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*good, *tricklers)
        return tally, outcomes

    try:
        asyncio.run(run(0))  # warm-up
        quiet, _ = asyncio.run(run(0))
        loaded, outcomes = asyncio.run(run(50))
    finally:
        server.stop()
    q99, l99 = quiet.percentile(99), loaded.percentile(99)
    ratio = round(l99 / q99, 2) if q99 and l99 else None
    section.add(
        "good requests, quiet",
        f"{quiet.total} ({_statuses(quiet)}), p50 {quiet.percentile(50)} ms, p99 {q99} ms",
    )
    section.add(
        "good requests, 50 trickling uploads",
        f"{loaded.total} ({_statuses(loaded)}), p50 {loaded.percentile(50)} ms, p99 {l99} ms",
    )
    section.add("good p99 under slow clients / quiet", ratio, "<= 2", ratio is not None and ratio <= 2)
    section.add(
        "good requests failed under slow clients", loaded.total - loaded.ok, "0", loaded.total == loaded.ok
    )
    section.add("trickling uploads' answers", ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())))
    section.details = {"quiet": quiet.summary(), "loaded": loaded.summary(), "tricklers": dict(outcomes)}
    return section


# -- crash consistency -------------------------------------------------------------------------------
def registry_rows(url: str) -> tuple[set[str], str, int]:
    """(stored keys, integrity/consistency verdict, version) read straight from the database."""
    if url.startswith("sqlite:///"):
        con = sqlite3.connect(url[len("sqlite:///") :])
        try:
            verdict = con.execute("PRAGMA integrity_check").fetchone()[0]
            keys = {row[0] for row in con.execute("SELECT key FROM flatprompt_classes")}
            bad = con.execute(
                "SELECT count(*) FROM flatprompt_classes WHERE length(embedding) <> 4 * embed_dim"
            ).fetchone()[0]
            version = con.execute("SELECT version FROM flatprompt_meta WHERE id = 1").fetchone()[0]
        finally:
            con.close()
        return keys, verdict if not bad else f"{bad} rows with a wrong embedding size", int(version)
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as pgcon:
        keys = {row[0] for row in pgcon.execute("SELECT key FROM flatprompt_classes")}
        row = pgcon.execute(
            "SELECT count(*) FROM flatprompt_classes WHERE octet_length(embedding) <> 4 * embed_dim"
            " OR name IS NULL OR templates IS NULL"
        ).fetchone()
        version = pgcon.execute("SELECT version FROM flatprompt_meta WHERE id = 1").fetchone()
        verdict = "ok"
        try:  # B-tree check of the primary key (contrib amcheck), when the extension is there
            pgcon.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
            pgcon.execute("SELECT bt_index_check('flatprompt_classes_pkey', true)")
        except psycopg.Error as exc:
            pgcon.rollback()
            if "amcheck" not in str(exc) and "extension" not in str(exc):
                verdict = f"index check failed: {str(exc)[:80]}"
    bad = int(row[0]) if row else 0
    return keys, verdict if not bad else f"{bad} inconsistent rows", int(version[0]) if version else -1


def _register_worker(
    port: int, prefix: str, acked: list[list[str]], sent: list[list[str]], stop: threading.Event
) -> None:
    i = 0
    while not stop.is_set():
        batch = [f"{prefix}-{i}-{j}" for j in range(5)]
        sent.append(batch)
        answer = exchange(port, json_request("/register", {"names": batch}, auth=True), 30)
        if answer.status == 200:
            acked.append(batch)
        elif answer.status is None:
            return  # the server is gone
        i += 1


def crash_run(ctx: Context, backend: str, url: str, kills: int, section: Section) -> None:
    acked: list[list[str]] = []
    sent: list[list[str]] = []
    integrity: list[str] = []
    restart_s: list[float] = []
    for k in range(kills):
        started = time.monotonic()
        server = ctx.server(f"crash-{backend}", registry_url=url)
        restart_s.append(time.monotonic() - started)
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=_register_worker, args=(server.port, f"k{k}t{t}", acked, sent, stop), daemon=True
            )
            for t in range(4)
        ]
        for t in threads:
            t.start()
        time.sleep(ctx.rng.uniform(0.3, 2.5))
        server.kill()  # the arbiter and every worker at once
        stop.set()
        for t in threads:
            t.join(timeout=60)
        server.stop(timeout=5)
        _, verdict, _ = registry_rows(url)
        integrity.append(verdict)
    keys, verdict, version = registry_rows(url)
    stored = keys
    lost = sum(1 for batch in acked for name in batch if name.lower() not in stored)
    half = sum(1 for batch in sent if 0 < sum(n.lower() in stored for n in batch) < len(batch))
    ok = sum(v == "ok" for v in integrity)
    label = "SQLite" if backend == "sqlite" else "PostgreSQL"
    section.add(
        f"{label}: kill -9 during registrations",
        f"{kills} kills, {len(acked)} batches acked of {len(sent)} sent, {len(stored)} rows, version {version}",
    )
    section.add(f"{label}: acknowledged registrations lost", lost, "0", lost == 0)
    section.add(f"{label}: integrity check ok", f"{ok}/{kills}", "all", ok == kills)
    section.add(f"{label}: half-written batches", half, "0", half == 0)
    section.add(f"{label}: restart until ready, median", f"{np.median(restart_s):.1f} s")
    section.details[backend] = {
        "acked": len(acked),
        "sent": len(sent),
        "lost": lost,
        "half": half,
        "integrity": integrity,
    }


def scenario_crash(ctx: Context) -> Section:
    section = Section("crash", "Crash consistency")
    crash_run(ctx, "sqlite", f"sqlite:///{ctx.workdir}/crash.db", ctx.args.kills, section)
    if postgres_binaries() is None:
        section.add("PostgreSQL", "not installed: skipped")
        return section
    pg = start_postgres()
    try:
        crash_run(ctx, "postgres", pg.url, ctx.args.kills, section)
    finally:
        pg.stop()
    return section


# -- graceful shutdown -------------------------------------------------------------------------------
def scenario_shutdown(ctx: Context) -> Section:
    section = Section("shutdown", "Graceful shutdown")
    server = ctx.server("shutdown")
    big = [good_image(i) for i in range(8)]
    from PIL import Image

    photos = []
    for i in range(8):  # 1600x1200 photos: a few hundred ms of decoding per request
        buf = io.BytesIO()
        arr = np.random.default_rng(i).integers(0, 255, (1200, 1600, 3), dtype=np.uint8)
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        photos.append(buf.getvalue())
    raw = classify_request(photos or big, top_k="1")

    async def run() -> tuple[list[tuple[int, float]], float, int, float]:
        async def one() -> tuple[int, float]:
            client = AsyncClient(server.port, 120)
            status, _, _, seconds = await client.send(raw)
            client.close()
            return status, seconds

        tasks = [asyncio.ensure_future(one()) for _ in range(16)]
        await asyncio.sleep(0.3)  # every request sent, most still running
        done_before = sum(t.done() for t in tasks)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks)
        while server.proc.poll() is None and time.monotonic() - t0 < 120:
            await asyncio.sleep(0.05)
        return list(results), time.monotonic() - t0, done_before, t0

    try:
        results, exit_s, done_before, _ = asyncio.run(run())
        rc = server.proc.returncode
    finally:
        server.stop(timeout=10)
    statuses = Counter(str(s) for s, _ in results)
    failed = sum(1 for s, _ in results if s != 200)
    section.add("in flight at SIGTERM", 16 - done_before, "16", done_before == 0)
    section.add("completed (200)", statuses.get("200", 0))
    section.add("failed", failed, "0", failed == 0)
    section.add("answers", ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    section.add("time from SIGTERM to exit", f"{exit_s:.1f} s (exit code {rc})")
    section.details = {"statuses": dict(statuses), "exit_s": exit_s, "returncode": rc}
    return section


# -- registry outage / freeze (PostgreSQL) -----------------------------------------------------------
@dataclass
class Phases:
    """Tallies of a run by the phase each request started in: before, during and after a disturbance,
    and the transitions (the disturbance or the restore under way), which are not scored."""

    names: tuple[str, ...] = ("before", "disturbing", "during", "restoring", "after")
    starts: list[float] = field(default_factory=list)  # monotonic start of "during" and of "after"
    classify: dict[str, Tally] = field(default_factory=dict)
    register: dict[str, Tally] = field(default_factory=dict)
    retry_after: dict[str, Counter[str]] = field(default_factory=dict)
    acked: list[str] = field(default_factory=list)
    log: list[tuple[str, float, float, int]] = field(default_factory=list)  # kind, start, end, status

    def __post_init__(self) -> None:
        for name in self.names:
            self.classify[name], self.register[name], self.retry_after[name] = Tally(), Tally(), Counter()

    def of(self, started: float) -> str:
        return self.names[sum(started >= t for t in self.starts)]

    def overlapping(self, kind: str) -> Tally:
        """Requests of ``kind`` in flight at any moment of the disturbance (from its end to the restore)."""
        tally = Tally()
        low, high = self.starts[1], self.starts[2]
        for k, start, end, status in self.log:
            if k == kind and start < high and end > low:
                tally.record(status, end - start)
        return tally


class _PhaseTally(Tally):
    """A Tally that files each record under the phase its request started in."""

    def __init__(self, phases: Phases, table: dict[str, Tally]) -> None:
        super().__init__()
        self.phases, self.table = phases, table

    def record(self, status: int, seconds: float, started: float = 0.0) -> None:
        self.table[self.phases.of(started)].record(status, seconds)
        self.phases.log.append(("classify", started, started + seconds, status))


async def register_loop(port: int, phases: Phases, stop: asyncio.Event, prefix: str) -> None:
    client = AsyncClient(port, 60)
    i = 0
    while not stop.is_set():
        name = f"{prefix}-{i}"
        started = time.monotonic()
        status, headers, _, seconds = await client.send(
            json_request("/register", {"names": [name]}, auth=True)
        )
        phase = phases.of(started)
        phases.register[phase].record(status, seconds)
        phases.log.append(("register", started, started + seconds, status))
        if status == 200:
            phases.acked.append(name)
        if status == 503:
            phases.retry_after[phase]["with" if "retry-after" in headers else "without"] += 1
        i += 1
        await asyncio.sleep(0.1)
    client.close()


def _phased_run(
    pg: Postgres, server: Server, disturb: Callable[[], None], restore: Callable[[], None], seconds: float
) -> tuple[Phases, int]:
    """Load for ``seconds``, PostgreSQL disturbed during the middle third; (phases, acked rows lost)."""
    phases = Phases()
    payloads = classify_payloads()

    async def run() -> None:
        stop = asyncio.Event()
        classify = _PhaseTally(phases, phases.classify)
        workers = [
            asyncio.ensure_future(classify_loop(server.port, classify, stop, payloads, 0.02))
            for _ in range(6)
        ] + [asyncio.ensure_future(register_loop(server.port, phases, stop, f"outage{t}")) for t in range(2)]
        third = seconds / 3
        await asyncio.sleep(third)
        phases.starts.append(time.monotonic())
        await asyncio.to_thread(disturb)
        phases.starts.append(time.monotonic())
        await asyncio.sleep(third)
        phases.starts.append(time.monotonic())
        await asyncio.to_thread(restore)
        phases.starts.append(time.monotonic())
        await asyncio.sleep(third)
        stop.set()
        await asyncio.gather(*workers)

    asyncio.run(run())
    keys, _, _ = registry_rows(pg.url)
    return phases, sum(1 for name in phases.acked if name.lower() not in keys)


def _availability(tally: Tally) -> float:
    return round(100.0 * tally.ok / tally.total, 2) if tally.total else float("nan")


def scenario_outage(ctx: Context) -> Section:
    section = Section("outage", "Registry outage (PostgreSQL stopped, started again)")
    if postgres_binaries() is None:
        section.add("PostgreSQL", "not installed: skipped")
        return section
    pg = start_postgres()
    server = None
    try:
        server = ctx.server("outage", registry_url=pg.url)
        phases, lost = _phased_run(pg, server, pg.halt, pg.start, ctx.args.outage_seconds)
    finally:
        if server is not None:
            server.stop()
        pg.stop()
    during_c, during_r = phases.classify["during"], phases.register["during"]
    after_r = phases.register["after"]
    avail = [_availability(phases.classify[p]) for p in ("before", "during", "after")]
    section.add(
        "classify availability before / during / after",
        " / ".join(f"{a}%" for a in avail),
        "100% during",
        avail[1] == 100.0,
    )
    section.add("classify during the outage", f"{_statuses(during_c)}, p99 {during_c.percentile(99)} ms")
    r503 = during_r.statuses.get("503", 0)
    with_retry = phases.retry_after["during"].get("with", 0)
    section.add(
        "register during the outage",
        _statuses(during_r),
        "503 + retry-after",
        r503 > 0 and with_retry == r503 and r503 == during_r.total,
    )
    section.add("503s with retry-after", f"{with_retry}/{r503}")
    section.add(
        "register after restart", _statuses(after_r), "200", after_r.total > 0 and after_r.ok == after_r.total
    )
    section.add("acknowledged registrations lost", f"{lost} of {len(phases.acked)}", "0", lost == 0)
    section.details = _phase_details(phases)
    return section


def _phase_details(phases: Phases) -> dict[str, Any]:
    return {
        "classify": {p: t.summary() for p, t in phases.classify.items()},
        "register": {p: t.summary() for p, t in phases.register.items()},
        "retry_after": {p: dict(c) for p, c in phases.retry_after.items()},
    }


def scenario_freeze(ctx: Context) -> Section:
    section = Section("freeze", "Registry frozen (PostgreSQL SIGSTOP)")
    if postgres_binaries() is None:
        section.add("PostgreSQL", "not installed: skipped")
        return section
    pg = start_postgres()
    server = None
    thaws: list[Callable[[], None]] = []

    def freeze() -> None:
        pid = pg.postmaster_pid()
        if pid is not None:  # the backends too: an unresponsive host, not a refused connection
            thaws.append(sigstop_tree(pid))

    def thaw() -> None:
        for undo in thaws:
            undo()

    try:
        server = ctx.server("freeze", registry_url=pg.url)
        phases, lost = _phased_run(pg, server, freeze, thaw, ctx.args.outage_seconds)
    finally:
        thaw()
        if server is not None:
            server.stop()
        pg.stop()
    during_c, during_r = phases.overlapping("classify"), phases.overlapping("register")
    quiet_p99 = phases.classify["before"].percentile(99)
    worst = round(1000 * max(during_c.latencies), 1) if during_c.latencies else None
    frozen_s = phases.starts[2] - phases.starts[1]
    section.add(
        f"classify in flight while frozen ({frozen_s:.0f} s)",
        f"{during_c.total} ({_statuses(during_c)}), p50 {during_c.percentile(50)} ms, slowest {worst} ms "
        f"(before: p99 {quiet_p99} ms)",
        "all 200 within 1 s",
        during_c.total > 0 and during_c.ok == during_c.total and worst is not None and worst < 1000,
    )
    section.add("register in flight while frozen", f"{_statuses(during_r)}, p99 {during_r.percentile(99)} ms")
    section.add("register after thaw", _statuses(phases.register["after"]))
    section.add("acknowledged registrations lost", f"{lost} of {len(phases.acked)}", "0", lost == 0)
    section.details = _phase_details(phases)
    return section


# -- paths, logs, arbiter ----------------------------------------------------------------------------
def _series(port: int) -> dict[str, int]:
    answer = exchange(port, http_request("GET", "/metrics"), 30)
    counts: Counter[str] = Counter()
    for line in answer.body.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#"):
            counts[line.split("{")[0].split(" ")[0]] += 1
    return dict(counts)


def scenario_paths(ctx: Context) -> Section:
    section = Section("paths", "1,000 random paths")
    server = ctx.server("paths")
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-_.%~"
    try:
        before = _series(server.port)
        statuses: Counter[str] = Counter()
        log0 = server.log_path.stat().st_size
        for _ in range(1000):
            path = "/" + "".join(ctx.rng.choice(alphabet) for _ in range(ctx.rng.randint(1, 40)))
            method = ctx.rng.choice(["GET", "POST"])
            answer = exchange(
                server.port, http_request(method, path, b"{}", {"Content-Type": "application/json"}), 15
            )
            statuses[str(answer.status) if answer.status else answer.outcome] += 1
        log_bytes = server.log_path.stat().st_size - log0
        after = _series(server.port)
    finally:
        server.stop()
    total_before, total_after = sum(before.values()), sum(after.values())
    grown = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
    top = sorted(grown.items(), key=lambda kv: -kv[1])[:3]
    section.add("answers", ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    section.add(
        "/metrics series before / after",
        f"{total_before} / {total_after}",
        "bounded (not +1 per path)",
        total_after - total_before < 100,
    )
    section.add("families that grew most", ", ".join(f"{k} +{v}" for k, v in top) or "none")
    section.add("server log per request", f"{log_bytes / 1000:.0f} B")
    section.details = {"statuses": dict(statuses), "grown": grown}
    return section


def scenario_logs(ctx: Context) -> Section:
    section = Section("logs", "Log volume under fuzzing")
    server = ctx.server("logs")
    rng = random.Random(ctx.args.seed)
    try:
        good = good_image()
        log0 = server.log_path.stat().st_size
        count = 0
        for i in range(200):
            data = bytearray(good)
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            kind = i % 4
            if kind == 0:
                raw = classify_request([bytes(data)])
            elif kind == 1:
                raw = classify_request([good], candidates="[" * rng.randint(1, 5000))
            elif kind == 2:
                raw = json_request("/classify_base64", None, raw=bytes(rng.randbytes(rng.randint(1, 2000))))
            else:
                raw = json_request("/register", {"names": [rng.randbytes(30).decode("latin-1")]}, auth=True)
            exchange(server.port, raw, 20)
            count += 1
        log_bytes = server.log_path.stat().st_size - log0
        tracebacks = server.log_path.read_text(errors="replace").count("Traceback")
    finally:
        server.stop()
    per = log_bytes / count
    section.add("fuzzed requests", count)
    section.add("server log per fuzzed request", f"{per:.0f} B", "< 2 KiB", per < 2048)
    section.add("tracebacks in the log", tracebacks)
    return section


def scenario_arbiter(ctx: Context) -> Section:
    section = Section("arbiter", "kill -9 of the arbiter alone")
    server = ctx.server("arbiter")
    port = server.port
    family = server.pids()
    again = None
    try:
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=30)
        time.sleep(5.0)
        left = [p for p in family[1:] if Path(f"/proc/{p}").exists() and not _zombie(p)]
        still = exchange(port, http_request("GET", "/readyz"), 5).status
        section.add("server processes before", len(family))
        section.add("workers left running 5 s after the arbiter died", len(left), "0", not left)
        section.add("old port still answering /readyz", str(still) if still else "no")
        started = time.monotonic()
        try:  # on the same port, whatever was left behind still there
            again = start_server(
                ctx.workdir / "arbiter-restart",
                {**server.env},
                port=port,
                ready_timeout=120,
                wait_ready=False,
            )
            while time.monotonic() - started < 120 and again.proc.poll() is None:
                if exchange(port, http_request("GET", "/readyz"), 5).status == 200 and not [
                    p for p in left if Path(f"/proc/{p}").exists()
                ]:
                    break
                if left and time.monotonic() - started > 15:
                    break  # the orphans answer for it: nothing more to learn
                time.sleep(0.25)
            alive = again.proc.poll() is None
            section.add(
                "new server on the same port",
                f"{'running' if alive else f'exited {again.proc.returncode}'} after "
                f"{time.monotonic() - started:.1f} s",
                "ready",
                alive,
            )
        except Exception as exc:  # reported, not raised: this is a measurement
            section.add("new server on the same port", f"failed: {type(exc).__name__}", "ready", False)
    finally:
        for pid in family[1:]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if again is not None:
            again.stop(timeout=10)
        server.stop(timeout=5)
    return section


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError, IndexError):
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    return True


def _rss_mib(pids: Sequence[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[pid] = int(line.split()[1]) / 1024
    return out


# -- soak -------------------------------------------------------------------------------------------
def scenario_soak(ctx: Context) -> Section:
    section = Section("soak", f"Soak ({ctx.args.minutes:g} min, c{ctx.args.concurrency} mixed)")
    server = ctx.server("soak")
    pool = [f"soak-{i}" for i in range(300)]
    kinds = {"classify": Tally(), "register": Tally(), "unregister": Tally()}
    payloads = classify_payloads()
    rng = random.Random(ctx.args.seed)

    async def worker(stop: asyncio.Event) -> None:
        client = AsyncClient(server.port, 60)
        i = 0
        while not stop.is_set():
            pick = rng.random()
            if pick < 0.8:
                kind, raw = "classify", payloads[i % len(payloads)]
            elif pick < 0.95:
                names = rng.sample(pool, 3)
                kind, raw = "register", json_request("/register", {"names": names}, auth=True)
            else:
                kind, raw = "unregister", json_request("/unregister", {"name": rng.choice(pool)}, auth=True)
            status, _, _, seconds = await client.send(raw)
            kinds[kind].record(status, seconds)
            i += 1
        client.close()

    samples: list[dict[int, float]] = []  # RSS of every server process, sampled during the measured run

    async def run(seconds: float, pids: Sequence[int] = ()) -> None:
        stop = asyncio.Event()
        workers = [asyncio.ensure_future(worker(stop)) for _ in range(ctx.args.concurrency)]
        end = time.monotonic() + seconds
        while pids and time.monotonic() < end:
            samples.append(_rss_mib(pids))
            await asyncio.sleep(min(max(5.0, seconds / 12), max(0.0, end - time.monotonic())))
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        stop.set()
        await asyncio.gather(*workers)

    try:
        asyncio.run(run(min(60.0, 10 + ctx.args.minutes * 6)))  # warm-up: allocator and caches settle
        for tally in kinds.values():
            tally.statuses.clear()
            tally.latencies.clear()
        pids = server.pids()
        started = time.monotonic()
        asyncio.run(run(60.0 * ctx.args.minutes, pids))
        wall = time.monotonic() - started
        samples.append(_rss_mib(pids))
        rss0, rss_mid, rss1 = samples[0], samples[len(samples) // 2], samples[-1]
    finally:
        server.stop()
    total = sum(t.total for t in kinds.values())
    non2xx: Counter[str] = Counter()
    for name, tally in kinds.items():
        for status, n in tally.statuses.items():
            if not status.startswith("2"):
                non2xx[f"{name} {status}"] += n
    unexpected = sum(
        n
        for key, n in non2xx.items()
        if key != "unregister 404"  # a name of the pool that is not registered right now
    )
    five = sum(
        n
        for key, n in non2xx.items()
        if key.split()[1].startswith("5") or key.split()[1] in ("reset", "timeout")
    )
    section.add("requests", f"{total} in {wall:.0f} s ({total / wall:.1f}/s)")
    for name, tally in kinds.items():
        section.add(
            f"{name}: p50 / p99", f"{tally.percentile(50)} / {tally.percentile(99)} ms ({tally.total})"
        )
    section.add("non-2xx by status", ", ".join(f"{k}: {v}" for k, v in sorted(non2xx.items())) or "none")
    section.add("unexpected non-2xx (all but unregister 404)", unexpected, "0", unexpected == 0)
    section.add("5xx, resets, timeouts", five, "0", five == 0)
    growth = {pid: (rss1.get(pid, 0) - v) / v * 100 for pid, v in rss0.items() if v}
    worst = max(growth.values()) if growth else float("nan")
    section.add(
        "RSS per server process, start -> end",
        ", ".join(f"{rss0[p]:.0f} -> {rss1.get(p, 0):.0f} MiB" for p in sorted(rss0)),
    )
    section.add("largest RSS growth", f"{worst:+.1f}%", "< 5%", worst < 5)
    second_half = max(((rss1.get(p, 0) - v) / v * 100 for p, v in rss_mid.items() if v), default=float("nan"))
    section.add("largest RSS growth over the second half", f"{second_half:+.1f}%")
    section.details = {k: t.summary() for k, t in kinds.items()} | {"rss_samples_mib": samples}
    return section


# -- driver -----------------------------------------------------------------------------------------
SCENARIOS: dict[str, Callable[[Context], Section]] = {
    "abuse": scenario_abuse,
    "slow": scenario_slow,
    "crash": scenario_crash,
    "shutdown": scenario_shutdown,
    "outage": scenario_outage,
    "freeze": scenario_freeze,
    "paths": scenario_paths,
    "logs": scenario_logs,
    "arbiter": scenario_arbiter,
    "soak": scenario_soak,
}


def markdown(sections: Sequence[Section], header: str) -> str:
    out = [header, ""]
    for s in sections:
        out += [
            f"**{s.title}** ({s.seconds:.0f} s)",
            "",
            "| measure | value | goal | met |",
            "| --- | --- | --- | --- |",
        ]
        for row in s.rows:
            met = "" if row.met is None else ("yes" if row.met else "**no**")
            value = str(row.value).replace("|", "\\|")
            out.append(f"| {row.measure} | {value} | {row.goal} | {met} |")
        out.append("")
    return "\n".join(out)


def _default_bundle(workdir: Path) -> Path:
    from export.synthetic import make_bundle

    return make_bundle(workdir / "bundle")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma list of sections ({', '.join(SCENARIOS)})"
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration")
    parser.add_argument("--kills", type=int, default=20, help="kill -9 rounds per registry backend")
    parser.add_argument("--concurrency", type=int, default=32, help="soak concurrency")
    parser.add_argument(
        "--slow-seconds", type=float, default=20.0, help="good-request run, quiet and with slow clients"
    )
    parser.add_argument(
        "--outage-seconds", type=float, default=30.0, help="outage / freeze run (a third of it disturbed)"
    )
    parser.add_argument("--workers", type=int, default=1, help="BentoML workers per server")
    parser.add_argument(
        "--bundle", type=Path, default=None, help="bundle to serve (default: a synthetic one)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write every figure and detail here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SCENARIOS)}")
    sections: list[Section] = []
    with tempfile.TemporaryDirectory(prefix="flatprompt-chaos-") as tmp:
        workdir = Path(tmp)
        bundle = args.bundle.resolve() if args.bundle else _default_bundle(workdir)
        ctx = Context(args=args, workdir=workdir, bundle=bundle, rng=random.Random(args.seed))
        for name in names:
            _logger.info("section %s", name)
            started = time.monotonic()
            try:
                section = SCENARIOS[name](ctx)
            except Exception as exc:  # one broken section must not hide the others' figures
                _logger.exception("section %s failed", name)
                section = Section(name, name)
                section.add("section failed", f"{type(exc).__name__}: {str(exc)[:300]}", "runs", False)
            section.seconds = time.monotonic() - started
            sections.append(section)
    header = (
        f"`python benchmarks/chaos.py {' '.join(argv if argv is not None else sys.argv[1:])}` — "
        f"{os.cpu_count()} CPUs, bundle {'synthetic' if args.bundle is None else args.bundle.name}, "
        f"{args.workers} worker(s)"
    )
    print(markdown(sections, header))
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in sections], indent=2, default=str))
    return 0 if all(r.met is not False for s in sections for r in s.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
