"""Helpers for the serving tests: a synthetic bundle and a real ``bentoml serve`` process.

The bundle and its images live in :mod:`export.synthetic`, the launchers (``bentoml serve``, a throw-away
PostgreSQL) in :mod:`serving.launch`, so that the benchmarks use them without importing the tests.
"""

from __future__ import annotations

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
    "png_bomb",
    "png_bytes",
    "postgres_binaries",
    "running_server",
    "start_postgres",
    "start_server",
    "wait_for_workers",
    "wait_until_ready",
]
