"""Typed configuration of the serving process, read once from environment variables.

Every setting has a documented default (the ``DEFAULT`` column of ``docs/serving.md`` mirrors the
field defaults below). Nothing here imports BentoML or onnxruntime, so the module is cheap to import
from tests and from the service module at import time (where the BentoML decorator needs
``workers``, ``threads`` and the batching settings).

Environment variables (all optional):

=================================  ==========================================================
``FLATPROMPT_BUNDLE``              bundle directory; wins over the model store when set
``FLATPROMPT_MODEL_TAG``           BentoML model-store tag (default ``flatprompt:latest``)
``FLATPROMPT_REGISTRY_URL``        ``sqlite:///path.db`` or ``postgresql://...``
``FLATPROMPT_TOKEN``               bearer token for mutations; unset = mutations refused
``FLATPROMPT_PROVIDERS``           comma list of ORT providers, in preference order
``FLATPROMPT_REQUIRE_PROVIDER``    refuse readiness unless this provider is the active one; ``none``
                                   (or empty) allows any (the Bento's container sets CUDA)
``FLATPROMPT_WORKERS`` ...         see :class:`ServiceSettings`
``FLATPROMPT_MAX_*``               see :class:`Limits`
``FLATPROMPT_REGISTRY_*_S``        registry budget, poll interval, statement timeout, max staleness
``FLATPROMPT_LOG_LEVEL``           level of the ``serving`` loggers (default ``INFO``)
``FLATPROMPT_LOG_FORMAT``          ``text`` (default, BentoML's format) or ``json`` (one object a line)
=================================  ==========================================================
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

ENV_PREFIX = "FLATPROMPT_"
DEFAULT_MODEL_TAG = "flatprompt:latest"
DEFAULT_REGISTRY_URL = "sqlite:///flatprompt-registry.db"
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")

_T = TypeVar("_T")


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


@dataclass(frozen=True)
class Limits:
    """Input limits; each violation answers 4xx with the error schema and is counted in a metric."""

    max_body_bytes: int = 32 * 1024 * 1024  # whole HTTP request body (413 beyond)
    max_image_pixels: int = 50_000_000  # width*height read from the header, before decoding
    max_images_per_request: int = 16  # images in one classify call
    max_name_length: int = 128  # characters of one class name (after whitespace normalisation)
    max_names_per_registration: int = 1000  # names in one register call
    max_registered_classes: int = 10_000  # registered (novel) classes in the whole registry
    max_templates: int = 16  # prompt templates per registration
    max_template_length: int = 200  # characters of one prompt template
    max_examples_per_class: int = 16  # example images stored per registered class
    max_example_bytes: int = 4194304  # bytes of one example image (4 MiB)
    max_candidates: int = 20_000  # names in the optional candidate subset
    max_top_k: int = 100  # upper bound of top_k
    max_tau: float = 10.0  # upper bound of the logit-adjustment strength


@dataclass(frozen=True)
class ServiceSettings:
    """Process settings: BentoML's (``workers``, ``threads``, needed at import time) and the batcher's."""

    workers: int = 1  # BentoML worker processes
    threads: int = 4  # threads per worker running sync APIs concurrently
    max_batch_size: int = 32  # dynamic batching: max images per image-tower call
    max_queue_delay_ms: float = 50.0  # dynamic batching: longest wait of a queued image for others
    max_queue_items: int = 256  # images queued or being decoded per worker (503 + Retry-After beyond)
    request_timeout_s: float = 30.0  # per-request deadline (504 beyond)
    body_timeout_s: float = 5.0  # longest wait for the next chunk of a request body (408 beyond)
    max_in_flight: int = 64  # concurrent API requests per worker (429 beyond)
    ort_threads: int = 0  # ORT intra-op threads per worker; 0 = cpu_count // workers
    registry_timeout_s: float = 0.6  # longest a request waits on the registry database (503 beyond)
    registry_poll_s: float = 0.5  # interval of each worker's background registry version check
    registry_statement_timeout_s: float = 5.0  # server-side statement/lock timeout, SQLite busy timeout
    registry_max_staleness_s: float = 0.0  # readiness fails past this staleness; 0 = never (see docs)


@dataclass(frozen=True)
class ServeConfig:
    """Runtime configuration of one service worker."""

    bundle_path: str | None = None  # bundle directory (wins over model_tag)
    model_tag: str = DEFAULT_MODEL_TAG  # BentoML model-store tag of the bundle
    registry_url: str = DEFAULT_REGISTRY_URL  # registry database URL
    token: str | None = None  # bearer token for register/unregister; None = refuse mutations
    providers: tuple[str, ...] = DEFAULT_PROVIDERS  # ORT execution providers, preferred first
    require_provider: str | None = None  # readiness fails unless this provider is active
    limits: Limits = field(default_factory=Limits)
    service: ServiceSettings = field(default_factory=ServiceSettings)

    @property
    def mutations_enabled(self) -> bool:
        """True when a token is configured; without one, register/unregister answer 403."""
        return bool(self.token)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeConfig:
        """Build the configuration from ``FLATPROMPT_*`` variables (``os.environ`` by default)."""
        env = os.environ if environ is None else environ
        token = env.get(ENV_PREFIX + "TOKEN") or None
        providers = tuple(
            p.strip() for p in env.get(ENV_PREFIX + "PROVIDERS", ",".join(DEFAULT_PROVIDERS)).split(",")
        )
        providers = tuple(p for p in providers if p)
        if not providers:
            raise ConfigError(f"{ENV_PREFIX}PROVIDERS names no provider")
        return cls(
            bundle_path=env.get(ENV_PREFIX + "BUNDLE") or None,
            model_tag=env.get(ENV_PREFIX + "MODEL_TAG") or DEFAULT_MODEL_TAG,
            registry_url=env.get(ENV_PREFIX + "REGISTRY_URL") or DEFAULT_REGISTRY_URL,
            token=token,
            providers=providers,
            require_provider=_require_provider(env.get(ENV_PREFIX + "REQUIRE_PROVIDER")),
            limits=_from_env(Limits, env),
            service=_from_env(ServiceSettings, env),
        )


NO_PROVIDER_REQUIRED = frozenset({"", "none", "any"})


def _require_provider(raw: str | None) -> str | None:
    """``FLATPROMPT_REQUIRE_PROVIDER``: a provider name, or None for ``none`` / ``any`` / empty (CPU allowed)."""
    value = (raw or "").strip()
    return None if value.lower() in NO_PROVIDER_REQUIRED else value


_ZERO_ALLOWED = frozenset({"ort_threads", "max_queue_delay_ms", "registry_max_staleness_s"})


def _from_env(cls: type[_T], env: Mapping[str, str]) -> _T:
    """Fill a flat dataclass of int/float fields from ``FLATPROMPT_<FIELD_NAME_UPPER>`` variables."""
    values: dict[str, object] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is None or raw.strip() == "":
            continue
        kind: type[int] | type[float] = float if isinstance(f.default, float) else int
        try:
            value = kind(raw.strip())
        except ValueError as exc:
            raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from exc
        if value < 0 or (value == 0 and f.name not in _ZERO_ALLOWED):
            raise ConfigError(f"{ENV_PREFIX}{f.name.upper()} must be positive, got {raw!r}")
        values[f.name] = value
    return cls(**values)


def service_settings(environ: Mapping[str, str] | None = None) -> ServiceSettings:
    """The import-time subset of the configuration (used by the BentoML decorators)."""
    return _from_env(ServiceSettings, os.environ if environ is None else environ)
