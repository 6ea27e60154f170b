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
* writers are serialised (SQLite ``BEGIN IMMEDIATE``; PostgreSQL a transaction-scoped advisory
  lock), so the registered-class cap cannot be overrun by concurrent registrations;
* readers do not query the database per request: a :class:`RegistryWatcher` thread per worker polls
  :meth:`Registry.version` (one single-row primary-key read) every ``poll_s`` and swaps in a new
  snapshot (:meth:`Registry.snapshot`, one consistent read transaction) when it moved. A request
  that needs the newest state (a candidate name it does not know yet, ``/classes``, the worker that
  just wrote) asks the watcher for a fresh check and waits for it at most its budget.

Nothing waits on the database without a bound, because a hung database (a stopped server, a dropped
network path: connections are not refused, they hang) must not hang the service:

* every connection carries timeouts: PostgreSQL ``statement_timeout`` and ``lock_timeout`` (server
  side), ``connect_timeout``, TCP keepalives and ``tcp_user_timeout`` (client side); SQLite a busy
  timeout;
* a caller with a budget runs its work through :func:`call_with_deadline`: the work runs in a
  thread of its own and the caller gets :class:`RegistryTimeout` when the budget is spent, while the
  connection stays with the stuck thread until the database answers;
* work whose caller gave up never commits later: every write transaction checks the deadline before
  ``COMMIT`` (and rolls back), and on PostgreSQL a deferred constraint trigger on the version row
  refuses a ``COMMIT`` that reaches the server after the deadline (server clock, so the window left
  is the clock offset between the hosts).

Embeddings depend on the bundle: rows remember the ``bundle_hash`` they were computed with, and
:meth:`Registry.reembed_stale` rewrites rows of another bundle at service start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np

_logger = logging.getLogger(__name__)

CLASSES_TABLE = "flatprompt_classes"
EXAMPLES_TABLE = "flatprompt_examples"
SCHEMA_WAIT_S = 30.0  # longest start-up wait for a registry another worker holds locked
META_TABLE = "flatprompt_meta"
DEADLINE_SETTING = "flatprompt.commit_deadline"  # transaction-local, read by the commit trigger
DEADLINE_FUNCTION = "flatprompt_commit_deadline"
DEADLINE_TRIGGER = "flatprompt_meta_commit_deadline"
DEFAULT_STATEMENT_TIMEOUT_S = 5.0

_T = TypeVar("_T")


class RegistryError(Exception):
    """The registry database cannot be reached or answered an unexpected error."""


class RegistryTimeout(RegistryError):
    """The registry did not answer within the caller's budget (the work, if any, will not commit)."""


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


# -- deadlines ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Deadline:
    monotonic: float  # when the caller gives up (this process's monotonic clock)
    wall: float  # the same instant as epoch seconds, for the server-side commit check


_current = threading.local()


def _deadline() -> _Deadline | None:
    return getattr(_current, "deadline", None)


def _remaining() -> float | None:
    """Seconds left before the current thread's deadline (None: no deadline)."""
    deadline = _deadline()
    return None if deadline is None else deadline.monotonic - time.monotonic()


def _check_deadline(before: str) -> None:
    remaining = _remaining()
    if remaining is not None and remaining <= 0:
        raise RegistryTimeout(f"the caller's deadline passed before {before}")


