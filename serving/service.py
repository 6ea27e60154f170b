"""The BentoML service: image classification over trained + registered classes, on ONNX Runtime.

Run it with ``bentoml serve serving.service:FlatPrompt`` (configuration: :mod:`serving.config`).

Request path of a classification (all inside one worker process; no HTTP hop, no tensor encoding)::

    POST /classify (multipart) or /classify_base64 (JSON)       async API, event loop
      -> limits checked, images announced to the batcher       event loop (503 when its queue is full)
      -> read upload, decode (reduced-scale JPEG) + preprocess worker thread (own limiter)
      -> the current class index (no database access)         same thread
      -> image batcher: one ORT call for the requests queued   batcher thread (serving/batcher.py)
      -> cosine logits, optional logit adjustment, top-k       worker thread

Concurrent requests of a worker share ORT calls through :class:`serving.batcher.DynamicBatcher`
(max batch size, max queue delay, bounded queue): the batch runs at once when no other request is
being decoded, and otherwise waits at most ``FLATPROMPT_MAX_QUEUE_DELAY_MS`` for those that are.
``/register`` embeds names through a second batcher over the text tower, so concurrent
registrations share text-encoder calls too. ``docs/serving.md`` compares this design with BentoML's
distributed-services pattern (``bentoml.depends``), measured side by side.

The registry database is off the request path: a :class:`serving.registry.RegistryWatcher` thread
per worker polls its version and swaps in a new class index; classification never waits on the
database, and the calls that must (``/register``, ``/unregister``, a candidate name not known yet,
``/classes``) wait at most ``FLATPROMPT_REGISTRY_TIMEOUT_S`` (503 ``registry_unavailable`` with
``Retry-After`` beyond, and nothing committed later).

Nothing here imports torch, open_clip, the trainer or the exporter; the model comes as a bundle
(``docs/bundle.md``) read by :mod:`serving.runtime`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast

import bentoml
import numpy as np
from starlette.responses import JSONResponse

from serving import logs
from serving.config import ServeConfig, service_settings
from serving.edge import install_edge_middleware, set_readiness_probe
from serving.errors import ServeError
from serving.inputs import enforce_strict_inputs
from serving.limits import GuardMiddleware, harden_multipart_parsing, harden_protocol_errors
from serving.openapi import DocsMiddleware, openapi_document
from serving.supervision import exit_with_parent

with bentoml.importing():
    import anyio
    import anyio.to_thread

    from serving.batcher import BatcherClosed, DynamicBatcher, Overloaded, Reservation
    from serving.images import configure_pil, decode_base64, decode_image
    from serving.metrics import get_metrics
    from serving.names import clean_name, clean_template, name_key
    from serving.prototypes import auto_text_weight, blend_prototype
    from serving.registry import (
        NEEDS_EMBEDDING,
        Example,
        NewClass,
        Registry,
        RegistryError,
        RegistryFullError,
        RegistryState,
        RegistryTimeout,
        RegistryWatcher,
        Snapshot,
        StaleRow,
        StoredClass,
        call_with_deadline,
    )
    from serving.runtime.bundle import Bundle
    from serving.schemas import (
        ClassesRequest,
        ClassesResponse,
        ClassifyBase64Request,
        ClassifyRequest,
        ClassifyResponse,
        RegisterImagesRequest,
        RegisterRequest,
        RegisterResponse,
        UnregisterRequest,
        UnregisterResponse,
    )
    from serving.scoring import REGISTERED, TRAINED, ClassIndex

logs.configure()  # import time: in a worker, after BentoML configured its logging
_logger = logging.getLogger(__name__)
_SETTINGS = service_settings()  # import time: the decorators below need these
TEXT_CHUNK = 256  # prompts per text-encoder call
TEXT_GRAPHS = ("learned", "handwritten")  # the text batcher's row flag: which graph embeds the row
INLINE_SCORE_CELLS = 64 * 1024  # classes x images scored on the event loop (about 0.1 ms); more: a thread

EXAMPLE_NAMES = ["okapi", "snow leopard"]


def bundle_hash(bundle_dir: str | Path) -> str:
    """Content hash of a bundle: sha256 of its ``manifest.json`` (which lists every file's sha256)."""
    return hashlib.sha256((Path(bundle_dir) / "manifest.json").read_bytes()).hexdigest()


def resolve_bundle_dir(config: ServeConfig) -> Path:
    """The bundle directory: ``FLATPROMPT_BUNDLE`` if set, else the model-store entry ``model_tag``."""
    if config.bundle_path:
        path = Path(config.bundle_path).expanduser()
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"FLATPROMPT_BUNDLE={path} is not a bundle directory (no manifest.json)")
        return path
    return Path(bentoml.models.get(config.model_tag).path)


@dataclasses.dataclass(frozen=True)
class _Classes:
    """What a request classifies into: the index and the registered rows it was built from (swapped
    together, atomically, by the registry watcher)."""

    index: ClassIndex
    registered: dict[str, StoredClass]


def _error_response(error: ServeError) -> JSONResponse:
    if error.limit:
        get_metrics().limit_violations.labels(limit=error.limit).inc()
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


