"""Start and stop what a serving test or benchmark needs: ``bentoml serve`` and a throw-away PostgreSQL.

Both bind 127.0.0.1 on a free port, run in a process group of their own (``start_new_session``) and are
stopped by whoever started them (:meth:`Server.stop`, :meth:`Postgres.stop`). Used by ``tests/`` and
``benchmarks/``; nothing in the service imports it.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path

import httpx

_logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


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

    def pids(self) -> list[int]:
        """The server's PID and every descendant's (circus starts each worker in a session of its own,
        so the process group alone misses them)."""
        return [self.proc.pid, *descendants(self.proc.pid)]

    def kill(self) -> list[int]:
        """SIGKILL the server and all its descendants at once (a crash); returns the PIDs signalled."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        return pids

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server's PID, wait, then SIGKILL whatever of it is still there (workers included)."""
        family = self.pids()
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
        # workers of a killed arbiter could linger (they have sessions of their own): end them too
        for pid in family[1:]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return self.proc.returncode


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (read from ``/proc``; Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


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

    def start(self) -> None:
        """Start the cluster (again): 127.0.0.1 only, its port, sockets in its own directory."""
        workdir = self.datadir.parent
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={workdir} -c fsync=off"
        )
        pg_ctl = [self.binaries["pg_ctl"], "-D", str(self.datadir), "-l", str(workdir / "postgres.log")]
        _as_pg_user([*pg_ctl, "-o", opts, "-w", "-t", "60", "start"])

    def halt(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data (:meth:`start` brings it back): an outage."""
        _as_pg_user(
            [self.binaries["pg_ctl"], "-D", str(self.datadir), "-m", mode, "-w", "-t", "30", "stop"],
            check=False,
        )

    def postmaster_pid(self) -> int | None:
        """PID of the running postmaster (``postmaster.pid``), or None."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.datadir / "postmaster.pid").read_text().split()[0])
        return None

    def stop(self) -> None:
        """Stop the cluster (immediate mode) and delete its directory."""
        self.halt("immediate")
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
    postgres = Postgres(datadir=datadir, port=free_port(), user=user, binaries=binaries)
    postgres.start()
    return postgres
