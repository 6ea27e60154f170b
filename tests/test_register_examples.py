"""Registration by example images (issue 11): registry storage + migration on SQLite and PostgreSQL, the
blend, and end to end over HTTP: multipart and base64, more examples later, the same 4xx as /classify for
bad images, and a prototype that survives a restart and a bundle change (re-embedded from stored images)."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from serving.prototypes import auto_text_weight, blend_prototype
from serving.registry import (
    CREATED,
    NEEDS_EMBEDDING,
    UNCHANGED,
    UPDATED,
    Example,
    NewClass,
    Registry,
    StaleRow,
)
from serving.service import bundle_hash
from tests.serving_fixtures import make_bundle, png_bytes, running_server

TOKEN = "examples-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _vec(seed: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _ex(data: bytes) -> Example:
    return Example(hashlib.sha256(data).hexdigest(), data)


def test_blend_and_automatic_weight() -> None:
    text, image = _vec(1), _vec(2)
    np.testing.assert_allclose(blend_prototype(text, image[None], 1.0), text, atol=1e-6)
    np.testing.assert_allclose(blend_prototype(text, image[None], 0.0), image, atol=1e-6)
    mid = blend_prototype(text, np.stack([image, image]), 0.5)
    assert abs(np.linalg.norm(mid) - 1) < 1e-6 and float(mid @ text) == pytest.approx(
        float(mid @ image), abs=1e-6
    )
    assert auto_text_weight(1) == 0.5 and auto_text_weight(16) == pytest.approx(0.2)
    assert auto_text_weight(4) < auto_text_weight(1)  # more examples earn more weight


def _exercise_examples(reg: Registry) -> None:
    a, b, c = _ex(b"image-a"), _ex(b"image-b"), _ex(b"image-c")
    new = NewClass("okapi", "okapi", (), _vec(1), 0.5, (a, b), frozenset({a.sha256, b.sha256}))
    assert reg.upsert([new], "h1", 10) == [CREATED]
    assert [e.data for e in reg.examples("okapi")] == [b"image-a", b"image-b"]
    snap = reg.snapshot().classes[0]
    assert (snap.examples, snap.text_weight) == (2, 0.5)
    # the same inputs again: nothing written; a name-only re-registration keeping the weight: unchanged too
    assert reg.upsert([new], "h1", 10) == [UNCHANGED]
    assert reg.upsert([NewClass("okapi", "okapi", (), None, 0.5)], "h1", 10) == [UNCHANGED]
    # an embedding computed without the stored examples is refused (a concurrent add): needs embedding
    stale = NewClass("okapi", "okapi", (), _vec(2), 0.5, (c,), frozenset({c.sha256}))
    assert reg.upsert([stale], "h1", 10) == [NEEDS_EMBEDDING]
    assert len(reg.examples("okapi")) == 2  # nothing written
    more = NewClass("okapi", "okapi", (), _vec(3), 0.4, (c,), frozenset({a.sha256, b.sha256, c.sha256}))
    assert reg.upsert([more], "h1", 10) == [UPDATED]
    assert reg.snapshot().classes[0].examples == 3
    # a bundle change hands the stored images to the re-embedding
    seen: list[StaleRow] = []

    def embed(rows: Any) -> np.ndarray:
        seen.extend(rows)
        return np.stack([_vec(9) for _ in rows])

    assert reg.reembed_stale("h2", 8, embed) == 1
    assert seen[0].examples == (b"image-a", b"image-b", b"image-c") and seen[0].text_weight == 0.4
    assert reg.delete("okapi") and reg.examples("okapi") == []


def test_sqlite_examples(tmp_path: Path) -> None:
    reg = Registry.open(f"sqlite:///{tmp_path}/reg.db")
    try:
        _exercise_examples(reg)
    finally:
        reg.close()


OLD_SCHEMA = (
    "CREATE TABLE flatprompt_classes (key TEXT PRIMARY KEY, name TEXT NOT NULL, templates TEXT NOT NULL,"
    " embedding {blob} NOT NULL, embed_dim INTEGER NOT NULL, bundle_hash TEXT NOT NULL,"
    " created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE flatprompt_meta (id INTEGER PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL)",
    "INSERT INTO flatprompt_meta (id, version) VALUES (1, 5)",
)


def _old_row(blob: bytes) -> tuple[Any, ...]:
    return ("zebra", "zebra", "[]", blob, 8, "h1", 1.0, 1.0)


def test_sqlite_registry_from_before_examples_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        for statement in OLD_SCHEMA:
            conn.execute(statement.format(blob="BLOB"))
        conn.execute(
            "INSERT INTO flatprompt_classes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", _old_row(_vec(4).tobytes())
        )
    reg = Registry.open(f"sqlite:///{path}")
    try:
        snap = reg.snapshot()
        assert snap.version == 5 and snap.classes[0].name == "zebra"
        assert (snap.classes[0].text_weight, snap.classes[0].examples) == (None, 0)
        a = _ex(b"z")
        assert reg.upsert(
            [NewClass("zebra", "zebra", (), _vec(5), 0.5, (a,), frozenset({a.sha256}))], "h1", 9
        ) == [UPDATED]
        assert reg.snapshot().classes[0].examples == 1
    finally:
        reg.close()


def _pg_database(postgres: Any, name: str) -> str:
    import psycopg

    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return str(postgres.url.rsplit("/", 1)[0] + "/" + name)


def test_postgres_examples_and_migration(postgres: Any) -> None:
    import psycopg

    reg = Registry.open(_pg_database(postgres, "examples_new"))
    try:
        _exercise_examples(reg)
    finally:
        reg.close()
    url = _pg_database(postgres, "examples_old")
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in OLD_SCHEMA:
            conn.execute(statement.format(blob="BYTEA"))
        conn.execute(
            "INSERT INTO flatprompt_classes VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            _old_row(_vec(4).tobytes()),
        )
    reg = Registry.open(url)
    try:
        assert reg.snapshot().classes[0].text_weight is None
        a = _ex(b"z")
        new = NewClass("zebra", "zebra", (), _vec(5), 0.25, (a,), frozenset({a.sha256}))
        assert reg.upsert([new], "h1", 9) == [UPDATED]
        assert reg.snapshot().classes[0].text_weight == 0.25
    finally:
        reg.close()


# -- end to end -----------------------------------------------------------------------------------
TEAL = (20, 200, 190)


def _images(colour: tuple[int, int, int], n: int) -> list[bytes]:
    rng = np.random.default_rng(sum(colour))
    return [
        png_bytes(
            tuple(int(np.clip(v + d, 0, 255)) for v, d in zip(colour, rng.integers(-12, 12, 3), strict=True))
        )
        for _ in range(n)
    ]


def _top(url: str, image: bytes) -> dict[str, Any]:
    r = httpx.post(url + "/classify", files=[("images", ("x.png", image, "image/png"))], timeout=60)
    assert r.status_code == 200, r.text
    return dict(r.json()["results"][0]["labels"][0])


def _registered(url: str) -> dict[str, dict[str, Any]]:
    body = httpx.post(url + "/classes", json={"kind": "registered"}, timeout=60).json()
    return {c["name"]: c for c in body["registered"]}


@pytest.mark.server
def test_register_from_images_end_to_end(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/reg.db"
    env = {
        "FLATPROMPT_BUNDLE": str(make_bundle(tmp_path / "b1")),
        "FLATPROMPT_REGISTRY_URL": db,
        "FLATPROMPT_TOKEN": TOKEN,
    }
    examples = _images(TEAL, 3)
    with running_server(tmp_path / "s1", env) as server:
        url = server.url
        files = [("images", (f"e{i}.png", data, "image/png")) for i, data in enumerate(examples[:2])]
        r = httpx.post(
            url + "/register_images", data={"name": "teal thing"}, files=files, headers=AUTH, timeout=60
        )
        assert r.status_code == 200, r.text
        assert r.json()["classes"][0]["status"] == "created"
        listed = _registered(url)["teal thing"]
        assert listed["examples"] == 2 and listed["text_weight"] == pytest.approx(auto_text_weight(2))
        assert _top(url, examples[2])["name"] == "teal thing"
        # more examples later (base64, JSON), one of them a repeat: 3 stored
        more = {"teal thing": [base64.b64encode(d).decode() for d in examples[1:]]}
        r = httpx.post(
            url + "/register", json={"names": ["teal thing"], "examples": more}, headers=AUTH, timeout=60
        )
        assert r.status_code == 200 and r.json()["classes"][0]["status"] == "updated", r.text
        assert _registered(url)["teal thing"]["examples"] == 3
        # bad example images: the same 4xx as /classify, nothing stored
        bad = [("images", ("bad.png", b"not an image", "image/png"))]
        r_reg = httpx.post(
            url + "/register_images", data={"name": "broken"}, files=bad, headers=AUTH, timeout=60
        )
        r_cls = httpx.post(url + "/classify", files=bad, timeout=60)
        assert r_reg.status_code == r_cls.status_code == 400
        assert r_reg.json()["error"] == r_cls.json()["error"] == "invalid_image"
        assert "broken" not in _registered(url)
        too_many = [("images", (f"{i}.png", png_bytes((i, 2 * i, 3 * i)), "image/png")) for i in range(17)]
        r = httpx.post(
            url + "/register_images", data={"name": "crowd"}, files=too_many, headers=AUTH, timeout=60
        )
        assert r.status_code == 413 and r.json()["error"] == "too_many_examples"
        r = httpx.post(
            url + "/register_images",
            data={"name": "x", "text_weight": "1.5"},
            files=files,
            headers=AUTH,
            timeout=60,
        )
        assert r.status_code == 400 and r.json()["error"] in ("bad_request", "invalid_text_weight")
        r = httpx.post(url + "/register_images", data={"name": "teal thing"}, files=files, timeout=60)
        assert r.status_code == 401  # the token is needed, as for /register
        before = json.loads(json.dumps(_registered(url)["teal thing"]))

    # restart on another bundle: the prototype is re-embedded from the stored images
    env2 = {**env, "FLATPROMPT_BUNDLE": str(make_bundle(tmp_path / "b2", seed=7))}
    with running_server(tmp_path / "s2", env2) as server:
        after = _registered(server.url)["teal thing"]
        assert after["examples"] == 3 and after["text_weight"] == before["text_weight"]
        assert _top(server.url, examples[0])["name"] == "teal thing"
    conn = sqlite3.connect(f"{tmp_path}/reg.db")
    hashes = {
        r[0] for r in conn.execute("SELECT bundle_hash FROM flatprompt_classes WHERE key = 'teal thing'")
    }
    conn.close()
    assert hashes == {bundle_hash(tmp_path / "b2")}  # rewritten for the new bundle


# -- text paths -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prompt-tuned tiny bundle (learned context + the hand-written graph), exported through the CLI."""
    from export.cli import main as export_main
    from tests.export_fixtures import (
        CLASS_COUNTS,
        CLASS_NAMES,
        load_tiny,
        make_prompted,
        tiny_weights,
        write_checkpoint,
    )

    root = tmp_path_factory.mktemp("tuned")
    loaded = load_tiny(tiny_weights(root / "w.pt"))
    ckpt = write_checkpoint(
        root / "run" / "checkpoint.pt", loaded, make_prompted(loaded), CLASS_NAMES, CLASS_COUNTS
    )
    out = root / "bundle"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(out), "--log-level", "WARNING"]) == 0
    return out


