"""Async clients of RegistryService, for dispatch, the CLI and the tests.

* :class:`RegistryClient`: one channel, one method per RPC.
* :class:`RegistryView`: a live local copy of the pool, kept current by a background WatchModels
  stream that reconnects with backoff.
* :class:`OutcomeReporter`: fire-and-forget batching of call outcomes; it never blocks or fails its
  caller, and counts what it had to drop.

Errors come back as the library's exception tree (:mod:`constellation.errors`): an unknown model as
``NotFound``, a bad record as ``InvalidArgument`` with its field violations, an unreachable registry
as ``Unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence

from constellation.channel import ServiceClient, server_stream
from constellation.errors import DeadlineExceeded
from constellation.tasks import BackgroundTask
from constellation.v1 import common_pb2, registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

Change = registry_pb2.WatchModelsResponse.Change


class RegistryClient(ServiceClient[registry_pb2_grpc.RegistryServiceStub]):
    """One channel to a registry server (see :class:`~constellation.channel.ServiceClient`)."""

    stub_class = registry_pb2_grpc.RegistryServiceStub

    async def register(
        self, record: registry_pb2.ModelRecord, timeout_s: float | None = 5.0
    ) -> registry_pb2.ModelRecord:
        """Adds or replaces a record (learned quality and statistics are kept); returns the stored one."""
        response = await self.stub.RegisterModel(registry_pb2.RegisterModelRequest(model=record), timeout=timeout_s)
        return response.model

    async def deregister(self, name: str, timeout_s: float | None = 5.0) -> None:
        """Removes a record. Raises ``NotFound`` for an unknown name."""
        await self.stub.DeregisterModel(registry_pb2.DeregisterModelRequest(name=name), timeout=timeout_s)

    async def get(self, name: str, timeout_s: float | None = 5.0) -> registry_pb2.ModelRecord:
        """One record. Raises ``NotFound`` (listing the known names) for an unknown one."""
        response = await self.stub.GetModel(registry_pb2.GetModelRequest(name=name), timeout=timeout_s)
        return response.model

    async def list(
        self, state: int = 0, required_capabilities: Sequence[str] = (), timeout_s: float | None = 5.0
    ) -> list[registry_pb2.ModelRecord]:
        """Records by name, filtered by ``state`` (a ``ModelState``; 0 any) and capabilities (all required)."""
        request = registry_pb2.ListModelsRequest(state=state, required_capabilities=list(required_capabilities))  # type: ignore[arg-type]
        response = await self.stub.ListModels(request, timeout=timeout_s)
        return list(response.models)

    async def report(self, outcomes: Iterable[registry_pb2.Outcome], timeout_s: float | None = 5.0) -> int:
        """Sends a batch of outcomes; returns how many the registry accepted (unknown models are not)."""
        request = registry_pb2.ReportOutcomeRequest(outcomes=list(outcomes))
        response = await self.stub.ReportOutcome(request, timeout=timeout_s)
        return int(response.accepted)

    async def report_state(
        self, model: str, state: int, *, load_time_ms: float = 0.0, replicas: int = 0, timeout_s: float | None = 5.0
    ) -> Sequence[registry_pb2.ModelRecord]:
        """Reports a capacity change (``MODEL_STATE_COLD``, ``_LOADING`` or ``_READY``) of a model, or of a
        backend model and so every record it serves, with the measured load time when a load from zero
        just finished; returns the records after it. Idempotent."""
        request = registry_pb2.ReportModelStateRequest(
            model=model,
            state=state,  # type: ignore[arg-type]
            load_time_ms=load_time_ms,
            replicas=replicas,
        )
        response = await self.stub.ReportModelState(request, timeout=timeout_s)
        return list(response.models)

    def watch(self) -> AsyncGenerator[registry_pb2.WatchModelsResponse, None]:
        """The WatchModels stream: the snapshot, CHANGE_SNAPSHOT_END, then changes until cancelled.

        Raises:
            constellation.errors.ConstellationError: the stream ended (``ResourceExhausted`` when this
                reader fell too far behind; ``Unavailable`` when the registry went away).
        """
        return server_stream(lambda: self.stub.WatchModels(registry_pb2.WatchModelsRequest()))


class RegistryView:
    """The pool as the registry sees it, kept current in the background. An async context manager.

    ``models`` maps name -> record and is replaced wholesale after each (re)connection's snapshot, then
    updated change by change. While the registry is unreachable the last known records stay (stale
    but usable) and the view reconnects with exponential backoff. Use it from one event loop.

    Args:
        address: ``host:port`` of the registry.
        on_change: Called with ``(change, record)`` after each change is applied (snapshot records
            included); must not block.
        min_backoff_s: First reconnection delay, in seconds; doubles up to ``max_backoff_s``.
    """

    def __init__(
        self,
        address: str,
        *,
        on_change: Callable[[int, registry_pb2.ModelRecord], None] | None = None,
        min_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
    ):
        self.address = address
        self.on_change = on_change
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.models: dict[str, registry_pb2.ModelRecord] = {}
        self.connected = False
        self.reconnects = 0
        self._ready = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task = BackgroundTask("registry-view")

    async def __aenter__(self) -> RegistryView:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        self._task.start(self._run())

    async def close(self) -> None:
        await self._task.stop()

    async def ready(self, timeout_s: float | None = None) -> None:
        """Waits until the first snapshot is in.

        Raises:
            DeadlineExceeded: no snapshot within ``timeout_s`` seconds.
        """
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(f"no snapshot from the registry at {self.address} within {timeout_s} s") from None

    async def wait_for(
        self, predicate: Callable[[dict[str, registry_pb2.ModelRecord]], bool], timeout_s: float
    ) -> None:
        """Waits until ``predicate(models)`` holds (checked after every change).

        Raises:
            DeadlineExceeded: it did not hold within ``timeout_s`` seconds.
        """
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self.models)), timeout_s)
            except TimeoutError:
                raise DeadlineExceeded(f"the registry view did not reach the condition in {timeout_s} s") from None

    def healthy(self) -> list[registry_pb2.ModelRecord]:
        """The READY records, by name."""
        return [r for _, r in sorted(self.models.items()) if r.state == common_pb2.MODEL_STATE_READY]

    async def _apply(self, change: int, record: registry_pb2.ModelRecord) -> None:
        if change == registry_pb2.WatchModelsResponse.CHANGE_REMOVED:
            self.models.pop(record.name, None)
        else:
            self.models[record.name] = record
        if self.on_change is not None:
            self.on_change(change, record)
        async with self._changed:
            self._changed.notify_all()

    async def _run(self) -> None:
        backoff = self.min_backoff_s
        while True:
            try:
                async with RegistryClient(self.address, traced=False) as client:
                    snapshot: dict[str, registry_pb2.ModelRecord] = {}
                    in_snapshot = True
                    async for message in client.watch():
                        if in_snapshot:
                            if message.change == registry_pb2.WatchModelsResponse.CHANGE_SNAPSHOT:
                                snapshot[message.model.name] = message.model
                                continue
                            if message.change == registry_pb2.WatchModelsResponse.CHANGE_SNAPSHOT_END:
                                in_snapshot = False
                                self.models = snapshot
                                self.connected = True
                                backoff = self.min_backoff_s
                                self._ready.set()
                                for record in snapshot.values():
                                    if self.on_change is not None:
                                        self.on_change(registry_pb2.WatchModelsResponse.CHANGE_SNAPSHOT, record)
                                async with self._changed:
                                    self._changed.notify_all()
                                continue
                        await self._apply(message.change, message.model)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("registry watch at %s ended (%s); reconnecting in %.1fs", self.address, exc, backoff)
            self.connected = False
            self.reconnects += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)


class OutcomeReporter:
    """Batches outcomes to ReportOutcome in the background. An async context manager.

    :meth:`report` never blocks and never raises: outcomes queue up (at most ``max_queue``) and go out
    every ``flush_interval_s`` or as soon as ``max_batch`` are waiting. When the queue is full, or a
    batch cannot be delivered within ``timeout_s`` (the registry is down), the outcomes are dropped
    and counted in ``dropped``. Use it from one event loop.

    Args:
        address: ``host:port`` of the registry.
        flush_interval_s: Longest an outcome waits before it is sent, in seconds.
        max_batch: Most outcomes per call; a full batch is sent at once.
        max_queue: Most outcomes waiting.
        timeout_s: Deadline of one ReportOutcome call, in seconds.
    """

    def __init__(
        self,
        address: str,
        *,
        flush_interval_s: float = 0.2,
        max_batch: int = 64,
        max_queue: int = 4096,
        timeout_s: float = 2.0,
    ):
        self.client = RegistryClient(address, traced=False)
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.sent = 0
        self.accepted = 0
        self.dropped = 0
        self._queue: list[registry_pb2.Outcome] = []
        self._full = asyncio.Event()
        self._task = BackgroundTask("outcome-reporter")

    async def __aenter__(self) -> OutcomeReporter:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        self._task.start(self._run())

    def report(self, outcome: registry_pb2.Outcome) -> None:
        """Queues one outcome; drops it (counted) when ``max_queue`` are already waiting."""
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            return
        self._queue.append(outcome)
        if len(self._queue) >= self.max_batch:
            self._full.set()

    async def flush(self) -> None:
        """Sends everything queued now, in batches of ``max_batch``."""
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                self.accepted += await self.client.report(batch, timeout_s=self.timeout_s)
                self.sent += len(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.dropped += len(batch)
                log.debug("dropped %d outcomes: %s", len(batch), exc)

    async def close(self) -> None:
        """Stops the background task, sends what is queued (each call within ``timeout_s``), closes."""
        await self._task.stop()
        await self.flush()
        await self.client.close()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self.flush_interval_s)
            self._full.clear()
            await self.flush()
