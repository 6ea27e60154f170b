"""Shared fixtures: a tiny random-init open_clip model registered at run time (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_CONFIG = FIXTURES / "tiny-clip.json"
TINY_NAME = "tiny-clip"


@pytest.fixture(scope="session")
def tiny_clip():
    """A LoadedClip of the tiny config, random init with a fixed seed, frozen, eval mode."""
    import torch

    from trainer.models import load_clip, register_model_config

    register_model_config(TINY_CONFIG)
    torch.manual_seed(0)
    return load_clip(TINY_NAME)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_clip):
    import open_clip

    return open_clip.get_tokenizer(TINY_NAME)


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 for one test module (fails naming the package when missing)."""
    from tests.serving_fixtures import start_postgres

    pg = start_postgres()
    yield pg
    pg.stop()
