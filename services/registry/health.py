"""When a model is unhealthy, and how it comes back.

Two signals decide. Passively, the outcomes dispatch reports: :meth:`HealthPolicy.unhealthy` turns a
model UNHEALTHY once its recent error rate reaches a threshold over enough calls, or after a run of
consecutive failures (a timeout, ``DEADLINE_EXCEEDED``, counts as a failure). Actively, a
:class:`Prober` asks Triton's ``ModelReady`` for every model with a backend endpoint: unhealthy ones
every ``unhealthy_interval_s``, all of them every ``interval_s``. A READY answer brings a model back
(its error window is reset); a not-ready or unreachable one marks it UNHEALTHY.

The probe is a plain async function of the record (:data:`Probe`), so tests drive recovery without
Triton; :func:`triton_probe` is the real one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from constellation import tls
from constellation.tasks import BackgroundTask
from constellation.v1 import common_pb2, registry_pb2
from services.registry.stats import ModelStats

log = logging.getLogger(__name__)

Probe = Callable[[registry_pb2.ModelRecord], Awaitable[bool | None]]
"""Asks whether a model's backend serves it: True ready, False not ready or unreachable, None cannot tell
(no endpoint). Must return within its own deadline and must not raise."""


@dataclass(frozen=True)
class HealthPolicy:
    """Thresholds of the passive signal.

    Attributes:
        error_rate_threshold: Error rate over the recent window at or above which a model is unhealthy.
        min_calls: Calls the window must hold before the error rate counts.
        max_consecutive_failures: Failures in a row (timeouts included) that make a model unhealthy.
    """

    error_rate_threshold: float = 0.5
    min_calls: int = 4
    max_consecutive_failures: int = 5

    def unhealthy(self, stats: ModelStats) -> bool:
        if stats.consecutive_failures >= self.max_consecutive_failures:
            return True
        return stats.recent_calls >= self.min_calls and stats.error_rate >= self.error_rate_threshold


class TritonReadiness:
    """The real :data:`Probe`: Triton's ``ModelReady`` over gRPC (``tritonclient.grpc.aio``).

    One client per endpoint is kept open between probes. Safe for concurrent probes.

    Args:
        timeout_s: Deadline of each ``ModelReady`` call, in seconds.
    """

    def __init__(self, timeout_s: float = 1.0):
        self.timeout_s = timeout_s
        self._clients: dict[str, object] = {}

    async def __call__(self, record: registry_pb2.ModelRecord) -> bool | None:
        from tritonclient.grpc.aio import InferenceServerClient

        backend = record.backend
        if not backend.endpoint:
            return None
        client = self._clients.get(backend.endpoint)
        if client is None:
            credentials = tls.triton_credentials()  # SSL to Triton when configured
            client = InferenceServerClient(backend.endpoint, ssl=credentials is not None, creds=credentials)
            self._clients[backend.endpoint] = client
        assert isinstance(client, InferenceServerClient)
        try:
            return bool(
                await asyncio.wait_for(
                    client.is_model_ready(
                        backend.model_name or record.name, backend.model_version, client_timeout=self.timeout_s
                    ),
                    self.timeout_s + 0.5,
                )
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an unreachable Triton is an answer: not ready
            log.debug("probe of %s at %s failed: %r", record.name, backend.endpoint, exc)
            return False

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()  # type: ignore[attr-defined]


class Prober:
    """Runs the active health check in a background task on the event loop.

    Args:
        probe: The readiness check.
        records: Returns the current records (read-only use).
        apply: Called with ``(name, ready)`` for every definite answer; it decides state changes.
        interval_s: Period of the sweep over every model with a backend endpoint, in seconds.
        unhealthy_interval_s: Period of the sweep over unhealthy models only, in seconds.
    """

    def __init__(
        self,
        probe: Probe,
        records: Callable[[], list[registry_pb2.ModelRecord]],
        apply: Callable[[str, bool], None],
        *,
        interval_s: float = 10.0,
        unhealthy_interval_s: float = 1.0,
    ):
        self.probe = probe
        self.records = records
        self.apply = apply
        self.interval_s = interval_s
        self.unhealthy_interval_s = unhealthy_interval_s
        self._task = BackgroundTask("registry-prober")

    def start(self) -> None:
        """Starts the probing loop on the running loop; idempotent."""
        self._task.start(self._run())

    async def stop(self) -> None:
        """Stops the probing loop and waits until a sweep in progress has ended."""
        await self._task.stop()

    async def sweep(self, *, everything: bool) -> None:
        """Probes the unhealthy models (or all with a backend endpoint) concurrently, once."""
        unhealthy = common_pb2.MODEL_STATE_UNHEALTHY
        chosen = [r for r in self.records() if (everything and r.backend.endpoint) or r.state == unhealthy]
        if not chosen:
            return
        answers = await asyncio.gather(*(self.probe(r) for r in chosen), return_exceptions=True)
        for record, answer in zip(chosen, answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning("probe of %s raised %r; treated as not ready", record.name, answer)
                answer = False
            if answer is not None:
                self.apply(record.name, bool(answer))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_full = loop.time()
        while True:
            now = loop.time()
            everything = now >= next_full
            if everything:
                next_full = now + self.interval_s
            try:
                await self.sweep(everything=everything)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("health sweep failed")
            await asyncio.sleep(min(self.unhealthy_interval_s, self.interval_s))