@bentoml.service(
    name="flatprompt",
    workers=_SETTINGS.workers,
    threads=_SETTINGS.threads,
    traffic={"timeout": _SETTINGS.request_timeout_s + 10},  # our own deadline (GuardMiddleware) fires first
)
class FlatPrompt:
    """Classifies images into the bundle's trained classes plus class names registered at run time.

    The docs page and ``/docs.json`` document this service from :mod:`serving.openapi`.
    """

    def __init__(self) -> None:
        self._ready = False
        self.config = ServeConfig.from_env()
        settings = self.config.service
        exit_with_parent(grace_s=settings.request_timeout_s + 10)  # no orphan worker holding the port
        limits = self.config.limits
        configure_pil(limits.max_image_pixels)
        harden_multipart_parsing()
        harden_protocol_errors()
        enforce_strict_inputs()
        self.metrics = get_metrics(self.config.service.max_batch_size)
        self.bundle_dir = resolve_bundle_dir(self.config)
        self.bundle_hash = bundle_hash(self.bundle_dir)
        started = time.perf_counter()
        self.bundle = Bundle.load(
            self.bundle_dir,
            providers=list(self.config.providers),
            verify=True,
            intra_op_threads=self.config.service.ort_threads
            or max(1, (os.cpu_count() or 1) // self.config.service.workers),
            allow_spinning=False,  # the decode threads share these cores
        )
        self.provider: str = self.bundle.provider
        self.precision: str = str(getattr(self.bundle, "precision", "fp32"))
        # how /register embeds a name unless asked otherwise: the path the exporter measured best on the toy
        # world's novel classes (manifest prompt.default_text_path), when this bundle offers it
        measured = self.bundle.manifest.default_text_path
        self.default_text_path = measured if measured in self.bundle.text_paths else "learned"
        self.provider_ok = self.config.require_provider in (None, self.provider)
        self.provider_reason = ""  # why the active provider is not the required one (/readyz, the log)
        if not self.provider_ok:
            reason = _provider_reason(
                self.provider, str(self.config.require_provider), self.bundle.gpu.reason()
            )
            _logger.error("%s: the service stays unready", reason)
            self.provider_reason = reason
        model_name = self.bundle.manifest.model.name or "unknown"
        self.metrics.model_info.labels(
            bundle_hash=self.bundle_hash[:16],
            model=model_name,
            provider=self.provider,
            precision=self.precision,
            cuda=self.bundle.cuda.get("cuda", ""),
            cudnn=self.bundle.cuda.get("cudnn", ""),
        ).set(1)
        self._trained_names = list(self.bundle.class_names)
        self._trained_keys = {name_key(n) for n in self._trained_names}
        self._foreign: dict[tuple[str, tuple[str, ...], str], np.ndarray] = {}
        self._index_lock = threading.Lock()
        self._classes = _Classes(
            ClassIndex.build(
                self._trained_names, self.bundle.class_counts, self.bundle.class_embeddings, [], version=-1
            ),
            {},
        )
        self.image_batcher, self.text_batcher = self._batchers()
        # two connections per worker: the service's (writes) and the watcher's (background reads), so a
        # write stuck on a hung database cannot hold up the checks
        self.registry = Registry.open(self.config.registry_url, settings.registry_statement_timeout_s)
        rewritten = self.registry.reembed_stale(
            self.bundle_hash, int(self.bundle.embed_dim), lambda rows: self._embed_rows(rows)
        )
        if rewritten:
            _logger.info("re-embedded %d registered classes with bundle %s", rewritten, self.bundle_hash[:12])
        self.registry_budget_s = settings.registry_timeout_s
        self.watcher = RegistryWatcher(
            Registry.open(self.config.registry_url, settings.registry_statement_timeout_s),
            self._apply_snapshot,
            poll_s=settings.registry_poll_s,
            # a background check may take longer than a request may wait: a busy machine must not make
            # the registry look down (requests still wait at most the budget for a check)
            timeout_s=max(1.5, 2 * settings.registry_timeout_s),
            on_state=self._publish_registry_state,
        )
        self.watcher.load(timeout_s=max(30.0, settings.registry_statement_timeout_s))  # must work at start
        self.watcher.start()
        self._limiter: anyio.CapacityLimiter | None = None
        self._warm_up()
        self._ready = True
        _logger.info(
            "ready in %.1f s: bundle %s (%s, %s), %d trained + %d registered classes, registry %s",
            time.perf_counter() - started,
            self.bundle_hash[:12],
            self.provider,
            self.precision,
            len(self._trained_names),
            len(self._classes.registered),
            self.registry.describe(),
        )
        set_readiness_probe(self._readiness)

    # -- probes --------------------------------------------------------------------------------
    def __is_ready__(self) -> bool:
        """Ready once the bundle is loaded on the required provider and both towers ran a warm-up.

        A stale registry does not make the worker unready (it classifies with the classes it has, and
        every replica shares the database: failing readiness everywhere at once would turn a registry
        outage into a full outage), unless ``FLATPROMPT_REGISTRY_MAX_STALENESS_S`` is set and passed.
        """
        return self._readiness()[0]

    def _readiness(self) -> tuple[bool, str, dict[str, Any]]:
        """(ready, why not, details for the ``/readyz`` body)."""
        state = self.watcher.state
        details = {"registry": {"backend": self.registry.backend, **state.as_dict()}}
        if not self._ready:
            return False, "warming up", details
        if not self.provider_ok:
            return False, self.provider_reason, details
        limit = self.config.service.registry_max_staleness_s
        if limit > 0 and state.staleness_s > limit:
            return (
                False,
                f"registry stale for {state.staleness_s:.1f} s (FLATPROMPT_REGISTRY_MAX_STALENESS_S={limit:g})",
                details,
            )
        return True, "", details

    @bentoml.on_shutdown
    def _close(self) -> None:
        set_readiness_probe(None)
        self.watcher.close()
        self.image_batcher.close()
        self.text_batcher.close()
        self.registry.close()

    def _batchers(self) -> tuple[DynamicBatcher, DynamicBatcher]:
        """One batcher per tower; each owns the thread that runs that tower's ORT calls."""
        settings = self.config.service
        metrics = self.metrics

        def hooks(tower: str) -> dict[str, Any]:
            def on_batch(items: int, seconds: float, waited: float) -> None:
                metrics.model_latency.labels(tower=tower).observe(seconds)
                metrics.batch_size.labels(tower=tower).observe(items)
                metrics.queue_wait.labels(tower=tower).observe(waited)

            gauge = metrics.queue_depth.labels(tower=tower)
            return {"on_batch": on_batch, "on_depth": gauge.set}

        image = DynamicBatcher(
            lambda x: self.bundle.embed_images(x, batch_size=max(settings.max_batch_size, len(x))),
            name="image",
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
            max_queue_items=max(settings.max_queue_items, settings.max_batch_size),
            **hooks("image"),
        )

        def text_fn(rows: np.ndarray) -> np.ndarray:
            # column 0 says which graph a row goes through (TEXT_GRAPHS); mixed batches run both
            out = np.empty((len(rows), int(self.bundle.embed_dim)), np.float32)
            for flag, path in enumerate(TEXT_GRAPHS):
                mask = rows[:, 0] == flag
                if mask.any():
                    out[mask] = self.bundle.embed_token_ids(
                        rows[mask, 1:], batch_size=TEXT_CHUNK, text_path=path
                    )
            return out

        text = DynamicBatcher(
            text_fn,
            name="text",
            max_batch_size=TEXT_CHUNK,
            max_queue_delay_s=0.0,  # no announcements: a text batch is whatever queued during the last
            max_queue_items=1 << 30,  # registrations are bounded by their own limits
            **hooks("text"),
        )
        return image, text

    # -- endpoints -----------------------------------------------------------------------------
    @bentoml.api(input_spec=ClassifyRequest)
    async def classify(
        self,
        images: list[Path],
        top_k: int = 5,
        candidates: list[str] | None = None,
        tau: float = 0.0,
    ) -> ClassifyResponse:
        """Classify uploaded image files into the top-k classes, one result per image in request order.

        A multipart form: one `images` part per file; `top_k`, `candidates` and `tau` are JSON values
        (`top_k=3`, `candidates=["red circle", "blue triangle"]`). Probabilities are a softmax over the
        classes scored (all trained and registered classes, or `candidates`).
        """
        try:
            return await self._classify(list(images), None, top_k, candidates, tau)
        except ServeError as error:
            return cast(ClassifyResponse, _error_response(error))

    @bentoml.api(input_spec=ClassifyBase64Request)
    async def classify_base64(
        self,
        images: list[str],
        top_k: int = 5,
        candidates: list[str] | None = None,
        tau: float = 0.0,
    ) -> ClassifyResponse:
        """Like `/classify`, with the images as base64 strings (or `data:` URLs) in a JSON body."""
        try:
            return await self._classify(None, images, top_k, candidates, tau)
        except ServeError as error:
            return cast(ClassifyResponse, _error_response(error))

    @bentoml.api(input_spec=RegisterRequest)
    def register(
        self,
        names: list[str],
        templates: list[str] | None = None,
        examples: dict[str, list[str]] | None = None,
        text_weight: float | None = None,
        text_path: Literal["learned", "handwritten", "ensemble"] | None = None,
    ) -> RegisterResponse:
        """Register novel class names; idempotent. Needs `Authorization: Bearer <FLATPROMPT_TOKEN>`.

        Each name is embedded with the bundle's text encoder (learned context included). With
        `templates` (each with one `{}`), the normalised embeddings of all templates are averaged and
        renormalised. `examples` maps a name to example images (base64 or `data:` URLs): the class
        prototype is then the normalised blend `text_weight * text + (1 - text_weight) * mean image
        embedding` (`text_weight` null: 1 / (1 + sqrt(K)) for K examples; 0: the images alone). Examples
        add to those already stored. Status per name: `created`, `updated`, `unchanged` or `trained`
        (already a trained class; nothing stored). Every worker sees the new classes on its next request.
        """
        try:
            decoded = None
            if examples is not None:
                cap = self.config.limits.max_example_bytes
                decoded = {
                    name: [decode_base64(item, i, cap) for i, item in enumerate(items)]
                    for name, items in examples.items()
                }
            response = self._register(names, templates, decoded, text_weight, text_path)
            return RegisterResponse.model_validate(response)
        except ServeError as error:
            return cast(RegisterResponse, _error_response(error))

    @bentoml.api(input_spec=RegisterImagesRequest)
    def register_images(
        self,
        name: str,
        images: list[Path],
        templates: list[str] | None = None,
        text_weight: float | None = None,
        text_path: Literal["learned", "handwritten", "ensemble"] | None = None,
    ) -> RegisterResponse:
        """Register (or extend) one class from example images (multipart). Needs the bearer token.

        Like `/register` with `examples={name: images}`: the prototype blends the name's text embedding
        with the mean embedding of every example stored for the class (`text_weight` 0: images alone).
        """
        try:
            uploads = {name: [_read_upload(p) for p in images]}
            response = self._register([name], templates, uploads, text_weight, text_path)
            return RegisterResponse.model_validate(response)
        except ServeError as error:
            return cast(RegisterResponse, _error_response(error))

    @bentoml.api(input_spec=UnregisterRequest)
    def unregister(self, name: str) -> UnregisterResponse:
        """Delete one registered class. Needs the bearer token; trained classes cannot be deleted (409)."""
        try:
            return UnregisterResponse.model_validate(self._unregister(name))
        except ServeError as error:
            return cast(UnregisterResponse, _error_response(error))

    @bentoml.api(input_spec=ClassesRequest)
    def classes(self, kind: Literal["all", "trained", "registered"] = "all") -> ClassesResponse:
        """List the classes: trained ones with their training counts, registered ones with templates."""
        try:
            self.watcher.refresh(self.registry_budget_s)  # the newest state, if the registry answers in time
            current = self._classes
            out: dict[str, Any] = {"registry_version": current.index.version, "bundle": self.bundle_hash[:16]}
            if kind in ("all", "trained"):
                out["trained"] = [
                    {"name": n, "count": int(c)}
                    for n, c in zip(self._trained_names, self.bundle.class_counts, strict=True)
                ]
            if kind in ("all", "registered"):
                out["registered"] = [
                    {
                        "name": c.name,
                        "templates": list(c.templates),
                        "created_at": c.created_at,
                        "examples": c.examples,
                        "text_weight": c.text_weight,
                        "text_path": c.text_path,
                    }
                    for c in current.registered.values()
                ]
            return ClassesResponse.model_validate(out)
        except ServeError as error:
            return cast(ClassesResponse, _error_response(error))

    # -- classification ------------------------------------------------------------------------
    async def _run(self, fn: Any, stop: threading.Event | None = None) -> Any:
        """Run blocking work in a worker thread, at most ``threads`` at a time per worker.

        With ``stop``, a cancelled caller (client gone, deadline) returns at once and sets ``stop``, which
        ``fn`` checks between images, so the thread ends after the image it is decoding.
        """
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.config.service.threads)
        if stop is None:
            return await anyio.to_thread.run_sync(fn, limiter=self._limiter)
        try:
            return await anyio.to_thread.run_sync(fn, limiter=self._limiter, abandon_on_cancel=True)
        except BaseException:
            stop.set()
            raise

    async def _classify(
        self,
        uploads: list[Path] | None,
        encoded: list[str] | None,
        top_k: int,
        candidates: list[str] | None,
        tau: float,
    ) -> ClassifyResponse:
        if not self.provider_ok:
            raise ServeError(
                503, "not_ready", f"model runs on {self.provider}, {self.config.require_provider} required"
            )
        limits = self.config.limits
        count = len(uploads if uploads is not None else encoded or [])
        if count == 0:
            raise ServeError(400, "no_images", "send at least one image")
        if count > limits.max_images_per_request:
            raise ServeError(
                413,
                "too_many_images",
                f"{count} images, the limit is {limits.max_images_per_request} per request",
                limit="images_per_request",
            )
        if not 1 <= top_k <= limits.max_top_k:
            raise ServeError(400, "invalid_top_k", f"top_k must be between 1 and {limits.max_top_k}")
        if not 0.0 <= tau <= limits.max_tau:
            raise ServeError(400, "invalid_tau", f"tau must be between 0 and {limits.max_tau:g}")
        if candidates is not None:
            if not candidates:
                raise ServeError(
                    400, "invalid_candidates", "candidates, when given, must name at least one class"
                )
            if len(candidates) > limits.max_candidates:
                raise ServeError(
                    413,
                    "too_many_candidates",
                    f"{len(candidates)} candidates, the limit is {limits.max_candidates}",
                    limit="candidates",
                )

        def prepare() -> tuple[np.ndarray, ClassIndex, np.ndarray | None]:
            size = int(self.bundle.image_size)
            pixels = np.empty((count, 3, size, size), np.float32)
            for i in range(count):
                if stop.is_set():
                    raise ServeError(499, "cancelled", "the client went away")
                if uploads is not None:
                    data = _read_upload(uploads[i])
                else:
                    data = decode_base64((encoded or [])[i], i, limits.max_body_bytes)
                self.metrics.image_bytes.observe(len(data))
                image = decode_image(data, i, limits.max_image_pixels, self.bundle.preprocess_config)
                pixels[i] = self.bundle.preprocess(image)
            index = self._classes.index
            rows = None
            if candidates is not None:
                names = [clean_name(c, limits.max_name_length) for c in candidates]
                try:
                    rows = index.resolve(names)
                except ServeError as exc:
                    # maybe registered a moment ago (on another worker or replica): one fresh check
                    if exc.code != "unknown_class" or not self.watcher.refresh(self.registry_budget_s):
                        raise
                    index = self._classes.index
                    rows = index.resolve(names)
            return pixels, index, rows

        stop = threading.Event()
        reservation = self._reserve(count)  # announced before decoding: the batch waits for these
        try:
            pixels, index, rows = await self._run(prepare, stop)
            embeddings = await self._encode(pixels, reservation)
        finally:
            reservation.release()

        def score() -> list[list[dict[str, object]]]:
            return index.classify(
                embeddings,
                logit_scale=float(self.bundle.logit_scale),
                logit_bias=None if self.bundle.logit_bias is None else float(self.bundle.logit_bias),
                top_k=top_k,
                tau=tau,
                rows=rows,
            )

        # scoring a small index is cheaper than a thread hop; a large one (many registered classes) is not
        small = len(index) * count <= INLINE_SCORE_CELLS
        results = score() if small else await self._run(score)
        return ClassifyResponse.build(results, index.version, self.bundle_hash[:16])

    def _reserve(self, count: int) -> Reservation:
        try:
            return self.image_batcher.reserve(count)
        except Overloaded as exc:
            raise _overloaded(str(exc)) from None
        except BatcherClosed:
            raise ServeError(503, "shutting_down", "the worker is shutting down; retry") from None

    async def _encode(self, pixels: np.ndarray, reservation: Reservation) -> np.ndarray:
        """Image embeddings ``[N, E]`` from the image batcher (shared ORT calls, no serialisation)."""
        try:
            return await self.image_batcher.run(pixels, reservation)
        except Overloaded as exc:
            raise _overloaded(str(exc)) from None
        except BatcherClosed:
            raise ServeError(503, "shutting_down", "the worker is shutting down; retry") from None

    # -- registry ------------------------------------------------------------------------------
    def _apply_snapshot(self, snapshot: Snapshot) -> None:
        """Build the class index of a registry snapshot and swap it in (the watcher's thread)."""
        with self._index_lock:
            registered: dict[str, StoredClass] = {}
            rows: list[tuple[str, np.ndarray]] = []
            for stored in snapshot.classes:
                if stored.key in self._trained_keys:
                    _logger.warning("registered class %r shadows a trained class; ignored", stored.name)
                    continue
                registered[stored.key] = stored
                rows.append((stored.name, self._usable_embedding(stored)))
            index = ClassIndex.build(
                self._trained_names,
                self.bundle.class_counts,
                self.bundle.class_embeddings,
                rows,
                snapshot.version,
            )
            self._classes = _Classes(index, registered)
            self.metrics.registry_reloads.inc()
            self.metrics.registered_classes.set(len(rows))

    def _publish_registry_state(self, state: RegistryState) -> None:
        """Gauges after every registry check (``flatprompt_registry_up`` / ``..._staleness_seconds``)."""
        self.metrics.registry_up.set(1 if state.up else 0)
        self.metrics.registry_staleness.set(state.staleness_s)
        if not state.up:
            self.metrics.registry_errors.inc()

    def _registry_call(self, fn: Any, what: str) -> Any:
        """A registry write bounded by the budget; 503 ``registry_unavailable`` (+ Retry-After) beyond.

        A write that missed the budget never commits afterwards (see :mod:`serving.registry`)."""
        try:
            return call_with_deadline(fn, self.registry_budget_s, name="registry-write", write=True)
        except RegistryFullError:
            raise
        except RegistryError as exc:
            self.metrics.registry_errors.inc()
            if not isinstance(exc, RegistryTimeout):  # a timeout is in the 503's own log line
                logs.log_limited(_logger, logging.WARNING, what, "%s not stored: %s", what, exc)
            why = (
                f"did not answer within {self.registry_budget_s:g} s"
                if isinstance(exc, RegistryTimeout)
                else "is unavailable"
            )
            raise ServeError(
                503,
                "registry_unavailable",
                f"the class registry {why}; nothing was stored, retry later",
                headers={"retry-after": "1"},
            ) from None

    def _usable_embedding(self, stored: StoredClass) -> np.ndarray:
        """The stored embedding, or (rows written by another bundle, e.g. mid rolling upgrade) a local one."""
        if stored.bundle_hash == self.bundle_hash and stored.embedding.shape == (int(self.bundle.embed_dim),):
            return stored.embedding
        cache_key = (stored.key, stored.templates, stored.bundle_hash)
        if cache_key not in self._foreign:
            examples = tuple(e.data for e in self.registry.examples(stored.key)) if stored.examples else ()
            row = StaleRow(
                stored.key, stored.name, stored.templates, stored.text_weight, examples, stored.text_path
            )
            self._foreign[cache_key] = self._embed_rows([row])[0]
        return self._foreign[cache_key]

    def _embed(
        self, names: Sequence[str], templates: Sequence[str], text_path: str = "learned"
    ) -> np.ndarray:
        """Normalised ``[N, E]`` text embeddings; several templates are averaged then renormalised.

        ``text_path``: ``learned`` (the bundle's text graph, learned context included), ``handwritten``
        (the frozen tower without it, the templates without their placeholder words) or ``ensemble``
        (the normalised mean of the two).
        """
        if text_path == "ensemble":
            both = self._embed(names, templates, "learned") + self._embed(names, templates, "handwritten")
            return both / np.maximum(np.linalg.norm(both, axis=1, keepdims=True), 1e-12)
        flag = TEXT_GRAPHS.index(text_path)
        outs = []
        for start in range(0, len(names), TEXT_CHUNK):
            chunk = list(names[start : start + TEXT_CHUNK])
            total = None
            variants: list[str | None] = list(templates) if templates else [None]
            for template in variants:
                if text_path == "learned":
                    prompts = [self.bundle.prompt_text(n, template) for n in chunk]
                else:
                    hand = self._handwritten(template)
                    prompts = [hand.format(n) for n in chunk]
                ids = self.bundle.tokenize(prompts)
                rows = np.concatenate([np.full((len(ids), 1), flag, ids.dtype), ids], axis=1)
                emb = self.text_batcher.run_sync(rows)
                total = emb if total is None else total + emb
            assert total is not None
            total /= np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)
            outs.append(total)
        return np.concatenate(outs) if outs else np.zeros((0, int(self.bundle.embed_dim)), np.float32)

    def _handwritten(self, template: str | None) -> str:
        """The hand-written prompt for the frozen text tower: a client template without the placeholder
        words a prompt-tuned bundle needs, or the bundle's hand-written template."""
        if template is None:
            return str(self.bundle.handwritten_template)
        prefix = " ".join([str(self.bundle.placeholder)] * int(self.bundle.n_ctx)) + " "
        return template.removeprefix(prefix) if int(self.bundle.n_ctx) > 0 else template

    def _text_path(self, requested: str | None, known: StoredClass | None) -> str:
        """The text path of a registration: as asked, else the class's own, else the bundle's default."""
        path = requested or (known.text_path if known is not None else self.default_text_path)
        if path not in self.bundle.text_paths:
            raise ServeError(
                400,
                "invalid_text_path",
                f"text_path {path!r} is not available with this bundle (it offers {list(self.bundle.text_paths)}); "
                "re-export it with the current `python -m export` for the hand-written paths",
            )
        return path

    def _embed_rows(self, rows: Sequence[StaleRow]) -> np.ndarray:
        """Embed stored rows (re-embedding for a new bundle): text rows grouped by templates and text path,
        rows with example images blended with them as at registration."""
        out = np.zeros((len(rows), int(self.bundle.embed_dim)), np.float32)
        groups: dict[tuple[tuple[str, ...], str], list[int]] = {}
        for i, row in enumerate(rows):
            path = row.text_path if row.text_path in self.bundle.text_paths else "learned"
            groups.setdefault((row.templates, path), []).append(i)
        for (templates, path), idx in groups.items():
            out[idx] = self._embed([rows[i].name for i in idx], templates, path)
        for i, row in enumerate(rows):
            if row.examples and row.text_weight is not None:
                pixels = self._example_pixels(list(row.examples))
                out[i] = blend_prototype(out[i], self._embed_images(pixels), row.text_weight)
        return out

    def _example_pixels(self, images: Sequence[bytes]) -> np.ndarray:
        """Decode + preprocess example images exactly as ``/classify`` does (same 4xx errors)."""
        limits = self.config.limits
        size = int(self.bundle.image_size)
        pixels = np.empty((len(images), 3, size, size), np.float32)
        for i, data in enumerate(images):
            if len(data) > limits.max_example_bytes:
                raise ServeError(
                    413,
                    "example_too_large",
                    f"example image {i} has {len(data)} bytes, the limit is {limits.max_example_bytes}",
                    limit="example_bytes",
                )
            image = decode_image(data, i, limits.max_image_pixels, self.bundle.preprocess_config)
            pixels[i] = self.bundle.preprocess(image)
        return pixels

    def _embed_images(self, pixels: np.ndarray) -> np.ndarray:
        """Image embeddings through the image batcher (register runs in a worker thread)."""
        size = int(self.config.service.max_batch_size)
        return np.concatenate(
            [self.image_batcher.run_sync(pixels[i : i + size]) for i in range(0, len(pixels), size)]
        )

    def _register(
        self,
        names: list[str],
        templates: list[str] | None,
        examples: dict[str, list[bytes]] | None = None,
        text_weight: float | None = None,
        text_path: str | None = None,
    ) -> dict[str, Any]:
        limits = self.config.limits
        if not names:
            raise ServeError(400, "no_names", "send at least one name")
        if text_weight is not None and not 0.0 <= text_weight <= 1.0:
            raise ServeError(
                400, "invalid_text_weight", "text_weight must be between 0 and 1 (or null: automatic)"
            )
        if len(names) > limits.max_names_per_registration:
            raise ServeError(
                413,
                "too_many_names",
                f"{len(names)} names, the limit is {limits.max_names_per_registration} per registration",
                limit="names_per_registration",
            )
        if templates is not None and len(templates) > limits.max_templates:
            raise ServeError(
                413,
                "too_many_templates",
                f"{len(templates)} templates, the limit is {limits.max_templates}",
                limit="templates",
            )
        tpl = tuple(
            dict.fromkeys(
                self._bundle_template(clean_template(t, limits.max_template_length)) for t in templates or []
            )
        )
        cleaned: dict[str, str] = {}
        for raw in names:
            name = clean_name(raw, limits.max_name_length)
            cleaned.setdefault(name_key(name), name)
        decoded: dict[str, np.ndarray] = {}  # example pixels by sha256, decoded once per call
        new_examples = self._new_examples(examples or {}, cleaned, decoded)
        known_rows = self._classes.registered
        results: dict[str, str] = {}
        todo: list[NewClass] = []
        need: set[int] = set()  # rows to (re-)embed; the others are expected unchanged
        for key, name in cleaned.items():
            if key in self._trained_keys:
                if key in new_examples:
                    raise ServeError(
                        409,
                        "trained_class",
                        f"{name!r} is a trained class; examples can only extend registered ones",
                    )
                results[key] = TRAINED
                continue
            known = known_rows.get(key)
            weight = text_weight if text_weight is not None or known is None else known.text_weight
            path = self._text_path(text_path, known)
            if (
                known is None
                or known.templates != tpl
                or known.bundle_hash != self.bundle_hash
                or key in new_examples
                or (known.examples and weight != known.text_weight)
                or known.text_path != path
            ):
                need.add(len(todo))
            new = NewClass(key, name, tpl, None, weight, new_examples.get(key, ()), text_path=path)
            todo.append(new)
        statuses: list[str] = []
        for _ in range(3):  # a concurrent change can turn an "unchanged" row into one to embed
            if need:
                by_path: dict[str, list[int]] = {}
                for i in sorted(need):
                    by_path.setdefault(todo[i].text_path, []).append(i)
                for path, ordered in by_path.items():
                    vectors = self._embed([todo[i].name for i in ordered], tpl, path)
                    for i, vec in zip(ordered, vectors, strict=True):
                        todo[i] = self._with_examples(
                            dataclasses.replace(todo[i], embedding=vec), text_weight, decoded
                        )
            rows = list(todo)
            try:
                statuses = self._registry_call(
                    lambda rows=rows: self.registry.upsert(
                        rows, self.bundle_hash, limits.max_registered_classes
                    ),
                    "registration",
                )
            except RegistryFullError as exc:
                raise ServeError(409, "registry_full", str(exc), limit="registered_classes") from None
            need = {i for i, status in enumerate(statuses) if status == NEEDS_EMBEDDING}
            if not need:
                break
        else:
            raise ServeError(409, "conflict", "the registry kept changing during registration; retry")
        results.update({c.key: s for c, s in zip(todo, statuses, strict=True)})
        # this worker answers with the new classes in place (the others see them within a poll interval,
        # or at once when a request names them); committed either way
        self.watcher.refresh(self.registry_budget_s, only_if_up=False)
        current = self._classes
        return {
            "classes": [
                {
                    "name": cleaned[key],
                    "status": results[key],
                    "kind": TRAINED if results[key] == TRAINED else REGISTERED,
                }
                for key in cleaned
            ],
            "registered_total": len(current.registered),
            "registry_version": current.index.version,
        }

    def _new_examples(
        self, examples: dict[str, list[bytes]], cleaned: dict[str, str], decoded: dict[str, np.ndarray]
    ) -> dict[str, tuple[Example, ...]]:
        """Example images per class key, checked (decodable, within the limits), deduplicated by sha256.

        Every image is decoded here, before anything is stored (same 4xx as /classify); the pixels go into
        ``decoded`` (by sha256) so that embedding them later does not decode them again.
        """
        limits = self.config.limits
        out: dict[str, tuple[Example, ...]] = {}
        for raw, images in examples.items():
            key = name_key(clean_name(raw, limits.max_name_length))
            if key not in cleaned:
                raise ServeError(
                    400, "invalid_examples", f"examples for {raw!r}, which is not among the names"
                )
            if not images:
                raise ServeError(400, "no_images", f"examples for {raw!r} hold no image")
            if len(images) > limits.max_examples_per_class:
                raise ServeError(
                    413,
                    "too_many_examples",
                    f"{len(images)} examples for {raw!r}, the limit is {limits.max_examples_per_class} per class",
                    limit="examples_per_class",
                )
            unique = {hashlib.sha256(data).hexdigest(): data for data in images}
            decoded.update(zip(unique, self._example_pixels(list(unique.values())), strict=True))
            out[key] = tuple(Example(sha, data) for sha, data in unique.items())
        return out

    def _with_examples(
        self, new: NewClass, text_weight: float | None, decoded: dict[str, np.ndarray]
    ) -> NewClass:
        """Blend a text-embedded class with its example images (stored ones and new ones), if it has any.

        ``decoded`` holds the pixels of images already decoded in this call (by sha256); it is filled in."""
        # read each time (a concurrent registration may have added examples), within the registry budget
        stored = self._registry_call(lambda: self.registry.examples(new.key), "registration")
        by_sha = {e.sha256: e.data for e in stored}
        by_sha.update({e.sha256: e.data for e in new.examples})
        if not by_sha:
            return dataclasses.replace(new, text_weight=None)
        limit = self.config.limits.max_examples_per_class
        if len(by_sha) > limit:
            raise ServeError(
                413,
                "too_many_examples",
                f"{new.name!r} would hold {len(by_sha)} examples, the limit is {limit} per class",
                limit="examples_per_class",
            )
        weight = text_weight if text_weight is not None else new.text_weight
        if weight is None:
            weight = auto_text_weight(len(by_sha))
        assert new.embedding is not None
        missing = [sha for sha in by_sha if sha not in decoded]
        if missing:
            decoded.update(zip(missing, self._example_pixels([by_sha[sha] for sha in missing]), strict=True))
        image = self._embed_images(np.stack([decoded[sha] for sha in by_sha]))
        return dataclasses.replace(
            new,
            embedding=blend_prototype(new.embedding, image, weight),
            text_weight=weight,
            example_set=frozenset(by_sha),
        )

    def _bundle_template(self, template: str) -> str:
        """A client template as the bundle needs it.

        A prompt-tuned bundle (``n_ctx > 0``) learned ``n_ctx`` context tokens that overwrite the first
        placeholder words of the prompt, so its templates must start with them: a client template
        without them (``"a photo of a {}."``) gets them prepended (``"X X X X a photo of a {}."``).
        """
        n_ctx = int(getattr(self.bundle, "n_ctx", 0))
        if n_ctx > 0:
            prefix = " ".join([str(self.bundle.placeholder)] * n_ctx) + " "
            if not template.startswith(prefix):
                template = prefix + template
        try:
            self.bundle.prompt_text("example", template)
        except (ValueError, IndexError, KeyError) as exc:
            raise ServeError(400, "invalid_template", f"template {template!r} is unusable: {exc}") from None
        return template

    def _unregister(self, name: str) -> dict[str, Any]:
        cleaned = clean_name(name, self.config.limits.max_name_length)
        key = name_key(cleaned)
        if key in self._trained_keys:
            raise ServeError(
                409,
                "trained_class",
                f"{cleaned!r} is a trained class; only registered classes can be deleted",
            )
        deleted = self._registry_call(lambda: self.registry.delete(key), "deletion")
        if not deleted:
            raise ServeError(404, "unknown_class", f"{cleaned!r} is not a registered class")
        self.watcher.refresh(self.registry_budget_s, only_if_up=False)
        current = self._classes
        return {
            "deleted": cleaned,
            "registered_total": len(current.registered),
            "registry_version": current.index.version,
        }

    def _warm_up(self) -> None:
        """Run both towers once (batch 1 and 2 images, a few prompts) so the first request is not slow."""
        size = int(self.bundle.image_size)
        for n in (1, 2):
            out = self.image_batcher.run_sync(np.zeros((n, 3, size, size), np.float32))
            if out.shape != (n, int(self.bundle.embed_dim)) or not np.all(np.isfinite(out)):
                raise RuntimeError(
                    f"image encoder warm-up returned {out.shape}, expected ({n}, {self.bundle.embed_dim})"
                )
        for path in self.bundle.text_paths:
            text = self._embed(EXAMPLE_NAMES, (), path)
            if text.shape != (len(EXAMPLE_NAMES), int(self.bundle.embed_dim)) or not np.all(
                np.isfinite(text)
            ):
                raise RuntimeError(f"text encoder warm-up ({path}) returned {text.shape}")


