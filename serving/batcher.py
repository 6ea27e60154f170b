"""An in-worker dynamic batcher: concurrent requests share one ONNX Runtime call, with no HTTP hop.

Requests hand their preprocessed arrays to :meth:`DynamicBatcher.submit` (or the awaitable
:meth:`~DynamicBatcher.run` / blocking :meth:`~DynamicBatcher.run_sync`); one thread per batcher forms
batches and runs ``fn`` (one ORT call) on each. The knobs are Triton's dynamic batcher's:

- ``max_batch_size``: items (rows) per call; a request is never split, so a request larger than the
  limit runs alone (``fn`` may chunk it);
- ``max_queue_delay_s``: how long the oldest queued item may wait for others before its batch runs;
- ``max_queue_items``: items queued or on their way at most; beyond, :class:`Overloaded` (the service
  answers 503 with ``Retry-After``), never an unbounded wait.

**Waiting only for work on its way.** A request announces its items as soon as it is admitted
(:meth:`reserve`, before its upload is decoded). The batch former waits up to ``max_queue_delay_s``
only while announced items are still being prepared; when nothing else is announced the batch runs at
once. So a lone request pays no queue delay (concurrency 1 runs at model latency), while under load
the batch fills with the requests that are decoding right now.

**Cancellation.** A request whose task is cancelled (client gone, deadline) has its
:class:`concurrent.futures.Future` cancelled by :func:`asyncio.wrap_future`; the former skips it and
its items stop counting towards ``max_queue_items`` at once.

Nothing here knows about BentoML, ORT or HTTP; it is tested on its own (``tests/test_batcher.py``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

_logger = logging.getLogger(__name__)

BatchFn = Callable[[np.ndarray], np.ndarray]
# on_batch(items, calls_seconds, oldest_wait_seconds): called after each ORT call (metrics)
BatchHook = Callable[[int, float, float], None]
DepthHook = Callable[[int], None]


class Overloaded(Exception):
    """The batcher's queue is full: retry later (HTTP 503 with ``Retry-After``)."""


class BatcherClosed(Exception):
    """The batcher was closed (the worker is shutting down)."""


@dataclass(eq=False)
class _Entry:
    items: np.ndarray
    future: cf.Future[np.ndarray]
    enqueued: float


