"""The in-worker dynamic batcher (serving/batcher.py): batches form, lone requests do not wait, the queue
is bounded, cancelled requests free their slots, failures reach every waiter."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from serving.batcher import BatcherClosed, DynamicBatcher, Overloaded


class Recorder:
    """A batch function that records the batch sizes and can be held to simulate a busy model."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait(10)
        self.sizes.append(len(x))
        return x * 2.0


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make(recorder: Recorder) -> Iterator[object]:
    made: list[DynamicBatcher] = []

    def factory(**kw: object) -> DynamicBatcher:
        args: dict[str, object] = {"max_batch_size": 8, "max_queue_delay_s": 0.5, "max_queue_items": 64}
        args.update(kw)
        b = DynamicBatcher(recorder, name="test", **args)  # type: ignore[arg-type]
        made.append(b)
        return b

    yield factory
    for b in made:
        recorder.gate.set()
        b.close()


def rows(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32).reshape(n, 1)


def test_announced_requests_share_one_call_and_get_their_own_rows(make, recorder) -> None:
    batcher = make()
    reservations = [batcher.reserve(1) for _ in range(6)]
    results: dict[int, np.ndarray] = {}

    def client(i: int) -> None:
        time.sleep(0.01 * i)  # decoding finishes at different times
        results[i] = batcher.submit(rows(10 * i, 1), reservations[i]).result(5)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert recorder.sizes == [6]  # waited for every announced request, then one call
    for i in range(6):
        np.testing.assert_array_equal(results[i], rows(10 * i, 1) * 2)


def test_a_lone_request_does_not_wait_for_the_queue_delay(make, recorder) -> None:
    batcher = make(max_queue_delay_s=2.0)
    started = time.perf_counter()
    out = batcher.run_sync(rows(0, 3))
    assert time.perf_counter() - started < 0.5
    np.testing.assert_array_equal(out, rows(0, 3) * 2)
    assert recorder.sizes == [3]


def test_the_delay_caps_the_wait_for_an_announced_request_that_never_comes(make, recorder) -> None:
    batcher = make(max_queue_delay_s=0.1)
    stuck = batcher.reserve(1)  # e.g. a request still decoding a huge upload
    started = time.perf_counter()
    batcher.run_sync(rows(0, 1))
    waited = time.perf_counter() - started
    assert 0.08 <= waited < 1.0
    stuck.release()
    assert batcher.depth == 0


def test_releasing_a_reservation_wakes_the_waiting_batch(make, recorder) -> None:
    batcher = make(max_queue_delay_s=5.0)
    failed = batcher.reserve(1)  # this request will fail to decode
    future = batcher.submit(rows(0, 1))
    time.sleep(0.05)
    assert not future.done()  # waiting for the announced item
    failed.release()
    future.result(1.0)  # runs right away instead of after 5 s
    assert recorder.sizes == [1]


def test_batches_respect_max_batch_size_and_never_split_a_request(make, recorder) -> None:
    batcher = make(max_batch_size=4, max_queue_delay_s=0.0)
    recorder.gate.clear()
    first = batcher.submit(rows(0, 1))
    assert recorder.entered.wait(2)  # the model is busy with the first call
    futures = [batcher.submit(rows(i, n)) for i, n in enumerate([3, 2, 2, 1, 6])]
    recorder.gate.set()
    first.result(2)
    outs = [f.result(2) for f in futures]
    assert [len(o) for o in outs] == [3, 2, 2, 1, 6]
    assert recorder.sizes[0] == 1
    assert all(s <= 4 for s in recorder.sizes[1:-1]) and 6 in recorder.sizes  # the 6-image request ran alone
    assert sum(recorder.sizes) == 15


def test_a_full_queue_refuses_at_once(make, recorder) -> None:
    batcher = make(max_batch_size=2, max_queue_items=4, max_queue_delay_s=0.0)
    recorder.gate.clear()
    busy = batcher.submit(rows(0, 1))
    assert recorder.entered.wait(2)
    queued = [batcher.submit(rows(i, 1)) for i in range(4)]
    started = time.perf_counter()
    with pytest.raises(Overloaded, match="queue full"):
        batcher.submit(rows(9, 1))
    with pytest.raises(Overloaded):
        batcher.reserve(1)
    assert time.perf_counter() - started < 0.1  # refused, not queued behind the busy model
    recorder.gate.set()
    for f in [busy, *queued]:
        f.result(2)
    assert batcher.depth == 0
    assert len(batcher.run_sync(rows(0, 9))) == 9  # an empty queue admits even an oversize request


