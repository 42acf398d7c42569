"""The micro-batcher: batch formation, backpressure, timeouts, isolation, ordering, grouping, drain."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Iterator

import pytest

from fmlora.errors import UnknownTaskError
from server.core.batcher import MicroBatcher
from server.core.errors import InferenceError, NotReadyError, QueueFullError, RequestTimeoutError


class Recorder:
    """A batch function that doubles numbers, records every batch, and can be held or made to fail."""

    def __init__(self) -> None:
        self.batches: list[tuple[object, list[int]]] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.delay = 0.0

    def __call__(self, key: object, items: list[int]) -> list[int]:
        self.entered.set()
        self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        self.threads.add(threading.current_thread().name)
        self.batches.append((key, list(items)))
        if "bad" in items:
            raise UnknownTaskError("unknown task 'bad'")
        if "boom" in items:
            raise RuntimeError("secret internal detail")
        return [x * 2 for x in items]

    @property
    def sizes(self) -> list[int]:
        return [len(items) for _, items in self.batches]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make(recorder: Recorder) -> Iterator:
    made: list[MicroBatcher] = []

    def factory(**kwargs: object) -> MicroBatcher:
        options: dict[str, object] = {"max_batch_size": 4, "max_wait_s": 0.01, "max_queue": 64}
        options.update(kwargs)
        batcher = MicroBatcher(recorder, **options)
        batcher.start()
        made.append(batcher)
        return batcher

    yield factory
    for batcher in made:
        batcher.stop(2)


def hold(recorder: Recorder, batcher: MicroBatcher) -> None:
    """Occupy the inference thread with a full batch (it starts at once) until the gate opens."""
    recorder.gate.clear()
    recorder.entered.clear()
    batcher.submit("hold", [0] * batcher.max_batch_size)
    assert recorder.entered.wait(5)


def test_full_batches_go_without_waiting(make, recorder):
    batcher = make(max_wait_s=5.0)
    hold(recorder, batcher)
    futures = [batcher.submit("k", [i]) for i in range(8)]
    started = time.monotonic()
    recorder.gate.set()
    assert [f.result(5) for f in futures] == [[i * 2] for i in range(8)]
    assert time.monotonic() - started < 2.0  # never waited the 5 s max wait: the batches were full
    assert recorder.sizes[1:] == [4, 4]


def test_partial_batch_waits_at_most_max_wait(make, recorder):
    batcher = make(max_batch_size=100, max_wait_s=0.05)
    started = time.monotonic()
    futures = [batcher.submit("k", [i]) for i in range(3)]
    assert [f.result(5) for f in futures] == [[0], [2], [4]]
    elapsed = time.monotonic() - started
    assert recorder.sizes == [3]  # one batch: the three requests waited for each other
    assert 0.04 <= elapsed < 1.0


def test_queue_full_is_refused_with_retry_after(make, recorder):
    batcher = make(max_queue=4)
    hold(recorder, batcher)
    accepted = [batcher.submit("k", [i]) for i in range(4)]
    with pytest.raises(QueueFullError) as info:
        batcher.submit("k", [99])
    assert info.value.status_code == 429 and info.value.retry_after >= 1
    assert batcher.stats().rejected_total == 1 and batcher.queue_items == 4
    recorder.gate.set()
    assert [f.result(5) for f in accepted] == [[0], [2], [4], [6]]
    assert batcher.submit("k", [5]).result(5) == [10]  # room again after the queue drained


def test_oversized_request_is_admitted_into_an_empty_queue(make, recorder):
    batcher = make(max_queue=4, max_batch_size=4)
    assert batcher.submit("k", list(range(10))).result(5) == [i * 2 for i in range(10)]
    assert recorder.sizes == [4, 4, 2]  # split across batches, results in order


def test_timed_out_request_is_skipped_if_not_started(make, recorder):
    batcher = make()
    hold(recorder, batcher)

    async def main() -> None:
        with pytest.raises(RequestTimeoutError) as info:
            await batcher.run("k", [7, 8], timeout_s=0.05)
        assert info.value.status_code == 504

    asyncio.run(main())
    sync_future = batcher.submit("k", [9], timeout_s=0.05)
    time.sleep(0.1)
    recorder.gate.set()
    with pytest.raises(RequestTimeoutError):
        sync_future.result(5)
    assert batcher.submit("k", [1]).result(5) == [2]
    ran = [x for _, items in recorder.batches for x in items]
    assert 7 not in ran and 8 not in ran and 9 not in ran  # timed-out images never reached the model
    assert batcher.stats().timeouts_total == 2


def test_run_sync_times_out(make, recorder):
    batcher = make()
    hold(recorder, batcher)
    with pytest.raises(RequestTimeoutError):
        batcher.run_sync("k", [3], timeout_s=0.05)
    recorder.gate.set()


def test_one_bad_request_does_not_fail_its_neighbours(make, recorder):
    batcher = make(max_batch_size=8)
    hold(recorder, batcher)
    good1 = batcher.submit("k", [1, 2])
    bad = batcher.submit("k", ["bad"])
    boom = batcher.submit("k", ["boom"])
    good2 = batcher.submit("k", [3])
    recorder.gate.set()
    assert good1.result(5) == [2, 4] and good2.result(5) == [6]
    with pytest.raises(UnknownTaskError):  # the library's own error passes through (-> 422)
        bad.result(5)
    with pytest.raises(InferenceError) as info:  # anything else becomes a fixed 500 message
        boom.result(5)
    assert "secret" not in str(info.value)
    assert any(len(items) == 5 for _, items in recorder.batches)  # they were first tried together


def test_output_count_is_checked():
    batcher = MicroBatcher(lambda key, items: items[:-1], max_batch_size=4, max_wait_s=0.001)
    batcher.start()
    try:
        with pytest.raises(InferenceError, match="does not match"):
            batcher.run_sync("k", [1, 2, 3])
    finally:
        batcher.stop(1)


def test_batches_never_mix_keys_and_keep_arrival_order(make, recorder):
    batcher = make(max_batch_size=8)
    hold(recorder, batcher)
    futures = []
    for i in range(12):
        key = "v1" if i % 3 else "v2"
        futures.append((key, i, batcher.submit(key, [i])))
    recorder.gate.set()
    for _, i, future in futures:
        assert future.result(5) == [i * 2]
    for key, items in recorder.batches[1:]:
        expected_key = "v2" if items[0] % 3 == 0 else "v1"
        assert key == expected_key and all((("v2" if x % 3 == 0 else "v1") == key) for x in items)
        assert items == sorted(items)  # FIFO within a key
    # The oldest waiting request decides the next key: v2 (item 0) first, then v1.
    assert [k for k, _ in recorder.batches[1:]] == ["v2", "v1"]


def test_batch_function_runs_in_the_one_inference_thread(make, recorder):
    batcher = make(max_batch_size=2)
    seen_in_call: list[bool] = []

    async def main() -> list[list[int]]:
        loop_thread = threading.current_thread().name
        results = await asyncio.gather(*(batcher.run("k", [i]) for i in range(6)))
        assert loop_thread not in recorder.threads
        return results

    assert asyncio.run(main()) == [[i * 2] for i in range(6)]
    assert recorder.threads == {"fmlora-inference"}
    batcher.call(lambda: seen_in_call.append(batcher.in_inference_thread())).result(5)
    assert seen_in_call == [True] and not batcher.in_inference_thread()


def test_control_jobs_run_between_batches(make, recorder):
    batcher = make(max_batch_size=2)
    hold(recorder, batcher)
    order: list[str] = []
    first = batcher.submit("k", [1])
    control = batcher.call(lambda: order.append(f"control after {len(recorder.batches)} batches") or 42)
    recorder.gate.set()
    assert control.result(5) == 42 and first.result(5) == [2]
    assert order == ["control after 1 batches"]  # ran after the held batch, before the next


def test_stop_drains_queued_requests(make, recorder):
    batcher = make(max_batch_size=2)
    recorder.delay = 0.02
    futures = [batcher.submit("k", [i]) for i in range(6)]
    assert batcher.stop(timeout_s=5) is True
    assert [f.result(0) for f in futures] == [[i * 2] for i in range(6)]
    with pytest.raises(NotReadyError):
        batcher.submit("k", [1])
    assert not batcher.running


def test_stop_timeout_fails_the_leftovers(make, recorder):
    batcher = make(max_batch_size=1)
    hold(recorder, batcher)
    waiting = batcher.submit("k", [5])
    threading.Timer(0.3, recorder.gate.set).start()
    assert batcher.stop(timeout_s=0.05) is False
    with pytest.raises(NotReadyError):
        waiting.result(5)


def test_cancelled_caller_frees_its_queue_slots(make, recorder):
    batcher = make(max_queue=3)
    hold(recorder, batcher)

    async def main() -> None:
        task = asyncio.ensure_future(batcher.run("k", [1, 2, 3]))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    recorder.gate.set()
    assert batcher.submit("k", [4, 5, 6]).result(5) == [8, 10, 12]
    ran = [x for _, items in recorder.batches for x in items]
    assert 1 not in ran


def test_invalid_settings_are_refused(recorder):
    with pytest.raises(ValueError):
        MicroBatcher(recorder, max_batch_size=0)
    with pytest.raises(ValueError):
        MicroBatcher(recorder, request_timeout_s=0)


def test_an_answered_request_keeps_nothing_alive():
    """The batcher holds no reference to a request's key once answered (the engine's key is a version
    with its merged weights): reference counting frees it, no garbage collection needed."""

    class Key:
        pass

    batcher = MicroBatcher(lambda key, items: [x * 2 for x in items], max_batch_size=4, max_wait_s=0.001)
    batcher.start()
    key = Key()
    ref = weakref.ref(key)
    gc.disable()
    try:
        assert batcher.submit(key, [1, 2]).result(5) == [2, 4]
        del key
        deadline = time.monotonic() + 2  # the inference thread finishes its loop turn after answering
        while ref() is not None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert ref() is None
    finally:
        gc.enable()
        batcher.stop(1)