@dataclass(eq=False)
class Reservation:
    """Items announced to the batcher before they are ready; see :meth:`DynamicBatcher.reserve`."""

    batcher: DynamicBatcher
    count: int
    open: bool = field(default=True)

    def release(self) -> None:
        """Give the announced items back (idempotent); done by :meth:`DynamicBatcher.submit` too."""
        if self.open:
            self.open = False
            self.batcher._release(self.count)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class DynamicBatcher:
    """Forms batches from concurrent submissions and runs ``fn`` once per batch in its own thread."""

    def __init__(
        self,
        fn: BatchFn,
        *,
        name: str,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_items: int,
        on_batch: BatchHook | None = None,
        on_depth: DepthHook | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay_s must be >= 0, got {max_queue_delay_s}")
        if max_queue_items < max_batch_size:
            raise ValueError(
                f"max_queue_items ({max_queue_items}) must be >= max_batch_size ({max_batch_size})"
            )
        self.fn = fn
        self.name = name
        self.max_batch_size = int(max_batch_size)
        self.max_queue_delay_s = float(max_queue_delay_s)
        self.max_queue_items = int(max_queue_items)
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._cond = threading.Condition()
        self._queue: collections.deque[_Entry] = collections.deque()
        self._queued_items = 0  # items of live (not cancelled) queued entries
        self._announced = 0  # items reserved and not yet submitted
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    # -- submitting ----------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Items queued or announced (what ``max_queue_items`` bounds)."""
        with self._cond:
            return self._queued_items + self._announced

    def reserve(self, count: int) -> Reservation:
        """Announce ``count`` items that will be submitted soon; raise :class:`Overloaded` if no room.

        Use as a context manager around the preparation, and pass it to :meth:`submit`.
        """
        with self._cond:
            self._admit(count)
            self._announced += count
            self._report_depth()
        return Reservation(self, count)

    def submit(self, items: np.ndarray, reservation: Reservation | None = None) -> cf.Future[np.ndarray]:
        """Queue ``items`` (first axis = rows); the future resolves to ``fn``'s rows for them."""
        if len(items) == 0:
            raise ValueError("submit needs at least one item")
        future: cf.Future[np.ndarray] = cf.Future()
        entry = _Entry(items, future, time.perf_counter())
        with self._cond:
            if self._closed:
                raise BatcherClosed(f"batcher {self.name} is closed")
            held = 0
            if reservation is not None and reservation.open:
                reservation.open = False
                held = reservation.count
                self._announced -= held
            try:
                self._admit(len(items) - held)
            except Overloaded:
                self._report_depth()
                raise
            self._queue.append(entry)
            self._queued_items += len(items)
            self._report_depth()
            self._cond.notify_all()
        future.add_done_callback(lambda f: self._on_done(entry, f))
        return future

    async def run(self, items: np.ndarray, reservation: Reservation | None = None) -> np.ndarray:
        """Awaitable :meth:`submit`; cancelling the awaiting task drops the items from the queue."""
        return await asyncio.wrap_future(self.submit(items, reservation))

    def run_sync(self, items: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """Blocking :meth:`submit` for sync callers (the thread waits; other threads' items batch with it)."""
        future = self.submit(items)
        try:
            return future.result(timeout)
        except cf.TimeoutError:
            future.cancel()
            raise

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting work, fail what is still queued, and join the thread."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._queued_items = 0
            self._cond.notify_all()
        for entry in pending:
            if entry.future.set_running_or_notify_cancel():
                entry.future.set_exception(BatcherClosed(f"batcher {self.name} closed"))
        self._thread.join(timeout)

    # -- internals -----------------------------------------------------------------------------------
    def _admit(self, extra: int) -> None:
        """Raise :class:`Overloaded` unless ``extra`` more items fit (caller holds the lock)."""
        if self._closed:
            raise BatcherClosed(f"batcher {self.name} is closed")
        depth = self._queued_items + self._announced
        # an empty queue always admits one request, whatever its size (it runs alone)
        if extra > 0 and depth > 0 and depth + extra > self.max_queue_items:
            raise Overloaded(f"{self.name} queue full: {depth} items waiting, limit {self.max_queue_items}")

    def _release(self, count: int) -> None:
        with self._cond:
            self._announced -= count
            self._report_depth()
            self._cond.notify_all()  # the former may be waiting for these items

    def _on_done(self, entry: _Entry, future: cf.Future[np.ndarray]) -> None:
        if future.cancelled():
            with self._cond:
                try:
                    self._queue.remove(entry)
                except ValueError:
                    return  # already taken into a batch (its rows are computed and dropped)
                self._queued_items -= len(entry.items)
                self._report_depth()
                self._cond.notify_all()

    def _report_depth(self) -> None:
        if self._on_depth is not None:
            self._on_depth(self._queued_items + self._announced)

    def _take_batch(self) -> list[_Entry] | None:
        """Wait for a batch (caller holds no lock); None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            while True:
                if self._closed:
                    break
                if self._queued_items >= self.max_batch_size or self._announced == 0:
                    break
                remaining = self._queue[0].enqueued + self.max_queue_delay_s - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
                if not self._queue:  # everything queued was cancelled meanwhile
                    return []
            batch: list[_Entry] = []
            taken = 0
            while self._queue:
                size = len(self._queue[0].items)
                if batch and taken + size > self.max_batch_size:
                    break
                entry = self._queue.popleft()
                batch.append(entry)
                taken += size
            self._queued_items -= taken
            self._report_depth()
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [e for e in batch if e.future.set_running_or_notify_cancel()]
            if not live:
                continue
            x = live[0].items if len(live) == 1 else np.concatenate([e.items for e in live])
            oldest = time.perf_counter() - min(e.enqueued for e in live)
            started = time.perf_counter()
            try:
                out = self.fn(x)
                if len(out) != len(x):
                    raise RuntimeError(f"{self.name}: fn returned {len(out)} rows for {len(x)} items")
            except Exception as exc:  # every waiter must get an answer
                _logger.exception("%s batch of %d items failed", self.name, len(x))
                for e in live:
                    e.future.set_exception(exc)
                continue
            elapsed = time.perf_counter() - started
            if self._on_batch is not None:
                try:
                    self._on_batch(len(x), elapsed, oldest)
                except Exception:  # metrics must never fail a batch
                    _logger.exception("%s batch hook failed", self.name)
            start = 0
            for e in live:
                n = len(e.items)
                e.future.set_result(out[start : start + n])
                start += n
