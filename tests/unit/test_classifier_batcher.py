"""The micro-batcher: results go back to the right callers, concurrent callers share runs, errors and
overload reach every caller. Nothing here is timed."""

from __future__ import annotations

import asyncio
import threading

import pytest

from constellation.errors import ResourceExhausted, Unavailable
from services.classifier.batcher import MicroBatcher


async def test_concurrent_callers_share_batches_and_get_their_own_results() -> None:
    sizes: list[int] = []
    threads: set[str] = set()

    def double(items: list[int]) -> list[int]:
        sizes.append(len(items))
        threads.add(threading.current_thread().name)
        return [2 * i for i in items]

    async with MicroBatcher(double, max_batch=8) as batcher:
        results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
    assert results == [2 * i for i in range(20)]
    assert sum(sizes) == 20 and max(sizes) > 1 and max(sizes) <= 8
    assert threads and all(name.startswith("classifier-encoder") for name in threads)


async def test_a_failing_batch_fails_each_of_its_callers() -> None:
    def broken(items: list[int]) -> list[int]:
        raise ValueError("model exploded")

    async with MicroBatcher(broken) as batcher:
        outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(o, ValueError) for o in outcomes)
    wrong_length: MicroBatcher[int, int] = MicroBatcher(lambda items: [0])
    async with wrong_length:
        with pytest.raises(RuntimeError, match="2 items"):
            await asyncio.gather(wrong_length.submit(1), wrong_length.submit(2))


async def test_full_queue_is_resource_exhausted_and_closed_is_unavailable() -> None:
    release = threading.Event()
    running = threading.Event()

    def slow(items: list[int]) -> list[int]:
        running.set()
        release.wait(30)
        return items

    batcher = MicroBatcher(slow, max_batch=1, max_queue=2)
    with pytest.raises(Unavailable):
        await batcher.submit(1)  # not started
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(1))
    assert await asyncio.to_thread(running.wait, 30)  # the worker is busy with the first item
    waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted) as caught:
        await batcher.submit(4)
    assert caught.value.reason == "CLASSIFIER_QUEUE_FULL"
    release.set()
    assert await first == 1
    assert await asyncio.gather(*waiting) == [2, 3]
    await batcher.close()
    with pytest.raises(Unavailable):
        await batcher.submit(5)


async def test_cancelled_callers_are_dropped_from_their_batch() -> None:
    seen: list[list[int]] = []
    gate = threading.Event()
    running = threading.Event()

    def record(items: list[int]) -> list[int]:
        running.set()
        gate.wait(30)
        seen.append(list(items))
        return items

    async with MicroBatcher(record, max_batch=4) as batcher:
        blocker = asyncio.ensure_future(batcher.submit(0))
        assert await asyncio.to_thread(running.wait, 30)
        doomed = asyncio.ensure_future(batcher.submit(1))
        kept = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0)
        doomed.cancel()
        gate.set()
        assert await blocker == 0 and await kept == 2
    assert [1] not in seen and all(1 not in batch for batch in seen)
