"""The floor of ``benchmarks/serve_load.py``: a bare BentoML service that accepts the same multipart upload
as ``/classify`` and answers at once (no decode, no model), so the served figures can be read as a fraction
of what BentoML itself allows on the same cores.

``bentoml serve benchmarks.services.floor:Floor``
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bentoml


@bentoml.service(
    name="floor",
    workers=int(os.environ.get("FLATPROMPT_WORKERS", "1")),
    threads=int(os.environ.get("FLATPROMPT_THREADS", "4")),
)
class Floor:
    """Parses the upload like the real service and returns a fixed answer of the same shape."""

    @bentoml.api
    async def classify(
        self, images: list[Path], top_k: int = 5, candidates: list[str] | None = None, tau: float = 0.0
    ) -> dict[str, Any]:
        """One fixed label per uploaded file."""
        label = {"name": "floor", "kind": "trained", "probability": 1.0}
        return {"results": [{"labels": [label]} for _ in images], "registry_version": 0, "bundle": "floor"}
