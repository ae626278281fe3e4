"""Dispatch's side of elastic capacity: what a cold model costs a request, the bounded wait for a model that
is loading, and the arrivals dispatch reports to the scaler.

- :func:`cold_start_ms`: the wait before a model can serve, from its registry record (COLD: its measured
  load time, else a size prior; LOADING: what is left of it; READY: nothing). Routing adds it to the
  model's predicted latency, so a warm model wins when a cold start would break a ceiling or deadline.
- :class:`ColdStartGate`: a call to a model that is not warm waits here while the scaler loads it
  (``EnsureReady``; one load per model per burst, however many requests wait). The wait is bounded: a
  full queue, or a deadline shorter than the expected load, turns the call away with ``Unavailable`` so
  that the strategy's fallback asks a warm model instead. While no model of the pool is warm the call
  waits regardless (a late answer beats none): a request is never dropped for want of capacity.
- :class:`ArrivalReporter`: counts every model call (each member of a fan-out, each hedge) and sends the
  counts to the scaler in one ``RecordArrivals`` per interval, off the answer's path.

Concurrency: everything here runs on dispatch's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

from prometheus_client import Counter as MetricCounter
from prometheus_client import Gauge

from constellation.errors import ConstellationError, Unavailable
from constellation.metrics import REGISTRY
from constellation.tasks import BackgroundTask
from constellation.v1 import common_pb2, registry_pb2
from services.dispatch.routing import PoolModel

log = logging.getLogger(__name__)

COLD_CALLS = MetricCounter(
    "constellation_dispatch_cold_calls_total",
    "Calls to a model that was not warm, by how they went: waited (served after a load), queue_full or "
    "too_late (turned to a warm alternative), failed (the load failed).",
    ["model", "outcome"],
    registry=REGISTRY,
)
WAITING = Gauge(
    "constellation_dispatch_cold_waiting", "Calls waiting for a model to load.", ["model"], registry=REGISTRY
)


def load_prior_ms(params_b: float) -> float:
    """Load time assumed for a model never measured, in ms: 2 s plus 150 ms per billion parameters (about
    what the replay model's simulated size classes take; 70 B when the size is unknown)."""
    size = params_b if params_b > 0 else 70.0
    return 2000.0 + 150.0 * size


def cold_start_ms(record: registry_pb2.ModelRecord | None, now_s: float) -> float:
    """The expected wait before ``record``'s model can serve a request, in ms (0: warm or unknown).

    Args:
        record: The registry's record; None (a catalog model the registry does not know) counts as warm.
        now_s: Wall-clock seconds, to tell how far a LOADING model's load has come.
    """
    if record is None or record.state not in (common_pb2.MODEL_STATE_COLD, common_pb2.MODEL_STATE_LOADING):
        return 0.0
    load_ms = record.load_time_ms or load_prior_ms(record.params_b)
    if record.state == common_pb2.MODEL_STATE_COLD:
        return load_ms
    since_s = record.state_since.ToNanoseconds() / 1e9 if record.HasField("state_since") else now_s
    return max(load_ms - (now_s - since_s) * 1000.0, 0.1 * load_ms)


class Readier(Protocol):
    """What the gate needs of the scaler: :meth:`services.scaler.client.ScalerClient.ensure_ready`."""

    async def ensure_ready(self, model: str, timeout_s: float | None = ...) -> Any: ...


class ColdStartGate:
    """Holds calls to models that are not warm until the scaler has loaded them; bounded per model.

    Args:
        scaler: Loads a model and returns once it serves (``EnsureReady``).
        cold_start_s: Expected wait before a model serves, in seconds (0: warm; see :func:`cold_start_ms`).
        any_warm: True while some model of the pool is warm (a refused call has somewhere to go).
        queue_max: Calls that may wait for one model at once.
        load_timeout_s: Deadline of one ``EnsureReady`` (a load from zero).
    """

    def __init__(
        self,
        scaler: Readier,
        cold_start_s: Callable[[str], float],
        any_warm: Callable[[], bool],
        *,
        queue_max: int = 64,
        load_timeout_s: float = 300.0,
    ) -> None:
        self.scaler = scaler
        self.cold_start_s = cold_start_s
        self.any_warm = any_warm
        self.queue_max = queue_max
        self.load_timeout_s = load_timeout_s
        self.waiting: Counter[str] = Counter()
        self._loads: dict[str, asyncio.Future[Any]] = {}

    async def admit(self, model: str, ends_at: float, deployment: str = "") -> None:
        """Returns once ``model`` can take a call that must end by ``ends_at`` (``time.perf_counter()``
        seconds): at once when it is warm, after its load when it is not.

        ``deployment`` is what the scaler loads (the Triton model serving ``model``; ``model`` itself when
        empty): waiting calls and loads are counted per deployment, so a burst over several pool models
        served by one Triton model still triggers one load.

        Raises:
            Unavailable: the queue for ``model`` is full or the load would outlast the deadline, while a
                warm model exists (the fallback goes there); or the load failed.
        """
        expected_s = self.cold_start_s(model)
        if expected_s <= 0:
            return
        target = deployment or model
        remaining_s = ends_at - time.perf_counter()
        if self.any_warm():
            if self.waiting[target] >= self.queue_max:
                COLD_CALLS.labels(target, "queue_full").inc()
                raise Unavailable(
                    f"{target} is loading and {self.queue_max} calls wait for it", reason="COLD_QUEUE_FULL"
                )
            if remaining_s < expected_s:
                COLD_CALLS.labels(target, "too_late").inc()
                raise Unavailable(
                    f"{model} is cold: its load (~{expected_s:.1f} s) would outlast the deadline ({remaining_s:.1f} s)",
                    reason="COLD_START_TOO_LONG",
                )
        await self._wait(target, max(remaining_s, 0.0))

    async def _wait(self, model: str, remaining_s: float) -> None:
        self.waiting[model] += 1
        WAITING.labels(model).inc()
        try:
            await asyncio.wait_for(asyncio.shield(self._load(model)), remaining_s)
        except ConstellationError as error:
            COLD_CALLS.labels(model, "failed").inc()
            raise Unavailable(f"{model} could not be loaded: {error.message}", reason="COLD_LOAD_FAILED") from error
        except TimeoutError as error:
            COLD_CALLS.labels(model, "failed").inc()
            raise Unavailable(f"{model} did not load within the deadline", reason="COLD_LOAD_LATE") from error
        finally:
            self.waiting[model] -= 1
            WAITING.labels(model).dec()
        COLD_CALLS.labels(model, "waited").inc()

    def _load(self, model: str) -> asyncio.Future[Any]:
        """The one ``EnsureReady`` in flight for ``model``, started by the first caller of a burst."""
        load = self._loads.get(model)
        if load is None:
            load = asyncio.ensure_future(self.scaler.ensure_ready(model, timeout_s=self.load_timeout_s))
            self._loads[model] = load
            load.add_done_callback(lambda _: self._loads.pop(model, None))
        return load

    async def close(self) -> None:
        """Cancels the loads still awaited (the scaler finishes them on its side)."""
        for load in list(self._loads.values()):
            load.cancel()
        self._loads.clear()


class ArrivalSink(Protocol):
    """What the reporter needs of the scaler: :meth:`services.scaler.client.ScalerClient.record_arrivals`."""

    async def record_arrivals(self, arrivals: Mapping[str, int], timeout_s: float | None = ...) -> int: ...


class ArrivalReporter:
    """Counts model calls and sends them to the scaler every ``interval_s`` (``RecordArrivals``).

    A failed send is logged and its counts dropped (not retried: a retried call that had landed would
    count twice, and the scaler's window forgets old arrivals anyway).

    Args:
        sink: The scaler.
        interval_s: Seconds between two sends.
    """

    def __init__(self, sink: ArrivalSink, interval_s: float = 1.0) -> None:
        self.sink = sink
        self.interval_s = interval_s
        self.pending: Counter[str] = Counter()
        self._task = BackgroundTask("dispatch-arrivals")

    def add(self, model: str, count: int = 1) -> None:
        """Counts ``count`` calls to ``model`` (never blocks)."""
        self.pending[model] += count

    def start(self) -> None:
        self._task.start(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def flush(self) -> None:
        """Sends what was counted since the last send."""
        counts, self.pending = self.pending, Counter()
        if not counts:
            return
        try:
            await self.sink.record_arrivals(dict(counts), timeout_s=2.0)
        except ConstellationError as error:
            log.warning("dispatch: could not report %d arrivals to the scaler: %s", sum(counts.values()), error)

    async def close(self) -> None:
        """Stops the loop and sends what is left."""
        await self._task.stop()
        await self.flush()


class CallCapacity:
    """What a model call passes before it leaves: it is counted for the scaler, then waits for a cold
    model's load when a gate is set. Set on :class:`~services.dispatch.generation.ModelCaller`.

    Args:
        arrivals: Counts the call (None: no scaler to tell).
        gate: Holds the call while its model loads (None: every model is taken as warm).
    """

    def __init__(self, arrivals: ArrivalReporter | None, gate: ColdStartGate | None) -> None:
        self.arrivals = arrivals
        self.gate = gate

    async def before_call(self, model: str, deployment: str, ends_at: float) -> None:
        """Counts the call for ``deployment`` (the Triton model serving ``model``: what the scaler sizes)
        and returns once ``model`` can take it (see :meth:`ColdStartGate.admit`)."""
        if self.arrivals is not None:
            self.arrivals.add(deployment or model)
        if self.gate is not None:
            await self.gate.admit(model, ends_at, deployment)


@asynccontextmanager
async def scaler_capacity(
    scaler_url: str,
    records: Callable[[], Mapping[str, registry_pb2.ModelRecord]] | None,
    any_warm: Callable[[], bool],
    *,
    queue_max: int = 64,
) -> AsyncIterator[CallCapacity]:
    """Capacity through the scaler at ``scaler_url``: arrivals reported each second and, with the registry's
    records to tell cold from warm, the gate for cold models. Closes both on exit (the last arrivals sent).

    Args:
        scaler_url: ScalerService ``host:port``.
        records: The registry's current records by name (``RegistryView.models``); None: no gate.
        any_warm: True while some model of the pool is warm.
        queue_max: Calls that may wait for one loading model.
    """
    from services.scaler.client import ScalerClient

    async with ScalerClient(scaler_url) as client:
        arrivals = ArrivalReporter(client)
        gate = None
        if records is not None:
            known = records

            def expected_s(model: str) -> float:
                return cold_start_ms(known().get(model), time.time()) / 1000.0

            gate = ColdStartGate(client, expected_s, any_warm, queue_max=queue_max)
        arrivals.start()
        try:
            yield CallCapacity(arrivals, gate)
        finally:
            if gate is not None:
                await gate.close()
            await arrivals.close()


def any_warm(pool: Callable[[], Sequence[PoolModel]]) -> Callable[[], bool]:
    """A check that some healthy model of ``pool()`` (routing's view of the pool) is warm now."""
    return lambda: any(model.healthy and model.cold_start_ms <= 0 for model in pool())
