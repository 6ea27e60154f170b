"""Prototype B of issue 9 (not shipped): BentoML's distributed-services pattern, measured by
``benchmarks/serve_load.py --prototype distributed``.

An API service parses, checks and decodes on CPU workers and reaches a separate ``ImageEncoder`` service
through ``bentoml.depends()``; the encoder owns the ORT session and exposes a batchable API over numpy
arrays (BentoML's adaptive batching; the dependency client sends arrays with its pickle-5 serde, raw
buffers, no base64). It lets the encoder scale apart from the API in a deployment. Only what the
comparison needs is here: trained classes, ``top_k``; no registry, no guard middleware.

``FLATPROMPT_BUNDLE=bundles/toy bentoml serve benchmarks.services.distributed:Api``
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

with bentoml.importing():
    import anyio.to_thread

    from serving.images import configure_pil, decode_image
    from serving.runtime.bundle import Bundle
    from serving.scoring import ClassIndex

_WORKERS = int(os.environ.get("FLATPROMPT_WORKERS", "1"))
_THREADS = int(os.environ.get("FLATPROMPT_THREADS", "4"))
_MAX_BATCH = int(os.environ.get("FLATPROMPT_MAX_BATCH_SIZE", "32"))


def _load(threads: int | None) -> Bundle:
    return Bundle.load(
        os.environ["FLATPROMPT_BUNDLE"],
        providers=os.environ.get("FLATPROMPT_PROVIDERS", "CUDAExecutionProvider,CPUExecutionProvider").split(
            ","
        ),
        intra_op_threads=threads,
    )


@bentoml.service(name="image_encoder", workers=1)
class ImageEncoder:
    """Owns the image tower; one process (one per GPU in a deployment)."""

    def __init__(self) -> None:
        self.bundle = _load(int(os.environ.get("FLATPROMPT_ORT_THREADS", "0")) or None)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=_MAX_BATCH, max_latency_ms=5000)
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """float32 ``[N, 3, S, S]`` -> L2-normalised ``[N, E]``."""
        return self.bundle.embed_images(pixels, batch_size=max(_MAX_BATCH, len(pixels)))


@bentoml.service(name="api", workers=_WORKERS, threads=_THREADS)
class Api:
    """Parses and decodes uploads, then calls the encoder service."""

    encoder = bentoml.depends(ImageEncoder)

    def __init__(self) -> None:
        configure_pil(50_000_000)
        self.bundle = _load(1)  # preprocessing config and class bank (its sessions stay idle)
        self.index = ClassIndex.build(
            list(self.bundle.class_names), self.bundle.class_counts, self.bundle.class_embeddings, [], 0
        )
        self.limiter: anyio.CapacityLimiter | None = None

    @bentoml.api
    async def classify(self, images: list[Path], top_k: int = 5) -> dict[str, Any]:
        """Top-k trained classes per uploaded image."""
        if self.limiter is None:
            self.limiter = anyio.CapacityLimiter(_THREADS)

        def prepare() -> np.ndarray:
            cfg = self.bundle.preprocess_config
            out = np.empty((len(images), 3, cfg.image_size, cfg.image_size), np.float32)
            for i, path in enumerate(images):
                out[i] = self.bundle.preprocess(decode_image(Path(path).read_bytes(), i, 50_000_000, cfg))
            return out

        pixels = await anyio.to_thread.run_sync(prepare, limiter=self.limiter)
        embeddings = await self.encoder.to_async.encode(pixels)
        labels = self.index.classify(
            np.asarray(embeddings, np.float32),
            logit_scale=float(self.bundle.logit_scale),
            logit_bias=self.bundle.logit_bias,
            top_k=top_k,
            tau=0.0,
            rows=None,
        )
        return {"results": [{"labels": one} for one in labels]}