def _stored(db: Path) -> dict[str, tuple[np.ndarray, str]]:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT key, embedding, text_path FROM flatprompt_classes").fetchall()
    conn.close()
    return {key: (np.frombuffer(blob, "<f4"), path) for key, blob, path in rows}


@pytest.mark.server
def test_each_text_path_embeds_a_name_as_the_bundle_does(tuned_bundle: Path, tmp_path: Path) -> None:
    from serving.runtime.bundle import Bundle

    bundle = Bundle.load(tuned_bundle, providers=["CPUExecutionProvider"])
    assert bundle.text_paths == ("learned", "handwritten", "ensemble")
    db = tmp_path / "reg.db"
    env = {
        "FLATPROMPT_BUNDLE": str(tuned_bundle),
        "FLATPROMPT_REGISTRY_URL": f"sqlite:///{db}",
        "FLATPROMPT_TOKEN": TOKEN,
    }
    names = {"learned": "okapi", "handwritten": "zebra", "ensemble": "giraffe"}
    with running_server(tmp_path / "s", env) as server:
        for path, name in names.items():
            r = httpx.post(
                server.url + "/register", json={"names": [name], "text_path": path}, headers=AUTH, timeout=60
            )
            assert r.status_code == 200 and r.json()["classes"][0]["status"] == "created", r.text
        listed = _registered(server.url)
        assert {n: listed[n]["text_path"] for n in names.values()} == {n: p for p, n in names.items()}
        stored = _stored(db)
        for path, name in names.items():
            expected = bundle.embed_texts([name], text_path=path)[0]
            np.testing.assert_allclose(stored[name][0], expected, atol=1e-5, err_msg=path)
            assert stored[name][1] == path
        assert not np.allclose(
            stored["okapi"][0], bundle.embed_texts(["okapi"], text_path="handwritten")[0], atol=1e-3
        )
        # a client template: the learned path gets the placeholders, the hand-written one does not
        r = httpx.post(
            server.url + "/register",
            json={"names": ["zebra"], "templates": ["a blurry photo of a {}."], "text_path": "handwritten"},
            headers=AUTH,
            timeout=60,
        )
        assert r.json()["classes"][0]["status"] == "updated", r.text
        expected = bundle.embed_texts(["zebra"], "a blurry photo of a {}.", text_path="handwritten")[0]
        np.testing.assert_allclose(_stored(db)["zebra"][0], expected, atol=1e-5)
        # switching a class's path re-embeds it; leaving text_path out keeps the class's own
        r = httpx.post(
            server.url + "/register",
            json={"names": ["okapi"], "text_path": "ensemble"},
            headers=AUTH,
            timeout=60,
        )
        assert r.json()["classes"][0]["status"] == "updated"
        r = httpx.post(server.url + "/register", json={"names": ["okapi"]}, headers=AUTH, timeout=60)
        assert r.json()["classes"][0]["status"] == "unchanged"