def test_a_cancelled_request_frees_its_slot_and_never_runs(make, recorder) -> None:
    batcher = make(max_batch_size=8, max_queue_items=8, max_queue_delay_s=0.0)
    recorder.gate.clear()
    busy = batcher.submit(rows(0, 1))
    assert recorder.entered.wait(2)
    doomed = batcher.submit(rows(100, 8))
    assert batcher.depth == 8
    with pytest.raises(Overloaded):
        batcher.submit(rows(1, 1))
    assert doomed.cancel()
    assert batcher.depth == 0
    kept = batcher.submit(rows(1, 1))  # room again
    recorder.gate.set()
    busy.result(2)
    np.testing.assert_array_equal(kept.result(2), rows(1, 1) * 2)
    assert sum(recorder.sizes) == 2  # the cancelled 8 items were never computed


def test_cancelling_the_awaiting_task_cancels_the_queued_request(make, recorder) -> None:
    batcher = make(max_queue_delay_s=0.0)
    recorder.gate.clear()

    async def scenario() -> int:
        busy = asyncio.ensure_future(batcher.run(rows(0, 1)))
        await asyncio.sleep(0.05)
        victim = asyncio.ensure_future(batcher.run(rows(1, 5)))
        await asyncio.sleep(0.05)
        depth_before = batcher.depth
        victim.cancel()  # what a client disconnect or the request deadline does
        with pytest.raises(asyncio.CancelledError):
            await victim
        recorder.gate.set()
        await busy
        return depth_before

    assert asyncio.run(scenario()) == 5
    assert batcher.depth == 0 and recorder.sizes == [1]


def test_a_failing_call_reaches_every_waiter_and_the_batcher_goes_on() -> None:
    calls = {"n": 0}

    def flaky(x: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA error: out of memory")
        return x

    batcher = DynamicBatcher(flaky, name="flaky", max_batch_size=8, max_queue_delay_s=0.5, max_queue_items=8)
    try:
        r = [batcher.reserve(1) for _ in range(2)]
        futures = [batcher.submit(rows(i, 1), r[i]) for i in range(2)]
        for f in futures:
            with pytest.raises(RuntimeError, match="out of memory"):
                f.result(2)
        np.testing.assert_array_equal(batcher.run_sync(rows(5, 2)), rows(5, 2))
    finally:
        batcher.close()


def test_a_wrong_row_count_is_an_error_not_a_misassignment() -> None:
    batcher = DynamicBatcher(
        lambda x: x[:1], name="bad", max_batch_size=8, max_queue_delay_s=0.0, max_queue_items=8
    )
    try:
        with pytest.raises(RuntimeError, match="returned 1 rows for 2 items"):
            batcher.run_sync(rows(0, 2))
    finally:
        batcher.close()


def test_close_fails_queued_work_and_refuses_new(make, recorder) -> None:
    batcher = make(max_queue_delay_s=0.0)
    recorder.gate.clear()
    busy = batcher.submit(rows(0, 1))
    assert recorder.entered.wait(2)
    queued = batcher.submit(rows(1, 1))
    closer = threading.Thread(target=batcher.close)
    closer.start()
    with pytest.raises(BatcherClosed):
        queued.result(2)
    recorder.gate.set()
    busy.result(2)
    closer.join(5)
    with pytest.raises(BatcherClosed):
        batcher.submit(rows(0, 1))


@pytest.mark.parametrize(
    "kw",
    [
        {"max_batch_size": 0},
        {"max_queue_delay_s": -1.0},
        {"max_queue_items": 2, "max_batch_size": 4},
    ],
)
def test_invalid_settings_are_refused(kw: dict[str, float]) -> None:
    args: dict[str, float] = {"max_batch_size": 4, "max_queue_delay_s": 0.0, "max_queue_items": 8}
    args.update(kw)
    with pytest.raises(ValueError):
        DynamicBatcher(lambda x: x, name="x", **args)  # type: ignore[arg-type]


def test_metrics_hooks_see_every_batch_and_the_depth(make, recorder) -> None:
    seen: list[tuple[int, float, float]] = []
    depths: list[int] = []
    batcher = DynamicBatcher(
        recorder,
        name="hooked",
        max_batch_size=8,
        max_queue_delay_s=0.5,
        max_queue_items=16,
        on_batch=lambda n, s, w: seen.append((n, s, w)),
        on_depth=depths.append,
    )
    try:
        r = [batcher.reserve(2) for _ in range(2)]
        f = [batcher.submit(rows(0, 2), r[0])]
        time.sleep(0.05)
        f.append(batcher.submit(rows(2, 2), r[1]))
        for x in f:
            x.result(2)
        assert [n for n, _, _ in seen] == [4]
        assert seen[0][2] >= 0.04  # the oldest item waited for the second request
        assert max(depths) == 4 and depths[-1] == 0
    finally:
        batcher.close()
