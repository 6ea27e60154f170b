"""The registry of novel class names: a real database shared by every worker and replica.

Backends: SQLite (``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``; the default) and
PostgreSQL (``postgresql://user@host:port/db``, through psycopg 3).

Tables (created on first use, ``CREATE TABLE IF NOT EXISTS``)::

    flatprompt_classes(key PK, name, templates JSON, embedding BLOB/BYTEA float32 LE, embed_dim,
                       bundle_hash, created_at, updated_at, text_weight NULL | REAL,
                       text_path NULL | TEXT)
    flatprompt_examples(key, sha256, data BLOB/BYTEA, bytes, created_at; PK (key, sha256))
    flatprompt_meta(id = 1, version)          -- bumped by every committed change

A class registered with example images keeps them (``flatprompt_examples``, the encoded files as
uploaded, deduplicated by sha256) and its blend weight (``text_weight``; NULL = text only); every class
keeps the text path its name was embedded with (``text_path``; NULL = learned), so a new
bundle re-embeds it from the same inputs. Registries created before examples existed are migrated
at open (the table is created, the column added).

Consistency rules:

* every mutation is one transaction that also bumps ``flatprompt_meta.version``; a process killed
  in the middle leaves either the old or the new state, never a half-registration;
* writers are serialised (SQLite ``BEGIN IMMEDIATE``; PostgreSQL ``SELECT ... FOR UPDATE`` on the
  meta row), so the registered-class cap cannot be overrun by concurrent registrations;
* readers call :meth:`Registry.version` (one indexed single-row query) before each classification
  and reload with :meth:`Registry.snapshot` (one consistent read transaction) only when it moved, so
  a registration is visible to every worker as soon as its commit returned, i.e. before the client
  got its response.

Embeddings depend on the bundle: rows remember the ``bundle_hash`` they were computed with, and
:meth:`Registry.reembed_stale` rewrites rows of another bundle at service start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

_logger = logging.getLogger(__name__)

CLASSES_TABLE = "flatprompt_classes"
EXAMPLES_TABLE = "flatprompt_examples"
META_TABLE = "flatprompt_meta"


class RegistryError(Exception):
    """The registry database cannot be reached or answered an unexpected error."""


class RegistryFullError(Exception):
    """A registration would exceed the configured maximum number of registered classes."""

    def __init__(self, current: int, adding: int, limit: int) -> None:
        super().__init__(f"registry holds {current} classes, adding {adding} exceeds the limit of {limit}")
        self.current, self.adding, self.limit = current, adding, limit


@dataclass(frozen=True)
class StoredClass:
    """One registered class as read from the database."""

    key: str  # case-folded identity
    name: str  # display name as registered
    templates: tuple[str, ...]  # prompt templates ensembled; () = the bundle's own template
    embedding: np.ndarray  # float32 [E], L2-normalised
    bundle_hash: str  # bundle the embedding was computed with
    created_at: float  # epoch seconds
    text_weight: float | None = None  # blend weight of the text embedding; None = no example images
    text_path: str = "learned"  # how the name was embedded: learned | handwritten | ensemble
    examples: int = 0  # example images stored for the class


@dataclass(frozen=True)
class Example:
    """One stored example image of a registered class (the uploaded file's bytes)."""

    sha256: str
    data: bytes


@dataclass(frozen=True)
class StaleRow:
    """A row to re-embed for another bundle: everything its embedding was computed from."""

    key: str
    name: str
    templates: tuple[str, ...]
    text_weight: float | None
    examples: tuple[bytes, ...]
    text_path: str = "learned"


@dataclass(frozen=True)
class Snapshot:
    """All registered classes at one registry version."""

    version: int
    classes: tuple[StoredClass, ...]


@dataclass(frozen=True)
class NewClass:
    """A class to insert or update; ``embedding`` may be None when the caller expects it unchanged.

    ``examples`` are new example images to store; ``example_set`` is the sha256 set of ALL examples the
    embedding was computed from (stored ones included): when the stored set differs at commit time (a
    concurrent registration added some), the class answers ``needs_embedding`` instead of being written.
    """

    key: str
    name: str
    templates: tuple[str, ...]
    embedding: np.ndarray | None
    text_weight: float | None = None
    examples: tuple[Example, ...] = ()
    example_set: frozenset[str] = frozenset()
    text_path: str = "learned"


# status values returned by Registry.upsert, per requested class
CREATED, UPDATED, UNCHANGED, NEEDS_EMBEDDING = "created", "updated", "unchanged", "needs_embedding"


def encode_embedding(vector: np.ndarray) -> bytes:
    """float32 little-endian bytes of a 1-D embedding."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def decode_embedding(blob: bytes, dim: int) -> np.ndarray:
    """Inverse of :func:`encode_embedding`; checks the length."""
    array = np.frombuffer(bytes(blob), dtype="<f4")
    if array.shape != (dim,):
        raise RegistryError(f"stored embedding has {array.size} values, expected {dim}")
    return array.astype(np.float32)


class Registry:
    """Base class: dialect-independent logic over a DB-API connection guarded by a lock."""

    placeholder = "?"
    blob_type = "BLOB"

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.RLock()
        self._conn: Any = None

    # -- backend hooks -------------------------------------------------------------------------
    def _connect(self) -> Any:
        raise NotImplementedError

    @contextlib.contextmanager
    def _write_tx(self) -> Iterator[Any]:
        """A serialised write transaction yielding a cursor; commits on success, rolls back on error."""
        raise NotImplementedError
        yield

    @contextlib.contextmanager
    def _read_tx(self) -> Iterator[Any]:
        """A read transaction with one consistent snapshot, yielding a cursor."""
        raise NotImplementedError
        yield

    def _is_connection_error(self, exc: BaseException) -> bool:
        return False

    # -- public API ----------------------------------------------------------------------------
    @staticmethod
    def open(url: str) -> Registry:
        """Open the registry named by ``url`` (SQLite or PostgreSQL) and create its tables if needed."""
        scheme = urlsplit(url).scheme.lower()
        registry: Registry
        if scheme == "sqlite":
            registry = SqliteRegistry(url)
        elif scheme in ("postgresql", "postgres"):
            registry = PostgresRegistry(url)
        else:
            raise ValueError(f"unsupported registry URL scheme {scheme!r} (use sqlite:/// or postgresql://)")
        registry.create_schema()
        return registry

    def describe(self) -> str:
        """The URL without credentials, for logs."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

    def create_schema(self) -> None:
        """Create the tables and the meta row when missing."""
        with self._write_tx() as cur:
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {CLASSES_TABLE} ("
                " key TEXT PRIMARY KEY,"
                " name TEXT NOT NULL,"
                " templates TEXT NOT NULL,"
                f" embedding {self.blob_type} NOT NULL,"
                " embed_dim INTEGER NOT NULL,"
                " bundle_hash TEXT NOT NULL,"
                " created_at DOUBLE PRECISION NOT NULL,"
                " updated_at DOUBLE PRECISION NOT NULL)"
            )
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {EXAMPLES_TABLE} ("
                " key TEXT NOT NULL,"
                " sha256 TEXT NOT NULL,"
                f" data {self.blob_type} NOT NULL,"
                " bytes INTEGER NOT NULL,"
                " created_at DOUBLE PRECISION NOT NULL,"
                " PRIMARY KEY (key, sha256))"
            )
            columns = self._columns(cur, CLASSES_TABLE)
            for column, kind in (("text_weight", "DOUBLE PRECISION"), ("text_path", "TEXT")):
                if column not in columns:  # a registry from before examples / text paths
                    cur.execute(f"ALTER TABLE {CLASSES_TABLE} ADD COLUMN {column} {kind}")
                    _logger.info("registry migrated: %s.%s added", CLASSES_TABLE, column)
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {META_TABLE} ("
                " id INTEGER PRIMARY KEY CHECK (id = 1),"
                " version BIGINT NOT NULL)"
            )
            cur.execute(f"INSERT INTO {META_TABLE} (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING")

    def version(self) -> int:
        """The current registry version (cheap: one single-row primary-key read)."""

        def run() -> int:
            cur = self._conn.cursor()
            try:
                cur.execute(f"SELECT version FROM {META_TABLE} WHERE id = 1")
                row = cur.fetchone()
            finally:
                cur.close()
            return int(row[0]) if row else 0

        return self._with_retry(run)

    def snapshot(self) -> Snapshot:
        """Every registered class and the version they belong to, read in one transaction."""

        def run() -> Snapshot:
            with self._read_tx() as cur:
                cur.execute(f"SELECT version FROM {META_TABLE} WHERE id = 1")
                row = cur.fetchone()
                version = int(row[0]) if row else 0
                cur.execute(
                    f"SELECT c.key, c.name, c.templates, c.embedding, c.embed_dim, c.bundle_hash, c.created_at,"
                    f" c.text_weight, (SELECT COUNT(*) FROM {EXAMPLES_TABLE} e WHERE e.key = c.key),"
                    " c.text_path"
                    f" FROM {CLASSES_TABLE} c ORDER BY c.created_at, c.key"
                )
                rows = cur.fetchall()
            classes = tuple(
                StoredClass(
                    key=r[0],
                    name=r[1],
                    templates=tuple(json.loads(r[2])),
                    embedding=decode_embedding(r[3], int(r[4])),
                    bundle_hash=r[5],
                    created_at=float(r[6]),
                    text_weight=None if r[7] is None else float(r[7]),
                    examples=int(r[8]),
                    text_path=r[9] or "learned",
                )
                for r in rows
            )
            return Snapshot(version=version, classes=classes)

        return self._with_retry(run)

    def count(self) -> int:
        """Number of registered classes."""

        def run() -> int:
            cur = self._conn.cursor()
            try:
                cur.execute(f"SELECT COUNT(*) FROM {CLASSES_TABLE}")
                return int(cur.fetchone()[0])
            finally:
                cur.close()

        return self._with_retry(run)

    def examples(self, key: str) -> list[Example]:
        """The stored example images of one class, oldest first."""

        def run() -> list[Example]:
            with self._read_tx() as cur:
                cur.execute(
                    f"SELECT sha256, data FROM {EXAMPLES_TABLE} WHERE key = {self.placeholder}"
                    " ORDER BY created_at, sha256",
                    (key,),
                )
                return [Example(r[0], bytes(r[1])) for r in cur.fetchall()]

        return self._with_retry(run)

    def upsert(self, classes: Sequence[NewClass], bundle_hash: str, max_total: int) -> list[str]:
        """Insert or update ``classes`` in ONE transaction; returns a status per class.

        Status: ``created``, ``updated`` (templates or bundle changed), ``unchanged`` (same templates
        and bundle; nothing written) or ``needs_embedding`` (the row would have to be written but the
        caller passed no embedding; nothing at all is written then, call again with embeddings).

        Raises:
            RegistryFullError: the number of registered classes would exceed ``max_total``.
        """
        ph = self.placeholder
        now = time.time()
        with self._lock, self._write_tx() as cur:
            existing: dict[str, tuple[str, str, float | None, str]] = {}
            stored_sets: dict[str, set[str]] = {}
            keys = [c.key for c in classes]
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ", ".join([ph] * len(chunk))
                cur.execute(
                    f"SELECT key, templates, bundle_hash, text_weight, text_path FROM {CLASSES_TABLE}"
                    f" WHERE key IN ({marks})",
                    chunk,
                )
                existing.update(
                    {
                        r[0]: (r[1], r[2], None if r[3] is None else float(r[3]), r[4] or "learned")
                        for r in cur.fetchall()
                    }
                )
                cur.execute(f"SELECT key, sha256 FROM {EXAMPLES_TABLE} WHERE key IN ({marks})", chunk)
                for key, sha in cur.fetchall():
                    stored_sets.setdefault(key, set()).add(sha)
            statuses: list[str] = []
            for c in classes:
                templates_json = json.dumps(list(c.templates), ensure_ascii=False)
                stored = stored_sets.get(c.key, set())
                wanted = stored | {e.sha256 for e in c.examples}
                same_inputs = (
                    c.key in existing
                    and existing[c.key][:2] == (templates_json, bundle_hash)
                    and wanted == stored
                    and (not stored or existing[c.key][2] == c.text_weight)
                    and existing[c.key][3] == c.text_path
                )
                if same_inputs:
                    statuses.append(UNCHANGED)
                elif c.embedding is None or (wanted and c.example_set != wanted):
                    statuses.append(NEEDS_EMBEDDING)  # no embedding, or one computed from other examples
                else:
                    statuses.append(UPDATED if c.key in existing else CREATED)
            if NEEDS_EMBEDDING in statuses:
                return statuses  # the transaction commits nothing
            adding = statuses.count(CREATED)
            if adding:
                cur.execute(f"SELECT COUNT(*) FROM {CLASSES_TABLE}")
                current = int(cur.fetchone()[0])
                if current + adding > max_total:
                    raise RegistryFullError(current, adding, max_total)
            for c, status in zip(classes, statuses, strict=True):
                if status == UNCHANGED:
                    continue
                assert c.embedding is not None
                blob = encode_embedding(c.embedding)
                templates_json = json.dumps(list(c.templates), ensure_ascii=False)
                weight = c.text_weight if (stored_sets.get(c.key) or c.examples) else None
                if status == CREATED:
                    cur.execute(
                        f"INSERT INTO {CLASSES_TABLE} (key, name, templates, embedding, embed_dim,"
                        f" bundle_hash, created_at, updated_at, text_weight, text_path)"
                        f" VALUES ({', '.join([ph] * 10)})",
                        (
                            c.key,
                            c.name,
                            templates_json,
                            blob,
                            int(c.embedding.size),
                            bundle_hash,
                            now,
                            now,
                            weight,
                            c.text_path,
                        ),
                    )
                else:
                    cur.execute(
                        f"UPDATE {CLASSES_TABLE} SET templates = {ph}, embedding = {ph}, embed_dim = {ph},"
                        f" bundle_hash = {ph}, updated_at = {ph}, text_weight = {ph}, text_path = {ph}"
                        f" WHERE key = {ph}",
                        (
                            templates_json,
                            blob,
                            int(c.embedding.size),
                            bundle_hash,
                            now,
                            weight,
                            c.text_path,
                            c.key,
                        ),
                    )
                for order, example in enumerate(c.examples):  # created_at keeps the upload order
                    cur.execute(
                        f"INSERT INTO {EXAMPLES_TABLE} (key, sha256, data, bytes, created_at)"
                        f" VALUES ({', '.join([ph] * 5)}) ON CONFLICT (key, sha256) DO NOTHING",
                        (c.key, example.sha256, example.data, len(example.data), now + order * 1e-6),
                    )
            if any(s != UNCHANGED for s in statuses):
                self._bump_version(cur)
            return statuses

    def delete(self, key: str) -> bool:
        """Delete one registered class in one transaction; False when it did not exist."""
        with self._lock, self._write_tx() as cur:
            cur.execute(f"DELETE FROM {CLASSES_TABLE} WHERE key = {self.placeholder}", (key,))
            deleted = cur.rowcount > 0
            cur.execute(f"DELETE FROM {EXAMPLES_TABLE} WHERE key = {self.placeholder}", (key,))
            if deleted:
                self._bump_version(cur)
            return deleted

    def reembed_stale(
        self,
        bundle_hash: str,
        embed_dim: int,
        embed: Callable[[Sequence[StaleRow]], np.ndarray],
    ) -> int:
        """Re-embed rows computed with another bundle (or dimension); returns the number rewritten.

        ``embed`` gets :class:`StaleRow` s (name, templates, blend weight and stored example images) and
        returns normalised ``[N, E]`` embeddings. Embedding runs outside any transaction; the rewrite is one
        transaction that only touches rows still unchanged since they were read (a concurrent worker doing
        the same work is harmless).
        """
        ph = self.placeholder

        def select() -> list[tuple[Any, ...]]:
            with self._read_tx() as cur:
                cur.execute(
                    f"SELECT key, name, templates, bundle_hash, text_weight, text_path FROM {CLASSES_TABLE}"
                    f" WHERE bundle_hash <> {ph} OR embed_dim <> {ph}",
                    (bundle_hash, embed_dim),
                )
                return list(cur.fetchall())

        stale = self._with_retry(select)
        if not stale:
            return 0
        _logger.info("re-embedding %d registered classes for bundle %s", len(stale), bundle_hash[:12])
        rows = [
            StaleRow(
                key=r[0],
                name=r[1],
                templates=tuple(json.loads(r[2])),
                text_weight=None if r[4] is None else float(r[4]),
                examples=tuple(e.data for e in self.examples(r[0])) if r[4] is not None else (),
                text_path=r[5] or "learned",
            )
            for r in stale
        ]
        vectors = embed(rows)
        now = time.time()
        rewritten = 0
        with self._lock, self._write_tx() as cur:
            for row, vector in zip(stale, vectors, strict=True):
                cur.execute(
                    f"UPDATE {CLASSES_TABLE} SET embedding = {ph}, embed_dim = {ph}, bundle_hash = {ph},"
                    f" updated_at = {ph} WHERE key = {ph} AND bundle_hash = {ph} AND templates = {ph}",
                    (encode_embedding(vector), int(vector.size), bundle_hash, now, row[0], row[3], row[2]),
                )
                rewritten += max(cur.rowcount, 0)
            if rewritten:
                self._bump_version(cur)
        return rewritten

    # -- helpers -------------------------------------------------------------------------------
    def _columns(self, cur: Any, table: str) -> set[str]:
        """Column names of ``table`` (dialect-specific)."""
        raise NotImplementedError

    def _bump_version(self, cur: Any) -> None:
        cur.execute(f"UPDATE {META_TABLE} SET version = version + 1 WHERE id = 1")

    def _with_retry(self, fn: Callable[[], Any]) -> Any:
        """Run a read under the lock; reconnect once when the connection was lost."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._conn is None:
                        self._conn = self._connect()
                    return fn()
                except Exception as exc:
                    lost = self._is_connection_error(exc) or (
                        exc.__cause__ is not None and self._is_connection_error(exc.__cause__)
                    )
                    if attempt == 1 and lost:
                        _logger.warning("registry connection lost (%s), reconnecting", exc)
                        self.close()
                        continue
                    if isinstance(exc, RegistryError | RegistryFullError):
                        raise
                    raise RegistryError(f"registry read failed: {exc}") from exc
        raise AssertionError("unreachable")


class SqliteRegistry(Registry):
    """SQLite in WAL mode; one connection per process, shared by its threads under a lock."""

    placeholder = "?"
    blob_type = "BLOB"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        path = url[len("sqlite:///") :] if url.lower().startswith("sqlite:///") else ""
        if not path:
            raise ValueError(f"SQLite URL must look like sqlite:///file.db, got {url!r}")
        self.path = path
        if path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"sqlite:///{self.path}"

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(Path(self.path).expanduser()) if self.path != ":memory:" else ":memory:",
            timeout=30.0,
            isolation_level=None,  # autocommit; transactions are explicit BEGIN ... COMMIT
            check_same_thread=False,  # guarded by self._lock
        )
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    @contextlib.contextmanager
    def _tx(self, begin: str) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            cur = self._conn.cursor()
            try:
                cur.execute(begin)
            except sqlite3.Error as exc:
                cur.close()
                raise RegistryError(f"registry unavailable: {exc}") from exc
            try:
                yield cur
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    cur.execute("ROLLBACK")
                raise
            else:
                try:
                    cur.execute("COMMIT")
                except sqlite3.Error as exc:
                    with contextlib.suppress(sqlite3.Error):
                        cur.execute("ROLLBACK")
                    raise RegistryError(f"registry commit failed: {exc}") from exc
            finally:
                cur.close()

    @contextlib.contextmanager
    def _write_tx(self) -> Iterator[sqlite3.Cursor]:
        try:
            with self._tx("BEGIN IMMEDIATE") as cur:
                yield cur
        except sqlite3.Error as exc:
            raise RegistryError(f"registry write failed: {exc}") from exc

    @contextlib.contextmanager
    def _read_tx(self) -> Iterator[sqlite3.Cursor]:
        with self._tx("BEGIN") as cur:
            yield cur

    def _columns(self, cur: Any, table: str) -> set[str]:
        cur.execute(f"PRAGMA table_info({table})")
        return {str(r[1]) for r in cur.fetchall()}


class PostgresRegistry(Registry):
    """PostgreSQL through psycopg 3; one autocommit connection per process, explicit transactions."""

    placeholder = "%s"
    blob_type = "BYTEA"

    def _connect(self) -> Any:
        import psycopg

        try:
            return psycopg.connect(
                self.url, autocommit=True, connect_timeout=10, application_name="flatprompt"
            )
        except psycopg.Error as exc:
            raise RegistryError(f"cannot connect to {self.describe()}: {exc}") from exc

    def _is_connection_error(self, exc: BaseException) -> bool:
        import psycopg

        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) or (
            self._conn is not None and bool(self._conn.closed)
        )

    @contextlib.contextmanager
    def _pg_tx(self, statements: Sequence[str]) -> Iterator[Any]:
        import psycopg

        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            try:
                with self._conn.transaction(), self._conn.cursor() as cur:
                    for statement in statements:
                        cur.execute(statement)
                    yield cur
            except psycopg.Error as exc:
                if self._is_connection_error(exc):
                    self.close()
                raise RegistryError(f"registry transaction failed: {exc}") from exc

    @contextlib.contextmanager
    def _write_tx(self) -> Iterator[Any]:
        # A transaction-scoped advisory lock serialises every writer of every process and replica,
        # including schema creation (CREATE TABLE IF NOT EXISTS races in PostgreSQL otherwise).
        with self._pg_tx(["SELECT pg_advisory_xact_lock(7146917031)"]) as cur:
            yield cur

    @contextlib.contextmanager
    def _read_tx(self) -> Iterator[Any]:
        with self._pg_tx(["SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"]) as cur:
            yield cur

    def _columns(self, cur: Any, table: str) -> set[str]:
        cur.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s AND table_schema = current_schema()",
            (table,),
        )
        return {str(r[0]) for r in cur.fetchall()}
