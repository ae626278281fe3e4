"""Async client of ScalerService, for dispatch, the CLI (``constellation scaler status``) and the tests.

Errors come back as the library's exception tree (:mod:`constellation.errors`), never as raw ``grpc.RpcError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc

from constellation import telemetry, tls
from constellation.errors import from_rpc_error
from constellation.v1 import scaler_pb2, scaler_pb2_grpc


class ScalerClient:
    """One channel to a scaler. An async context manager; safe for concurrent calls.

    Args:
        address: ``host:port`` of the scaler service.
        traced: Add the OpenTelemetry client interceptors (propagates ``traceparent``).
    """

    def __init__(self, address: str, *, traced: bool = True):
        interceptors = telemetry.client_interceptors() if traced else []
        self.address = address
        self.channel = tls.open_channel(address, [], interceptors)  # TLS and the service key when configured
        self.stub = scaler_pb2_grpc.ScalerServiceStub(self.channel)

    async def __aenter__(self) -> ScalerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        try:
            return await method(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    async def status(self, timeout_s: float | None = 5.0) -> scaler_pb2.GetStatusResponse:
        """Every managed model's replicas, target and latest decision with its reason."""
        return await self._call(self.stub.GetStatus, scaler_pb2.GetStatusRequest(), timeout_s)  # type: ignore[no-any-return]

    async def set_dry_run(self, dry_run: bool, timeout_s: float | None = 5.0) -> bool:
        """Turns dry-run on or off; returns the mode in force."""
        response = await self._call(self.stub.SetDryRun, scaler_pb2.SetDryRunRequest(dry_run=dry_run), timeout_s)
        return bool(response.dry_run)

    async def record_arrivals(self, arrivals: Mapping[str, int] | Iterable[str], timeout_s: float | None = 5.0) -> int:
        """Reports requests sent: a mapping model -> count, or model names (one each: a fan-out's members).

        Not idempotent: a retried call that had landed counts twice.
        """
        counts = dict(arrivals) if isinstance(arrivals, Mapping) else {}
        if not isinstance(arrivals, Mapping):
            for model in arrivals:
                counts[model] = counts.get(model, 0) + 1
        request = scaler_pb2.RecordArrivalsRequest(
            arrivals=[scaler_pb2.Arrival(model=m, count=c) for m, c in counts.items()]
        )
        response = await self._call(self.stub.RecordArrivals, request, timeout_s)
        return int(response.recorded)

    async def ensure_ready(self, model: str, timeout_s: float | None = 300.0) -> scaler_pb2.EnsureReadyResponse:
        """Returns once ``model`` has a ready replica, loading it from zero if needed (counts one arrival).

        Args:
            model: The model a request is about to go to.
            timeout_s: Deadline, in seconds; a cold start takes the model's load time.
        """
        request = scaler_pb2.EnsureReadyRequest(model=model)
        return await self._call(self.stub.EnsureReady, request, timeout_s)  # type: ignore[no-any-return]
