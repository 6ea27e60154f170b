"""Helpers for the serving tests: a synthetic bundle and a real ``bentoml serve`` process.

The bundle and its images live in :mod:`export.synthetic`, the launchers (``bentoml serve``, a throw-away
PostgreSQL) in :mod:`serving.launch`, so that the benchmarks use them without importing the tests.
"""

from __future__ import annotations

from pathlib import Path

from export.synthetic import (
    COLOURS,
    CONTEXT_LENGTH,
    COUNTS,
    EMBED_DIM,
    IMAGE_SIZE,
    MEAN,
    STD,
    TEXT_VOCAB,
    make_bundle,
    png_bomb,
    png_bytes,
)
from serving.launch import (
    REPO,
    Postgres,
    Server,
    free_port,
    postgres_binaries,
    running_server,
    start_postgres,
    start_server,
    wait_for_workers,
    wait_until_ready,
)

__all__ = [
    "COLOURS",
    "CONTEXT_LENGTH",
    "COUNTS",
    "EMBED_DIM",
    "IMAGE_SIZE",
    "MEAN",
    "REPO",
    "STD",
    "TEXT_VOCAB",
    "Postgres",
    "Server",
    "free_port",
    "make_bundle",
    "one_worker_env",
    "png_bomb",
    "png_bytes",
    "postgres_binaries",
    "running_server",
    "start_postgres",
    "start_server",
    "wait_for_workers",
    "wait_until_ready",
]


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
