"""Dispatch's health follows Triton's: a periodic liveness check sets the gRPC health status.

Liveness, not readiness: under Triton's strict readiness the server reads "not ready" while any one model
is loading or unloaded, and dispatch can still serve the others (a model that is missing is a per-model
NOT_FOUND, replaced by a fallback).

A load balancer reading ``grpc.health.v1`` stops sending while Triton is unreachable (NOT_SERVING) and
resumes when it answers again (SERVING); meanwhile :class:`~services.dispatch.pipeline.Dispatcher`
fails requests fast with UNAVAILABLE, a code callers retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

log = logging.getLogger(__name__)


class LivenessProbe(Protocol):
    """What the watch needs of Triton: :meth:`constellation.triton.TritonClient.server_live`."""

    url: str

    async def server_live(self) -> bool: ...


class TritonWatch:
    """Asks Triton whether it is live every ``interval_s`` and reports each change.

    Args:
        triton: The Triton client (its ``server_live`` never raises and is bounded by its control timeout).
        on_change: Called with True (live) or False (unreachable) at the first check and whenever the
            answer changes.
        interval_s: Seconds between checks.
    """

    def __init__(
        self, triton: LivenessProbe, on_change: Callable[[bool], Awaitable[None]], *, interval_s: float
    ) -> None:
        self.triton = triton
        self.on_change = on_change
        self.interval_s = interval_s
        self.ready: bool | None = None

    async def check(self) -> bool:
        """One check; reports the answer when it differs from the last one."""
        ready = await self.triton.server_live()
        if ready != self.ready:
            if self.ready is not None or not ready:
                log.log(
                    logging.INFO if ready else logging.WARNING,
                    "Triton at %s is %s",
                    self.triton.url,
                    "reachable again" if ready else "unreachable: dispatch is NOT_SERVING",
                )
            self.ready = ready
            await self.on_change(ready)
        return ready

    async def run(self) -> None:
        """Checks until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)
