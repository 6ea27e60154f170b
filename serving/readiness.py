"""Why this worker is not ready, in words: ``/readyz`` answers them in its 503 body.

BentoML's ``__is_ready__`` hook can only say yes or no; an operator (and a load balancer's log) needs
the reason. The service records each condition under a key (:func:`set_reason`, ``None`` clears it) and
:class:`serving.limits.GuardMiddleware` answers ``GET /readyz`` with 503
``{"error": "not_ready", "message": ...}`` while any is set. One worker process, one set of reasons.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_reasons: dict[str, str] = {}


def set_reason(key: str, reason: str | None) -> None:
    """Record (or, with ``None``, clear) why the worker is not ready."""
    with _lock:
        if reason:
            _reasons[key] = reason
        else:
            _reasons.pop(key, None)


def reasons() -> list[str]:
    """The current reasons, in the order they were first set."""
    with _lock:
        return list(_reasons.values())