def call_with_deadline(
    fn: Callable[[], _T], timeout_s: float, *, name: str = "registry", write: bool = False
) -> _T:
    """``fn()`` in a daemon thread of its own; its result, or :class:`RegistryTimeout` after ``timeout_s``.

    Registry calls made by that thread see the deadline: they wait for the connection at most until
    then, and a write transaction that reaches its ``COMMIT`` after it rolls back instead (on
    PostgreSQL the server checks it again at commit time). A stuck call keeps its connection until the
    database answers; later calls on the same :class:`Registry` fail at their own deadline meanwhile.
    A ``write`` that still succeeds after its caller gave up (the window described in the module
    docstring) is logged as a warning.
    """
    started = time.monotonic()
    deadline = _Deadline(started + timeout_s, time.time() + timeout_s)
    box: dict[str, Any] = {}
    done = threading.Event()
    abandoned = threading.Event()

    def run() -> None:
        _current.deadline = deadline
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()
            if abandoned.is_set():
                late = time.monotonic() - started
                error = box.get("error")
                if error is None:
                    level = logging.WARNING if write else logging.INFO
                    _logger.log(level, "%s call finished %.1f s after its caller gave up", name, late)
                elif not isinstance(error, RegistryTimeout) or time.monotonic() - deadline.monotonic > 0.1:
                    # (a RegistryTimeout right at the deadline is the lock wait ending: nothing to tell)
                    _logger.info("%s call ended %.1f s after its caller gave up: %s", name, late, error)

    thread = threading.Thread(target=run, name=f"{name}-call", daemon=True)
    thread.start()
    if not done.wait(timeout_s):
        abandoned.set()
        if not done.is_set():
            raise RegistryTimeout(f"the registry did not answer within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class Registry:
    """Base class: dialect-independent logic over a DB-API connection guarded by a lock.

    ``statement_timeout_s`` bounds every statement (PostgreSQL ``statement_timeout`` and
    ``lock_timeout``; SQLite's busy timeout) and connection attempt.
    """

    placeholder = "?"
    blob_type = "BLOB"

    def __init__(self, url: str, statement_timeout_s: float = DEFAULT_STATEMENT_TIMEOUT_S) -> None:
        if statement_timeout_s <= 0:
            raise ValueError("statement_timeout_s must be positive")
        self.url = url
        self.statement_timeout_s = float(statement_timeout_s)
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

    def _create_extras(self, cur: Any) -> None:
        """Backend-specific schema objects (the commit-deadline trigger on PostgreSQL)."""

    # -- public API ----------------------------------------------------------------------------
    @staticmethod
    def open(url: str, statement_timeout_s: float = DEFAULT_STATEMENT_TIMEOUT_S) -> Registry:
        """Open the registry named by ``url`` (SQLite or PostgreSQL) and create its tables if needed."""
        scheme = urlsplit(url).scheme.lower()
        registry: Registry
        if scheme == "sqlite":
            registry = SqliteRegistry(url, statement_timeout_s)
        elif scheme in ("postgresql", "postgres"):
            registry = PostgresRegistry(url, statement_timeout_s)
        else:
            raise ValueError(f"unsupported registry URL scheme {scheme!r} (use sqlite:/// or postgresql://)")
        # Workers of one server start together: a SQLite file another worker is migrating stays locked for
        # longer than a statement's busy timeout may allow, so the schema step (start-up, not a request)
        # waits for it, up to SCHEMA_WAIT_S.
        deadline = time.monotonic() + SCHEMA_WAIT_S
        while True:
            try:
                registry.create_schema()
                return registry
            except RegistryError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                _logger.info(
                    "registry %s is locked by another process; waiting to create the schema",
                    registry.describe(),
                )
                time.sleep(0.2)

    def describe(self) -> str:
        """The URL without credentials, for logs."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return "sqlite" if isinstance(self, SqliteRegistry) else "postgresql"

    def close(self) -> None:
        """Close the connection (idempotent). Waits for a call in progress at most one statement timeout."""
        if not self._lock.acquire(timeout=min(1.0, self.statement_timeout_s)):
            _logger.warning("registry connection still busy at close; left to its thread")
            return
        try:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None
        finally:
            self._lock.release()

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
            self._create_extras(cur)

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
            RegistryTimeout: the deadline of :func:`call_with_deadline` passed (nothing committed).
        """
        ph = self.placeholder
        now = time.time()
        with self._locked(), self._write_tx() as cur:
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
            inserts: list[tuple[Any, ...]] = []
            updates: list[tuple[Any, ...]] = []
            examples: list[tuple[Any, ...]] = []
            for c, status in zip(classes, statuses, strict=True):
                if status == UNCHANGED:
                    continue
                assert c.embedding is not None
                blob = encode_embedding(c.embedding)
                templates_json = json.dumps(list(c.templates), ensure_ascii=False)
                weight = c.text_weight if (stored_sets.get(c.key) or c.examples) else None
                if status == CREATED:
                    inserts.append(
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
                        )
                    )
                else:
                    updates.append(
                        (
                            templates_json,
                            blob,
                            int(c.embedding.size),
                            bundle_hash,
                            now,
                            weight,
                            c.text_path,
                            c.key,
                        )
                    )
                examples.extend(  # created_at keeps the upload order
                    (c.key, e.sha256, e.data, len(e.data), now + order * 1e-6)
                    for order, e in enumerate(c.examples)
                )
            _check_deadline("writing")
            if inserts:  # one pipelined round trip on PostgreSQL, not one per row
                cur.executemany(
                    f"INSERT INTO {CLASSES_TABLE} (key, name, templates, embedding, embed_dim,"
                    f" bundle_hash, created_at, updated_at, text_weight, text_path)"
                    f" VALUES ({', '.join([ph] * 10)})",
                    inserts,
                )
            if updates:
                cur.executemany(
                    f"UPDATE {CLASSES_TABLE} SET templates = {ph}, embedding = {ph}, embed_dim = {ph},"
                    f" bundle_hash = {ph}, updated_at = {ph}, text_weight = {ph}, text_path = {ph}"
                    f" WHERE key = {ph}",
                    updates,
                )
            if examples:
                cur.executemany(
                    f"INSERT INTO {EXAMPLES_TABLE} (key, sha256, data, bytes, created_at)"
                    f" VALUES ({', '.join([ph] * 5)}) ON CONFLICT (key, sha256) DO NOTHING",
                    examples,
                )
            if inserts or updates:
                self._bump_version(cur)
            return statuses

    def delete(self, key: str) -> bool:
        """Delete one registered class in one transaction; False when it did not exist."""
        with self._locked(), self._write_tx() as cur:
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
        with self._locked(), self._write_tx() as cur:
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
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The connection lock, waited for at most until the current thread's deadline."""
        remaining = _remaining()
        if remaining is None:
            self._lock.acquire()
        elif not self._lock.acquire(timeout=max(remaining, 0.0)):
            raise RegistryTimeout(
                "the registry connection is busy with an earlier call that has not returned"
            )
        try:
            yield
        finally:
            self._lock.release()

    def _columns(self, cur: Any, table: str) -> set[str]:
        """Column names of ``table`` (dialect-specific)."""
        raise NotImplementedError

    def _bump_version(self, cur: Any) -> None:
        cur.execute(f"UPDATE {META_TABLE} SET version = version + 1 WHERE id = 1")

    def _with_retry(self, fn: Callable[[], Any]) -> Any:
        """Run a read under the lock; reconnect once when the connection was lost."""
        with self._locked():
            for attempt in (1, 2):
                try:
                    _check_deadline("reading")
                    if self._conn is None:
                        self._conn = self._connect()
                    return fn()
                except Exception as exc:
                    lost = self._is_connection_error(exc) or (
                        exc.__cause__ is not None and self._is_connection_error(exc.__cause__)
                    )
                    if attempt == 1 and lost and not isinstance(exc, RegistryTimeout):
                        _logger.warning("registry connection lost (%s), reconnecting", exc)
                        self._drop_connection()
                        continue
                    if isinstance(exc, RegistryError | RegistryFullError):
                        raise
                    raise RegistryError(f"registry read failed: {exc}") from exc
        raise AssertionError("unreachable")

    def _drop_connection(self) -> None:
        """Close the connection (the lock is held)."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


class SqliteRegistry(Registry):
    """SQLite in WAL mode; one connection per :class:`Registry`, shared by its threads under a lock."""

    placeholder = "?"
    blob_type = "BLOB"

    def __init__(self, url: str, statement_timeout_s: float = DEFAULT_STATEMENT_TIMEOUT_S) -> None:
        super().__init__(url, statement_timeout_s)
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
            timeout=self.statement_timeout_s,  # busy timeout: a locked file fails after this
            isolation_level=None,  # autocommit; transactions are explicit BEGIN ... COMMIT
            check_same_thread=False,  # guarded by self._lock
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.statement_timeout_s * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    @contextlib.contextmanager
    def _tx(self, begin: str) -> Iterator[sqlite3.Cursor]:
        with self._locked():
            _check_deadline("starting a transaction")
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
                _check_deadline("commit")  # the caller gave up: roll back rather than commit late
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
    """PostgreSQL through psycopg 3; one autocommit connection per :class:`Registry`, explicit transactions."""

    placeholder = "%s"
    blob_type = "BYTEA"

    def connect_kwargs(self) -> dict[str, Any]:
        """libpq parameters: server-side statement/lock timeouts, connect timeout, TCP keepalives and
        ``tcp_user_timeout`` (unacknowledged data on a dead path closes the connection)."""
        ms = max(1, int(self.statement_timeout_s * 1000))
        return {
            "autocommit": True,
            "application_name": "flatprompt",
            "connect_timeout": max(2, math.ceil(self.statement_timeout_s)),  # libpq's minimum is 2 s
            "options": f"-c statement_timeout={ms} -c lock_timeout={ms}"
            f" -c idle_in_transaction_session_timeout={4 * ms}",
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 2 * ms,
        }

    def _connect(self) -> Any:
        import psycopg

        try:
            return psycopg.connect(self.url, **self.connect_kwargs())
        except psycopg.Error as exc:
            raise RegistryError(f"cannot connect to {self.describe()}: {exc}") from exc

    def _is_connection_error(self, exc: BaseException) -> bool:
        import psycopg

        if self._conn is not None and bool(self._conn.closed or getattr(self._conn, "broken", False)):
            return True
        if isinstance(exc, psycopg.InterfaceError):
            return True
        if isinstance(exc, psycopg.OperationalError):
            # statement and lock timeouts are OperationalErrors too, on a healthy connection
            state = getattr(exc, "sqlstate", None)
            return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")
        return False

    def _create_extras(self, cur: Any) -> None:
        # A COMMIT that reaches the server after the caller's deadline fails: every mutation updates the
        # meta row, and this deferred trigger runs at COMMIT time.
        cur.execute(
            f"CREATE OR REPLACE FUNCTION {DEADLINE_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" DECLARE deadline text := current_setting('{DEADLINE_SETTING}', true);"
            " BEGIN"
            "  IF deadline IS NOT NULL AND deadline <> ''"
            "     AND extract(epoch FROM clock_timestamp()) > deadline::double precision THEN"
            "   RAISE EXCEPTION 'flatprompt: commit after the caller''s deadline' USING ERRCODE = '57014';"
            "  END IF;"
            "  RETURN NULL;"
            " END $$"
        )
        cur.execute(f"SELECT 1 FROM pg_trigger WHERE tgname = '{DEADLINE_TRIGGER}'")
        if cur.fetchone() is None:
            cur.execute(
                f"CREATE CONSTRAINT TRIGGER {DEADLINE_TRIGGER} AFTER UPDATE ON {META_TABLE}"
                f" DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {DEADLINE_FUNCTION}()"
            )

    @contextlib.contextmanager
    def _pg_tx(self, statements: Sequence[str], write: bool = False) -> Iterator[Any]:
        import psycopg

        with self._locked():
            _check_deadline("starting a transaction")
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            elif write:
                self._ensure_alive()
            try:
                with self._conn.transaction(), self._conn.cursor() as cur:
                    for statement in statements:
                        cur.execute(statement)
                    deadline = _deadline()
                    if write and deadline is not None:
                        # the server refuses the COMMIT past this instant (a margin for the answer to travel)
                        margin = min(0.1, 0.1 * max(deadline.monotonic - time.monotonic(), 0.0))
                        cur.execute(
                            "SELECT set_config(%s, %s, true)",
                            (DEADLINE_SETTING, repr(deadline.wall - margin)),
                        )
                    yield cur
                    _check_deadline("commit")  # the caller gave up: roll back rather than commit late
            except psycopg.Error as exc:
                if self._is_connection_error(exc):
                    self._drop_connection()
                raise RegistryError(f"registry transaction failed: {exc}") from exc

    def _ensure_alive(self) -> None:
        """Reconnect when the connection died while idle (a server restart), so that the first write
        after it does not fail; a write is never retried itself (its outcome could be unknown)."""
        import psycopg

        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error as exc:
            if not self._is_connection_error(exc):
                raise RegistryError(f"registry unavailable: {exc}") from exc
            _logger.info("registry connection lost (%s), reconnecting", exc)
            self._drop_connection()
            self._conn = self._connect()

    @contextlib.contextmanager
    def _write_tx(self) -> Iterator[Any]:
        # A transaction-scoped advisory lock serialises every writer of every process and replica,
        # including schema creation (CREATE TABLE IF NOT EXISTS races in PostgreSQL otherwise).
        with self._pg_tx(["SELECT pg_advisory_xact_lock(7146917031)"], write=True) as cur:
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


# -- the background refresh ----------------------------------------------------------------------
@dataclass(frozen=True)
class RegistryState:
    """What a worker knows about its registry, as of the last check."""

    up: bool  # the last check answered
    version: int  # version of the classes in use (-1 before the first load)
    staleness_s: float  # seconds since the classes in use were last confirmed current
    stale: bool  # not up, or not confirmed current for longer than ``stale_after_s``
    error: str | None  # why the last check failed
    down_since_s: float | None  # seconds since the registry stopped answering (None while up)

    def as_dict(self) -> dict[str, Any]:
        """For the readiness body."""
        return {
            "state": "stale" if self.stale else "current",
            "up": self.up,
            "version": self.version,
            "staleness_seconds": round(self.staleness_s, 3),
            **({"error": self.error} if self.error else {}),
        }


class RegistryWatcher:
    """Keeps a worker's classes current without putting the database on the request path.

    A daemon thread checks :meth:`Registry.version` every ``poll_s`` (and at once when
    :meth:`refresh` asks), each check bounded by ``timeout_s`` through :func:`call_with_deadline`; when
    the version moved it reads a :meth:`Registry.snapshot` (bounded by ``snapshot_timeout_s``) and hands
    it to ``apply``, which swaps in the new class index. When the database does not answer, requests go
    on with the classes they have; :attr:`state` says how stale they are, and ``on_state`` (the
    Prometheus gauges) hears it after every check.

    The watcher needs a :class:`Registry` of its own (its own connection): a write stuck on the
    service's connection must not hold up the checks, and the other way round.
    """

    def __init__(
        self,
        registry: Registry,
        apply: Callable[[Snapshot], None],
        *,
        poll_s: float = 0.5,
        timeout_s: float = 1.0,
        snapshot_timeout_s: float | None = None,
        stale_after_s: float | None = None,
        on_state: Callable[[RegistryState], None] | None = None,
        name: str = "registry-watch",
    ) -> None:
        if poll_s <= 0 or timeout_s <= 0:
            raise ValueError("poll_s and timeout_s must be positive")
        self.registry = registry
        self.poll_s = float(poll_s)
        self.timeout_s = float(timeout_s)
        self.snapshot_timeout_s = float(snapshot_timeout_s or max(timeout_s, registry.statement_timeout_s))
        self.stale_after_s = float(stale_after_s or max(2.0, 2 * poll_s + timeout_s))
        self._apply = apply
        self._on_state = on_state
        self._name = name
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0  # checks started
        self._finished = 0  # checks finished
        self._version = -1
        self._confirmed_at = time.monotonic()  # start of the last successful check
        self._up = False
        self._error: str | None = "not checked yet"
        self._down_since: float | None = None
        self._last_down_log = 0.0

    # -- lifecycle -----------------------------------------------------------------------------
    def load(self, timeout_s: float | None = None) -> Snapshot:
        """The first load, in the caller's thread (service start); raises :class:`RegistryError`."""
        started = time.monotonic()
        snapshot = call_with_deadline(
            self.registry.snapshot, timeout_s or self.snapshot_timeout_s, name=f"{self._name}-load"
        )
        self._apply(snapshot)
        with self._cond:
            self._version = snapshot.version
            self._confirmed_at = started
            self._up, self._error, self._down_since = True, None, None
        self._publish()
        return snapshot

    def start(self) -> None:
        """Start the polling thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the thread (it finishes the check in progress, bounded by its timeout) and close."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.registry.close()

    # -- queries -------------------------------------------------------------------------------
    @property
    def state(self) -> RegistryState:
        with self._cond:
            now = time.monotonic()
            staleness = max(0.0, now - self._confirmed_at)
            return RegistryState(
                up=self._up,
                version=self._version,
                staleness_s=staleness,
                stale=not self._up or staleness > self.stale_after_s,
                error=self._error,
                down_since_s=None if self._down_since is None else now - self._down_since,
            )

    def refresh(self, wait_s: float, *, only_if_up: bool = True) -> bool:
        """Ask for a check now and wait, at most ``wait_s``, for one that started after this call.

        True when such a check succeeded (the classes are current as of this call). With
        ``only_if_up`` (the default) and the registry not answering, returns False at once: requests do
        not queue behind a database that is known to hang.
        """
        with self._cond:
            if only_if_up and not self._up:
                return False
            target = self._started + 1
            self._wake.set()
            end = time.monotonic() + wait_s
            while self._finished < target:
                remaining = end - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return False
                self._cond.wait(remaining)
            return self._up

    # -- the thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.check()

    def check(self) -> bool:
        """One check (the thread's body; public for tests): version, then a snapshot when it moved."""
        with self._cond:
            self._started += 1
        started = time.monotonic()
        error: str | None = None
        try:
            version = call_with_deadline(self.registry.version, self.timeout_s, name=f"{self._name}-poll")
            if version != self._version:
                snapshot = call_with_deadline(
                    self.registry.snapshot, self.snapshot_timeout_s, name=f"{self._name}-snapshot"
                )
                self._apply(snapshot)
                with self._cond:
                    self._version = snapshot.version
        except RegistryError as exc:
            error = str(exc) or type(exc).__name__
        except Exception as exc:  # a bug in apply: keep polling, say so
            _logger.exception("applying a registry snapshot failed")
            error = f"{type(exc).__name__}: {exc}"
        with self._cond:
            was_up, down_since = self._up, self._down_since
            if error is None:
                self._confirmed_at = started
                self._up, self._error, self._down_since = True, None, None
            else:
                self._up, self._error = False, error
                if self._down_since is None:
                    self._down_since = started
            self._finished += 1
            self._cond.notify_all()
        self._log_transition(was_up, down_since, error)
        self._publish()
        return error is None

    def _log_transition(self, was_up: bool, down_since: float | None, error: str | None) -> None:
        now = time.monotonic()
        if error is None:
            if not was_up and down_since is not None:
                _logger.info(
                    "registry %s answers again after %.1f s; classes at version %d",
                    self.registry.describe(),
                    now - down_since,
                    self._version,
                )
            return
        if was_up or now - self._last_down_log >= 30.0:  # once when it goes, then every 30 s
            self._last_down_log = now
            _logger.warning(
                "registry %s not answering (%s); classifying with the classes of version %d, "
                "registrations answer 503",
                self.registry.describe(),
                error,
                self._version,
            )

    def _publish(self) -> None:
        if self._on_state is not None:
            try:
                self._on_state(self.state)
            except Exception:  # metrics must never stop the watcher
                _logger.exception("publishing the registry state failed")