@pytest.mark.server
def test_the_bundles_measured_default_text_path_is_used(tuned_bundle: Path, tmp_path: Path) -> None:
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(tuned_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["prompt"]["default_text_path"] = "handwritten"  # as the exporter records a measured winner
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    db = tmp_path / "r.db"
    env = {
        "FLATPROMPT_BUNDLE": str(bundle),
        "FLATPROMPT_REGISTRY_URL": f"sqlite:///{db}",
        "FLATPROMPT_TOKEN": TOKEN,
    }
    with running_server(tmp_path / "s", env) as server:
        r = httpx.post(server.url + "/register", json={"names": ["okapi"]}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
    assert _stored(db)["okapi"][1] == "handwritten"


@pytest.mark.server
def test_a_bundle_without_the_handwritten_graph_refuses_those_paths(
    tmp_path: Path, tuned_bundle: Path
) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tuned_bundle, old)
    (old / "text_encoder_handwritten.onnx").unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["files"]["text_encoder_handwritten.onnx"], manifest["prompt"]["handwritten_template"]
    manifest.get("graphs", {}).pop("text_encoder_handwritten", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    env = {
        "FLATPROMPT_BUNDLE": str(old),
        "FLATPROMPT_REGISTRY_URL": f"sqlite:///{tmp_path}/r.db",
        "FLATPROMPT_TOKEN": TOKEN,
    }
    with running_server(tmp_path / "s", env) as server:
        r = httpx.post(
            server.url + "/register",
            json={"names": ["okapi"], "text_path": "handwritten"},
            headers=AUTH,
            timeout=60,
        )
        assert r.status_code == 400 and r.json()["error"] == "invalid_text_path"
        assert "re-export" in r.json()["message"]
        r = httpx.post(server.url + "/register", json={"names": ["okapi"]}, headers=AUTH, timeout=60)
        assert r.status_code == 200  # the learned path, as before
