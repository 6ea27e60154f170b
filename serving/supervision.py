"""A worker must not outlive the server process that started it.

BentoML (through circus) starts each worker in a session of its own (``os.setsid``), with the
listening socket inherited from the arbiter. When the arbiter dies without stopping them (``kill -9``
of the ``bentoml serve`` process or of its process group, an OOM kill), the workers went on serving,
unsupervised, on the old code, and holding the port: a restart failed with "Address already in use".
Systemd and Kubernetes kill the whole cgroup, so they never saw this; PID- or group-based supervisors
and scripts did. Neither BentoML 1.4 nor circus has an option for it, so :func:`exit_with_parent`
does it in the worker:

* on Linux, ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: the kernel sends SIGTERM the moment the parent
  dies; uvicorn then closes the listening socket at once (the port is free) and lets requests in
  flight finish;
* everywhere, a watchdog thread that polls ``os.getppid()`` every ``poll_s``: when the parent changed
  (re-parented to init or a subreaper) it sends the SIGTERM itself if the kernel did not, and if the
  process is still alive ``grace_s`` later (a drain that does not end) it exits hard.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

_logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
_installed: dict[str, object] = {}


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """``prctl(PR_SET_PDEATHSIG, signum)``; False where unsupported (not Linux, no libc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            _logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
            return False
    except (OSError, AttributeError) as exc:
        _logger.warning("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)
        return False
    return True


def exit_with_parent(poll_s: float = 0.5, grace_s: float = 40.0) -> dict[str, object]:
    """Make this process exit when its parent dies (see the module docstring). Idempotent.

    ``grace_s``: how long a SIGTERM'd orphan may drain before it exits hard (default: above the 30 s
    request deadline). Returns what was installed (``pdeathsig``, ``watchdog``, ``parent``).
    """
    if _installed:
        return dict(_installed)
    parent = os.getppid()
    pdeathsig = set_parent_death_signal(signal.SIGTERM)
    if pdeathsig and os.getppid() != parent:  # died between the two calls: the kernel will not tell
        os.kill(os.getpid(), signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        _logger.warning(
            "parent process %d is gone: this worker stops (SIGTERM: the port is released, requests in "
            "flight finish, at most %.0f s)",
            parent,
            grace_s,
        )
        if not pdeathsig:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        _logger.error("still running %.0f s after the parent died: exiting now", grace_s)
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
    _installed.update(pdeathsig=pdeathsig, watchdog=True, parent=parent)
    return dict(_installed)
