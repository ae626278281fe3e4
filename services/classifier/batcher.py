"""Micro-batching: concurrent requests share one run of a CPU-bound batch function, off the event loop.

Callers ``await batcher.submit(item)``; one worker task collects queued items into a batch (up to
``max_batch``), runs ``run(batch)`` in a single-thread executor, and hands each caller its result. While
a batch runs, new items queue up, so under load batches fill by themselves ("continuous batching");
when the previous batch held more than one item, the worker also lingers up to ``max_wait_s`` for
stragglers. An idle service therefore adds no wait to a lone request.

A caller that is cancelled (its RPC deadline passed) before its batch starts is dropped from it. The
queue is bounded: :meth:`MicroBatcher.submit` raises ``ResourceExhausted`` when it is full, so overload
turns into fast errors instead of unbounded latency.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from prometheus_client import Histogram

from constellation.errors import ResourceExhausted, Unavailable
from constellation.metrics import REGISTRY
from constellation.tasks import BackgroundTask

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

BATCH_SIZE = Histogram(
    "constellation_classifier_batch_size",
    "Items per encoder batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "constellation_classifier_batch_seconds",
    "Wall time of one encoder batch.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)


class MicroBatcher(Generic[T, R]):
    """Runs ``run`` over batches of submitted items, one batch at a time, in a worker thread.

    Args:
        run: Maps a list of items to a list of results of the same length and order. Runs in the
            executor thread; may raise (every caller of that batch gets the exception).
        max_batch: Most items per batch.
        max_wait_s: How long the worker lingers for more items when the last batch was not a singleton.
        max_queue: Most items waiting; beyond it ``submit`` raises ``ResourceExhausted``.
        name: For logs, metrics and the executor thread's name.

    Use as an async context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        max_queue: int = 1024,
        name: str = "encoder",
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.name = name
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"classifier-{name}")
        self._worker = BackgroundTask(f"batcher-{name}")
        self._last_size = 0

    async def __aenter__(self) -> MicroBatcher[T, R]:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        """Starts the worker task on the running loop. Idempotent."""
        self._worker.start(self._work())

    async def close(self) -> None:
        """Stops the worker, fails waiting callers with ``Unavailable``, and shuts the executor down."""
        await self._worker.stop()
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(Unavailable("the classifier is shutting down", retry_after_s=1.0))
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, item: T) -> R:
        """Queues ``item`` and waits for its result.

        Raises:
            ResourceExhausted: the queue already holds ``max_queue`` items.
            Unavailable: the batcher is not running.
            Exception: whatever ``run`` raised for this item's batch.
        """
        if not self._worker.running:
            raise Unavailable("the classifier's encoder is not running", retry_after_s=1.0)
        if self._queue.qsize() >= self.max_queue:
            raise ResourceExhausted(
                f"the classifier's encoder queue is full ({self.max_queue} waiting); retry later",
                reason="CLASSIFIER_QUEUE_FULL",
            )
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    def _drain(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        while len(batch) < self.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _collect(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch = [await self._queue.get()]
        await asyncio.sleep(0)  # let requests that arrived in the same loop turn enqueue
        self._drain(batch)
        if self._last_size > 1 and len(batch) < self.max_batch and self.max_wait_s > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
                self._drain(batch)
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [(item, future) for item, future in batch if not future.done()]
            self._last_size = len(live)
            if not live:
                continue
            BATCH_SIZE.observe(len(live))
            started = loop.time()
            try:
                results = await loop.run_in_executor(self._executor, self._run, [item for item, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} items")
            except asyncio.CancelledError:
                for _, future in live:
                    if not future.done():
                        future.set_exception(Unavailable("the classifier is shutting down", retry_after_s=1.0))
                raise
            except Exception as exc:
                log.exception("%s batch of %d failed", self.name, len(live))
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                BATCH_SECONDS.observe(loop.time() - started)
            for (_, future), result in zip(live, results, strict=True):
                if not future.done():
                    future.set_result(result)