def _provider_reason(active: str, required: str, libraries: str) -> str:
    """Why the required provider is not active, and the two ways out."""
    why = libraries or "see the onnxruntime messages above in the log"
    return (
        f"the model runs on {active}, but FLATPROMPT_REQUIRE_PROVIDER={required} ({why}); fix the GPU "
        "setup (driver, CUDA libraries, --gpus for the container), or set FLATPROMPT_REQUIRE_PROVIDER=none "
        "to serve on the CPU"
    )


def _overloaded(reason: str) -> ServeError:
    return ServeError(
        503, "overloaded", f"{reason}; retry later", headers={"retry-after": "1"}, limit="queue_items"
    )


def _read_upload(path: Path) -> bytes:
    """Bytes of one uploaded file (BentoML spooled it to a per-request temp file)."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ServeError(400, "invalid_image", f"unreadable upload: {exc.strerror}") from None


def _openapi() -> dict[str, Any]:
    """The OpenAPI document of this service (``serving/openapi.py``), for the configured bundle."""
    try:
        digest = bundle_hash(resolve_bundle_dir(ServeConfig.from_env()))
    except Exception:  # no bundle: the worker does not start anyway; keep the docs page answering
        digest = "unknown"
    apis = cast(Any, FlatPrompt).apis
    return openapi_document({name: api.func.__doc__ for name, api in apis.items()}, bundle_hash=digest)


# The decorator returns a bentoml Service, which mypy sees as the plain class.
cast(Any, FlatPrompt).add_asgi_middleware(GuardMiddleware)
install_edge_middleware(FlatPrompt)  # outermost, before BentoML's own (metrics, access log)
cast(Any, FlatPrompt).add_asgi_middleware(DocsMiddleware, document=_openapi)
