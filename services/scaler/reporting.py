"""Where the scaler tells the mesh what capacity it made: model states and measured load times.

The registry keeps each model COLD (no replica), LOADING (a load from zero runs) or READY (warm), with an
exponentially weighted mean of the load times the scaler measured; dispatch routes on both (a cold model's
predicted latency includes its load time). No gRPC here beyond the registry's client.
"""

from __future__ import annotations

import logging
from typing import Literal, Protocol

from constellation.errors import ConstellationError
from constellation.v1 import common_pb2
from services.registry.client import RegistryClient

log = logging.getLogger(__name__)

Capacity = Literal["cold", "loading", "ready"]

STATES: dict[Capacity, int] = {
    "cold": common_pb2.MODEL_STATE_COLD,
    "loading": common_pb2.MODEL_STATE_LOADING,
    "ready": common_pb2.MODEL_STATE_READY,
}


class StateReporter(Protocol):
    """Receives the scaler's capacity changes; must not raise (a lost report is logged, never fatal)."""

    async def report(self, model: str, state: Capacity, *, load_time_s: float = 0.0, replicas: int = 0) -> None: ...


class NoReports:
    """Reports nowhere (a scaler without a registry)."""

    async def report(self, model: str, state: Capacity, *, load_time_s: float = 0.0, replicas: int = 0) -> None:
        return None


class RegistryStates:
    """Reports capacity changes to the registry (``ReportModelState``), each with a short deadline.

    Args:
        client: An open registry client (the caller closes it).
        timeout_s: Deadline of one report, in seconds.
    """

    def __init__(self, client: RegistryClient, timeout_s: float = 2.0) -> None:
        self.client = client
        self.timeout_s = timeout_s

    async def report(self, model: str, state: Capacity, *, load_time_s: float = 0.0, replicas: int = 0) -> None:
        try:
            await self.client.report_state(
                model, STATES[state], load_time_ms=load_time_s * 1000.0, replicas=replicas, timeout_s=self.timeout_s
            )
        except ConstellationError as error:
            log.warning("scaler: could not report %s %s to the registry: %s", model, state, error.message)
